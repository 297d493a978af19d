"""The main job: a manager and two workers on loopback running a real workload.

Run with ``python examples/quickstart.py``. It starts the network, runs the canonical
examples, estimates pi with a Monte Carlo fan-out, pushes 5,000 trivial tasks through to
measure throughput, prints everything, and shuts the network down cleanly.
"""

from __future__ import annotations

import random
import time

from argon import LocalCluster


def sample_pi(samples: int, seed: int) -> int:
    """Count random points of the unit square that fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


def main() -> None:
    started = time.perf_counter()
    with LocalCluster(nodes=2, workers=2) as cluster, cluster.client() as client:
        print(f"network up in {time.perf_counter() - started:.2f}s: manager {cluster.address}, 2 workers x 2 processes")

        print("queue(lambda x, y: x + y, [4, 7]) =", client.queue(lambda x, y: x + y, [4, 7]))
        deferred = client.defer(lambda x, y: x + y, [4, 7])
        print("defer(lambda x, y: x + y, [4, 7])() =", deferred())

        try:
            client.queue(lambda: {}["missing"])
        except KeyError as exc:
            print(f"a task's error comes back as itself: KeyError({exc})")

        tasks, samples = 200, 25_000
        t0 = time.perf_counter()
        hits = [d() for d in [client.defer(sample_pi, [samples, seed]) for seed in range(tasks)]]
        pi = 4 * sum(hits) / (tasks * samples)
        print(f"pi ~ {pi:.5f} from {tasks * samples:,} samples in {tasks} tasks ({time.perf_counter() - t0:.2f}s)")

        count = 5000
        t0 = time.perf_counter()
        deferreds = [client.defer(lambda i: i * 2, [i]) for i in range(count)]
        assert [d() for d in deferreds] == [i * 2 for i in range(count)]
        elapsed = time.perf_counter() - t0
        print(f"{count:,} trivial tasks in {elapsed:.2f}s: {count / elapsed:,.0f} tasks/s")

        status = client.status()
        per_worker = ", ".join(str(w["completed"]) for w in status["workers"])
        print(f"manager: {status['completed']:,} tasks completed, {status['failed']} failed; per worker: {per_worker}")
    print(f"network shut down cleanly; total {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    main()
