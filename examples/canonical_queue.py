"""The canonical ``queue`` example: run a task and wait for its result.

``client.queue(func, args)`` sends ``func`` and its arguments to the network and blocks
(only the calling greenlet) until the result is back. A task's exception is re-raised by
``queue`` as the same exception type, with the worker's traceback attached as its
``__cause__``.

Run it with ``python examples/canonical_queue.py``: it starts a small network of its own
on loopback (a manager and one worker node) and stops it at the end. To use a network
that is already running instead, give its manager's address (and key, if it has one)::

    python examples/canonical_queue.py --connect 127.0.0.1:8000 --key-file argon.key
"""

from __future__ import annotations

import argparse

from _network import add_network_options, network


def fails(key: str) -> object:
    """A task that raises: looks up a key that is not there."""
    return {"present": 1}[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The canonical queue example.")
    add_network_options(parser)
    args = parser.parse_args(argv)

    with network(args) as client:
        result = client.queue(lambda x, y: x + y, [4, 7])
        print(f"client.queue(lambda x, y: x + y, [4, 7]) = {result}")

        try:
            client.queue(fails, ["missing"])
        except KeyError as exc:
            print(f"client.queue(fails, ['missing']) raised KeyError({exc})")
            remote = str(exc.__cause__).strip().splitlines()
            print(f"  the worker's traceback is its __cause__, ending: {remote[-1]}")


if __name__ == "__main__":
    main()
