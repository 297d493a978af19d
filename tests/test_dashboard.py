"""The live dashboard (``--dashboard-port``): its JSON, its page in a real browser, and bad HTTP input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.ssl
import gevent.subprocess
import pytest

from argon import LocalCluster
from argon.history import Recorder, percentiles
from argon.status import reachable_dashboard
from argon.testing import read_ready

from conftest import ArgonProcess, Network, child_env, make_key, wait_for

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _make_tasks() -> tuple[Any, Any]:
    # Nested, so they travel by value (the workers cannot import this test module).
    def sleep(seconds: float, value: Any = None) -> Any:
        import time

        time.sleep(seconds)
        return value

    def fail() -> None:
        raise ValueError("expected")

    return sleep, fail


_sleep, _fail = _make_tasks()


def dashboard_of(process: ArgonProcess) -> tuple[str, int]:
    """The dashboard's address, from the line a server prints before its ready line."""
    line = next((line for line in process.printed if "dashboard on" in line), "")
    match = re.search(r"dashboard on https?://([\d.]+):(\d+)/", line)
    assert match, f"no dashboard line in {process.printed!r}"
    return match.group(1), int(match.group(2))


def http(address: tuple[str, int], path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh gevent socket (Connection: close); returns status, headers, body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address[0]}:{address[1]}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with gevent.socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = _read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in found.items()}, body


def _read_until_closed(sock: Any) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def api(address: tuple[str, int]) -> dict[str, Any]:
    status, headers, body = http(address, "/api/status")
    assert status == 200 and headers["content-type"].startswith("application/json"), (status, body[:200])
    return json.loads(body)


def _closed_within(sock: Any, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it sends first)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


# -- the recorder, in-process ----------------------------------------------------------------


@pytest.mark.parametrize(("announced", "dialed", "expected"), [
    ("http://10.0.0.5:8080/", "10.0.0.5", "http://10.0.0.5:8080/"),
    ("http://0.0.0.0:8080/", "mgr1.example", "http://mgr1.example:8080/"),  # listening everywhere
    ("https://[::]:8443/", "fd00::1", "https://[fd00::1]:8443/"),
    ("javascript:alert(1)", "10.0.0.5", ""),
    ("http://10.0.0.5:8080/x?<script>", "10.0.0.5", ""),
    ("", "10.0.0.5", ""),
])
def test_a_managers_announced_dashboard_is_linked_as_the_worker_reaches_it(announced, dialed, expected):
    assert reachable_dashboard(announced, dialed) == expected




def test_percentiles_are_nearest_rank_over_the_window():
    samples = [(10.0, v / 100) for v in range(1, 101)] + [(1.0, 99.0)]  # the last one is too old
    result = percentiles(samples, since=5.0)
    assert result == {"count": 100, "p50": 0.50, "p95": 0.95, "p99": 0.99}
    assert percentiles([], since=0.0) == {"count": 0, "p50": None, "p95": None, "p99": None}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recorder_averages_busy_processes_over_time():
    clock = FakeClock()
    recorder = Recorder(clock=clock)
    first, second = recorder.started(clock.now - 1), recorder.started(clock.now)
    clock.now += 1.0  # two busy for a second...
    recorder.finished(first)
    clock.now += 1.0  # ...then one for a second
    assert recorder.busy_average(busy_now=1, capacity=4) == pytest.approx(1.5)
    clock.now += 2.0  # the server said one was busy; nothing changed since
    assert recorder.busy_average(busy_now=0, capacity=4) == pytest.approx(1.0)
    recorder.finished(second)  # never counts below zero
    clock.now += 1.0
    assert recorder.busy_average(busy_now=0, capacity=2) == 0.0
    times = recorder.timings()
    assert times["wait"] == {"count": 2, "p50": 0.0, "p95": 1.0, "p99": 1.0}
    assert times["run"]["p99"] == pytest.approx(4.0)
    for _ in range(5):  # three more than the two processes: they wait in a worker's prefetch
        recorder.started(clock.now)
    clock.now += 1.0
    assert recorder.busy_average(busy_now=2, capacity=2) == pytest.approx(2.0)


def test_recorder_measures_wait_and_run_and_remembers_departures():
    recorder = Recorder(keep=3)
    sent = recorder.started(time.monotonic() - 2.0)
    recorder.finished(sent - 0.5)
    for _ in range(5):  # only the newest three are kept
        recorder.finished(time.monotonic())
    times = recorder.timings()
    assert times["wait"]["count"] == 1 and 2.0 <= times["wait"]["p50"] < 3.0
    assert times["run"]["count"] == 3 and times["run"]["p99"] < 0.5
    recorder.departed({"id": "w1", "busy": 3, "processes": [{"pid": 1}]}, lost=True)
    recorder.departed({"id": "w2", "busy": 0}, lost=False)
    assert [(r["id"], r["state"], r["busy"]) for r in recorder.departed_since()] == [("w2", "left", 0),
                                                                                      ("w1", "lost", 0)]
    assert "processes" not in recorder.departed_since()[1]


# -- the JSON against client.status() -------------------------------------------------------------


@pytest.mark.timeout(90)
def test_api_status_matches_client_status_while_tasks_run(net: Network):
    manager = net.manager("--dashboard-port", "0")
    address = dashboard_of(manager)
    workers = [net.worker(manager, processes=2) for _ in range(2)]
    client = net.client(manager)
    net.wait_workers(client, 2)
    deferreds = [client.defer(_sleep, [0.05, i]) for i in range(120)]
    compared = 0
    while not all(d.done() for d in deferreds):
        before = client.status()
        seen = api(address)
        after = client.status()
        for field in ("role", "name", "version", "capacity", "queue_size"):
            assert seen[field] == before[field] == after[field], field
        for field in ("completed", "failed", "rejected"):
            assert before[field] <= seen[field] <= after[field], field
        assert {(w["id"], w["host"], w["port"], w["capacity"]) for w in seen["workers"]} == {
            (w["id"], w["host"], w["port"], w["capacity"]) for w in before["workers"]}
        assert 0 <= seen["busy"] <= seen["capacity"] == 4
        compared += 1
        gevent.sleep(0.1)
    assert compared >= 3, "the tasks finished before the dashboard could be compared"
    assert [d(timeout=30) for d in deferreds] == list(range(120))

    final, seen = client.status(), api(address)  # quiet now: every figure agrees
    for field in ("completed", "failed", "rejected", "queued", "busy", "capacity", "redelivered"):
        assert seen[field] == final[field], field
    assert seen["completed"] == 120 and seen["queued"] == 0 and seen["oldest_queued"] is None
    assert {w["port"] for w in seen["workers"]} == {w.port for w in workers}
    assert all(w["state"] == "ok" and "processes" not in w for w in seen["workers"])
    # Timings and history are rebuilt once a second.
    timings = wait_for(lambda: (t := api(address)["timings"])["run"]["count"] == 120 and t, 10,
                       what="the timings of all 120 tasks")
    run = timings["run"]
    assert 0.05 <= run["p50"] <= run["p95"] <= run["p99"] < 5
    assert timings["wait"]["count"] == 120 and timings["window"] == 300
    assert seen["security"] == {"key": False, "tls": False, "insecure": False}
    assert seen["peers"] == []
    history = wait_for(lambda: (h := api(address)["history"]) and len(h["time"]) >= 3 and h, 10,
                       what="three history samples")
    assert set(history) == {"interval", "time", "completed", "failed", "rejected", "redelivered", "queued",
                            "busy", "capacity"}
    assert len({len(column) for name, column in history.items() if name != "interval"}) == 1
    assert history["completed"][-1] <= 120 and history["capacity"][-1] == 4


@pytest.mark.timeout(60)
def test_oldest_queued_age_wait_times_and_worker_rates(net: Network):
    manager = net.manager("--dashboard-port", "0")
    address = dashboard_of(manager)
    net.worker(manager, processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)
    blocker = client.defer(_sleep, [2.0])
    waiting = [client.defer(_sleep, [0.0, i]) for i in range(3)]
    seen = wait_for(lambda: (s := api(address))["queued"] == 3 and s["oldest_queued"] >= 0.5 and s, 15,
                    what="three tasks queued for half a second")
    first = seen["oldest_queued"]
    later = wait_for(lambda: (s := api(address))["oldest_queued"] and s["oldest_queued"] >= first + 0.5 and s, 10,
                     what="the oldest queued task to grow older")
    assert later["queued"] == 3
    assert [d(timeout=20) for d in waiting] == [0, 1, 2] and blocker(timeout=20) is None
    timings = wait_for(lambda: (t := api(address)["timings"])["run"]["count"] == 4 and t, 10,
                       what="the timings of four tasks")
    assert timings["wait"]["count"] == 4 and timings["wait"]["p99"] >= 1.0  # they waited behind the blocker
    assert timings["run"]["p99"] >= 2.0
    # A steady stream gives the worker a rate of its own.
    for _ in range(3):
        [d(timeout=20) for d in [client.defer(_sleep, [0.0]) for _ in range(100)]]
        gevent.sleep(0.5)
    assert wait_for(lambda: api(address)["workers"][0]["rate"] > 0, 10, what="a worker rate")


@pytest.mark.timeout(60)
def test_lost_and_drained_workers_are_shown_as_such(net: Network):
    manager = net.manager("--dashboard-port", "0")
    address = dashboard_of(manager)
    doomed, leaving, staying = (net.worker(manager, processes=1) for _ in range(3))
    client = net.client(manager)
    net.wait_workers(client, 3)
    os.killpg(doomed.pid, signal.SIGKILL)
    leaving.signal(signal.SIGTERM)
    seen = wait_for(lambda: len((s := api(address))["departed"]) == 2 and s, 15, what="two departed workers")
    states = {w["port"]: w["state"] for w in seen["departed"]}
    assert states == {doomed.port: "lost", leaving.port: "left"}
    assert [w["port"] for w in seen["workers"]] == [staying.port]
    assert all(w["busy"] == 0 and w["since"] <= time.time() for w in seen["departed"])


@pytest.mark.timeout(60)
def test_each_managers_page_links_to_the_other_managers_its_workers_know(net: Network):
    managers = [net.manager("--dashboard-port", "0") for _ in range(3)]
    pages = [dashboard_of(m) for m in managers]
    urls = [f"http://{host}:{port}/" for host, port in pages]
    net.start("worker", "--manager", ",".join(m.address for m in managers), "--workers", "1")
    for i, page in enumerate(pages):  # stats reach each manager every few heartbeats
        others = sorted(url for j, url in enumerate(urls) if j != i)
        seen = wait_for(lambda page=page, others=others: [p["url"] for p in api(page)["peers"]] == others and api(page),
                        30, what=f"manager {i}'s page to link to the other two")
        assert all(p["name"] == p["url"][len("http://"):-1] for p in seen["peers"])
        assert sorted(seen["workers"][0]["dashboards"]) == others


@pytest.mark.timeout(60)
def test_stand_alone_worker_serves_its_own_dashboard(net: Network):
    worker = net.worker(None, "--dashboard-port", "0", processes=2)
    address = dashboard_of(worker)
    client = net.client(worker)
    assert [d(timeout=20) for d in [client.defer(_sleep, [0.01, i]) for i in range(20)]] == list(range(20))
    with pytest.raises(ValueError):
        client.queue(_fail)
    seen = wait_for(lambda: (s := api(address))["timings"]["run"]["count"] == 21 and s, 10,
                    what="the timings of 21 tasks")
    assert seen["role"] == "worker" and seen["completed"] == 20 and seen["failed"] == 1
    (me,) = seen["workers"]
    assert me["port"] == worker.port and me["capacity"] == 2 and me["rss"] > 0 and me["pool_rss"] > 0
    assert me["cpu"] >= 0
    assert seen["timings"]["run"]["p50"] >= 0.01


def test_local_cluster_reports_its_dashboard():
    with LocalCluster(nodes=1, workers=1, dashboard_port=0) as cluster, cluster.client() as client:
        assert client.queue(pow, [2, 5]) == 32
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/", cluster.dashboard or "")
        assert match, cluster.dashboard
        seen = api(("127.0.0.1", int(match.group(1))))
        assert seen["completed"] == 1 and len(seen["workers"]) == 1 and seen["name"] == cluster.address


# -- bad HTTP input -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_bad_http_requests_are_refused_and_the_server_goes_on(net: Network):
    manager = net.manager("--dashboard-port", "0", "--handshake-timeout", "1")
    address = dashboard_of(manager)
    net.worker(manager, processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)

    assert http(address, "/nope")[0] == 404
    assert http(address, "/api/status/../../etc/passwd")[0] == 404
    assert http(address, "/api/status", method="POST", headers={"Content-Length": "0"})[0] == 405
    assert http(address, "/", headers={"X-Big": "a" * 100_000})[0] == 431
    assert http(address, "/", headers={f"X-{i}": "b" * 200 for i in range(200)})[0] == 431
    assert http(address, "/" + "c" * 10_000)[0] == 414
    status, headers, body = http(address, "/", method="HEAD")
    assert status == 200 and body == b"" and "content-security-policy" in headers
    status, headers, body = http(address, "/")
    assert status == 200 and b"api/status" in body and headers["cache-control"] == "no-store"
    assert "script-src 'sha256-" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    # A page elsewhere cannot read a loopback dashboard through a name it controls (DNS rebinding).
    with gevent.socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 403") and b"loopback" in reply

    # An idle connection and one that trickles its request are both closed after the deadline.
    idle = gevent.socket.create_connection(address)
    slow = gevent.socket.create_connection(address)
    started = time.monotonic()
    trickle = gevent.spawn(_trickle, slow, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: y\r\n" * 50)
    assert _closed_within(idle, 10) and _closed_within(slow, 10)
    assert time.monotonic() - started < 5
    trickle.kill()
    idle.close()
    slow.close()

    # Far more idle connections than the dashboard serves at once: a real request still gets
    # through (as the deadline frees their places), and the task port never notices.
    hogs = [gevent.socket.create_connection(address) for _ in range(150)]
    try:
        started = time.monotonic()
        assert client.queue(_sleep, [0.0, 7]) == 7
        assert api(address)["completed"] == 1
        assert time.monotonic() - started < 8
    finally:
        for sock in hogs:
            sock.close()
    assert manager.alive() and api(address)["workers"]


def _trickle(sock: Any, data: bytes) -> None:
    """Send ``data`` one byte every 50 ms (a slowloris client)."""
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            gevent.sleep(0.05)
    except OSError:
        pass


@pytest.mark.timeout(60)
def test_with_a_key_any_host_name_is_served(net: Network, tmp_path: Path):
    key = make_key(tmp_path / "argon.key")
    manager = net.manager("--dashboard-port", "0", "--key", str(key))
    address = dashboard_of(manager)
    with gevent.socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: argon.example.net\r\nConnection: close\r\n\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["security"]["key"] is True


@pytest.mark.timeout(60)
def test_with_tls_the_dashboard_is_served_over_https(net: Network, tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    gevent.subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(private),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=argon-test",
                           "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True,
                          capture_output=True, timeout=60)
    manager = net.manager("--dashboard-port", "0", "--tls-cert", str(cert), "--tls-key", str(private))
    line = next((line for line in manager.printed if "dashboard on" in line), "")
    match = re.search(r"dashboard on https://127\.0\.0\.1:(\d+)/", line)
    assert match, manager.printed
    address = ("127.0.0.1", int(match.group(1)))
    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(cert))
    with gevent.socket.create_connection(address, timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["security"]["tls"] is True
    # A plain-text request on the TLS port is dropped after the handshake fails; the server goes on.
    with gevent.socket.create_connection(address, timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _closed_within(plain, 10)
    assert manager.alive()


# -- a real browser ---------------------------------------------------------------------------------


def find_browser() -> str | None:
    """A Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(browser: str, url: str, profile: Path, *extra: str, budget_ms: int = 4000) -> str:
    """Load ``url`` in headless Chromium for ``budget_ms`` of virtual time; return its stdout (the DOM)."""
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
    result = gevent.subprocess.run(argv, capture_output=True, timeout=90, start_new_session=True)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode(errors="replace")


class _Text(HTMLParser):
    """Collects the text of every element that has an id, and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.text: list[str] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("meta", "link", "br", "input", "img", "path", "line"):
            self._open.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("meta", "link", "br", "input", "img"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for element in self._open:
            if element:
                self.by_id[element] = self.by_id.get(element, "") + data


@pytest.mark.timeout(120)
def test_a_real_browser_renders_the_live_network(net: Network, tmp_path: Path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no headless browser found (install Debian's 'chromium' package; .ci/run does)")
    manager = net.manager("--dashboard-port", "0")
    address = dashboard_of(manager)
    workers = [net.worker(manager, processes=2) for _ in range(2)]
    client = net.client(manager)
    net.wait_workers(client, 2)
    assert [d(timeout=30) for d in [client.defer(_sleep, [0.01, i]) for i in range(50)]] == list(range(50))
    url = f"http://{address[0]}:{address[1]}/"

    dom = browse(browser, url, tmp_path / "profile", "--dump-dom")
    page = _Text()
    page.feed(dom)
    assert page.by_id.get("completed") == "50", page.by_id.get("completed")
    assert page.by_id.get("nworkers") == "2"
    assert page.by_id.get("capacity") == "4"
    assert page.by_id.get("live-text") == "live"
    rows = page.by_id.get("workers", "")
    for worker in workers:
        assert worker.address in rows, (worker.address, rows)
    assert page.by_id.get("name") == manager.address
    assert page.by_id.get("run-p50") not in (None, "\u2013")

    shots = {}
    for name, size in (("desktop", "1366,1000"), ("phone", "390,1800")):
        shots[name] = tmp_path / f"dashboard-{name}.png"
        browse(browser, url, tmp_path / f"profile-{name}", f"--screenshot={shots[name]}", f"--window-size={size}")
        assert shots[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shots[name].stat().st_size > 10_000
    keep = os.environ.get("ARGON_SCREENSHOTS")  # a directory to copy the screenshots to, for people to look at
    if keep:
        for shot in shots.values():
            shutil.copy(shot, Path(keep) / shot.name)


# -- peers on other hosts ------------------------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_without_a_key_other_hosts_are_refused(tmp_path: Path):
    import netns

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    bed = netns.Testbed(tmp_path, child_env(), hosts=("manager",))
    try:
        ip = bed.hosts["manager"].ip
        ports = []
        for extra in ((), ("--insecure",)):
            node = bed.argon("manager", "manager", "--host", ip, "--port", "0", "--dashboard-port", "0", *extra,
                             wait=False)
            printed: list[str] = []
            read_ready(node.popen.stdout, 30, "manager", printed)
            ports.append(int(re.search(r"dashboard on http://[\d.]+:(\d+)/", "".join(printed)).group(1)))
        status, _, body = http((ip, ports[0]), "/api/status")
        assert status == 403, body
        assert bed.client_ip.encode() in body and b"--key" in body
        status, _, body = http((ip, ports[1]), "/api/status")
        assert status == 200 and json.loads(body)["security"]["insecure"] is True
    finally:
        bed.close()
    assert bed.leftovers() == []
