"""The baselines, each run in a fresh process: ``python -m bench.baselines PEER MODE [N] [SIZE]``.

PEER is ``pool`` (multiprocessing.Pool(2)), ``ppe`` (ProcessPoolExecutor(2)), ``dask``
(a LocalCluster of 2 single-threaded worker processes), ``ray`` (num_cpus=2) or ``celery``
(a Celery worker of 2 prefork processes, started by the caller, on the Redis at
``BENCH_REDIS_URL``). MODE is ``throughput`` (N trivial tasks submitted at once, then
collected), ``latency`` (N sequential round trips), ``payload`` (N echo tasks of SIZE
bytes each way) or ``map`` (``ProcessPoolExecutor(2).map`` of N items with chunksize SIZE;
``ppe`` only). PEER may also be ``relay-tcp-tcp-pipe`` or ``relay-tcp-pipe`` (``latency``
only): no task system at all, only a chain of plain processes that pass a 100-byte message
along the same hops as Argon's round trip through a manager (or to a stand-alone worker)
and back, with blocking reads and writes: the cost of the hops themselves (see
:func:`_relay`); ``hub-relay-tcp-tcp-pipe`` does the same on gevent hubs. The result is
printed as one line: ``RESULT {json}``; a peer that is not installed prints ``{"skipped": "not installed: NAME"}``.

This module imports neither gevent nor argon, so each baseline runs in a clean process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

from bench.tasks import echo, noop

WARMUP = 100
PROCESSES = 2

# Ray as a single-node instance: with this set (the name says Windows or macOS, but Ray reads
# it everywhere, when it is imported) every Ray process uses 127.0.0.1 instead of the
# machine's interface address. Ray also keeps its session files in a temp dir of ours.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _latencies(call: Callable[[int], Any], count: int) -> list[float]:
    for i in range(WARMUP):
        call(i)
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t0)
    return out


def _timed(batch: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    batch()
    return time.perf_counter() - t0


class Peer(NamedTuple):
    """How one system runs tasks: submit ``func(arg)``, wait for one, run a whole batch."""

    submit: Callable[[Callable[[Any], Any], Any], Any]
    get: Callable[[Any], Any]
    batch: Callable[[Callable[[Any], Any], list[Any]], list[Any]]


def _one_by_one(submit: Callable[..., Any], get: Callable[[Any], Any]) -> Peer:
    return Peer(submit, get, lambda f, args: [get(r) for r in [submit(f, a) for a in args]])


def _measure(mode: str, count: int, size: int, peer: Peer) -> dict[str, Any]:
    """Run MODE on ``peer``."""
    if mode == "latency":
        return {"latencies": _latencies(lambda i: peer.get(peer.submit(noop, i)), count)}
    if mode == "map":  # ProcessPoolExecutor.map with chunksize=SIZE
        with ProcessPoolExecutor(PROCESSES, mp_context=multiprocessing.get_context("fork")) as ex:
            list(ex.map(noop, range(WARMUP), chunksize=size or 1))
            elapsed = _timed(lambda: list(ex.map(noop, range(count), chunksize=size or 1)))
        return {"items": count, "seconds": elapsed, "rate": count / elapsed}
    if mode == "throughput":
        peer.batch(noop, list(range(WARMUP)))
        elapsed = _timed(lambda: peer.batch(noop, list(range(count))))
        return {"tasks": count, "seconds": elapsed, "rate": count / elapsed}
    data = b"x" * size
    peer.batch(echo, [data])
    elapsed = _timed(lambda: peer.batch(echo, [data] * count))
    return {"tasks": count, "bytes": 2 * size * count, "seconds": elapsed, "mb_s": 2 * size * count / elapsed / 1e6}


@contextlib.contextmanager
def _pool() -> Iterator[Peer]:
    with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
        yield _one_by_one(lambda f, a: pool.apply_async(f, (a,)), lambda r: r.get(60))


@contextlib.contextmanager
def _ppe() -> Iterator[Peer]:
    with ProcessPoolExecutor(PROCESSES, mp_context=multiprocessing.get_context("fork")) as ex:
        yield _one_by_one(ex.submit, lambda f: f.result(60))


@contextlib.contextmanager
def _scratch(peer: str) -> Iterator[str]:
    """A temp dir for a peer's own files (Ray's session, Dask's spill space), removed afterwards."""
    path = tempfile.mkdtemp(prefix=f"argon-bench-{peer}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _dask() -> Iterator[Peer]:
    import dask
    from dask.distributed import Client, LocalCluster

    with (
        _scratch("dask") as temp,
        dask.config.set({"temporary-directory": temp}),  # not /tmp/dask-scratch-space
        LocalCluster(
            n_workers=PROCESSES, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
            local_directory=temp,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield Peer(
            lambda f, a: client.submit(f, a, pure=False),
            lambda fut: fut.result(60),
            lambda f, args: client.gather(client.map(f, args, pure=False)),
        )


@contextlib.contextmanager
def _ray() -> Iterator[Peer]:
    # Ray 2.5x turns token authentication on for a new local cluster and, unless given a
    # token, writes one to ~/.ray/auth_token: give it a fresh one in the environment (its
    # processes inherit it) so it stays on and nothing is left outside our temp dir.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    with _scratch("ray") as temp:
        ray.init(num_cpus=PROCESSES, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp)
        try:
            remote: dict[Any, Any] = {noop: ray.remote(noop), echo: ray.remote(echo)}
            yield Peer(
                lambda f, a: remote[f].remote(a),
                lambda ref: ray.get(ref, timeout=60),
                lambda f, args: ray.get([remote[f].remote(a) for a in args], timeout=300),
            )
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _celery() -> Iterator[Peer]:
    from bench import celery_app

    deadline = time.monotonic() + 60
    while not celery_app.app.control.ping(timeout=0.5):
        if time.monotonic() > deadline:
            raise TimeoutError("the Celery worker did not answer pings within 60s")
    tasks = {noop: celery_app.noop, echo: celery_app.echo}
    yield _one_by_one(lambda f, a: tasks[f].delay(a), lambda r: r.get(timeout=60))


class _End:
    """One end of a hop: a TCP socket on loopback, or a pair of pipes (the read end, the write end)."""

    def __init__(self, sock: socket.socket | None = None, fds: tuple[int, int] = (-1, -1)) -> None:
        self.sock = sock
        self.fds = fds

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            os.write(self.fds[1], data)

    def recv(self, size: int) -> bytes:
        """Exactly ``size`` bytes (b"" once the other end has gone)."""
        data = b""
        while len(data) < size:
            want = size - len(data)
            chunk = self.sock.recv(want) if self.sock is not None else os.read(self.fds[0], want)
            if not chunk:
                return b""
            data += chunk
        return data


def _hop(kind: str) -> tuple[_End, _End]:
    """Both ends of one hop: ``tcp`` (loopback, TCP_NODELAY, as Argon's links) or ``pipe`` (as a pool process's)."""
    if kind == "pipe":
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        return _End(fds=(up_r, down_w)), _End(fds=(down_r, up_w))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _End(near), _End(far)


RELAY_MESSAGE = b"x" * 100  # about the size of a trivial task's frame


def _pass_on(up: _End, down: _End | None) -> None:
    """A relay with blocking reads: pass each message down the chain, and its answer back up."""
    size = len(RELAY_MESSAGE)
    while data := up.recv(size):
        if down is not None:
            down.send(data)
            data = down.recv(size)
        up.send(data)


def _pass_on_hub(up: _End, down: _End | None) -> None:
    """The same relay on a gevent hub, as Argon's processes do it: an I/O watcher reads a
    message, and a hub callback writes it on (no greenlet switch on the way)."""
    import gevent  # only in the relay process: this module's own process stays clean

    loop = gevent.get_hub().loop

    def watch(end: _End, then: Callable[[bytes], None]) -> Any:
        fd = end.sock.fileno() if end.sock is not None else end.fds[0]
        os.set_blocking(fd, False)

        def readable() -> None:
            data = end.sock.recv(1 << 16) if end.sock is not None else os.read(fd, 1 << 16)
            if not data:
                os._exit(0)
            loop.run_callback(then, data)

        watcher = loop.io(fd, 1)
        watcher.start(readable)
        return watcher

    watchers = [watch(up, down.send if down is not None else up.send)]
    if down is not None:
        watchers.append(watch(down, up.send))
    gevent.sleep(3600)


@contextlib.contextmanager
def _relay(kinds: list[str], relay: Callable[[_End, _End | None], None] = _pass_on) -> Iterator[Peer]:
    """A chain of forked processes, one per hop, passing a message to the end and back.

    Each process reads a message from the hop before it and writes it to the next; the
    last one writes it straight back, and each passes the answer back up. No encoding and
    no bookkeeping: a lower bound for any system whose round trip crosses the same hops
    between processes (``relay``: with blocking reads, or on a gevent hub).
    """
    hops = [_hop(kind) for kind in kinds]
    children = []
    for index in range(len(hops)):
        pid = os.fork()
        if pid == 0:  # process ``index``: between hop ``index`` (up) and hop ``index + 1`` (down)
            try:
                relay(hops[index][1], hops[index + 1][0] if index + 1 < len(hops) else None)
            finally:
                os._exit(0)
        children.append(pid)
    first = hops[0][0]
    try:
        yield _one_by_one(lambda f, a: first.send(RELAY_MESSAGE), lambda _: first.recv(len(RELAY_MESSAGE)))
    finally:
        for near, far in hops:
            for end in (near, far):
                if end.sock is not None:
                    end.sock.close()
                else:
                    for fd in end.fds:
                        os.close(fd)
        for pid in children:  # each holds copies of every end, so none sees the others close
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


PEERS = {
    "pool": _pool, "ppe": _ppe, "dask": _dask, "ray": _ray, "celery": _celery,
    "relay-tcp-tcp-pipe": functools.partial(_relay, ["tcp", "tcp", "pipe"]),
    "relay-tcp-pipe": functools.partial(_relay, ["tcp", "pipe"]),
    "hub-relay-tcp-tcp-pipe": functools.partial(_relay, ["tcp", "tcp", "pipe"], _pass_on_hub),
}
MODULES = {"dask": ("distributed",), "ray": ("ray",), "celery": ("celery", "redis")}


def main(argv: list[str]) -> dict[str, Any]:
    """Run one baseline and return its result."""
    peer, mode = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else 1000
    size = int(argv[3]) if len(argv) > 3 else 0
    # Looked up, not imported: importing Ray here would fix its settings before _ray sets them.
    for module in MODULES.get(peer, ()):
        if importlib.util.find_spec(module) is None:
            return {"skipped": f"not installed: {module}"}
    t0 = time.perf_counter()
    with PEERS[peer]() as runner:
        started = time.perf_counter() - t0
        result = _measure(mode, count, size, runner)
    return {"peer": peer, "mode": mode, "startup": started, **result}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1:])), flush=True)
