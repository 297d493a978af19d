"""Chaos run: many tasks through managers and three workers while processes are SIGKILLed.

Usage:
  python bench/chaos.py [--tasks N | --quick] [--managers N] [--task-ms MS] [--seed N] [--keep-logs] ...

Not a unit test: a soak that checks the fault-tolerance promises end to end. A manager
and three workers of two pool processes each (heartbeat 0.5 s) run on 127.0.0.1; one
client submits ``--tasks`` tasks (20,000 by default) with at most ``--window`` in flight.
Each task appends ``"task_id pid"`` to a per-run file (``O_APPEND``: one tiny write per
line is atomic), sleeps ``--task-ms`` so kills hit tasks in flight, and returns ``i*i``.

Meanwhile a chaos greenlet, once a second, either SIGKILLs one random pool process of a
random live worker (its task should fail with ``ProcessDied``) or SIGKILLs a whole worker's
process group (its tasks should be redelivered elsewhere, at most 3 sends per task, then
``WorkerLost``) and starts a replacement worker after ``--restart-delay`` seconds. It stops
once every task is answered, after ``--max-faults`` faults, or after ``--max-seconds``
(which also stops submitting).

With ``--managers N`` (N > 1) there are N managers, every worker serves them all and the
client is given all of them; a ``--manager-share`` of the faults then SIGKILLs a random
live manager (never the last one) and restarts it on its port ``--restart-delay`` seconds
later. The client must resend what that manager held: a task is **lost** if it neither
returned its correct result nor failed with one of the two errors the kills legitimately
cause: ``ProcessDied`` (its pool process was killed) or ``WorkerLost`` after the workers
holding it were lost ``MAX_ATTEMPTS`` (3) times (the contract's bound on resends; a
``WorkerLost`` with fewer losses is counted as ``WorkerLost (early)`` and is lost). No
task may be lost.

Each deferred is waited for with ``--wait`` seconds; one that neither returns nor raises
by then is *hung*. The run prints, and writes to ``bench/results/chaos.json``: tasks
submitted, completed with the correct result, failed with an Argon error (by type),
wrong results, other exceptions, hung, duplicated executions (from the execution log),
faults injected, elapsed time, throughput and the managers' final counters. It exits 1
if any task was lost, hung or returned a wrong result, or if a manager was down at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent
import gevent.event
import gevent.pool
import gevent.subprocess
import psutil

from argon import ArgonError, Client, TaskTimeout, WorkerLost, defaults
from bench import common

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "chaos.json"
HOST = "127.0.0.1"
HEARTBEAT = "0.5"
POOL_SIZE = 2

# -- helpers: argon processes in their own sessions -------------------------------------------


def make_task(path: str, seconds: float) -> Callable[[int], int]:
    """The task, as a closure so dill sends it by value (workers cannot import bench/)."""

    def square(i: int) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{i} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        time.sleep(seconds)
        return i * i

    return square


# -- the chaos monkey ---------------------------------------------------------------------------


@dataclass
class Chaos:
    """Kills pool processes, workers and managers at random, and restarts the killed servers."""

    managers: list[common.Proc]
    log_dir: Path
    rng: random.Random
    worker_share: float
    restart_delay: float
    procs: list[common.Proc]
    manager_share: float = 0.0
    workers: list[common.Proc] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    restarting: gevent.pool.Group = field(default_factory=gevent.pool.Group)

    def start_worker(self) -> common.Proc:
        """Start a worker for the manager, wait until it listens, and track it."""
        self.counts["workers_started"] += 1
        every = ",".join(m.address for m in self.managers)
        proc = common.argon_process(
            "worker",
            ["--manager", every, "--workers", str(POOL_SIZE), "--heartbeat", HEARTBEAT],
            self.log_dir,
            name=f"worker-{self.counts['workers_started']}",
        )
        self.procs.append(proc)
        proc.wait_listening()
        self.workers.append(proc)
        return proc

    def _restart(self) -> None:
        gevent.sleep(self.restart_delay)
        try:
            self.start_worker()
            self.counts["restarts"] += 1
        except (TimeoutError, RuntimeError, OSError) as exc:
            self.counts["restart_failures"] += 1
            print(f"chaos: restart failed: {exc}", file=sys.stderr)

    def _restart_manager(self, index: int) -> None:
        """Start the killed manager ``index`` again on its port (the workers and clients find it there)."""
        gevent.sleep(self.restart_delay)
        port = self.managers[index].port
        try:
            proc = common.argon_process(
                "manager", ["--heartbeat", HEARTBEAT], self.log_dir, name=f"manager-{index}-again", port=port
            )
            self.procs.append(proc)
            proc.wait_listening()
            self.managers[index] = proc
            self.counts["manager_restarts"] += 1
        except (TimeoutError, RuntimeError, OSError) as exc:
            self.counts["manager_restart_failures"] += 1
            print(f"chaos: manager restart failed: {exc}", file=sys.stderr)

    def strike(self) -> None:
        """Inject one fault: kill a pool process, a whole worker or a manager (then restart it)."""
        live_managers = [i for i, m in enumerate(self.managers) if m.alive()]
        if len(live_managers) > 1 and self.rng.random() < self.manager_share:
            index = self.rng.choice(live_managers)
            self.managers[index].kill()
            self.counts["manager_kills"] += 1
            self.restarting.spawn(self._restart_manager, index)
            return
        live = [w for w in self.workers if w.alive()]
        if not live:
            self.counts["skipped_no_worker"] += 1
            return
        victim = self.rng.choice(live)
        if self.rng.random() < self.worker_share:
            self.workers.remove(victim)
            victim.kill()
            self.counts["worker_kills"] += 1
            self.restarting.spawn(self._restart)
            return
        try:
            children = psutil.Process(victim.pid).children()
            child = self.rng.choice(children) if children else None
            if child is not None:
                child.send_signal(signal.SIGKILL)
                self.counts["pool_process_kills"] += 1
                return
        except psutil.Error:
            pass
        self.counts["pool_kill_misses"] += 1  # the pool was between processes

    def run(self, stop: gevent.event.Event, interval: float, max_faults: int, deadline: float,
            progress: Callable[[], str]) -> None:
        """Strike every ``interval`` s until ``stop`` is set, ``max_faults`` or ``deadline``."""
        ticks = 0
        while not stop.wait(interval) and ticks < max_faults and time.monotonic() < deadline:
            ticks += 1
            self.strike()
            if ticks % 10 == 0:
                print(f"chaos: {ticks} faults ({dict(self.counts)}); {progress()}", file=sys.stderr, flush=True)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What became of each task."""

    submitted: int = 0
    correct: int = 0
    wrong: list[int] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    outcome: dict[int, str] = field(default_factory=dict)

    def answered(self) -> int:
        """Tasks with any outcome so far."""
        return len(self.outcome)

    def note(self, i: int, kind: str, counter: collections.Counter[str], exc: BaseException) -> None:
        """Count a failure of ``kind`` and keep the first message of each kind."""
        counter[kind] += 1
        self.outcome[i] = kind
        self.examples.setdefault(kind, str(exc)[:300])


def drive(client: Client, task: Callable[[int], int], tasks: int, window: int, wait: float, deadline: float,
          tally: Tally) -> None:
    """Submit ``tasks`` tasks, at most ``window`` in flight, and wait for each one."""

    def one(i: int) -> None:
        try:
            deferred = client.defer(task, (i,))
        except Exception as exc:
            tally.note(i, f"submit {type(exc).__name__}", tally.other, exc)
            return
        try:
            value = deferred(timeout=wait)
        except TaskTimeout as exc:
            if not deferred.done():
                tally.hung.append(i)
                tally.outcome[i] = "hung"
            else:
                tally.note(i, type(exc).__name__, tally.errors, exc)
        except WorkerLost as exc:  # legitimate only once the resends are used up
            spent = f"lost {defaults.MAX_ATTEMPTS} times" in str(exc)
            tally.note(i, "WorkerLost" if spent else "WorkerLost (early)", tally.errors, exc)
        except ArgonError as exc:
            tally.note(i, type(exc).__name__, tally.errors, exc)
        except Exception as exc:
            tally.note(i, type(exc).__name__, tally.other, exc)
        else:
            if value == i * i:
                tally.correct += 1
                tally.outcome[i] = "correct"
            else:
                tally.wrong.append(i)
                tally.outcome[i] = "wrong"

    group = gevent.pool.Pool(window)
    for i in range(tasks):
        if time.monotonic() >= deadline:
            print(f"time cap reached: submitted {i} of {tasks}", file=sys.stderr)
            break
        group.spawn(one, i)
        tally.submitted += 1
    group.join()


def executions(path: Path, tally: Tally) -> dict[str, Any]:
    """Duplicated executions, from the per-run execution log."""
    runs: collections.Counter[int] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            runs[int(line.split()[0])] += 1
    dup = {i: n for i, n in runs.items() if n > 1}
    by_outcome = collections.Counter(tally.outcome.get(i, "unanswered") for i in dup)
    return {
        "executions": sum(runs.values()),
        "tasks_executed": len(runs),
        "duplicated_tasks": len(dup),
        "extra_executions": sum(n - 1 for n in dup.values()),
        "max_executions": max(runs.values(), default=0),
        "duplicated_by_outcome": dict(by_outcome),
        "never_executed_by_outcome": dict(collections.Counter(o for i, o in tally.outcome.items() if i not in runs)),
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Start the network, run the tasks under chaos, and return the record."""
    log_dir = Path(tempfile.mkdtemp(prefix="argon-chaos-"))
    exec_log = log_dir / "executions.txt"
    procs: list[common.Proc] = []
    client: Client | None = None
    chaos_greenlet: gevent.Greenlet | None = None
    chaos: Chaos | None = None
    record: dict[str, Any] = {}
    try:
        managers = [
            common.argon_process("manager", ["--heartbeat", HEARTBEAT], log_dir, name=f"manager-{i}")
            for i in range(opts.managers)
        ]
        procs.extend(managers)
        for manager in managers:
            manager.wait_listening()
        chaos = Chaos(
            managers, log_dir, random.Random(opts.seed), opts.worker_share, opts.restart_delay, procs,
            manager_share=opts.manager_share if opts.managers > 1 else 0.0,
        )
        for _ in range(3):
            chaos.start_worker()
        client = Client([m.address for m in managers])
        deadline = time.monotonic() + 60
        for manager in managers:
            with Client(manager.address) as one:
                while len(one.status()["workers"]) < 3:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the three workers did not register with {manager.address} within 60s")
                    gevent.sleep(0.1)

        tally = Tally()
        stop = gevent.event.Event()
        started = time.monotonic()
        hard_deadline = started + opts.max_seconds
        chaos_greenlet = gevent.spawn(
            chaos.run, stop, opts.interval, opts.max_faults, hard_deadline,
            lambda: f"{tally.submitted} submitted, {tally.answered()} answered ({tally.correct} correct)",
        )
        task = make_task(str(exec_log), opts.task_ms / 1000)
        drive(client, task, opts.tasks, opts.window, opts.wait, hard_deadline, tally)
        elapsed = time.monotonic() - started
        stop.set()
        chaos_greenlet.join(timeout=10)
        chaos.restarting.join(timeout=30)  # let the last restarts happen: the end state is checked
        chaos.restarting.kill(timeout=10)

        manager_alive = all(m.alive() for m in chaos.managers)
        live_workers = sum(w.alive() for w in chaos.workers)
        settle = time.monotonic() + 20  # restarted managers: every live worker registers again
        while (status := final_status(chaos.managers))["workers_at_end"] < live_workers and time.monotonic() < settle:
            gevent.sleep(0.2)
        faults = dict(chaos.counts)
        lost = tally.submitted - tally.correct - tally.errors["ProcessDied"] - tally.errors["WorkerLost"]
        record = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "quick"},
            "tasks": {
                "submitted": tally.submitted,
                "correct": tally.correct,
                "failed_clear": sum(tally.errors.values()),
                "failed_by_type": dict(tally.errors),
                "wrong": len(tally.wrong),
                "other_exceptions": dict(tally.other),
                "hung": len(tally.hung),
                "lost": lost,
                "unanswered": tally.submitted - tally.answered(),
                "client_duplicates": client.duplicates,
            },
            "examples": tally.examples,
            "wrong_ids": tally.wrong[:50],
            "hung_ids": tally.hung[:50],
            "duplicates": executions(exec_log, tally),
            "faults": faults,
            "elapsed_s": round(elapsed, 1),
            "tasks_per_s": round(tally.submitted / elapsed, 1) if elapsed else 0.0,
            "manager_alive": manager_alive,
            "manager": {k: status.get(k) for k in ("completed", "failed", "redelivered", "rejected", "queued", "busy",
                                                   "error")},
            "workers_at_end": status.get("workers_at_end", 0),
            "workers_alive_at_end": live_workers,
            "log_dir": str(log_dir),
        }
        return record
    finally:
        if chaos_greenlet is not None:
            chaos_greenlet.kill(timeout=5)
        if chaos is not None:
            chaos.restarting.kill(timeout=5)
        if client is not None:
            client.close()
        for proc in procs:
            proc.kill()
        bad = not record or failed(record)
        if opts.keep_logs or bad:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


def final_status(managers: list[common.Proc]) -> dict[str, Any]:
    """The live managers' counters, added up (a restarted manager counts only since its restart)."""
    totals: dict[str, Any] = collections.Counter()
    errors = []
    workers = []
    for manager in managers:
        if not manager.alive():
            errors.append(f"{manager.address}: down")
            continue
        try:
            with Client(manager.address, retries=0) as one:
                status = one.status()
        except ArgonError as exc:
            errors.append(f"{manager.address}: {exc}")
            continue
        for key in ("completed", "failed", "redelivered", "rejected", "queued", "busy"):
            totals[key] += status.get(key) or 0
        workers.append(len(status.get("workers", [])))
    return {**totals, "error": "; ".join(errors) or None, "workers_at_end": min(workers, default=0)}


def failed(record: dict[str, Any]) -> bool:
    """Whether the run broke a promise: a task lost, hung or wrong, or a manager down at the end."""
    tasks = record["tasks"]
    return bool(tasks["hung"] or tasks["wrong"] or tasks["lost"] or not record["manager_alive"])


def summary(record: dict[str, Any]) -> str:
    """The record as a plain two-column table."""
    t, d, f, m = record["tasks"], record["duplicates"], record["faults"], record["manager"]
    rows = [
        ("tasks submitted", t["submitted"]),
        ("completed, correct result", t["correct"]),
        ("failed with a clear error", t["failed_clear"]),
        *((f"  {name}", n) for name, n in sorted(t["failed_by_type"].items())),
        ("wrong results (must be 0)", t["wrong"]),
        ("other exceptions", sum(t["other_exceptions"].values())),
        *((f"  {name}", n) for name, n in sorted(t["other_exceptions"].items())),
        ("hung (must be 0)", t["hung"]),
        ("lost (must be 0)", t["lost"]),
        ("late duplicate results dropped by the client", t["client_duplicates"]),
        ("executions recorded", d["executions"]),
        ("tasks executed more than once", d["duplicated_tasks"]),
        ("extra executions", d["extra_executions"]),
        ("most executions of one task", d["max_executions"]),
        *((f"  duplicated, then {name}", n) for name, n in sorted(d["duplicated_by_outcome"].items())),
        ("answered but never executed", sum(d["never_executed_by_outcome"].values())),
        *((f"  never executed, {name}", n) for name, n in sorted(d["never_executed_by_outcome"].items())),
        ("pool process kills", f.get("pool_process_kills", 0)),
        ("pool kill misses (no child)", f.get("pool_kill_misses", 0)),
        ("worker kills", f.get("worker_kills", 0)),
        ("worker restarts", f.get("restarts", 0)),
        ("restart failures", f.get("restart_failures", 0)),
        ("manager kills", f.get("manager_kills", 0)),
        ("manager restarts", f.get("manager_restarts", 0)),
        ("manager restart failures", f.get("manager_restart_failures", 0)),
        ("elapsed (s)", record["elapsed_s"]),
        ("tasks/s", record["tasks_per_s"]),
        ("managers", record["config"]["managers"]),
        ("every manager alive at end", record["manager_alive"]),
        ("workers alive at end", record["workers_alive_at_end"]),
        ("workers registered at end (fewest on one manager)", record["workers_at_end"]),
        ("managers completed (since their last start)", m["completed"]),
        ("managers failed", m["failed"]),
        ("managers redelivered", m["redelivered"]),
        ("managers rejected", m["rejected"]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"example {kind}: {text}" for kind, text in record["examples"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, print and save the record; 1 if anything hung or was wrong."""
    parser = argparse.ArgumentParser(description="Argon chaos run: tasks under random SIGKILLs.")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks to submit (default 20000)")
    parser.add_argument("--quick", action="store_true", help="2,000 tasks")
    parser.add_argument("--task-ms", type=float, default=10.0, help="sleep in each task, ms (default 10)")
    parser.add_argument("--window", type=int, default=500, help="tasks in flight at most (default 500)")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for each task (default 120)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between faults (default 1)")
    parser.add_argument("--worker-share", type=float, default=0.3, help="share of faults that kill a worker")
    parser.add_argument("--restart-delay", type=float, default=1.0, help="seconds before restarting a worker")
    parser.add_argument("--managers", type=int, default=1, help="managers; every worker serves them all (default 1)")
    parser.add_argument("--manager-share", type=float, default=0.2,
                        help="with several managers, share of faults that kill a manager (default 0.2)")
    parser.add_argument("--max-faults", type=int, default=1000, help="faults at most (default 1000)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard cap on the chaos and submission")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs and execution log")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON record (default {RESULTS})")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.tasks = 2_000
    if opts.seed is None:
        opts.seed = random.randrange(1 << 32)
    record = common.interruptible(lambda: run(opts))
    if record is None:
        return 130
    print(summary(record))
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {opts.output}")
    return 1 if failed(record) else 0


if __name__ == "__main__":
    sys.exit(main())
