"""The canonical ``defer`` example: send a task now, collect its result later.

``client.defer(func, args)`` sends the task and returns a ``Deferred`` at once; calling
the deferred waits for the result. A task's exception is not raised by ``defer``: it is
raised when (and every time) the deferred is called.

Run it with ``python examples/canonical_defer.py``: it starts a small network of its own
on loopback (a manager and one worker node) and stops it at the end. To use a network
that is already running instead, give its manager's address (and key, if it has one)::

    python examples/canonical_defer.py --connect 127.0.0.1:8000 --key-file argon.key
"""

from __future__ import annotations

import argparse
import concurrent.futures

from _network import add_network_options, network

from argon import Deferred


def wait_done(deferred: Deferred, timeout: float = 60.0) -> None:
    """Wait until the deferred's outcome has arrived, without collecting it.

    A deferred is a ``concurrent.futures.Future``, so the standard ``wait`` does this.
    """
    done, _ = concurrent.futures.wait([deferred], timeout=timeout)
    if not done:
        raise SystemExit(f"task {deferred.id} did not finish within {timeout}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The canonical defer example.")
    add_network_options(parser)
    args = parser.parse_args(argv)

    with network(args) as client:
        deferred = client.defer(lambda x, y: x + y, [4, 7])
        print(f"deferred = client.defer(lambda x, y: x + y, [4, 7]); deferred() = {deferred()}")

        failing = client.defer(lambda x: x / 0, [4])
        print("client.defer(lambda x: x / 0, [4]) returned at once, raising nothing")
        wait_done(failing)
        print(f"the task has failed (done() = {failing.done()}), and still nothing was raised")
        for attempt in ("calling the deferred", "calling it again"):
            try:
                failing()
            except ZeroDivisionError as exc:
                print(f"{attempt} raised ZeroDivisionError({exc})")


if __name__ == "__main__":
    main()
