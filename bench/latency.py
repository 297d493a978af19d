"""Scenario 2: latency of one sequential round trip, Argon against Pool.apply."""

from __future__ import annotations

import functools
import time
from typing import Any

from bench import common
from bench.tasks import noop
from bench.throughput import cluster

TITLE = "Latency: one round trip"
ABOUT = """\
One client runs trivial tasks one after another with `queue()` (send, wait for the
result, send the next), through a manager with one worker of 2 processes, and straight
to a stand-alone worker. The baselines do the same with `multiprocessing.Pool(2).apply`
and `ProcessPoolExecutor(2).submit(...).result()` in a fresh process. Each figure comes
from the same number of round trips after a warm-up of 100; all the rows below take turns
in three rounds, with the order rotated, so changes in the machine's load hit them alike.

One more row runs the same round trips through the same manager from a client created
with `own_thread=False`, whose network I/O runs on the calling greenlet's own gevent hub
(as in a monkey-patched program): the same hops without the hand-offs between the
caller's thread and the client's network thread.

Three more rows run no task system at all: a chain of plain processes that pass a
100-byte message along the hops of Argon's round trip and back (client to manager and
manager to worker over TCP on loopback, worker to pool process over a pipe; or TCP and a
pipe for a stand-alone worker), once with blocking reads and writes and once on gevent
hubs the way Argon's processes read and write (an I/O watcher, a hub callback). They show
what the hops themselves cost on this machine, so that the rest of Argon's figure is the
work Argon does at each hop (decoding, routing, bookkeeping, encoding) rather than the
number of hops.

One `queue()` round trip through a manager wakes a sleeping process six times (the
manager, the worker, the pool process, the worker, the manager, the client);
`Pool.apply` wakes two (its worker process, then its own process's result thread). Both
also hand the call twice between threads of one process (Argon's caller and network
thread; `Pool`'s caller and its task and result threads): the row for a client on the
caller's hub shows what Argon's two hand-offs cost. On this virtual machine waking
another process is costly: in a `perf` profile of the round trips, about
half of each Argon process's CPU time was in the kernel, most of it waking the next
process (the inter-processor interrupt) or spinning on the socket lock its waker still
held."""

WARMUP = 100
#: The relay chains (see ``bench.baselines._relay``) and their labels.
RELAYS = {
    "relay-tcp-tcp-pipe": "no task system: plain processes relaying over TCP, TCP, pipe",
    "hub-relay-tcp-tcp-pipe": "no task system: the same relays on gevent hubs",
    "relay-tcp-pipe": "no task system: plain processes relaying over TCP, pipe",
}


def argon_latencies(client: common.Client, count: int) -> list[float]:
    """``count`` sequential ``queue()`` round trips (after a warm-up), in seconds each."""
    for i in range(WARMUP):
        client.queue(noop, (i,))
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        client.queue(noop, (i,))
        out.append(time.perf_counter() - t0)
    return out


def summary(latencies: list[float]) -> dict[str, float]:
    """Median, p99 and mean in microseconds."""
    us = [x * 1e6 for x in latencies]
    return {"median_us": common.median(us), "p99_us": common.percentile(us, 99), "mean_us": sum(us) / len(us)}


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("latency", TITLE, ABOUT, quick)
    count = 300 if quick else 3000
    rounds = 1 if quick else 3
    per_round = count // rounds
    with common.Stack() as one, common.Stack() as two:  # both up at once, measured in turn
        via, direct = cluster(one), cluster(two, direct=True)
        manager = next(proc for proc in one.procs if proc.name == "manager")
        on_hub = one.client(manager, own_thread=False)  # the caller's own hub: no thread hand-off
        runs = common.interleave(rounds, {
            "via": lambda: argon_latencies(via, per_round),
            "hub": lambda: argon_latencies(on_hub, per_round),
            "direct": lambda: argon_latencies(direct, per_round),
            "pool": lambda: common.run_baseline(["pool", "latency", str(per_round)], 120),
            "ppe": lambda: common.run_baseline(["ppe", "latency", str(per_round)], 120),
            **{relay: functools.partial(common.run_baseline, [relay, "latency", str(per_round)], 120)
               for relay in RELAYS},
        })
    series: dict[str, list[float] | None] = {
        "Argon queue() via manager": [x for part in runs["via"] for x in part],
        "Argon queue() via manager, client on the caller's gevent hub": [x for part in runs["hub"] for x in part],
        "Argon queue() to stand-alone worker": [x for part in runs["direct"] for x in part],
    }
    for peer, label in (("pool", "multiprocessing.Pool(2).apply"), ("ppe", "ProcessPoolExecutor(2) submit+result"),
                        *RELAYS.items()):
        parts = [r["latencies"] for r in runs[peer] if "latencies" in r]
        series[label] = [x for part in parts for x in part] or None
        skipped = [r["skipped"] for r in runs[peer] if "skipped" in r]
        if skipped:
            record["skipped"].append(f"{label}: {skipped[0]}")
    stats = {name: summary(values) if values else None for name, values in series.items()}
    pool = stats["multiprocessing.Pool(2).apply"]
    pool_median = pool["median_us"] if pool else None
    rows: list[list[Any]] = []
    for name, s in stats.items():
        if s is None:
            rows.append([name, "-", "-", "-", "skipped"])
        else:
            rows.append([name, len(series[name] or []), common.fmt(s["median_us"]), common.fmt(s["p99_us"]),
                         common.fmt_ratio(common.ratio(s["median_us"], pool_median))])
    record["tables"].append({
        "caption": "Sequential round trips, microseconds (median relative to Pool.apply's median)",
        "columns": ["system", "round trips", "median us", "p99 us", "median / Pool.apply"],
        "rows": rows,
    })
    manager = stats["Argon queue() via manager"]
    assert manager is not None
    record["targets"] = [
        common.target("queue() via manager, median", manager["median_us"], 300, at_least=False, unit=" us"),
        common.target("queue() median / Pool.apply median", common.ratio(manager["median_us"], pool_median), 2,
                      at_least=False, unit="x"),
    ]
    record["data"] = {"summary": stats, "count": count}
    record["plot"] = plot(series)
    return common.finish(record)


def plot(series: dict[str, list[float] | None]) -> str | None:
    """Latency distribution (CDF, log scale) of each system."""
    plt = common.plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, values in series.items():
        if values:
            us = sorted(x * 1e6 for x in values)
            ax.plot(us, [(i + 1) / len(us) for i in range(len(us))], label=name)
    ax.axvline(300, color="tab:red", linestyle=":", label="target: 300 us median")
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency, microseconds (log scale)")
    ax.set_ylabel("fraction of round trips")
    ax.set_title("Sequential round trips of a trivial task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return common.save_plot(fig, "latency")
