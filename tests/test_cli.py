"""The argon command line: help, version, option errors, keygen."""

from __future__ import annotations

import re
import stat
import subprocess
import sys

import pytest

from argon import Client, __version__

from conftest import ARGON, child_env, wait_for

CONTRACT_OPTIONS = ["--host", "--port", "--queue-size", "--key", "--manager", "--workers", "--max-requests",
                    "-v", "--verbose", "--debug", "--help", "--version", "--insecure", "--grace", "--heartbeat"]


def argon(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, str(ARGON), *args], capture_output=True, text=True,
                          env=env or child_env(), timeout=timeout)


def test_help_lists_every_option_and_command():
    result = argon("--help")
    assert result.returncode == 0
    for option in CONTRACT_OPTIONS:
        assert re.search(rf"(^|\s){re.escape(option)}\b", result.stdout), option
    for command in ("argon manager", "argon worker", "argon keygen"):
        assert command in result.stdout
    assert "(default: 127.0.0.1)" in result.stdout


def test_version():
    result = argon("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"argon {__version__}"


def test_the_console_script_runs_the_same_command():
    """``pip install`` makes ``argon`` call ``argon.cli:run``, which is ``bin/argon``'s ``main``."""
    setup = (ARGON.parent.parent / "setup.py").read_text()
    assert '"argon = argon.cli:run"' in setup
    code = "import sys; sys.argv = ['argon', '--version']; from argon.cli import run; run()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"argon {__version__}"


def test_debug_logs_everything_and_no_flag_only_warnings(net):
    debug = net.manager("--debug")  # (the tests add --verbose to every server)
    net.client(debug).status()
    wait_for(lambda: re.search(r" DEBUG argon\.server\[\d+\]: client \S+ connected", debug.log()), 5,
             what="a debug line")
    quiet = subprocess.Popen([sys.executable, str(ARGON), "manager", "--port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    try:
        line = ""
        while "ARGON READY" not in line:
            line = quiet.stdout.readline()
            assert line, "the manager exited"
        host, port = re.search(r"ARGON READY \w+ (\S+):(\d+)", line).groups()
        with Client(host, int(port)) as client:
            client.status()
    finally:
        quiet.terminate()
        _, errors = quiet.communicate(timeout=30)
    assert quiet.returncode == 0
    assert " INFO " not in errors and " DEBUG " not in errors, errors


@pytest.mark.parametrize("args, message", [
    (["manager", "--port", "eighty"], "--port expects a number"),
    (["worker", "--workers", "0"], "--workers must be at least 1"),
    (["worker", "--manager", "nohostport"], "--manager expects HOST:PORT"),
    (["manager", "--frobnicate"], "unknown option --frobnicate"),
    (["manager", "extra"], "invalid arguments for 'argon manager': extra"),
    (["launch"], "unknown command 'launch'"),
    ([], "missing command"),
])
def test_bad_options_fail_with_one_line_and_status_2(args, message):
    result = argon(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_keygen_writes_an_owner_only_key(tmp_path):
    target = tmp_path / "argon.key"
    result = argon("keygen", str(target))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(bytes.fromhex(target.read_text().strip())) == 32
    again = argon("keygen", str(target))
    assert again.returncode != 0  # never overwrites a key
    assert "File exists" in again.stderr


def test_environment_supplies_options(net):
    manager = net.manager(env=child_env(ARGON_QUEUE_SIZE="0"))
    net.worker(manager, processes=1)
    client = net.client(manager, retries=0)
    net.wait_workers(client, 1)
    assert client.status()["queue_size"] == 0
    assert client.queue(lambda: 5) == 5


def test_sigterm_stops_an_idle_manager_and_worker_with_status_0(net):
    manager = net.manager()
    worker = net.worker(manager, processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)
    assert worker.stop() == 0
    assert manager.stop() == 0
