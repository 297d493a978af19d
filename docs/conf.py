"""Sphinx configuration for the Argon documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` after
``pip install -r docs/requirements.txt`` (or ``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

_version: dict[str, str] = {}
exec((ROOT / "argon" / "_version.py").read_text(), _version)

project = "Argon for Python"
author = "The Argon for Python developers"
copyright = "2026, The Argon for Python developers (MIT licence)"
release = _version["__version__"]
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "requirements.txt", "Thumbs.db", ".DS_Store"]

# Markdown: ```{directive} fences, "name: value" definition lists, and anchors for
# headings down to level 3 so pages can link to page.md#a-section.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference from the docstrings (Google style).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Every cross-reference must resolve, except to the standard library and gevent,
# which are not part of this site (there is no network access for intersphinx).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(ssl|os|collections\.abc|typing|gevent|types|concurrent\.futures|multiprocessing|asyncio|joblib)\..*"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Exception|BaseException|TimeoutError|ConnectionError)"),
]

pygments_style = "sphinx"
html_title = f"Argon for Python {release}"
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_static_path: list[str] = []
