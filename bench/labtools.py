"""What the benchmarks share: statistics, the daemons' JSON logs, reading a
wireguard-go device over its UAPI socket or a kernel one over netlink from this
process (no subprocess, so a tight poll costs little), packet captures in a
namespace, and a process's CPU.

Secrets: a UAPI `get` answer holds the device's private key; it is parsed by
wgnat.device.uapi.parse_get_answer, which drops it, and never kept or printed.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.logger import eventFromJSON, formatEvent

from wgnat._types import DeviceState, PublicKey
from wgnat.device.uapi import parse_get_answer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "integration")]


# -- statistics -------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def stat(values: Iterable[float | None], unit: str = "s", digits: int = 3) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    return (
        f"median {statistics.median(present):.{digits}f} {unit}, "
        f"p95 {percentile(present, 0.95):.{digits}f} {unit} (n={len(present)})"
    )


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# -- the daemons' JSON logs (--log-format json) -----------------------------------------
@dataclass(frozen=True)
class LogLine:
    time: float
    text: str


def log_lines(path: str) -> list[LogLine]:
    """Every JSON event of a daemon's log, formatted as the text log would say it
    (from the fields Twisted flattened when it wrote the event)."""
    lines = []
    with open(path, errors="replace") as handle:
        for raw in handle:
            raw = raw.strip()
            if not raw.startswith("{"):
                continue
            try:
                event = eventFromJSON(raw)
            except ValueError:
                continue
            lines.append(LogLine(float(event["log_time"]), formatEvent(event)))
    return lines


def first_time(lines: list[LogLine], pattern: str, after: float = 0.0) -> float | None:
    regex = re.compile(pattern)
    for line in lines:
        if line.time >= after and regex.search(line.text):
            return line.time
    return None


def about(tunnel_ip: str) -> str:
    """The start of a log line about a peer: '198.51.100.5 (Ab12Cd34) ...'."""
    return rf"^{re.escape(tunnel_ip)} \("


# -- devices ----------------------------------------------------------------------
def uapi_get(socket_path: str, timeout: float = 5.0) -> DeviceState:
    """Read a device over its UAPI socket (reachable from any namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(b"get=1\n\n")
        chunks: list[bytes] = []
        tail = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            tail = (tail + chunk)[-2:]
            if tail == b"\n\n":
                break
    state, code = parse_get_answer(b"".join(chunks).decode("ascii", "replace"))
    if code:
        raise OSError(code, f"UAPI get on {socket_path} failed")
    return state


def uapi_set(socket_path: str, lines: list[str], timeout: float = 5.0) -> None:
    """One `set=1` request (public fields only: never a key but a public one)."""
    request = ("\n".join(["set=1", *lines]) + "\n\n").encode("ascii")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request)
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    if b"errno=0\n" not in answer:
        raise OSError(f"UAPI set on {socket_path} failed: {answer[:80]!r}")


_kernel_sockets: dict[str, Any] = {}


def kernel_get(netns: str, ifname: str) -> DeviceState:
    """Read a kernel WireGuard device in namespace `netns` over generic netlink,
    as wgnat's netlink backend does (one pyroute2 socket per namespace, kept: a
    tight poll must not open one each time).  The private key is never read."""
    from wgnat.device.netlink import state_from_messages

    return state_from_messages(_kernel_socket(netns).info(ifname))


def kernel_set_peer(netns: str, ifname: str, update: Any) -> None:
    """One peer change (a wgnat PeerUpdate) on a kernel device in `netns`."""
    from wgnat.device.netlink import build_peer_dict

    _kernel_socket(netns).set(ifname, peer=build_peer_dict(update))


def _kernel_socket(netns: str) -> Any:
    if netns not in _kernel_sockets:
        from pyroute2 import WireGuard

        _kernel_sockets[netns] = WireGuard(netns=netns)
    return _kernel_sockets[netns]


def close_kernel_sockets() -> None:
    """Before the lab's namespaces go."""
    for sock in _kernel_sockets.values():
        sock.close()
    _kernel_sockets.clear()


def device_get(wg: Any) -> DeviceState:
    """A lab device (tests/netns.py WireGuard), whichever kind, read from here."""
    if wg.kind == "kernel":
        return kernel_get(wg.host.name, wg.ifname)
    return uapi_get(wg.socket_path)


def key_of(base64: str) -> PublicKey:
    return PublicKey.from_base64(base64)


# -- packet captures ------------------------------------------------------------------
@dataclass(frozen=True)
class Packet:
    time: float
    interface: str
    direction: str  # "In" or "Out"
    source: str  # "ip:port"
    destination: str
    length: int
    proto: str  # "tcp" or "udp"


_PACKET = re.compile(
    r"^(?P<time>\d+\.\d+) (?P<ifname>\S+)\s+(?P<dir>In|Out)\s+IP (?P<src>\S+) > (?P<dst>\S+?):"
    r" (?:(?P<tcp>tcp) (?P<tcplen>\d+)|UDP, length (?P<udplen>\d+))"
)


def _address(text: str) -> str:
    host, _, port = text.rpartition(".")
    return f"{host}:{port}"


class Capture:
    """tcpdump in a namespace, into a file; `packets()` once stopped."""

    def __init__(self, host: Any, bpf: str, path: str) -> None:
        self.path = path
        self._out = open(path, "wb")  # closed in stop()
        self.process = host.popen(
            ["tcpdump", "-i", "any", "-n", "-tt", "-q", "-l", "--immediate-mode", bpf],
            stdout=self._out,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        assert self.process.stderr is not None
        while time.monotonic() < deadline:  # tcpdump says "listening on any" when ready
            line = self.process.stderr.readline()
            if b"listening on" in line or not line:
                break
        if self.process.poll() is not None:
            raise RuntimeError(f"tcpdump failed in {host.name}")

    def stop(self) -> list[Packet]:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._out.close()
        packets = []
        with open(self.path, errors="replace") as handle:
            for line in handle:
                match = _PACKET.match(line)
                if match:
                    packets.append(
                        Packet(
                            float(match["time"]),
                            match["ifname"],
                            match["dir"],
                            _address(match["src"]),
                            _address(match["dst"]),
                            int(match["tcplen"] or match["udplen"]),
                            "tcp" if match["tcp"] else "udp",
                        )
                    )
        return packets


# -- CPU ------------------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat, clock ticks)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# -- counting a device's UAPI operations ------------------------------------------
class UAPICounter:
    """Counts and times every UAPI request a process makes to a wireguard-go
    device, without touching that process: this proxy listens on `socket_path`
    and passes each request, unchanged, to the device's own socket `real_path`.

    wireguard-go stops as soon as anything happens to its socket's inode (a
    link, a rename), so the proxy cannot take its place; instead the caller
    renames the *interface* and points the measured process at the new name,
    whose socket is this proxy (see client_cost.py).  Requests are classified by
    their first line (`get=1`, `set=1`)."""

    def __init__(self, socket_path: str, real_path: str) -> None:
        import threading

        self.socket_path = socket_path
        self.real_path = real_path
        self.lock = threading.Lock()
        self.operations: list[tuple[str, float, float]] = []  # (kind, start, seconds)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self.listener.listen(64)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        started = time.time()
        with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            request = b""
            while not request.endswith(b"\n\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            upstream.connect(self.real_path)
            upstream.sendall(request)
            tail = b""
            while True:
                chunk = upstream.recv(1 << 20)
                if not chunk:
                    break
                conn.sendall(chunk)
                tail = (tail + chunk)[-2:]
                if tail == b"\n\n":
                    break
        kind = request.split(b"\n", 1)[0].decode("ascii", "replace")
        with self.lock:
            self.operations.append((kind, started, time.time() - started))

    def count(self, kind: str, since: float = 0.0, until: float = float("inf")) -> int:
        with self.lock:
            return sum(1 for k, t, _ in self.operations if k == kind and since <= t < until)

    def close(self) -> None:
        self.listener.close()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
