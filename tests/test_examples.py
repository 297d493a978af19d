"""Smoke tests for ``examples/``: each example runs as its own program, as a user runs it.

Every run is ``python examples/X.py ...`` from the repository root, with the environment
of :func:`conftest.child_env` plus a tag of its own. Every process the example starts
(the manager and workers of its ``LocalCluster``, their pool processes) inherits the tag,
so after the example exits the test can find any it left behind, even those that were
re-parented, and fails (after killing them) if one is still running past a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from types import ModuleType

import gevent
import gevent.subprocess
import psutil
import pytest

from conftest import REPO, child_env, make_key

pytestmark = pytest.mark.timeout(300)

RUN_TIMEOUT = 200.0  # the machine may be busy; the default runs take seconds
EXIT_DEADLINE = 30.0  # for the processes an example started to be gone after it exits
TAG = "EXAMPLES_SMOKE_TAG"  # not ARGON_*: argon reads those as options


# -- running examples ------------------------------------------------------------------


def _tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (the example's own and its descendants)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return found


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())}")
    return "\n".join(lines)


def _reap(tag: str, deadline: float = EXIT_DEADLINE) -> str:
    """Wait for every tagged process to exit; kill those still running at the deadline.

    Returns:
        A description of the processes that had to be killed ("" if none).
    """
    until = time.monotonic() + deadline
    while (left := _tagged(tag)) and time.monotonic() < until:
        gevent.sleep(0.1)
    described = _describe(left)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return described


def run_example(name: str, *args: str, timeout: float = RUN_TIMEOUT, ok: bool = True) -> tuple[str, str]:
    """Run ``examples/<name>``; check that it exits (0 if ``ok``) and leaves nothing running.

    Output goes to files, not pipes: a process left running would hold a pipe open, and
    reading it to the end would hang instead of failing.

    Returns:
        Its stdout and stderr.
    """
    tag = uuid.uuid4().hex
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:

        def output() -> tuple[str, str]:
            out_file.seek(0)
            err_file.seek(0)
            return out_file.read().decode(errors="replace"), err_file.read().decode(errors="replace")

        proc = gevent.subprocess.Popen(
            [sys.executable, f"examples/{name}", *args],
            stdout=out_file,
            stderr=err_file,
            env=child_env(**{TAG: tag}),
            cwd=str(REPO),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _reap(tag, deadline=5.0)
            if isinstance(exc, gevent.subprocess.TimeoutExpired):
                stdout, stderr = output()
                raise AssertionError(f"{name} ran for over {timeout}s\n{stdout}\n{stderr}") from None
            raise
        left = _reap(tag)
        stdout, stderr = output()
    shown = f"\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    if ok:
        assert proc.returncode == 0, f"{name} exited with status {proc.returncode}{shown}"
    else:
        assert proc.returncode != 0, f"{name} should have failed{shown}"
    assert not left, f"{name} left processes running after it exited (now killed):\n{left}{shown}"
    return stdout, stderr


def load_example(name: str) -> ModuleType:
    """Import an example as a module (its ``main()`` does not run), to reuse its functions."""
    if str(REPO / "examples") not in sys.path:
        sys.path.append(str(REPO / "examples"))  # as when run: examples import their _network helper
    spec = importlib.util.spec_from_file_location(f"example_{name.removesuffix('.py')}", REPO / "examples" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines_in_order(out: str, *expected: str) -> None:
    """Assert that each expected line is in ``out``, in this order."""
    lines = out.splitlines()
    at = 0
    for line in expected:
        assert line in lines[at:], f"missing line {line!r} (in order) in:\n{out}"
        at = lines.index(line, at) + 1


# -- what each example must print --------------------------------------------------------


def check_canonical_queue(out: str) -> None:
    lines_in_order(
        out,
        "client.queue(lambda x, y: x + y, [4, 7]) = 11",
        "client.queue(fails, ['missing']) raised KeyError('missing')",
        "  the worker's traceback is its __cause__, ending: KeyError: 'missing'",
    )


def check_canonical_defer(out: str) -> None:
    lines_in_order(
        out,
        "deferred = client.defer(lambda x, y: x + y, [4, 7]); deferred() = 11",
        "client.defer(lambda x: x / 0, [4]) returned at once, raising nothing",
        "the task has failed (done() = True), and still nothing was raised",
        "calling the deferred raised ZeroDivisionError(division by zero)",
        "calling it again raised ZeroDivisionError(division by zero)",
    )


def check_monte_carlo(out: str, tasks: int, samples: int, seed: int) -> float:
    """Check the estimate against the same computation done here; return it."""
    match = re.search(r"^pi ~ (\d\.\d{6}) from ([\d,]+) samples in (\d+) tasks$", out, re.M)
    assert match, out
    estimate = float(match.group(1))
    assert (int(match.group(2).replace(",", "")), int(match.group(3))) == (tasks * samples, tasks)
    assert abs(estimate - math.pi) < 0.05, out
    count_hits = load_example("monte_carlo_pi.py").count_hits
    local = 4 * sum(count_hits(samples, seed + i) for i in range(tasks)) / (tasks * samples)
    assert match.group(1) == f"{local:.6f}", f"the network's estimate differs from the local {local:.6f}:\n{out}"
    error = re.search(r"^error vs math\.pi: ([+-]\d\.\d{6}) \(", out, re.M)
    assert error and abs(float(error.group(1)) - (local - math.pi)) < 2e-6, out
    rate = re.search(rf"^{tasks} tasks in (\d+\.\d\d)s: ([\d,.]+) tasks/s, ([\d,]+) samples/s$", out, re.M)
    assert rate and float(rate.group(2).replace(",", "")) > 0, out
    return estimate


def top_words(out: str) -> list[tuple[str, int]]:
    """The (word, count) lines that follow "top N words:"."""
    _, sep, tail = out.partition(" words:\n")
    assert sep, out
    return [(m.group(2), int(m.group(1).replace(",", ""))) for m in re.finditer(r"^ *([\d,]+)  (\S+)$", tail, re.M)]


def check_fan_out_fan_in(out: str, numbers: int, chunks: int) -> None:
    expected = (numbers - 1) * numbers * (2 * numbers - 1) // 6
    assert expected == sum(k * k for k in range(numbers))
    assert f"sum of k*k for 0 <= k < {numbers:,}; closed form (N-1)N(2N-1)/6 = {expected}" in out.splitlines(), out
    fan = re.search(r"^fan-out/fan-in: +(\d+) from (\d+) tasks in [\d.]+s \(ok\)$", out, re.M)
    pipe = re.search(r"^pipeline: +(\d+) from (\d+) tasks in [\d.]+s \(ok\)$", out, re.M)
    assert fan and pipe, out
    assert (int(fan.group(1)), int(fan.group(2))) == (expected, chunks), out
    assert (int(pipe.group(1)), int(pipe.group(2))) == (expected, 2 * chunks), out


# A folder with known counts: words in three cases and with punctuation, spread over
# three files (one in a subfolder), and a non-matching file that must be ignored.
WORDS = {
    "apple": 15, "banana": 12, "cherry": 11, "don't": 10, "elder": 9, "fig": 8, "grape": 7,
    "honeydew": 6, "kiwi": 5, "lime": 5, "mango": 3, "nectarine": 1,
}
TOP_TEN = [("apple", 15), ("banana", 12), ("cherry", 11), ("don't", 10), ("elder", 9), ("fig", 8), ("grape", 7),
           ("honeydew", 6), ("kiwi", 5), ("lime", 5)]


def write_word_folder(folder: Path) -> Path:
    cases = (str.lower, str.upper, str.capitalize)
    names = ("a.txt", "b.txt", "nested/c.txt")
    for i, (name, case) in enumerate(zip(names, cases, strict=True)):
        words = [case(word) for word, count in WORDS.items() for _ in range(count // 3 + (i < count % 3))]
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(", ".join(words[j:j + 7]) + "." for j in range(0, len(words), 7)), encoding="utf-8")
    (folder / "ignored.md").write_text("zebra " * 100, encoding="utf-8")
    return folder


def check_word_count(out: str) -> None:
    assert f"{sum(WORDS.values())} words ({len(WORDS)} distinct) in 3 files, one task each, in" in out, out
    assert top_words(out) == TOP_TEN, out
    assert "zebra" not in out


# -- each example on a network of its own -----------------------------------------------


def test_quickstart():
    out, _ = run_example("quickstart.py")
    lines_in_order(
        out,
        "queue(lambda x, y: x + y, [4, 7]) = 11",
        "defer(lambda x, y: x + y, [4, 7])() = 11",
        "a task's error comes back as itself: KeyError('missing')",
    )
    assert re.search(r"^network up in [\d.]+s: manager 127\.0\.0\.1:\d+, 2 workers x 2 processes$", out, re.M), out
    pi = re.search(r"^pi ~ (\d\.\d{5}) from 5,000,000 samples in 200 tasks \([\d.]+s\)$", out, re.M)
    assert pi and abs(float(pi.group(1)) - math.pi) < 0.05, out
    rate = re.search(r"^5,000 trivial tasks in [\d.]+s: ([\d,]+) tasks/s$", out, re.M)
    assert rate and int(rate.group(1).replace(",", "")) > 0, out
    done = re.search(r"^manager: ([\d,]+) tasks completed, (\d+) failed; per worker: (\d+), (\d+)$", out, re.M)
    assert done, out
    assert int(done.group(1).replace(",", "")) >= 5202 and int(done.group(2)) == 1, out
    assert int(done.group(3)) > 0 and int(done.group(4)) > 0, "both workers should have run tasks"
    assert re.search(r"^network shut down cleanly; total [\d.]+s$", out, re.M), out


def test_canonical_queue():
    out, _ = run_example("canonical_queue.py")
    assert re.search(r"^started a local network: manager 127\.0\.0\.1:\d+, 1 node x 2 processes$", out, re.M), out
    check_canonical_queue(out)


def test_canonical_defer():
    out, _ = run_example("canonical_defer.py")
    assert out.startswith("started a local network: manager 127.0.0.1:"), out
    check_canonical_defer(out)


def test_monte_carlo_pi_defaults():
    out, _ = run_example("monte_carlo_pi.py")
    assert out.startswith("started a local network: manager 127.0.0.1:"), out
    check_monte_carlo(out, tasks=100, samples=20_000, seed=0)


def test_monte_carlo_pi_options():
    out, _ = run_example("monte_carlo_pi.py", "--tasks", "9", "--samples", "4,000", "--seed", "42")
    check_monte_carlo(out, tasks=9, samples=4000, seed=42)


def test_word_count_folder(tmp_path):
    folder = write_word_folder(tmp_path / "texts")
    out, _ = run_example("word_count.py", str(folder))
    assert "built-in sample" not in out
    check_word_count(out)


def test_word_count_pattern_and_top(tmp_path):
    folder = write_word_folder(tmp_path / "texts")
    out, _ = run_example("word_count.py", str(folder), "--pattern", "*.md", "--top", "3")
    assert "100 words (1 distinct) in 1 files, one task each, in" in out, out
    assert top_words(out) == [("zebra", 100)], out


def test_word_count_builtin_sample():
    out, _ = run_example("word_count.py")
    match = re.search(r"^no folder given: counting a built-in sample of (\d+) files in (\S+)$", out, re.M)
    assert match, out
    sample = load_example("word_count.py").SAMPLE
    assert int(match.group(1)) == len(sample)
    assert not Path(match.group(2)).exists(), "the sample's temporary folder should be removed"
    counts = Counter(re.findall(r"[a-z]+(?:'[a-z]+)*", "\n".join(sample.values()).lower()))
    assert f"{sum(counts.values())} words ({len(counts)} distinct) in {len(sample)} files" in out, out
    assert top_words(out) == sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:10], out
    assert top_words(out)[:3] == [("and", 8), ("to", 8), ("the", 6)], out


def test_word_count_rejects_a_missing_folder(tmp_path):
    _, err = run_example("word_count.py", str(tmp_path / "nowhere"), ok=False)
    assert "is not a folder" in err, err


def test_fan_out_fan_in_defaults():
    out, _ = run_example("fan_out_fan_in.py")
    assert out.startswith("started a local network: manager 127.0.0.1:"), out
    check_fan_out_fan_in(out, numbers=200_000, chunks=40)


def test_fan_out_fan_in_uneven_chunks():
    out, _ = run_example("fan_out_fan_in.py", "--numbers", "12345", "--chunks", "7")
    check_fan_out_fan_in(out, numbers=12345, chunks=7)


# -- examples on a network that is already running ----------------------------------------


@pytest.mark.parametrize("name", ["canonical_queue.py", "canonical_defer.py", "monte_carlo_pi.py",
                                  "word_count.py", "fan_out_fan_in.py"])
def test_example_with_connect(net, tmp_path, name):
    manager, _, client = net.cluster(workers=1, processes=2)
    args = {
        "monte_carlo_pi.py": ["--tasks", "8", "--samples", "5000", "--seed", "3"],
        "word_count.py": [str(write_word_folder(tmp_path / "texts"))],
        "fan_out_fan_in.py": ["--numbers", "1001", "--chunks", "5"],
    }.get(name, [])
    tasks = {"canonical_queue.py": 2, "canonical_defer.py": 2, "monte_carlo_pi.py": 8, "word_count.py": 3,
             "fan_out_fan_in.py": 15}[name]

    out, _ = run_example(name, *args, "--connect", manager.address)

    assert out.startswith(f"using the manager at {manager.address}\n"), out
    assert "started a local network" not in out
    {
        "canonical_queue.py": check_canonical_queue,
        "canonical_defer.py": check_canonical_defer,
        "monte_carlo_pi.py": lambda out: check_monte_carlo(out, tasks=8, samples=5000, seed=3),
        "word_count.py": check_word_count,
        "fan_out_fan_in.py": lambda out: check_fan_out_fan_in(out, numbers=1001, chunks=5),
    }[name](out)
    status = client.status()  # the tasks ran on this network
    assert status["completed"] + status["failed"] == tasks, status


@pytest.fixture
def key(tmp_path):
    return make_key(tmp_path / "argon.key")


def test_example_with_connect_and_key_file(net, key):
    manager = net.manager("--key", str(key))
    net.worker(manager, "--key", str(key))
    client = net.client(manager, key_file=str(key))
    net.wait_workers(client, 1)

    out, _ = run_example("canonical_queue.py", "--connect", manager.address, "--key-file", str(key))
    assert out.startswith(f"using the manager at {manager.address}\n"), out
    check_canonical_queue(out)
    assert client.status()["completed"] >= 1

    _, err = run_example("canonical_queue.py", "--connect", manager.address, ok=False)  # no key: refused
    assert "AuthenticationError" in err, err


# -- using Argon from any Python code (docs/using.md) -------------------------------------------


def _number(pattern: str, out: str) -> list[str]:
    match = re.search(pattern, out, re.M)
    assert match, f"no line matching {pattern!r} in:\n{out}"
    return list(match.groups())


def test_from_threads():
    out, _ = run_example("from_threads.py", "--threads", "6", "--calls", "20")
    total, expected = _number(r"^6 threads x 20 queue\(\) calls: sum of squares = (\d+)\nexpected (\d+);", out)
    assert total == expected == str(sum(i * i for i in range(120)))
    (overlap,) = _number(r"^1s of remote sleep overlapped 1s of local work: ([\d.]+)s in all$", out)
    assert float(overlap) < 1.8, out


def test_from_asyncio():
    out, _ = run_example("from_asyncio.py", "--tasks", "100")
    pattern = r"of 100 tasks: sum = (\d+)\nexpected (\d+); longest event-loop stall ([\d.]+) ms"
    total, expected, stall = _number(pattern, out)
    assert total == expected == str(sum(range(1, 101)))
    assert float(stall) < 250, out


def test_from_gevent():
    out, _ = run_example("from_gevent.py", "--greenlets", "50")
    total, expected = _number(r"^50 greenlets, one client: sum = (\d+) \(expected (\d+)\)$", out)
    assert total == expected == str(3 * sum(range(50)))
    assert "client on the program's hub: True" in out


def test_executor_map():
    out, _ = run_example("executor_map.py", "--items", "5000")
    assert "executor.submit(pow, 2, 100).result() = 1267650600228229401496703205376" in out, out
    assert re.search(r"^primes below 5000: 669 \(map, chunksize=64, [\d.]+s\)$", out, re.M), out
    assert "concurrent.futures.wait: 3 of 3 done; 10! = 3628800" in out, out


def test_pool_map():
    out, _ = run_example("pool_map.py")
    assert "the longest Collatz chain below 10001 starts at 6171 (261 steps)" in out, out
    assert "pool.starmap(pow, [(2, 10), (3, 4)]) = [1024, 81]" in out, out
    assert "pool.apply_async(sum, ([1, 2, 3],)).get() = 6" in out, out
    assert "first three of pool.imap: [111, 118, 178]" in out, out


def test_joblib_sklearn():
    pytest.importorskip("sklearn")
    out, _ = run_example("joblib_sklearn.py")
    assert f"over 10000 calls: sum of squares = {sum(i * i for i in range(10_000))}" in out, out
    (accuracy,) = _number(r"n_jobs=-1\): mean accuracy ([\d.]+)$", out)
    assert float(accuracy) > 0.8, out


@pytest.mark.parametrize("name", ["from_threads.py", "executor_map.py", "pool_map.py"])
def test_any_caller_example_with_connect(net, name):
    manager, _, client = net.cluster(workers=1, processes=2)
    out, _ = run_example(name, "--connect", manager.address)
    assert "started a local network" not in out
    assert client.status()["completed"] > 0  # the tasks ran on this network
