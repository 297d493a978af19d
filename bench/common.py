"""Shared helpers for the benchmarks: processes, statistics, targets, records and tables.

Every process a benchmark starts runs in its own session (so its whole process group can
be killed) and carries its :class:`Stack`'s token in ``ARGON_BENCH_TOKEN``, so
:meth:`Stack.close` can also find and kill that stack's descendants that left their group
(Ray's workers, Celery's children) and nothing else. Servers listen on 127.0.0.1 with
``--port 0`` and the port is read back from the ``ARGON READY ROLE HOST:PORT`` line each
one prints. Waiting, child environments and process-group kills come from
:mod:`argon.testing`, which the tests share.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.subprocess
import psutil

import argon
from argon import Client, testing

REPO = Path(__file__).resolve().parents[1]
ARGON = REPO / "bin" / "argon"
RESULTS = REPO / "bench" / "results"
T = TypeVar("T")
HOST = "127.0.0.1"
RUN = uuid.uuid4().hex  # every stack's token starts with this run's id
START_TIMEOUT = 60.0
#: File descriptors a manager may need with 1,000 workers connected (soft limit raised to this).
NOFILE = 4096


def child_env(**extra: str) -> dict[str, str]:
    """Environment for every process the benchmarks start: the repo importable, no ARGON_*, no telemetry."""
    env = testing.child_env(
        RAY_USAGE_STATS_ENABLED="0",  # no telemetry: traffic stays on this machine
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single-node Ray on 127.0.0.1 (see baselines.py)
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _raise_nofile() -> None:
    """Runs in the child before exec: allow enough sockets for 1,000 workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def argon_process(role: str, args: Sequence[str], log_dir: Path, name: str | None = None, port: int = 0) -> Proc:
    """Start ``bin/argon ROLE ARGS`` on 127.0.0.1 (``port``: 0 picks one; verbose); call ``wait_listening``."""
    cmd = [sys.executable, str(ARGON), role, "--host", HOST, "--port", str(port), "--verbose", *args]
    return Proc(name or role, cmd, log_dir, child_env())


def interruptible(run: Callable[[], T]) -> T | None:
    """Call ``run()`` so that SIGTERM ends it like Ctrl-C; None if it was interrupted.

    Either way the ``finally`` blocks inside ``run`` have killed every process it started.
    """
    main = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.get_hub().loop.run_callback(main.throw, SystemExit(143)))
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted; every process started was killed", file=sys.stderr)
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers without ``--port 0``)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


wait_for = testing.wait_for


class Proc:
    """One child process in its own session; its stderr goes to a log file."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.popen = gevent.subprocess.Popen(
            list(cmd),
            stdin=gevent.subprocess.DEVNULL,
            stdout=gevent.subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=str(log_dir),
            start_new_session=True,
            preexec_fn=_raise_nofile,
        )
        self.pid: int = self.popen.pid
        self.host = HOST
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` the process listens on."""
        return f"{self.host}:{self.port}"

    def wait_line(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Read stdout lines until one matches ``pattern`` (bounded in lines and time)."""
        seen = []
        with gevent.Timeout(timeout, TimeoutError(f"{self.name} did not start:\n{self.log()}")):
            for _ in range(1000):
                line = self.popen.stdout.readline().decode(errors="replace")
                if not line:
                    break
                seen.append(line)
                match = pattern.search(line)
                if match:
                    return match
        raise RuntimeError(f"{self.name} exited or printed {''.join(seen)!r}:\n{self.log()}")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> Proc:
        """Wait for the ``ARGON READY ROLE HOST:PORT`` line and remember the address."""
        try:
            _, self.host, self.port = testing.read_ready(self.popen.stdout, timeout, self.name)
        except testing.WaitTimeout:
            raise TimeoutError(f"{self.name} did not start:\n{self.log()}") from None
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None
        return self

    def log(self, tail: int | None = 4000) -> str:
        """What the process wrote to stderr so far: its last ``tail`` characters (None: all)."""
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.popen.poll() is None

    def rss(self) -> int:
        """Resident memory of the process itself, in bytes (0 once it is gone)."""
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def kill(self) -> None:
        """SIGKILL the whole process group and reap the process."""
        testing.kill_group(self.pid)
        with contextlib.suppress(gevent.subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time (user + system) a process, and optionally its children, has used so far; 0 if gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += sum(p.cpu_times()[:2])
        return total
    except psutil.Error:
        return 0.0


def sweep(token: str = RUN) -> int:
    """Kill every process whose ``ARGON_BENCH_TOKEN`` starts with ``token`` (default: this whole run)."""
    me = os.getpid()
    killed = 0
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("ARGON_BENCH_TOKEN", "").startswith(token):
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


@dataclass
class Stack:
    """The processes and clients of one measurement; :meth:`close` stops them all.

    Use as a context manager so every process group is killed in a ``finally``.
    """

    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="argon-bench-")))
    token: str = field(default_factory=lambda: f"{RUN}-{uuid.uuid4().hex[:8]}")
    procs: list[Proc] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        """Start any command in its own session, owned by this stack (and marked with its token)."""
        proc = Proc(name, cmd, self.log_dir, {**(env or child_env()), "ARGON_BENCH_TOKEN": self.token})
        self.procs.append(proc)
        return proc

    def argon(self, role: str, *args: str) -> Proc:
        """Start ``bin/argon ROLE --port 0 ARGS`` on 127.0.0.1 and wait until it listens."""
        cmd = [sys.executable, str(ARGON), role, "--host", HOST, "--port", "0", *args]
        return self.spawn(role, cmd).wait_listening()

    def manager(self, *args: str) -> Proc:
        """Start a manager."""
        return self.argon("manager", *args)

    def worker(self, manager: Proc | None = None, processes: int = 2, *args: str) -> Proc:
        """Start a worker of ``processes`` pool processes, for ``manager`` or stand-alone."""
        extra = ["--manager", manager.address] if manager is not None else []
        return self.argon("worker", "--workers", str(processes), *extra, *args)

    def client(self, server: Proc, **options: Any) -> Client:
        """A :class:`argon.Client` connected to ``server``, closed with the stack."""
        client = Client(server.host, server.port, **options)
        self.closers.append(client.close)
        return client

    def wait_workers(self, client: Any, count: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the server reports ``count`` workers; return its status."""
        return wait_for(
            lambda: (s := client.status()) and len(s["workers"]) >= count and s, timeout, 0.1, f"{count} workers"
        )

    def close(self) -> None:
        """Close clients, kill every process group, then sweep stragglers; never raises."""
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.kill()
        self.closers.clear()
        self.procs.clear()
        sweep(self.token)
        shutil.rmtree(self.log_dir, ignore_errors=True)


def run_baseline(args: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m bench.baselines ARGS`` in its own session and return its JSON result.

    A peer that is not installed comes back as ``{"skipped": "not installed: ..."}``; one
    that fails or overruns ``timeout`` as ``{"skipped": "failed: ..."}``. Never raises.
    """
    with Stack() as stack:
        proc = stack.spawn(f"baseline-{args[0]}", [sys.executable, "-m", "bench.baselines", *args], env)
        try:
            match = proc.wait_line(re.compile(r"^RESULT (.*)$"), timeout)
            return dict(json.loads(match.group(1)))
        except (TimeoutError, RuntimeError, ValueError) as exc:
            return {"skipped": f"failed: {str(exc).splitlines()[0][:200]}", "log": proc.log()[-1500:]}


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, by linear interpolation; nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return percentile(values, 50)


def interleave(rounds: int, contestants: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Run every contestant once per round, rotating who goes first.

    Drifts in machine load then hit every contestant alike, which keeps same-run ratios
    honest on a shared machine.
    """
    names = list(contestants)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(contestants[name]())
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: Any, digits: int = 0) -> str:
    """Format a number with thousands separators; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    """Format a ratio as ``1.23x``."""
    return "-" if value is None else f"{value:.2f}x"


# -- targets ----------------------------------------------------------------------------------


def target(what: str, value: float | None, limit: float, *, at_least: bool, unit: str = "") -> dict[str, Any]:
    """Judge one target: ``value`` must be at least (or at most) ``limit``.

    Returns:
        ``{"target", "value", "limit", "met", "verdict"}``; ``met`` is None when the
        value could not be measured (a skipped baseline).

    """
    op = ">=" if at_least else "<="
    text = f"{what} {op} {fmt(limit, 2 if limit != int(limit) else 0)}{unit}"
    if value is None or value != value:
        return {"target": text, "value": None, "limit": limit, "met": None, "verdict": "not measured (skipped)"}
    met = value >= limit if at_least else value <= limit
    digits = 2 if abs(value) < 10 and value != int(value) else 0
    if limit == 0:
        verdict = f"{'met' if met else 'NOT met'} ({fmt(value, digits)}{unit})"
    elif met:
        margin = (value / limit - 1) if at_least else (1 - value / limit)
        verdict = f"met ({fmt(value, digits)}{unit}, {margin:.0%} to spare)"
    else:
        factor = limit / value if at_least and value > 0 else value / limit
        verdict = f"NOT met ({fmt(value, digits)}{unit}, off by {factor:.2f}x)"
    return {"target": text, "value": value, "limit": limit, "met": met, "verdict": verdict}


# -- records, tables, machine ------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS, Python and package versions of this machine."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in ("gevent", "msgpack", "dill", "psutil", "matplotlib", "dask", "distributed", "ray",
                 "celery", "redis"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["argon"] = argon.__version__
    redis_server = shutil.which("redis-server")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "redis_server": redis_server,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def cell(value: Any) -> str:
    """A table cell: integers get thousands separators, everything else is ``str()``."""
    return fmt(value) if isinstance(value, int) and not isinstance(value, bool) else str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(c) for c in columns], *[[cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(record: dict[str, Any]) -> Path:
    """Write ``bench/results/<scenario>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{record['scenario']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def plt() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    return pyplot


def save_plot(fig: Any, scenario: str) -> str:
    """Save a figure as ``bench/results/<scenario>.png``; returns the file name."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{scenario}.png"
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=90)
    fig.clf()
    return name


def print_record(record: dict[str, Any]) -> None:
    """Print a scenario's table and target verdicts."""
    print(f"\n== {record['title']} ({record['seconds']:.0f}s{', quick' if record['quick'] else ''})")
    for tab in record["tables"]:
        if tab.get("caption"):
            print(f"\n{tab['caption']}")
        print(table(tab["columns"], tab["rows"]))
    for note in record.get("skipped", []):
        print(f"  skipped: {note}")
    for item in record["targets"]:
        print(f"  target {item['target']}: {item['verdict']}")
    print(flush=True)


def new_record(scenario: str, title: str, about: str, quick: bool) -> dict[str, Any]:
    """An empty scenario record; :func:`finish` stamps its duration."""
    return {
        "scenario": scenario,
        "title": title,
        "about": about,
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python bench/run.py" + (" --quick" if quick else "") + f" --only {scenario}",
        "machine": machine_info(),
        "tables": [],
        "targets": [],
        "skipped": [],
        "plot": None,
        "data": {},
        "_t0": time.monotonic(),
    }


def finish(record: dict[str, Any]) -> dict[str, Any]:
    """Stamp the record's duration, save it as JSON and return it."""
    record["seconds"] = round(time.monotonic() - record.pop("_t0"), 1)
    save(record)
    return record


# -- peers that need servers of their own -----------------------------------------------------


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def celery_baseline(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a Celery+Redis baseline: a private redis-server and Celery worker, then the client.

    Redis listens on 127.0.0.1 on a free port and keeps nothing on disk; both servers are
    killed when the measurement ends. Skipped, never faked, when anything is missing.
    """
    missing = [m for m in ("celery", "redis") if not has_module(m)]
    if not shutil.which("redis-server"):
        missing.append("redis-server")
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)}"}
    with Stack() as stack:
        try:
            port = free_port()
            redis = stack.spawn(
                "redis",
                ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--protected-mode", "yes"],
            )
            redis.wait_line(re.compile(r"Ready to accept connections"), 30)
            env = child_env(BENCH_REDIS_URL=f"redis://{HOST}:{port}/0")
            stack.spawn(
                "celery",
                [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--concurrency", "2",
                 "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "--hostname", "bench@127.0.0.1"],
                env,
            )
        except (TimeoutError, RuntimeError, OSError) as exc:
            return {"skipped": f"failed: {str(exc).splitlines()[0][:200]}"}
        return run_baseline(list(args), timeout, env)


def keygen(directory: Path) -> str:
    """Write a new key with ``argon keygen FILE`` and return the file's path."""
    path = directory / "argon.key"
    done = gevent.subprocess.run(
        [sys.executable, str(ARGON), "keygen", str(path)], env=child_env(), capture_output=True, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"argon keygen failed: {done.stderr.decode(errors='replace')}")
    return str(path)
