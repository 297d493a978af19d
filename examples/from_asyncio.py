"""Argon from asyncio: ``await`` a deferred; the event loop never stalls.

Every ``Deferred`` is a ``concurrent.futures.Future``, so ``await deferred`` (or
``asyncio.gather``) works inside coroutines while the loop keeps serving other tasks.

    python examples/from_asyncio.py [--connect HOST:PORT] [--key-file FILE] [--tasks 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _network import add_network_options, network


async def fan_out(client, count: int) -> tuple[list[int], float]:
    """Send ``count`` tasks, await them all, and measure the loop's longest stall meanwhile."""
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        last = time.monotonic()
        while running:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst = max(worst, now - last - 0.01)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(client.submit(lambda x: (time.sleep(0.01), x + 1)[1], i) for i in range(count)))
    running = False
    await tick
    return results, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Awaiting Argon tasks in asyncio.")
    add_network_options(parser)
    parser.add_argument("--tasks", type=int, default=200, help="tasks to await together")
    args = parser.parse_args(argv)

    with network(args) as client:
        results, worst = asyncio.run(fan_out(client, args.tasks))
        print(f"await asyncio.gather(...) of {args.tasks} tasks: sum = {sum(results)}")
        print(f"expected {sum(range(1, args.tasks + 1))}; longest event-loop stall {worst * 1000:.1f} ms")


if __name__ == "__main__":
    main()
