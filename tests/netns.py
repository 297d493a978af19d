"""Separate network hosts on one machine, made of Linux network namespaces (root only).

A :class:`Testbed` is a small switched LAN::

    root namespace (this test process: the "client host", 10.251.N.254)
            |  veth <prefix>-c <-> to-client
    <prefix>-switch   (namespace holding bridge br0; ports to-<host>)
            |  veth to-<host> <-> eth0
    <prefix>-manager (.1)   <prefix>-worker1 (.2)   <prefix>-worker2 (.3)

Every host namespace has only loopback and ``eth0`` with an address in a private
/24 picked so that it overlaps nothing routed on this machine, and no default route:
nothing can leave the bridge. The test process reaches the hosts through its own
veth into the bridge (one extra interface and its connected /24 route in the root
namespace), so it can use :class:`argon.Client` in-process. Every name starts with
``argnt<pid>-``; :meth:`Testbed.close` removes all of them, and :func:`clean_stale`
removes those left by test processes that no longer exist.

Link faults: :meth:`Testbed.cut` takes a link down (at the switch port, so the host
only sees its carrier go, or at the host's NIC); :meth:`Testbed.impair` adds delay
and loss in both directions of a host's link, with ``tc netem`` or, where the kernel
lacks ``sch_netem``, with :func:`relay`: a user-space wire spliced between the
host's veth and the bridge that delays and drops Ethernet frames (run as
``python3 tests/netns.py relay ...`` inside the switch namespace).

This module needs only the standard library and gevent (it is run as a script too).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import ipaddress
import os
import random
import re
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import gevent
import gevent.subprocess

from argon.testing import kill_group, read_ready

ARGON = Path(__file__).resolve().parents[1] / "bin" / "argon"
PREFIX = "argnt"
NAME = re.compile(rf"^{PREFIX}(\d+)-")
HOSTS = ("manager", "worker1", "worker2")
CLIENT_OCTET = 254
NIC = "eth0"
BRIDGE = "br0"


class CommandFailed(RuntimeError):
    """An ``ip`` or ``tc`` command exited with an error."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def run(*argv: str, check: bool = True, timeout: float = 20.0) -> str:
    """Run a command (without blocking other greenlets); return its stdout."""
    done = gevent.subprocess.run(
        list(argv), stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        stderr = done.stderr.decode().strip()
        raise CommandFailed(f"{' '.join(argv)} failed ({done.returncode}): {stderr}", stderr)
    return done.stdout.decode()


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NS] ARGS``."""
    return run("ip", *(("-n", ns) if ns else ()), *args, check=check)


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    """Run a command inside namespace ``ns``."""
    return run("ip", "netns", "exec", ns, *argv, check=check)


# -- what this machine supports ------------------------------------------------------------------


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespaces, veth pairs and bridges cannot be built here (None if they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root (run the netns tests as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (CommandFailed, OSError) as exc:
        return f"'ip netns add' does not work here: {exc}"
    try:
        ip("link", "add", BRIDGE, "type", "bridge", ns=probe)
        ip("link", "add", "probe0", "type", "veth", "peer", "name", "probe1", ns=probe)
    except CommandFailed as exc:
        return f"this kernel cannot make bridges or veth pairs: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


@functools.cache
def netem_unavailable_reason() -> str | None:
    """Why ``tc qdisc ... netem`` cannot be used here (None if it can)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    ip("netns", "add", probe)
    try:
        ip("link", "set", "lo", "up", ns=probe)
        in_ns(probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", "loss", "1%")
    except CommandFailed as exc:
        return f"tc netem is not available (kernel without sch_netem?): {exc.stderr or exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def packet_relay_unavailable_reason() -> str | None:
    """Why the user-space impairment relay cannot run here (None if it can)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if not hasattr(socket, "AF_PACKET"):
        return "no AF_PACKET sockets"
    return None


# -- naming and stale cleanup ------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    match = NAME.match(name)
    if not match:
        return False
    pid = int(match.group(1))
    return pid == os.getpid() or not _pid_alive(pid)


def _kill_namespace_processes(ns: str) -> None:
    for pid in ip("netns", "pids", ns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def clean_stale() -> list[str]:
    """Remove namespaces and links left by dead test processes (or earlier tests of this one)."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name):
            _kill_namespace_processes(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if _stale(name):
                ip("link", "del", name, check=False)
                removed.append(name)
    return removed


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this namespace has an address in or a route to (but the default)."""
    networks = []
    for line in ip("-4", "-o", "addr", "show", check=False).splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            networks.append(ipaddress.ip_interface(match.group(1)).network)
    for line in ip("-4", "route", "show", "table", "all", check=False).splitlines():
        words = line.split()
        dest = words[1] if words and words[0] in ("local", "broadcast", "unicast", "blackhole") else words[0]
        if dest == "default" or not words:
            continue
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(dest, strict=False))
    return networks


def pick_subnet(pid: int) -> ipaddress.IPv4Network:
    """A 10.251.N.0/24 that overlaps nothing this machine routes."""
    taken = _routed_networks()
    for step in range(224):
        candidate = ipaddress.ip_network(f"10.251.{16 + (pid + step) % 224}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise CommandFailed("every 10.251.N.0/24 is already routed on this machine")


# -- processes in namespaces -----------------------------------------------------------------


class NsProcess:
    """A process run with ``ip netns exec`` in its own session (so its group can be killed)."""

    def __init__(self, ns: str, argv: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.popen = gevent.subprocess.Popen(
            ["ip", "netns", "exec", ns, *self.argv],
            stdout=gevent.subprocess.PIPE,
            stderr=self._log, env=env, cwd=str(cwd), start_new_session=True,
        )
        self.pid = self.popen.pid  # ip netns exec execs the command: same pid, own process group

    def readline(self, timeout: float) -> str:
        """One line of the process's stdout ('' at EOF); fails with its log on timeout."""
        with gevent.Timeout(timeout, AssertionError(f"no output from {self.argv} in {self.ns}:\n{self.log()}")):
            return self.popen.stdout.readline().decode()

    def log(self) -> str:
        """What the process wrote to stderr so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group)."""
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it; idempotent."""
        kill_group(self.pid)
        with contextlib.suppress(gevent.subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


class ArgonNode(NsProcess):
    """``bin/argon ROLE`` on one host of the testbed; its address is read from its ready line."""

    def __init__(self, host: Host, role: str, args: Sequence[str], log_dir: Path, env: dict[str, str],
                 serial: int) -> None:
        self.host = host
        self.role = role
        argv = [sys.executable, str(ARGON), role, "--verbose", *args]
        super().__init__(host.ns, argv, log_dir / f"{role}-{host.name}-{serial}.log", env, log_dir)
        self.ip = host.ip
        self.port = 0

    def wait_ready(self, timeout: float = 30.0) -> ArgonNode:
        """Wait for the ``ARGON READY ROLE HOST:PORT`` line and remember the address."""
        try:
            _, self.ip, self.port = read_ready(self.popen.stdout, timeout, f"{self.role} on {self.host.name}")
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None
        return self

    @property
    def address(self) -> str:
        """``ip:port`` this node listens on."""
        return f"{self.ip}:{self.port}"


# -- the testbed -----------------------------------------------------------------------------


class Host:
    """One host: its namespace, its address, and its switch port."""

    def __init__(self, name: str, ns: str, ip_address: str, port: str) -> None:
        self.name = name
        self.ns = ns
        self.ip = ip_address
        self.port = port

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} ns={self.ns}>"


class Testbed:
    """Namespaces joined by a bridge; see the module docstring. Use :meth:`close` (always)."""

    def __init__(self, log_dir: Path, env: dict[str, str], hosts: Sequence[str] = HOSTS) -> None:
        self.pid = os.getpid()
        self.prefix = f"{PREFIX}{self.pid}"
        self.log_dir = log_dir
        self.env = env
        self.switch = f"{self.prefix}-switch"
        self.client_link = f"{self.prefix}-c"
        self.namespaces: list[str] = []
        self.processes: list[NsProcess] = []
        self.relays: dict[str, NsProcess] = {}
        self.netem: dict[str, bool] = {}
        self._serial = 0
        clean_stale()
        self.subnet = pick_subnet(self.pid)
        addresses = list(self.subnet.hosts())
        self.client_ip = str(addresses[CLIENT_OCTET - 1])
        self.hosts = {
            name: Host(name, f"{self.prefix}-{name}", str(addresses[i]), f"to-{name}") for i, name in enumerate(hosts)
        }
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", ns=name)

    def _build(self) -> None:
        self._add_ns(self.switch)
        ip("link", "add", BRIDGE, "type", "bridge", ns=self.switch)
        ip("link", "set", BRIDGE, "addrgenmode", "none", "up", ns=self.switch)
        prefix = self.subnet.prefixlen
        for host in self.hosts.values():
            self._add_ns(host.ns)
            ip("link", "add", host.port, "type", "veth", "peer", "name", NIC, "netns", host.ns, ns=self.switch)
            self._plug(host.port)
            ip("link", "set", NIC, "addrgenmode", "none", ns=host.ns)
            ip("addr", "add", f"{host.ip}/{prefix}", "dev", NIC, ns=host.ns)
            ip("link", "set", NIC, "up", ns=host.ns)
        # The test process's own leg into the bridge: made here, its peer moved into the switch.
        ip("link", "add", self.client_link, "type", "veth", "peer", "name", "to-client", "netns", self.switch)
        self._plug("to-client")
        ip("link", "set", self.client_link, "addrgenmode", "none")
        ip("addr", "add", f"{self.client_ip}/{prefix}", "dev", self.client_link)
        ip("link", "set", self.client_link, "up")

    def _plug(self, port: str) -> None:
        ip("link", "set", port, "addrgenmode", "none", ns=self.switch)
        ip("link", "set", port, "master", BRIDGE, "up", ns=self.switch)

    # -- processes ---------------------------------------------------------------------------

    def argon(self, host: str, role: str, *args: str, wait: bool = True) -> ArgonNode:
        """Start ``bin/argon ROLE ARGS`` on ``host`` (listening on its address, port 0)."""
        self._serial += 1
        node = ArgonNode(self.hosts[host], role, args, self.log_dir, self.env, self._serial)
        self.processes.append(node)
        if wait:
            node.wait_ready()
        return node

    def python(self, host: str, code: str, timeout: float = 30.0) -> str:
        """Run a short Python program on ``host`` and return its stdout (it must exit 0)."""
        self._serial += 1
        proc = NsProcess(self.hosts[host].ns, [sys.executable, "-c", code],
                         self.log_dir / f"script-{host}-{self._serial}.log", self.env, self.log_dir)
        self.processes.append(proc)
        try:
            with gevent.Timeout(timeout, AssertionError(f"script on {host} ran over {timeout}s:\n{proc.log()}")):
                out = proc.popen.stdout.read().decode()
                status = proc.popen.wait()
        finally:
            proc.kill()
        assert status == 0, f"script on {host} exited {status}:\n{proc.log()}"
        return out

    def logs(self) -> str:
        """Every process's stderr, for failure reports."""
        return "\n".join(f"--- {' '.join(p.argv[:4])} in {p.ns} (pid {p.pid}) ---\n{p.log()}" for p in self.processes)

    # -- link faults --------------------------------------------------------------------------

    def _link(self, host: str, side: str) -> tuple[str, str]:
        h = self.hosts[host]
        return (self.switch, h.port) if side == "switch" else (h.ns, NIC)

    def cut(self, host: str, side: str = "switch") -> None:
        """Take ``host``'s link down: its switch port (``side="switch"``) or its own NIC (``"host"``)."""
        ns, dev = self._link(host, side)
        ip("link", "set", dev, "down", ns=ns)

    def mend(self, host: str, side: str = "switch") -> None:
        """Bring back a link taken down by :meth:`cut`."""
        ns, dev = self._link(host, side)
        ip("link", "set", dev, "up", ns=ns)

    def impair(self, host: str, delay: float, loss: float, how: str = "netem") -> None:
        """Delay every frame on ``host``'s link by ``delay`` s and drop ``loss`` of them, each way.

        Args:
            host: The host whose link to impair.
            delay: Seconds added in each direction.
            loss: Fraction (0..1) of frames dropped in each direction.
            how: ``"netem"`` (``tc`` on both ends of the veth) or ``"relay"`` (user space).
        """
        h = self.hosts[host]
        if how == "netem":
            spec = ["netem", "delay", f"{delay * 1000:g}ms", "loss", f"{loss * 100:g}%"]
            self.netem[host] = True
            in_ns(h.ns, "tc", "qdisc", "add", "dev", NIC, "root", *spec)
            in_ns(self.switch, "tc", "qdisc", "add", "dev", h.port, "root", *spec)
            return
        if how != "relay":
            raise ValueError(f"unknown impairment method {how!r}")
        # Splice: host veth <-> relay <-> new veth pair <-> bridge.
        wire, plug = f"w-{host}"[:15], f"p-{host}"[:15]
        ip("link", "set", h.port, "nomaster", ns=self.switch)
        ip("link", "add", wire, "type", "veth", "peer", "name", plug, ns=self.switch)
        ip("link", "set", wire, "addrgenmode", "none", "up", ns=self.switch)
        self._plug(plug)
        self._serial += 1
        relay_proc = NsProcess(
            self.switch,
            [sys.executable, str(Path(__file__).resolve()), "relay", h.port, wire, str(delay), str(loss)],
            self.log_dir / f"relay-{host}-{self._serial}.log", self.env, self.log_dir,
        )
        self.processes.append(relay_proc)
        self.relays[host] = relay_proc
        line = relay_proc.readline(15.0)
        assert line.startswith("relaying"), f"relay did not start ({line!r}):\n{relay_proc.log()}"

    def unimpair(self, host: str) -> str:
        """Remove :meth:`impair`'s delay and loss; return the relay's statistics line, if any."""
        h = self.hosts[host]
        if self.netem.pop(host, False):
            in_ns(h.ns, "tc", "qdisc", "del", "dev", NIC, "root", check=False)
            in_ns(self.switch, "tc", "qdisc", "del", "dev", h.port, "root", check=False)
            return ""
        relay_proc = self.relays.pop(host, None)
        if relay_proc is None:
            return ""
        relay_proc.signal(signal.SIGTERM)
        with contextlib.suppress(gevent.subprocess.TimeoutExpired):
            relay_proc.popen.wait(timeout=5)
        stats = relay_proc.log().strip().splitlines()
        relay_proc.kill()
        ip("link", "del", f"w-{host}"[:15], ns=self.switch, check=False)
        self._plug(h.port)
        return stats[-1] if stats else ""

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process started here, then delete every namespace and link made here."""
        for proc in self.processes:
            proc.kill()
        for ns in self.namespaces:
            _kill_namespace_processes(ns)  # anything that escaped its process group
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.client_link, check=False)  # gone with its peer already, normally
        self.namespaces = []

    def leftovers(self) -> list[str]:
        """Namespaces or links of this testbed that still exist (should be none after close)."""
        names = [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.split()]
        links = [line.split(":")[1].strip().split("@")[0]
                 for line in ip("-o", "link", "show", check=False).splitlines() if ":" in line]
        return [n for n in names + links if n.startswith(self.prefix + "-")]


# -- the user-space impairment relay (run inside the switch namespace) -----------------------------

ETH_P_ALL = 0x0003
PACKET_VNET_HDR = 15  # frames carry a virtio_net_hdr: checksum-offload and GSO state survive the hop
PACKET_OUTGOING = 4
SOL_PACKET = 263
FRAME_MAX = 65536 + 64


def _packet_socket(dev: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((dev, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def relay(a: str, b: str, delay: float, loss: float, seed: int | None = None) -> None:
    """Forward Ethernet frames between devices ``a`` and ``b``, delaying and dropping them.

    Like ``netem delay D loss L`` on both directions: each frame is held ``delay``
    seconds (order kept) and a fraction ``loss`` of them is dropped. Prints one line when
    ready, and one line of counts to stderr when it gets SIGTERM.
    """
    rng = random.Random(seed)
    socks = {a: _packet_socket(a), b: _packet_socket(b)}
    other = {socks[a].fileno(): socks[b], socks[b].fileno(): socks[a]}
    counts = {"relayed": 0, "dropped": 0}
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    serial = 0

    def report(*_: Any) -> None:
        print(f"relay {a}<->{b}: relayed {counts['relayed']} frames, dropped {counts['dropped']}",
              file=sys.stderr, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)
    poller = select.poll()
    for sock in socks.values():
        poller.register(sock.fileno(), select.POLLIN)
    print(f"relaying {a}<->{b} delay {delay}s loss {loss:.1%}", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                counts["relayed"] += 1
            except OSError:
                counts["dropped"] += 1  # the far device is down: the frame is lost, as on a wire
        wait_ms = max(0, int((queue[0][0] - now) * 1000) + 1) if queue else 1000
        for fd, _ in poller.poll(wait_ms):
            sock = other[fd]  # the socket frames go *out* of
            source = socks[a] if sock is socks[b] else socks[b]
            while True:
                try:
                    frame, address = source.recvfrom(FRAME_MAX)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue  # our own transmission, seen again by the tap
                if rng.random() < loss:
                    counts["dropped"] += 1
                    continue
                serial += 1
                heapq.heappush(queue, (time.monotonic() + delay, serial, sock, frame))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        print("usage: netns.py relay DEV_A DEV_B DELAY_SECONDS LOSS_FRACTION", file=sys.stderr)
        sys.exit(2)
