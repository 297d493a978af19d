"""Scenario: calling Argon from threads and greenlets, and Executor.map against ProcessPoolExecutor.

A client in a program that is not monkey-patched runs its network loop in a thread of its
own; callers hand tasks over to it and wait on futures. This measures what that hop
costs against a client on the caller's own gevent hub (``own_thread=False``, what a
monkey-patched program gets), both against the same manager and worker, in alternating
rounds: one ``queue()`` round trip from a plain thread and from a greenlet, and 5,000
deferred tasks sent at once then collected. It also times ``Executor.map(chunksize=64)``
of 40,000 trivial items against ``ProcessPoolExecutor(2).map(chunksize=64)``.
"""

from __future__ import annotations

import time
from typing import Any

import gevent

import argon
from bench import common
from bench.latency import argon_latencies, summary
from bench.tasks import noop
from bench.throughput import cluster

TITLE = "Callers: the network thread, and Executor.map"
ABOUT = __doc__.split("\n\n", 1)[1].replace("\n", " ").strip() if __doc__ else ""
CHUNK = 64


def burst(client: common.Client, count: int) -> float:
    """Tasks per second for ``count`` deferred tasks sent at once, then collected."""
    t0 = time.perf_counter()
    deferreds = [client.defer(noop, (i,)) for i in range(count)]
    for deferred in deferreds:
        deferred()
    return count / (time.perf_counter() - t0)


def executor_map(executor: argon.Executor, count: int) -> float:
    """Items per second of ``executor.map(noop, range(count), chunksize=64)``."""
    t0 = time.perf_counter()
    for _ in executor.map(noop, range(count), chunksize=CHUNK):
        pass
    return count / (time.perf_counter() - t0)


def in_greenlet(func: Any, *args: Any) -> Any:
    """Run ``func`` in a greenlet of this thread's hub (where an inline client lives)."""
    return gevent.spawn(func, *args).get()


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("callers", TITLE, ABOUT, quick)
    rounds = 1 if quick else 3
    calls = 300 if quick else 1000
    tasks = 1000 if quick else 5000
    items = 8000 if quick else 40_000
    with common.Stack() as stack:
        threaded = cluster(stack)  # a client of the bench process: its own network thread
        manager = stack.procs[0]
        inline = stack.client(manager, own_thread=False)  # the hop-free client
        executor = threaded.executor()
        executor_map(executor, 2000)
        runs = common.interleave(rounds, {
            "thread": lambda: argon_latencies(threaded, calls),
            "greenlet": lambda: in_greenlet(argon_latencies, inline, calls),
            "burst_thread": lambda: burst(threaded, tasks),
            "burst_greenlet": lambda: in_greenlet(burst, inline, tasks),
            "map": lambda: executor_map(executor, items),
            "ppe_map": lambda: common.run_baseline(["ppe", "map", str(items), str(CHUNK)], 120).get("rate"),
        })
    thread = summary([x for part in runs["thread"] for x in part])
    greenlet = summary([x for part in runs["greenlet"] for x in part])
    burst_thread, burst_greenlet = common.median(runs["burst_thread"]), common.median(runs["burst_greenlet"])
    mapped = common.median(runs["map"])
    ppe = [r for r in runs["ppe_map"] if r]
    ppe_rate = common.median(ppe) if ppe else None
    record["results"] = {
        "queue_thread_us": thread["median_us"],
        "queue_greenlet_us": greenlet["median_us"],
        "hop_us": thread["median_us"] - greenlet["median_us"],
        "burst_thread_per_s": burst_thread,
        "burst_greenlet_per_s": burst_greenlet,
        "executor_map_per_s": mapped,
        "ppe_map_per_s": ppe_rate,
    }
    rows = [
        ["queue() round trip, median", f"{common.fmt(thread['median_us'])} µs",
         f"{common.fmt(greenlet['median_us'])} µs",
         common.fmt_ratio(common.ratio(thread["median_us"], greenlet["median_us"]))],
        ["queue() round trip, p99", f"{common.fmt(thread['p99_us'])} µs", f"{common.fmt(greenlet['p99_us'])} µs",
         common.fmt_ratio(common.ratio(thread["p99_us"], greenlet["p99_us"]))],
        [f"{tasks:,} deferred tasks", f"{common.fmt(burst_thread)}/s", f"{common.fmt(burst_greenlet)}/s",
         common.fmt_ratio(common.ratio(burst_thread, burst_greenlet))],
    ]
    record["tables"] = [
        {"caption": "A plain thread (the client's network thread) against a greenlet (the caller's hub)",
         "columns": ["measure", "from a plain thread", "from a greenlet", "thread ÷ greenlet"], "rows": rows},
        {"caption": f"Executor.map(chunksize={CHUNK}) of {items:,} trivial items",
         "columns": ["system", "items/s", "ratio"],
         "rows": [["argon.Executor (manager, one 2-process worker)", common.fmt(mapped),
                   common.fmt_ratio(common.ratio(mapped, ppe_rate))],
                  ["ProcessPoolExecutor(2)", common.fmt(ppe_rate), "1.00x"]]},
    ]
    record["targets"] = [
        common.target("Executor.map(chunksize=64) vs ProcessPoolExecutor(2)", common.ratio(mapped, ppe_rate), 0.5,
                      at_least=True, unit="x"),
    ]
    return common.finish(record)
