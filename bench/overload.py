"""Scenario 4: open-loop overload at 5x capacity, with and without ``--queue-size``."""

from __future__ import annotations

import itertools
import time
from typing import Any

import gevent
import gevent.pool

from argon import ArgonError
from bench import common
from bench.tasks import sleep

TITLE = "Overload: 5x capacity, with and without --queue-size"
PROCESSES = 2
SLEEP = 0.05
CAPACITY = PROCESSES / SLEEP  # 40 tasks/s
QUEUE_SIZE = PROCESSES  # at most one task waits per process
ABOUT = f"""\
A manager with one worker of {PROCESSES} processes runs `sleep({SLEEP})` tasks, so its capacity is
known: {CAPACITY:.0f} tasks/s nominally. The capacity the network really sustains (sleep plus
per-task overhead) is measured first, by timing a backlog of 5 s of work; "1x" and "5x"
are that measured rate and five times it. A submitter greenlet offers tasks open-loop at a fixed rate
(it never waits for results: each task is deferred on schedule and a greenlet of its own
waits for it), first at 1x capacity for a reference, then at 5x capacity
(about {5 * CAPACITY:.0f} tasks/s) three times: with `--queue-size {QUEUE_SIZE}` on the manager (one
waiting task per process, so a task that is admitted waits at most about one service time
and its latency stays under about 2x the service time) and the default client (`retries=10`, so a
rejected task is re-sent after a growing delay for about ten seconds); with the same
manager and `Client(retries=0)` (rejections reach the caller at once); and with an
unbounded manager queue. Latency is measured two ways for completed tasks: *end to end*,
from the first submission to the result, which for a retried task includes the client's
own waits between retries (up to the ~10 s retry budget, by design: the task waits at
the client instead of in the manager's queue); and *service*, from the accepted send
(`Deferred.sent_at`) to the result, which is what `--queue-size` bounds and what the
target is judged on. Per-second figures group tasks by the second they were submitted.
Rejections are the manager's `rejected` counter (every refusal, first sends and retries
alike); retries are rejections the client re-sent.
The manager's RSS is sampled with psutil every 0.5 s. After the offer window the run waits
for every outstanding task (the unbounded queue takes about 4x the window to drain); a task
is *lost* if it neither completed nor failed with a clear error (`TaskRejected`, ...).
In the plot the shaded band is the offer window. At exactly 1x the network has no slack:
any hiccup leaves a queue behind that drains only when the load stops."""

SAMPLE = 0.5


def offer(client: common.Client, manager: common.Proc, rate: float, duration: float,
          drain: float) -> dict[str, Any]:
    """Offer ``rate`` tasks/s for ``duration`` seconds, then wait up to ``drain`` s for the rest."""
    count = int(rate * duration)
    outcomes: list[tuple[float, float, str, float | None] | None] = [None] * count
    deferreds: list[Any] = [None] * count
    samples: list[dict[str, float]] = []
    waiters = gevent.pool.Group()
    t0 = time.perf_counter()

    def track(i: int, submitted: float) -> None:
        try:
            deferreds[i](timeout=duration + drain + 30)
            kind = "completed"
        except ArgonError as exc:
            kind = type(exc).__name__
        except Exception as exc:  # the task's own error would be a bug here: keep its name
            kind = f"error:{type(exc).__name__}"
        sent_at = deferreds[i].sent_at  # the accepted (last) send: what the network itself took
        service = time.monotonic() - sent_at if sent_at is not None else None
        outcomes[i] = (submitted, time.perf_counter() - t0 - submitted, kind, service)

    def sample() -> None:
        for _ in range(int((duration + drain + 60) / SAMPLE)):
            now = time.perf_counter() - t0
            try:
                status = client.status()
            except ArgonError:
                status = {}
            samples.append({"t": now, "rss": manager.rss(), "rejected": status.get("rejected", 0),
                            "queued": status.get("queued", 0), "completed": status.get("completed", 0)})
            gevent.sleep(max(0.0, SAMPLE - (time.perf_counter() - t0 - now)))

    sampler = gevent.spawn(sample)
    try:
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            submitted = time.perf_counter() - t0
            deferreds[i] = client.defer(sleep, (SLEEP,))
            waiters.spawn(track, i, submitted)
        offered_for = time.perf_counter() - t0
        waiters.join(timeout=drain)
        unresolved = [i for i, o in enumerate(outcomes) if o is None]
        for i in unresolved:  # past the deadline: ask for a clear TaskCancelled
            deferreds[i].cancel()
        waiters.join(timeout=10)
    finally:
        sampler.kill()
        waiters.kill(timeout=5)
    status = client.status()
    return {"offered": count, "offered_for": offered_for, "outcomes": outcomes, "samples": samples,
            "cancelled_at_deadline": len(unresolved), "status": {k: status[k] for k in
                                                                 ("completed", "failed", "rejected", "queued")}}


def analyse(raw: dict[str, Any], duration: float) -> dict[str, Any]:
    """Per-second latency percentiles, totals, lost tasks and RSS growth of one run."""
    outcomes = [o for o in raw["outcomes"] if o is not None]
    completed = [o for o in outcomes if o[2] == "completed"]
    failures: dict[str, int] = {}
    for o in outcomes:
        if o[2] != "completed":
            failures[o[2]] = failures.get(o[2], 0) + 1
    clear = sum(n for kind, n in failures.items() if not kind.startswith("error:"))
    lost = raw["offered"] - len(completed) - clear
    seconds = []
    for s in range(int(duration + 0.999)):
        lat = [o[1] for o in completed if s <= o[0] < s + 1]
        seconds.append({"t": s, "completed": len(lat), "p50": common.median(lat) if lat else None,
                        "p99": common.percentile(lat, 99) if lat else None})
    window = [x for x in raw["samples"] if x["t"] <= duration + SAMPLE and x["rss"]]
    rss0 = window[0]["rss"] if window else 0
    rss_max = max((x["rss"] for x in window), default=0)
    rejected = raw["status"]["rejected"]
    lat_all = [o[1] for o in completed]
    service = [o[3] for o in completed if o[3] is not None]
    return {
        "service_p50": common.median(service) if service else None,
        "service_p99": common.percentile(service, 99) if service else None,
        "offered": raw["offered"],
        "completed": len(completed),
        "failures": failures,
        "lost": lost,
        "rejected": rejected,
        "retries": rejected - failures.get("TaskRejected", 0),
        "p50": common.median(lat_all) if lat_all else None,
        "p99": common.percentile(lat_all, 99) if lat_all else None,
        "rss_start_mb": rss0 / 1e6,
        "rss_max_mb": rss_max / 1e6,
        "rss_growth": (rss_max / rss0 - 1) if rss0 else None,
        "per_second": seconds,
        "samples": raw["samples"],
        "drain_seconds": max((o[0] + o[1] for o in outcomes), default=0) - duration,
        "cancelled_at_deadline": raw["cancelled_at_deadline"],
        "manager": raw["status"],
    }


def one_run(rate: float, duration: float, drain: float, queue_size: int | None, retries: int) -> dict[str, Any]:
    """Start a fresh manager and worker, offer the load, and analyse it."""
    with common.Stack() as stack:
        manager = stack.manager(*(["--queue-size", str(queue_size)] if queue_size is not None else []))
        stack.worker(manager, PROCESSES)
        client = stack.client(manager, retries=retries)
        stack.wait_workers(client, 1)
        for d in [client.defer(sleep, (SLEEP,)) for _ in range(2 * PROCESSES)]:  # warm-up
            d(timeout=30)
        raw = offer(client, manager, rate, duration, drain)
    return analyse(raw, duration)


def measure_capacity(seconds: float) -> float:
    """Tasks/s the network really sustains: a backlog of ``seconds`` worth of nominal work, timed."""
    count = int(CAPACITY * seconds)
    with common.Stack() as stack:
        manager = stack.manager()
        stack.worker(manager, PROCESSES)
        client = stack.client(manager)
        stack.wait_workers(client, 1)
        for d in [client.defer(sleep, (SLEEP,)) for _ in range(2 * PROCESSES)]:  # warm-up
            d(timeout=30)
        t0 = time.perf_counter()
        for d in [client.defer(sleep, (SLEEP,)) for _ in range(count)]:
            d(timeout=seconds * 10 + 30)
        return count / (time.perf_counter() - t0)


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("overload", TITLE, ABOUT, quick)
    window, reference = (2.5, 1.5) if quick else (20.0, 10.0)
    capacity = measure_capacity(2.0 if quick else 5.0)
    plans = {
        "1x load (reference)": (capacity, reference, None, 10),
        f"5x, --queue-size {QUEUE_SIZE}": (5 * capacity, window, QUEUE_SIZE, 10),
        f"5x, --queue-size {QUEUE_SIZE}, retries=0": (5 * capacity, window, QUEUE_SIZE, 0),
        "5x, unbounded queue": (5 * capacity, window, None, 10),
    }
    runs = {}
    for name, (rate, duration, queue_size, retries) in plans.items():
        drain = 5 * duration + 20  # the unbounded queue needs ~4x the window
        runs[name] = one_run(rate, duration, drain, queue_size, retries)
        runs[name]["rate"], runs[name]["duration"] = rate, duration
    rows = []
    for name, r in runs.items():
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "0"
        rows.append([name, r["offered"], r["completed"], failed, r["rejected"], r["retries"], r["lost"],
                     common.fmt((r["p50"] or 0) * 1000), common.fmt((r["p99"] or 0) * 1000),
                     common.fmt((r["service_p99"] or 0) * 1000),
                     f"{r['rss_start_mb']:.0f} -> {r['rss_max_mb']:.0f} ({(r['rss_growth'] or 0):+.0%})",
                     f"{r['drain_seconds']:.1f}"])
    record["tables"].append({
        "caption": f"Offered load vs measured capacity {capacity:.1f} tasks/s (nominal {CAPACITY:.0f});"
                   " latency of completed tasks, ms: end to end (first submission to result, including the"
                   " client's waits between retries) and service (the accepted send to result)",
        "columns": ["run", "offered", "completed", "failed (clear error)", "rejections", "retries", "lost",
                    "p50 ms", "p99 ms", "service p99 ms", "manager RSS MB", "drain s"],
        "rows": rows,
    })
    ref = runs["1x load (reference)"]["p99"]
    ref_service = runs["1x load (reference)"]["service_p99"]
    for name in (f"5x, --queue-size {QUEUE_SIZE}", f"5x, --queue-size {QUEUE_SIZE}, retries=0"):
        r = runs[name]
        record["targets"] += [
            common.target(f"[{name}] service p99 / service p99 at 1x", common.ratio(r["service_p99"], ref_service),
                          2, at_least=False, unit="x"),
            common.target(f"[{name}] end-to-end p99 / p99 at 1x", common.ratio(r["p99"], ref), 2, at_least=False,
                          unit="x"),
            common.target(f"[{name}] manager RSS growth", 100 * (r["rss_growth"] or 0), 10, at_least=False,
                          unit="%"),
            common.target(f"[{name}] tasks lost", r["lost"], 0, at_least=False),
        ]
    record["targets"].append(common.target("[5x, unbounded queue] tasks lost", runs["5x, unbounded queue"]["lost"],
                                           0, at_least=False))
    record["data"] = {"nominal_capacity": CAPACITY, "capacity": capacity, "queue_size": QUEUE_SIZE, "runs": runs}
    record["plot"] = plot(runs)
    return common.finish(record)


def plot(runs: dict[str, dict[str, Any]]) -> str | None:
    """Latency over time, rejections over time and manager RSS over time, every run."""
    plt = common.plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (lat50, lat99), (rej, rss) = axes
    for (name, r), color in zip(runs.items(), ["black", "tab:green", "tab:blue", "tab:red"], strict=False):
        secs = [s for s in r["per_second"] if s["p50"] is not None]
        lat50.plot([s["t"] + 0.5 for s in secs], [s["p50"] * 1000 for s in secs], "o-", ms=3, color=color,
                   label=name)
        lat99.plot([s["t"] + 0.5 for s in secs], [s["p99"] * 1000 for s in secs], "o-", ms=3, color=color,
                   label=name)
        samples = r["samples"]
        rates = [(b["t"], (b["rejected"] - a["rejected"]) / (b["t"] - a["t"])) for a, b in itertools.pairwise(samples)]
        rej.plot([t for t, _ in rates], [v for _, v in rates], color=color, label=name)
        rss.plot([s["t"] for s in samples if s["rss"]], [s["rss"] / 1e6 for s in samples if s["rss"]], color=color,
                 label=name)
    for ax, title, ylabel in (
        (lat50, "p50 latency of completed tasks, by second of submission", "ms (log)"),
        (lat99, "p99 latency of completed tasks, by second of submission", "ms (log)"),
        (rej, "manager rejections per second (first sends and retries)", "rejections/s"),
        (rss, "manager RSS (each run goes on until every task is answered)", "MB"),
    ):
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("seconds since the load started")
        ax.grid(alpha=0.3)
    window = max(r["duration"] for r in runs.values())
    for ax in (lat50, lat99, rej, rss):
        ax.axvspan(0, window, color="tab:gray", alpha=0.08, lw=0)
    rss.set_ylim(bottom=0)
    lat50.set_yscale("log")
    lat99.set_yscale("log")
    lat50.legend(fontsize=7)
    return common.save_plot(fig, "overload")
