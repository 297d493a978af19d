"""Packaging for Argon: ``pip install .`` installs the package and the ``argon`` command."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version: dict[str, str] = {}
exec((HERE / "argon" / "_version.py").read_text(), version)

setup(
    name="argon-tasks",
    version=version["__version__"],
    description="A distributed task-processing network for Python: managers, workers and clients on gevent.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["argon", "argon.*"]),
    package_data={"argon": ["py.typed", "dashboard.html"]},
    scripts=[],
    entry_points={"console_scripts": ["argon = argon.cli:run"]},
    python_requires=">=3.10",
    install_requires=[
        "gevent>=23.9",
        "msgpack>=1.0",
        "dill>=0.3.8",
        "docopt-ng>=0.9",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "tqdm>=4.60",
            "prometheus_client>=0.17",
            "joblib>=1.3",
            "scikit-learn>=1.3",
        ],
        "joblib": ["joblib>=1.3"],
        "lint": ["ruff>=0.5", "mypy>=1.8"],
        "progress": ["tqdm>=4.60"],
        "metrics": ["prometheus_client>=0.17"],
        # The baselines of bench/run.py (tested with matplotlib 3.11, dask 2026.8, ray 2.60,
        # celery 5.7 and redis 8.1 on Python 3.11); the Celery baseline also needs the
        # redis-server program, which pip cannot install (Debian: apt-get install redis-server).
        "bench": ["matplotlib>=3.7", "dask[distributed]>=2024.1", "ray>=2.9", "celery[redis]>=5.3", "redis>=5.0"],
        "docs": ["sphinx>=7.2,<10", "myst-parser>=2.0,<6", "furo>=2024.1.29"],
    },
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: System :: Distributed Computing",
    ],
)
