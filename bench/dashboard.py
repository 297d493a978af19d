"""Scenario: what an open dashboard page costs the manager, and the docs' dashboard screenshots.

Usage:
  python bench/run.py --only dashboard            # the cost, as a scenario of the suite
  python -m bench.dashboard poll URL PAGES        # (internal) a poller standing in for open pages
  python -m bench.dashboard screenshots DIR [SECONDS]
                                                  # a varied load for SECONDS (default 330), then
                                                  # desktop and phone screenshots of the page in DIR
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent
import gevent.subprocess

from argon import testing
from bench import common
from bench.tasks import sleep as task_sleep
from bench.throughput import argon_batch

TITLE = "Dashboard: the cost of an open page"
ABOUT = """\
A manager started with `--dashboard-port`, with one worker of 2 processes, runs batches
of trivial tasks (`noop`, `defer()` then wait for all) from one client, with no page open,
with one page open and with ten, in turns (the order rotated every round); each figure is
the median of its rounds. An open page is stood in for by a separate process that fetches
both `/` and `/api/status` every second over a kept-alive connection (a real page fetches
`/` only once, so this costs the server more than a browser would); it is started once
and paused (SIGSTOP) except during the batches it takes part in. The target is the ratio
of medians, one page open to none. Rates on this shared 2-core machine swing by tens of
percent from round to round with what else runs, so the CPU time the processes used per
task is given too: it shows the cost where it is paid. Last, with no tasks running, the
CPU use of this manager, with no page and with ten pages open, is measured beside that
of a manager started without a dashboard, in the same seconds. (Every manager records
task wait and run times, dashboard or not: under a microsecond per task.)"""


# -- the stand-in for open pages -----------------------------------------------------------------------


def poll(url: str, pages: int) -> None:
    """Fetch ``/`` and ``/api/status`` once a second for each of ``pages`` pages, forever."""
    parts = urllib.parse.urlsplit(url)
    connections: list[http.client.HTTPConnection | None] = [None] * pages
    announced = False
    while True:
        started = time.monotonic()
        for page in range(pages):
            for path in ("/", "/api/status"):
                try:
                    connections[page] = _fetch(connections[page], parts.hostname or "", parts.port or 80, path)
                except (OSError, http.client.HTTPException, RuntimeError) as exc:
                    print(f"poll {path} failed: {exc}", file=sys.stderr, flush=True)
                    connections[page] = None
        if not announced:
            print("polling", flush=True)  # the first round went through
            announced = True
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def _fetch(conn: http.client.HTTPConnection | None, host: str, port: int, path: str) -> http.client.HTTPConnection:
    """GET ``path`` (reconnecting once if the kept-alive connection was closed); return the connection."""
    for attempt in (1, 2):
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"{path}: HTTP {reply.status}")
            return conn
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = None
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def dashboard_manager(stack: common.Stack, *args: str) -> tuple[common.Proc, str]:
    """Start a manager with ``--dashboard-port 0``; return it and its dashboard's URL."""
    cmd = [sys.executable, str(common.ARGON), "manager", "--host", common.HOST, "--port", "0",
           "--dashboard-port", "0", *args]
    proc = stack.spawn("manager", cmd)
    printed: list[str] = []
    _, proc.host, proc.port = testing.read_ready(proc.popen.stdout, common.START_TIMEOUT, "manager", printed)
    match = re.search(r"dashboard on (\S+)", "".join(printed))
    if match is None:
        raise RuntimeError(f"the manager printed no dashboard address: {printed!r}")
    return proc, match.group(1)


class Pages:
    """A poller process standing in for ``pages`` open pages: started once, then paused
    (SIGSTOP) except inside :meth:`opened`, so that no process start lands in a measurement.
    """

    def __init__(self, stack: common.Stack, url: str, pages: int) -> None:
        self.proc = stack.spawn(f"poller{pages}", [sys.executable, "-m", "bench.dashboard", "poll", url, str(pages)])
        self.proc.wait_line(re.compile(r"^polling"), 30)
        os.kill(self.proc.pid, signal.SIGSTOP)

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """The pages are open (polling) inside the ``with`` block."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)
            if not self.proc.alive():
                raise RuntimeError(f"the poller stopped:\n{self.proc.log()}")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, to the nanosecond where Linux tells (``/proc/PID/schedstat``).

    psutil's figure moves in 10 ms ticks: too coarse for an idle manager's few milliseconds a second.
    """
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return common.cpu_seconds(pid)


# -- the scenario ---------------------------------------------------------------------------------------


LABELS = {"idle": "no page open", "page": "one page open", "pages10": "ten pages open"}


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario and return its record."""
    record = common.new_record("dashboard", TITLE, ABOUT, quick)
    count, rounds = (2000, 3) if quick else (2500, 60)
    manager_cpu: dict[str, float] = {}  # CPU seconds of the manager, per contestant
    network_cpu: dict[str, float] = {}  # ... of the client, manager, worker and pool processes
    with common.Stack() as stack, common.Stack() as plain_stack:
        manager, url = dashboard_manager(stack)
        worker = stack.worker(manager, 2)
        client = stack.client(manager)
        stack.wait_workers(client, 1)
        argon_batch(client, 500)
        plain = plain_stack.manager()  # only for the idle cost, below
        plain_stack.worker(plain, 2)
        pollers = {1: Pages(stack, url, 1), 10: Pages(stack, url, 10)}

        def cpu() -> tuple[float, float]:
            ours = common.cpu_seconds(os.getpid()) + common.cpu_seconds(worker.pid, True)
            mine = cpu_seconds(manager.pid)
            return mine, mine + ours

        def batch(name: str, pages: int) -> float:
            with pollers[pages].opened() if pages else contextlib.nullcontext():
                before = cpu()
                rate = count / argon_batch(client, count)
                after = cpu()
            manager_cpu[name] = manager_cpu.get(name, 0.0) + after[0] - before[0]
            network_cpu[name] = network_cpu.get(name, 0.0) + after[1] - before[1]
            return rate

        runs = common.interleave(rounds, {"idle": lambda: batch("idle", 0), "page": lambda: batch("page", 1),
                                          "pages10": lambda: batch("pages10", 10)})
        idle = idle_cost(pollers[10], manager, plain, seconds=2.0 if quick else 5.0, rounds=1 if quick else 3)
    rates = {name: common.median(values) for name, values in runs.items()}
    tasks = count * rounds
    per_k = {name: (1e6 * manager_cpu[name] / tasks, 1e6 * network_cpu[name] / tasks) for name in runs}
    record["tables"].append({
        "caption": f"One manager with --dashboard-port: trivial tasks per second, median of {rounds} rounds of"
                   f" {count:,} tasks each, and CPU time per 1,000 tasks over all rounds",
        "columns": ["pages", "tasks/s", "/ no page open", "manager CPU", "all processes' CPU", "/ no page open"],
        "rows": [[LABELS[name], common.fmt(rates[name]), common.fmt_ratio(common.ratio(rates[name], rates["idle"])),
                  f"{per_k[name][0]:.1f} ms", f"{per_k[name][1]:.0f} ms",
                  common.fmt_ratio(common.ratio(per_k[name][1], per_k["idle"][1]))] for name in runs],
    })
    record["tables"].append({
        "caption": "CPU time of idle managers (no tasks), measured side by side in the same seconds",
        "columns": ["manager", "CPU"],
        "rows": [["without a dashboard", f"{idle['plain_ms']:.2f} ms/s"],
                 ["with --dashboard-port, no page open", f"{idle['idle_ms']:.2f} ms/s"],
                 ["with --dashboard-port, ten pages open", f"{idle['pages_ms']:.2f} ms/s"],
                 ["one page, by difference", f"{(idle['pages_ms'] - idle['idle_ms']) / 10:.2f} ms/s"]],
    })
    record["tables"].append({
        "caption": "Every round's tasks per second, in the order they ran",
        "columns": ["pages", "rounds"],
        "rows": [[LABELS[name], " ".join(common.fmt(v) for v in runs[name])] for name in runs],
    })
    record["targets"] = [
        common.target("one page open: tasks/s / no page open",
                      common.ratio(rates["page"], rates["idle"]), 0.95, at_least=True, unit="x"),
    ]
    record["data"] = {"count": count, "rounds": runs, "medians": rates, "cpu_ms_per_1000": per_k, "idle": idle}
    return common.finish(record)


def idle_cost(pages: Pages, manager: common.Proc, plain: common.Proc, seconds: float,
              rounds: int) -> dict[str, float]:
    """CPU use (ms per second) of idle managers: one without a dashboard and one with, without and with pages."""
    samples: dict[str, list[float]] = {"plain_ms": [], "idle_ms": [], "pages_ms": []}
    for _ in range(rounds):
        for opened in (False, True):
            with pages.opened() if opened else contextlib.nullcontext():
                before = (cpu_seconds(manager.pid), cpu_seconds(plain.pid), time.monotonic())
                gevent.sleep(seconds)
                elapsed = time.monotonic() - before[2]
                samples["pages_ms" if opened else "idle_ms"].append(
                    1000 * (cpu_seconds(manager.pid) - before[0]) / elapsed)
                if not opened:
                    samples["plain_ms"].append(1000 * (cpu_seconds(plain.pid) - before[1]) / elapsed)
    return {name: common.median(values) for name, values in samples.items()}


# -- screenshots for the docs ---------------------------------------------------------------------------


def _offer(client: common.Client, seconds: float, capacity: float) -> None:
    """A load that rises above capacity and falls back, with a few failures, for ``seconds``."""

    def flaky(duration: float) -> None:
        import random as chance
        import time as clock

        clock.sleep(duration)
        if chance.random() < 0.004:
            raise ValueError("a task failed (on purpose)")

    pending: list[Any] = []
    started = time.monotonic()
    while (now := time.monotonic() - started) < seconds:
        load = capacity * (0.65 + 0.5 * math.sin(2 * math.pi * now / 150))  # tasks/s offered now
        for _ in range(int(load / 10 + random.random())):
            duration = random.lognormvariate(math.log(0.015), 0.5)
            pending.append(client.defer(flaky if random.random() < 0.5 else task_sleep, (duration,)))
        pending = [d for d in pending if not d.done()]
        gevent.sleep(0.1)


def screenshots(directory: Path, seconds: float = 330.0) -> list[Path]:
    """Run a varied load, then save desktop and phone screenshots (and one with a lost worker)."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        raise SystemExit("no headless browser: apt-get install chromium")
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    with common.Stack() as stack:
        manager, url = dashboard_manager(stack, "--queue-size", "5000")
        workers = [stack.worker(manager, 2) for _ in range(3)]
        client = stack.client(manager)
        stack.wait_workers(client, 3)
        loader = gevent.spawn(_offer, client, seconds + 60, capacity=6 / 0.02)
        gevent.sleep(seconds)
        for name, size in (("dashboard.png", "1280,1040"), ("dashboard-phone.png", "390,1640")):
            saved.append(_shoot(browser, url, directory / name, size))
        workers[1].kill()  # a worker lost: what the page shows then
        gevent.sleep(3)
        saved.append(_shoot(browser, url, directory / "dashboard-lost.png", "1280,1040"))
        loader.kill()
    return saved


def _shoot(browser: str, url: str, path: Path, size: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="argon-shot-") as profile:
        done = gevent.subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--hide-scrollbars",
             f"--window-size={size}", f"--screenshot={path}", url],
            capture_output=True, timeout=120, start_new_session=True)
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"{browser} failed: {done.stderr.decode(errors='replace')[-1000:]}")
    print(f"wrote {path}")
    return path


def main(argv: list[str]) -> int:
    """Command-line entry point (see the module docstring)."""
    if argv[:1] == ["poll"] and len(argv) == 3:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        poll(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["screenshots"] and len(argv) in (2, 3):
        common.interruptible(lambda: screenshots(Path(argv[1]), float(argv[2]) if len(argv) == 3 else 330.0))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
