"""``argon.Pool``: code written for ``multiprocessing.Pool`` runs on Argon unchanged.

Without ``--connect`` the pool starts (and stops) a local network of its own.

    python examples/pool_map.py [--connect HOST:PORT] [--key-file FILE]
"""

from __future__ import annotations

import argparse

from _network import add_network_options

import argon


def collatz_steps(n: int) -> int:
    """Steps for ``n`` to reach 1 in the Collatz sequence."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="multiprocessing.Pool code on Argon.")
    add_network_options(parser)
    args = parser.parse_args(argv)

    options = {"address": f"{args.connect[0]}:{args.connect[1]}"} if args.connect else {"processes": 2}
    with argon.Pool(key_file=args.key_file, **options) as pool:
        steps = pool.map(collatz_steps, range(1, 10_001))
        longest = max(range(len(steps)), key=steps.__getitem__) + 1
        print(f"pool.map: the longest Collatz chain below 10001 starts at {longest} ({max(steps)} steps)")
        print(f"pool.starmap(pow, [(2, 10), (3, 4)]) = {pool.starmap(pow, [(2, 10), (3, 4)])}")
        print(f"pool.apply_async(sum, ([1, 2, 3],)).get() = {pool.apply_async(sum, ([1, 2, 3],)).get(60)}")
        print(f"first three of pool.imap: {list(pool.imap(collatz_steps, [27, 97, 871]))}")


if __name__ == "__main__":
    main()
