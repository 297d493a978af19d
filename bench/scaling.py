"""Scenario 3: adding workers adds capacity; 1,000 registered workers do not slow routing; several managers."""

from __future__ import annotations

import functools
import re
import sys
import time
from typing import Any

import gevent
import psutil

from bench import common
from bench.tasks import sleep
from bench.throughput import argon_batch

TITLE = "Scaling: more workers, 1,000 registered workers, and several managers"
ABOUT = """\
**Workers.** One manager; k = 1, 2, 4, 8 workers of 4 pool processes each (up to 32
processes on this 2-core machine). One client defers `sleep(0.02)` tasks, 100 per pool
process, and waits for all of them. Sleeping tasks need no CPU, so the ideal throughput
is k x 4 / 0.02 = k x 200 tasks/s; what limits it is the manager, the workers and the
client sharing 2 cores. Workers are added between steps; each step starts once the manager
reports all k registered.

**1,000 registered workers.** Routing cost is measured two ways, each against a baseline
measured in the same run, with trivial tasks (`noop`) deferred by one client:

1. *Idle registrations:* one real worker (2 processes) alone, then the same plus 999
   stand-in workers that register with the manager (capacity 1) and heartbeat, but whose
   one process is busy (`free=0`), so the manager keeps them in its tables and links
   while every task still goes to the real worker. This is the target's measure: the
   work per task is identical, so any slowdown is the cost of holding 1,000 workers.
   Measured A-B-A: the real worker alone, then with the stand-ins, then alone again once
   they have gone; the baseline is the median of both "alone" phases.
2. *Routing among 1,000:* the same total capacity (999 slots) offered by one stand-in
   with 999 free slots, and by 999 stand-ins with one free slot each (two managers, both
   up at once, taking turns: seven rounds of 20,000 tasks, medians; single rounds of this
   CPU-bound pair moved from 0.65x to 1.0x on this machine, so three rounds were not
   enough to tell 0.7x from 0.9x). Like real workers whose tasks take no time, these
   stand-ins grant a credit of 64 tasks beyond their free slots (their prefetch, see
   "Routing and flow" in the concepts), so a worker may be sent several tasks at once; a
   third row shows the same 999 stand-ins granting no prefetch, as a worker of Argon
   0.1 did (one task per worker per round trip). Stand-ins answer
   every task at once with `None`, so the tasks do no work and the manager has to pick
   among 999 workers for every task instead of one. Besides throughput, this reports the
   manager's CPU time per task.

The stand-ins are greenlets in one helper process (`bench/standins.py`); each holds a real
authenticated-protocol connection (`argon.handshake.connect(role="worker")`, `Register`,
`Result`), so the manager cannot tell them from workers.

**Several managers.** Routing-bound load through 1, 2 and 3 managers, all set up at once
and taking turns: each manager has 20 stand-in workers with 50 free slots each, which
answer every task at once, and one client given all of that setup's managers defers
trivial tasks (`noop`), 30,000 per batch, and waits for them; seven rounds, medians. For
each setup this reports each manager's CPU time per task it routed (from its process CPU
time and its `completed` counter), and the client's CPU time per task (this benchmark's
process, where the client runs): what spreading over several managers costs the client.
CPU time is counted in 10 ms ticks and the machine is shared, so these figures move by
about 5% from run to run. Each of N managers carries 1/N of the traffic, so fewer
messages share each batch frame and system call: a small rise per task is expected. From the measured per-task cost it
reports the capacity N managers would have, each on a core of its own (N / manager CPU
per task). **This machine has 2 cores**, shared by the client, every manager and the
stand-ins, so the aggregate rate here cannot show scale-out: the per-task costs are what
carries over to N hosts."""

PROCESSES = 4
PER_PROCESS = 100
SLEEP = 0.02
STANDINS = 999
#: What a worker whose tasks take no time prefetches (``argon.defaults.MAX_PREFETCH``).
PREFETCH = 64


def scale(ks: list[int], per_process: int) -> list[dict[str, Any]]:
    """Throughput of ``sleep(0.02)`` tasks with k workers of 4 processes, for each k."""
    rows = []
    with common.Stack() as stack:
        manager = stack.manager()
        client = stack.client(manager)
        workers = 0
        mgr = psutil.Process(manager.pid)
        for k in ks:
            while workers < k:
                stack.worker(manager, PROCESSES)
                workers += 1
            stack.wait_workers(client, k)
            tasks = k * PROCESSES * per_process
            _sleep_batch(client, k * PROCESSES * 2)  # warm-up: every process runs a task
            cpu0 = sum(mgr.cpu_times()[:2])
            elapsed = _sleep_batch(client, tasks)
            cpu = sum(mgr.cpu_times()[:2]) - cpu0
            rows.append({"k": k, "tasks": tasks, "seconds": elapsed, "rate": tasks / elapsed,
                         "ideal": k * PROCESSES / SLEEP, "manager_cpu": cpu / elapsed})
    return rows


def _sleep_batch(client: common.Client, count: int) -> float:
    t0 = time.perf_counter()
    for d in [client.defer(sleep, (SLEEP,)) for _ in range(count)]:
        d(timeout=120)
    return time.perf_counter() - t0


def _standins(stack: common.Stack, manager: common.Proc, count: int, capacity: int, free: int,
              prefetch: int = 0) -> common.Proc:
    proc = stack.spawn("standins", [sys.executable, "-m", "bench.standins", manager.address, str(count),
                                    str(capacity), str(free), str(prefetch)])
    proc.wait_line(re.compile(r"standins ready"), 120)
    return proc


def _cpu(pid: int | None) -> float:
    return common.cpu_seconds(pid) if pid else 0.0


def _idle(manager: common.Proc, helper: common.Proc | None, seconds: float) -> dict[str, float]:
    """CPU shares of the manager and the stand-ins while no task runs: what registrations alone cost."""
    helper_pid = helper.pid if helper else None
    m0, h0, t0 = _cpu(manager.pid), _cpu(helper_pid), time.perf_counter()
    gevent.sleep(seconds)
    wall = time.perf_counter() - t0
    return {"idle_manager_cpu": (_cpu(manager.pid) - m0) / wall, "idle_standins_cpu": (_cpu(helper_pid) - h0) / wall}


def _batch(manager: common.Proc, client: common.Client, count: int, check: bool,
           helper: common.Proc | None) -> dict[str, float]:
    """One timed batch of trivial tasks: rate, manager CPU per task, stand-ins' CPU share."""
    helper_pid = helper.pid if helper else None
    m0, h0, t0 = _cpu(manager.pid), _cpu(helper_pid), time.perf_counter()
    rate = count / argon_batch(client, count, check=check)
    wall = time.perf_counter() - t0
    return {"rate": rate, "cpu_us": (_cpu(manager.pid) - m0) / count * 1e6,
            "standins": (_cpu(helper_pid) - h0) / wall}


def _summary(batches: list[dict[str, float]], idle: dict[str, float], workers: int) -> dict[str, Any]:
    return {
        "rate": common.median([b["rate"] for b in batches]),
        "rates": [b["rate"] for b in batches],
        "cpu_us_per_task": common.median([b["cpu_us"] for b in batches]),
        "standins_cpu": common.median([b["standins"] for b in batches]),
        "workers": workers,
        **idle,
    }


def routing(count: int, repeats: int, route_count: int, rounds: int) -> dict[str, dict[str, Any]]:
    """The routing measurements described in ABOUT.

    Idle registrations are measured A-B-A (one real worker, then with the stand-ins, then
    alone again once they are gone), ``repeats`` batches of ``count`` tasks per phase; the
    routing configurations are all up at once and take turns, ``rounds`` batches of
    ``route_count`` tasks each, so that drifts in the machine's load do not masquerade as cost.
    """
    idle_time = 1.0 if repeats == 1 else 2.0
    out = {}
    with common.Stack() as stack:  # idle registrations
        manager = stack.manager()
        stack.worker(manager, 2)
        client = stack.client(manager)
        stack.wait_workers(client, 1)
        argon_batch(client, 500)
        alone = [_batch(manager, client, count, True, None) for _ in range(repeats)]
        idle_alone = _idle(manager, None, idle_time)
        helper = _standins(stack, manager, STANDINS, 1, 0)
        workers = len(stack.wait_workers(client, 1 + STANDINS)["workers"])
        idle_with = _idle(manager, helper, idle_time)
        crowded = [_batch(manager, client, count, True, helper) for _ in range(repeats)]
        helper.kill()
        common.wait_for(lambda: len(client.status()["workers"]) == 1, 30, 0.1, "the stand-ins to be dropped")
        alone += [_batch(manager, client, count, True, None) for _ in range(repeats)]
        out["1 real worker"] = _summary(alone, idle_alone, 1)
        out["1 real + 999 busy stand-ins"] = _summary(crowded, idle_with, workers)
    with common.Stack() as one, common.Stack() as many, common.Stack() as bare:  # routing among many
        setups = {}
        for stack, standins, capacity, prefetch in ((one, 1, STANDINS, PREFETCH), (many, STANDINS, 1, PREFETCH),
                                                    (bare, STANDINS, 1, 0)):
            manager = stack.manager()
            client = stack.client(manager)
            helper = _standins(stack, manager, standins, capacity, capacity, prefetch)
            workers = len(stack.wait_workers(client, standins)["workers"])
            argon_batch(client, 500, check=False)
            name = f"{standins} stand-in{'s' if standins > 1 else ''} x {capacity} free"
            if not prefetch:
                name += ", no prefetch"
            setups[name] = (manager, client, helper, workers)
        idle = {name: _idle(m, h, idle_time) for name, (m, _, h, _) in setups.items()}
        runs = common.interleave(rounds, {
            name: functools.partial(_batch, m, c, route_count, False, h) for name, (m, c, h, _) in setups.items()
        })
        for name, (_, _, _, workers) in setups.items():
            out[name] = _summary(runs[name], idle[name], workers)
    return out


MANAGER_COUNTS = (1, 2, 3)
STANDINS_PER_MANAGER = 20
SLOTS_PER_STANDIN = 50


def _spread_batch(managers: list[common.Proc], client: common.Client, probes: list[common.Client],
                  count: int) -> dict[str, Any]:
    """One timed batch through several managers: rate, each manager's CPU per routed task, the client's."""
    routed0 = [probe.status()["completed"] for probe in probes]
    cpu0 = [_cpu(m.pid) for m in managers]
    own0, t0 = time.process_time(), time.perf_counter()
    rate = count / argon_batch(client, count, check=False)
    own = time.process_time() - own0
    wall = time.perf_counter() - t0
    cpu = [_cpu(m.pid) - c for m, c in zip(managers, cpu0, strict=True)]
    routed = [probe.status()["completed"] - r for probe, r in zip(probes, routed0, strict=True)]
    return {
        "rate": rate,
        "routed": routed,
        "manager_us": [c / max(n, 1) * 1e6 for c, n in zip(cpu, routed, strict=True)],
        "manager_us_all": sum(cpu) / count * 1e6,
        "manager_cpu": [c / wall for c in cpu],
        "client_us": own / count * 1e6,
    }


def several_managers(count: int, repeats: int) -> dict[int, dict[str, Any]]:
    """Routing-bound load through 1, 2 and 3 managers (see ABOUT); all set up first, then taking turns."""
    stacks = [common.Stack() for _ in MANAGER_COUNTS]
    try:
        setups = {}
        for n, stack in zip(MANAGER_COUNTS, stacks, strict=True):
            managers = [stack.manager() for _ in range(n)]
            for manager in managers:
                _standins(stack, manager, STANDINS_PER_MANAGER, SLOTS_PER_STANDIN, SLOTS_PER_STANDIN)
            probes = [stack.client(m) for m in managers]
            for probe in probes:
                stack.wait_workers(probe, STANDINS_PER_MANAGER)
            client = common.Client([m.address for m in managers])
            stack.closers.append(client.close)
            argon_batch(client, 1000, check=False)  # warm-up
            setups[n] = (managers, client, probes)
        runs = common.interleave(repeats, {
            str(n): functools.partial(_spread_batch, m, c, p, count) for n, (m, c, p) in setups.items()
        })
    finally:
        for stack in stacks:
            stack.close()
    out = {}
    for n in MANAGER_COUNTS:
        batches = runs[str(n)]
        per_manager = [common.median([b["manager_us"][i] for b in batches]) for i in range(n)]
        manager_us = common.median([b["manager_us_all"] for b in batches])
        out[n] = {
            "rate": common.median([b["rate"] for b in batches]),
            "rates": [b["rate"] for b in batches],
            "manager_us_per_task": manager_us,
            "each_manager_us_per_task": per_manager,
            "routed_share": [common.median([b["routed"][i] / count for b in batches]) for i in range(n)],
            "client_us_per_task": common.median([b["client_us"] for b in batches]),
            "capacity": n / (manager_us / 1e6),  # N managers, each with a core of its own
        }
    return out


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("scaling", TITLE, ABOUT, quick)
    ks = [1, 2] if quick else [1, 2, 4, 8]
    steps = scale(ks, 25 if quick else PER_PROCESS)
    one = steps[0]["rate"]
    record["tables"].append({
        "caption": f"sleep({SLEEP}) tasks, k workers x {PROCESSES} processes",
        "columns": ["k", "tasks", "tasks/s", "ideal tasks/s", "vs k=1", "efficiency (rate / k x k=1)",
                    "manager CPU (% of a core)"],
        "rows": [[s["k"], s["tasks"], common.fmt(s["rate"]), common.fmt(s["ideal"]),
                  common.fmt_ratio(s["rate"] / one), f"{s['rate'] / (s['k'] * one):.0%}",
                  f"{s['manager_cpu']:.0%}"] for s in steps],
    })
    route = routing(1000 if quick else 10000, 1 if quick else 3, 1000 if quick else 20000, 1 if quick else 7)
    base_idle, base_route = route["1 real worker"]["rate"], route[f"1 stand-in x {STANDINS} free"]["rate"]
    base_rates = route[f"1 stand-in x {STANDINS} free"]["rates"]
    rows = []
    for name, r in route.items():
        base = base_idle if "real" in name else base_route
        per_round = "-"
        if "real" not in name:  # rounds taken in turn with the baseline's: each has a partner
            ratios = sorted(rate / partner for rate, partner in zip(r["rates"], base_rates, strict=True))
            per_round = (f"{common.fmt_ratio(common.median(ratios))} ({common.fmt_ratio(ratios[0])}"
                         f" to {common.fmt_ratio(ratios[-1])})")
        rows.append([name, common.fmt(r["rate"]), common.fmt_ratio(r["rate"] / base), per_round,
                     common.fmt(r["cpu_us_per_task"], 1), f"{r['standins_cpu']:.0%}",
                     f"{r['idle_manager_cpu']:.1%}", f"{r['idle_standins_cpu']:.1%}"])
    record["tables"].append({
        "caption": "Trivial tasks with 1 vs 1,000 registered workers (relative to the first row of each pair:"
                   " ratio of the medians, and the median and range of the per-round ratios);"
                   " CPU in % of one core",
        "columns": ["configuration", "tasks/s", "vs baseline", "per round vs baseline", "manager CPU us/task",
                    "stand-ins CPU", "idle: manager CPU", "idle: stand-ins CPU"],
        "rows": rows,
    })
    record["targets"] = [
        common.target(f"k={s['k']} throughput / (k x k=1)", s["rate"] / (s["k"] * one), 0.9, at_least=True, unit="x")
        for s in steps[1:]
    ]
    record["targets"].append(common.target(
        "throughput with 1,000 registered workers / with 1 (idle registrations)",
        route["1 real + 999 busy stand-ins"]["rate"] / base_idle, 0.8, at_least=True, unit="x"))
    record["targets"].append(common.target(
        "throughput routing among 999 workers / among 1 (same capacity)",
        route[f"{STANDINS} stand-ins x 1 free"]["rate"] / base_route, 0.8, at_least=True, unit="x"))
    spread = several_managers(5000 if quick else 30000, 1 if quick else 7)
    one_manager = spread[1]
    record["tables"].append({
        "caption": "Trivial tasks through 1, 2 and 3 managers (20 instant stand-ins each), one client given them"
                   " all; CPU per task from each process's CPU time; capacity = N managers on N cores",
        "columns": ["managers", "tasks/s here (2 cores)", "manager CPU us/task", "vs 1 manager",
                    "each manager us/task", "tasks routed by each", "client CPU us/task", "vs 1 manager",
                    "capacity of N managers (tasks/s)"],
        "rows": [[n, common.fmt(r["rate"]), common.fmt(r["manager_us_per_task"], 1),
                  common.fmt_ratio(r["manager_us_per_task"] / one_manager["manager_us_per_task"]),
                  " / ".join(common.fmt(u, 1) for u in r["each_manager_us_per_task"]),
                  " / ".join(f"{share:.0%}" for share in r["routed_share"]),
                  common.fmt(r["client_us_per_task"], 1),
                  common.fmt_ratio(r["client_us_per_task"] / one_manager["client_us_per_task"]),
                  common.fmt(r["capacity"])] for n, r in spread.items()],
    })
    record["targets"].append(common.target(
        "manager CPU per routed task, 3 managers / 1", spread[3]["manager_us_per_task"]
        / one_manager["manager_us_per_task"], 1.1, at_least=False, unit="x"))
    record["targets"].append(common.target(
        "client CPU per task, 3 managers / 1", spread[3]["client_us_per_task"]
        / one_manager["client_us_per_task"], 1.1, at_least=False, unit="x"))
    record["data"] = {"scaling": steps, "routing": route, "managers": spread}
    record["plot"] = plot(steps, route)
    return common.finish(record)


def plot(steps: list[dict[str, Any]], route: dict[str, dict[str, Any]]) -> str | None:
    """Left: throughput against k with the ideal and the 0.9k target. Right: routing bars."""
    plt = common.plt()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ks = [s["k"] for s in steps]
    one = steps[0]["rate"]
    left.plot(ks, [s["rate"] for s in steps], "o-", label="measured")
    left.plot(ks, [s["ideal"] for s in steps], "k--", label="ideal (k x 4 / 0.02 s)")
    left.plot(ks, [0.9 * k * one for k in ks], ":", color="tab:red", label="target: 0.9 k x (k=1)")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xlabel("workers (4 processes each)")
    left.set_ylabel("sleep(0.02) tasks/s")
    left.set_title("Adding workers")
    left.legend(fontsize=8)
    names = list(route)
    right.barh(names[::-1], [route[n]["rate"] for n in names][::-1],
               color=["tab:blue" if "real" in n else "tab:orange" for n in names[::-1]])
    right.set_xlabel("trivial tasks/s")
    right.set_title("1 vs 1,000 registered workers")
    right.tick_params(axis="y", labelsize=8)
    return common.save_plot(fig, "scaling")
