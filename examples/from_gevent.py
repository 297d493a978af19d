"""Argon from a gevent program: greenlets share one client.

In a monkey-patched program the client lives on the program's own hub (no extra
thread); each greenlet's ``queue()`` blocks only that greenlet.

    python examples/from_gevent.py [--connect HOST:PORT] [--key-file FILE] [--greenlets 100]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after patching, as gevent asks
import time  # noqa: E402

import gevent  # noqa: E402
from _network import add_network_options, network  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Greenlets sharing one Argon client.")
    add_network_options(parser)
    parser.add_argument("--greenlets", type=int, default=100, help="greenlets calling queue()")
    args = parser.parse_args(argv)

    with network(args) as client:
        started = time.monotonic()
        jobs = [gevent.spawn(client.queue, lambda x: x * 3, [i]) for i in range(args.greenlets)]
        gevent.joinall(jobs, raise_error=True)
        total = sum(job.value for job in jobs)
        print(f"{args.greenlets} greenlets, one client: sum = {total} (expected {3 * sum(range(args.greenlets))})")
        print(f"in {time.monotonic() - started:.2f}s; client on the program's hub: {client._loop.thread is None}")


if __name__ == "__main__":
    main()
