"""Scenario 1: throughput of trivial tasks, Argon against its baselines in the same run."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from bench import common
from bench.tasks import noop

TITLE = "Throughput: trivial tasks"
ABOUT = """\
One client sends trivial tasks (`noop(i)` returns `i`) with `defer()` as fast as it can,
then waits for every result. Argon runs a manager and one worker with 2 pool processes
(and, for comparison, the same worker stand-alone with no manager). Baselines run the
same function in the same run, each in a fresh process: `multiprocessing.Pool(2).apply_async`,
`ProcessPoolExecutor(2).submit`, Dask distributed (`LocalCluster` of 2 single-threaded
worker processes, `map` + `gather`), Ray (`num_cpus=2`, `remote` + one `ray.get` of the
list) and Celery 5 with Redis (2 prefork processes, `delay` + `get`, on a redis-server of
its own). Dask, Ray and Celery get fewer tasks because they are one to two orders of
magnitude slower; the rate is what counts, and their start-up is not timed. Everything
takes turns: three rounds with the order rotated, and each figure is the median of its
rounds, so changes in the machine's load hit them alike. The CPU table shows how busy each
Argon process was while tasks went through the manager: a total well under 200% (2 cores)
means the rate was bounded by round trips rather than by CPU."""

WARMUP = 500


def argon_batch(client: common.Client, count: int, timeout: float = 120.0, check: bool = True) -> float:
    """Defer ``count`` trivial tasks, wait for all, check the results; return the seconds taken.

    ``check=False`` accepts any result (stand-in workers answer ``None``).
    """
    t0 = time.perf_counter()
    deferreds = [client.defer(noop, (i,)) for i in range(count)]
    results = [d(timeout=timeout) for d in deferreds]
    elapsed = time.perf_counter() - t0
    if check and results != list(range(count)):
        raise AssertionError("wrong results")
    return elapsed


def cluster(stack: common.Stack, *, direct: bool = False, key_file: str | None = None) -> common.Client:
    """A manager with one worker of 2 processes (or a stand-alone worker), and a client for it.

    Args:
        stack: Owns the processes and the client.
        direct: A stand-alone worker instead of a manager and its worker.
        key_file: Run every process and the client with this key.

    """
    key = ["--key", key_file] if key_file else []
    if direct:
        server = stack.worker(None, 2, *key)
    else:
        server = stack.manager(*key)
        stack.worker(server, 2, *key)
    client = stack.client(server, key_file=key_file)
    stack.wait_workers(client, 1)
    argon_batch(client, WARMUP)
    return client


class CpuShare:
    """Adds up the CPU time of some processes over the ``with`` blocks it is used in."""

    def __init__(self, pids: dict[str, tuple[int, bool]]) -> None:
        self.pids = pids  # name -> (pid, children): children=True counts only the children
        self.used = dict.fromkeys(pids, 0.0)
        self.wall = 0.0
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _now(self) -> dict[str, float]:
        out = {}
        for name, (pid, children) in self.pids.items():
            out[name] = common.cpu_seconds(pid, True) - common.cpu_seconds(pid) if children else common.cpu_seconds(pid)
        return out

    def __enter__(self) -> None:
        self._start, self._t0 = self._now(), time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t0
        for name, value in self._now().items():
            self.used[name] += value - self._start[name]

    def shares(self) -> dict[str, float]:
        """CPU seconds per wall-clock second, per process (1.0 = one core busy)."""
        return {name: used / self.wall if self.wall else 0.0 for name, used in self.used.items()}


def median_rate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge one baseline's rounds: the median rate of those that ran, or the first skip reason.

    Rounds that failed are kept in ``failed_rounds`` so the record says so.
    """
    ran = [r for r in results if "rate" in r]
    if not ran:
        return results[0]
    merged = {**ran[0], "rate": common.median([r["rate"] for r in ran]), "rates": [r["rate"] for r in ran]}
    failed = [r.get("skipped", "no result") for r in results if "rate" not in r]
    if failed:
        merged["failed_rounds"] = failed
    return merged


def baseline(peer: str, count: int) -> dict[str, Any]:
    """One round of a baseline peer's throughput measurement, in fresh processes."""
    args = [peer, "throughput", str(count)]
    return common.celery_baseline(args, 300) if peer == "celery" else common.run_baseline(args, 300)


LABELS = {
    "pool": "multiprocessing.Pool(2).apply_async",
    "ppe": "ProcessPoolExecutor(2)",
    "dask": "Dask distributed (2 procs)",
    "ray": "Ray (num_cpus=2)",
    "celery": "Celery + Redis (2 procs)",
}


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("throughput", TITLE, ABOUT, quick)
    count, repeats = (2000, 1) if quick else (20000, 3)
    small = 300 if quick else 2000
    with common.Stack() as one, common.Stack() as two:  # both up at once, measured in turn
        via, direct = cluster(one), cluster(two, direct=True)
        cpu = CpuShare({"client": (os.getpid(), False), "manager": (one.procs[0].pid, False),
                        "worker": (one.procs[1].pid, False), "pool processes": (one.procs[1].pid, True)})

        def argon_run() -> float:
            with cpu:
                return count / argon_batch(via, count)

        counts = {"pool": count, "ppe": count, "dask": small, "ray": small, "celery": small // 2}
        runs = common.interleave(repeats, {
            "argon": argon_run,
            "direct": lambda: count / argon_batch(direct, count),
            **{peer: functools.partial(baseline, peer, n) for peer, n in counts.items()},
        })
    argon: dict[str, Any] = {"tasks": count, "rates": runs["argon"], "rate": common.median(runs["argon"])}
    direct_rates: dict[str, Any] = {"tasks": count, "rates": runs["direct"], "rate": common.median(runs["direct"])}
    peers = {peer: median_rate(runs[peer]) for peer in counts}
    rate = argon["rate"]
    rows: list[list[Any]] = [
        ["Argon: client -> manager -> worker(2)", argon["tasks"], common.fmt(rate), "1.00x"],
        ["Argon: client -> stand-alone worker(2)", count, common.fmt(direct_rates["rate"]),
         common.fmt_ratio(common.ratio(rate, direct_rates["rate"]))],
    ]
    for peer, result in peers.items():
        if "skipped" in result:
            rows.append([LABELS[peer], "-", result["skipped"], "-"])
            record["skipped"].append(f"{LABELS[peer]}: {result['skipped']}")
        else:
            rows.append([LABELS[peer], result["tasks"], common.fmt(result["rate"]),
                         common.fmt_ratio(common.ratio(rate, result["rate"]))])
            for reason in result.get("failed_rounds", []):
                record["skipped"].append(f"{LABELS[peer]}: one round of {repeats} failed ({reason})")
    record["tables"].append({
        "caption": "Trivial tasks per second (Argon's rate divided by each system's, same run)",
        "columns": ["system", "tasks", "tasks/s", "Argon (manager) / this"],
        "rows": rows,
    })
    rate_of = {peer: r.get("rate") for peer, r in peers.items()}
    record["targets"] = [
        common.target("Argon through a manager, tasks/s", rate, 10_000, at_least=True),
        common.target("Argon / Pool(2).apply_async", common.ratio(rate, rate_of["pool"]), 0.5, at_least=True, unit="x"),
        common.target("Argon / Ray", common.ratio(rate, rate_of["ray"]), 8, at_least=True, unit="x"),
        common.target("Argon / Dask", common.ratio(rate, rate_of["dask"]), 25, at_least=True, unit="x"),
        common.target("Argon / Celery", common.ratio(rate, rate_of["celery"]), 25, at_least=True, unit="x"),
    ]
    shares = cpu.shares()
    record["tables"].append({
        "caption": "Where the CPU went while Argon ran through the manager (% of one core; the machine has 2)",
        "columns": ["process", "CPU"],
        "rows": [*[[name, f"{share:.0%}"] for name, share in shares.items()],
                 ["total", f"{sum(shares.values()):.0%}"]],
    })
    record["data"] = {"cpu_shares": shares, "argon": argon, "argon_direct": direct_rates, "baselines": peers}
    record["plot"] = plot(rows)
    return common.finish(record)


def plot(rows: list[list[Any]]) -> str | None:
    """Bar chart of tasks/s per system (log scale); skipped peers are labelled as such."""
    plt = common.plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r[0] for r in rows][::-1]
    values = [float(str(r[2]).replace(",", "")) if r[1] != "-" else 0.0 for r in rows][::-1]
    notes = [f"{v:,.0f}" if v else str(r[2])[:60] for v, r in zip(values, rows[::-1], strict=True)]
    colors = ["tab:blue" if n.startswith("Argon") else "tab:gray" for n in names]
    ax.barh(names, [v or 1 for v in values], color=colors)
    for i, (v, note) in enumerate(zip(values, notes, strict=True)):
        ax.text(max(v, 1) * 1.05, i, note, va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trivial tasks per second (log scale)")
    ax.set_title("Throughput, 2 processes each, same run")
    ax.set_xlim(1, max(values) * 8)
    return common.save_plot(fig, "throughput")
