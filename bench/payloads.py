"""Scenario 5: large arguments and results, MB/s through manager and worker."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from bench import common
from bench.tasks import blob, echo, size
from bench.throughput import cluster

TITLE = "Payloads: 1 MB and 10 MB arguments and results"
ABOUT = """\
A client defers a batch of tasks carrying large payloads and waits for all of them:
`size(data)` takes an N-byte argument and returns its length (payload in), `blob(n)`
returns N bytes (payload out), `echo(data)` returns its N-byte argument (both ways).
MB/s counts the payload bytes moved (arguments plus results, 1 MB = 10^6 bytes) divided
by the wall time of the batch. Argon runs through a manager to one worker of 2 processes
and straight to a stand-alone worker; the baseline is `multiprocessing.Pool(2).apply_async(echo)`
in a fresh process. Every byte crosses three hops through the manager (client to manager to
worker to pool process, and back), two when direct. The three take turns, three rounds
with the order rotated, and each figure is the median of its rounds."""

SIZES = {"1 MB": 1_000_000, "10 MB": 10_000_000}


def measure(client: common.Client, kind: str, nbytes: int, count: int) -> dict[str, Any]:
    """Run ``count`` payload tasks of one kind at once; return bytes moved, seconds and MB/s."""
    data = b"x" * nbytes
    plans: dict[str, tuple[Callable[[Any], Any], Any, int]] = {
        "in": (size, data, nbytes),
        "out": (blob, nbytes, nbytes),
        "echo": (echo, data, 2 * nbytes),
    }
    func, arg, moved = plans[kind]
    client.defer(func, (arg,))(timeout=60)  # warm-up
    t0 = time.perf_counter()
    deferreds = [client.defer(func, (arg,)) for _ in range(count)]
    for d in deferreds:
        value = d(timeout=120)
        expected = nbytes if kind == "in" else None
        if (expected is not None and value != expected) or (expected is None and len(value) != nbytes):
            raise AssertionError(f"wrong {kind} result")
    elapsed = time.perf_counter() - t0
    return {"tasks": count, "bytes": moved * count, "seconds": elapsed, "mb_s": moved * count / elapsed / 1e6}


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one measurement: total tasks, and the median MB/s (or the first skip reason)."""
    ok = [r for r in results if "mb_s" in r]
    if not ok:
        return results[0]
    return {"tasks": sum(r["tasks"] for r in ok), "mb_s": common.median([r["mb_s"] for r in ok]),
            "rounds": [r["mb_s"] for r in ok]}


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("payloads", TITLE, ABOUT, quick)
    rounds, counts = (1, {"1 MB": 20, "10 MB": 4}) if quick else (3, {"1 MB": 30, "10 MB": 7})
    manager: dict[str, dict[str, Any]] = {}
    direct: dict[str, dict[str, Any]] = {}
    pool: dict[str, dict[str, Any]] = {}
    with common.Stack() as one, common.Stack() as two:  # both up at once, measured in turn
        via, alone = cluster(one), cluster(two, direct=True)
        for label, nbytes in SIZES.items():
            n = counts[label]
            for kind in ("in", "out", "echo"):
                contestants: dict[str, Callable[[], Any]] = {
                    "manager": functools.partial(measure, via, kind, nbytes, n),
                    "direct": functools.partial(measure, alone, kind, nbytes, n),
                }
                if kind == "echo":
                    contestants["pool"] = functools.partial(
                        common.run_baseline, ["pool", "payload", str(n), str(nbytes)], 120)
                runs = common.interleave(rounds, contestants)
                name = f"{label} {kind}"
                manager[name], direct[name] = _merge(runs["manager"]), _merge(runs["direct"])
                if "pool" in runs:
                    pool[label] = _merge(runs["pool"])
    rows = []
    for name, m in manager.items():
        label, kind = name.split(" MB ")[0] + " MB", name.split(" ")[-1]
        base = pool[label].get("mb_s") if kind == "echo" else None
        rows.append([label, kind, m["tasks"], common.fmt(m["mb_s"]), common.fmt(direct[name]["mb_s"]),
                     common.fmt(base), common.fmt_ratio(common.ratio(m["mb_s"], base))])
    for label, result in pool.items():
        if "skipped" in result:
            record["skipped"].append(f"Pool payload {label}: {result['skipped']}")
    record["tables"].append({
        "caption": "Payload MB/s (arguments + results); Pool(2) baseline for echo only",
        "columns": ["size", "kind", "tasks", "via manager MB/s", "direct MB/s", "Pool(2) echo MB/s",
                    "manager / Pool"],
        "rows": rows,
    })
    record["targets"] = [
        common.target(f"10 MB {kind} via manager, MB/s", manager[f"10 MB {kind}"]["mb_s"], 200, at_least=True)
        for kind in ("in", "out", "echo")
    ]
    record["data"] = {"manager": manager, "direct": direct, "pool": pool, "counts": counts, "rounds": rounds}
    record["plot"] = plot(manager, direct, pool)
    return common.finish(record)


def plot(manager: dict[str, Any], direct: dict[str, Any], pool: dict[str, Any]) -> str | None:
    """Grouped bars of MB/s per size and kind."""
    plt = common.plt()
    if plt is None:
        return None
    names = list(manager)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar([x - 0.27 for x in xs], [manager[n]["mb_s"] for n in names], 0.27, label="Argon via manager")
    ax.bar(list(xs), [direct[n]["mb_s"] for n in names], 0.27, label="Argon direct to worker")
    base = [pool[n.split(" MB ")[0] + " MB"].get("mb_s", 0) if n.endswith("echo") else 0 for n in names]
    ax.bar([x + 0.27 for x in xs], base, 0.27, label="Pool(2) apply_async (echo)", color="tab:gray")
    ax.axhline(200, color="tab:red", linestyle=":", label="target: 200 MB/s (10 MB)")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("MB/s (arguments + results)")
    ax.set_title("Large payloads")
    ax.legend(fontsize=8)
    return common.save_plot(fig, "payloads")
