"""Count the words of a folder of text files: one task per file, results merged.

The client reads each file and sends its *text* (not its path: a worker on another
host cannot read this machine's files) to a task that counts its words; the per-file
``Counter`` objects are merged as they come back, and the ten most common words are
printed. Words are runs of letters and digits (with inner apostrophes, as in "don't"),
compared case-insensitively.

Run it with ``python examples/word_count.py [FOLDER] [--pattern GLOB]``. Files under
FOLDER (recursively) whose names match GLOB (default ``*.txt``) are counted; without a
FOLDER, a small built-in sample is written to a temporary folder and counted. It starts
a small network of its own on loopback (a manager and two worker nodes) and stops it at
the end. To use a network that is already running instead::

    python examples/word_count.py FOLDER --connect 127.0.0.1:8000 --key-file argon.key
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from _network import add_network_options, network

SAMPLE = {
    "hamlet.txt": """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them.""",
    "macbeth.txt": """Tomorrow, and tomorrow, and tomorrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death.""",
    "sonnets/18.txt": """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date.""",
    "tempest.txt": """We are such stuff
As dreams are made on, and our little life
Is rounded with a sleep.""",
}


def count_words(text: str) -> Counter[str]:
    """The task: count the words of one file's text."""
    return Counter(re.findall(r"[^\W_]+(?:'[^\W_]+)*", text.lower()))


@contextlib.contextmanager
def folder_to_count(folder: Path | None) -> Iterator[Path]:
    """The folder given, or a temporary one holding the built-in sample."""
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="argon-words-") as tmp:
        for name, text in SAMPLE.items():
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
        print(f"no folder given: counting a built-in sample of {len(SAMPLE)} files in {tmp}")
        yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Count the words of a folder of text files.")
    parser.add_argument("folder", nargs="?", type=Path, help="folder to count (default: a built-in sample)")
    parser.add_argument("--pattern", default="*.txt", help="file names to count (default: *.txt)")
    parser.add_argument("--top", type=int, default=10, help="most common words to print (default: 10)")
    add_network_options(parser)
    args = parser.parse_args(argv)
    if args.folder is not None and not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")

    with folder_to_count(args.folder) as folder:
        files = sorted(path for path in folder.rglob(args.pattern) if path.is_file())
        if not files:
            sys.exit(f"no files matching {args.pattern} under {folder}")
        with network(args, nodes=2, workers=2) as client:
            started = time.perf_counter()
            deferreds = [
                client.defer(count_words, [path.read_text(encoding="utf-8", errors="replace")]) for path in files
            ]
            counts: Counter[str] = Counter()
            for deferred in deferreds:
                counts.update(deferred())
            elapsed = time.perf_counter() - started

    total = sum(counts.values())
    print(f"{total:,} words ({len(counts):,} distinct) in {len(files)} files, one task each, in {elapsed:.2f}s")
    print(f"top {args.top} words:")
    # Sorted by count, then alphabetically, so that ties print the same way every time.
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: args.top]:
        print(f"{count:8,}  {word}")


if __name__ == "__main__":
    main()
