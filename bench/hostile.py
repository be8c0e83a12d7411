"""What one hostile peer or local user can cost the registry, and everyone else.

    python bench/hostile.py [--peers 1000] [--json FILE]

The registry runs in its own process, built as the daemon builds it (Registry
over a MemoryDevice of N live peers, build_site behind the daemon's connection
limits, --max-connections 16384, --max-connections-per-peer 8, the 1 s device
poll), listening on 127.0.0.1; peer i sends from 127.1.x.y as registry_scale.py
does.  This process holds streams for 20 well-behaved peers and, phase by
phase, plays one attacker:

  baseline      no attacker: one endpoint change -> the 20 streams, p50 / p99
  connections   one peer opens 1,100 connections and trickles a byte into each
                every 2 s (issue 17, finding 1): how many it holds, whether
                /healthz and the others' pushes still work, the registry's open
                descriptors
  trickle       one request sent a byte a second: how long until it is cut
  no-reader     one peer pipelines 100 GET /v1/peers and never reads (finding
                2): push latency to the others meanwhile, the registry's RSS
  unknown       4 senders from an address no peer holds loop GET /v1/peers for
                10 s (finding 2): the registry's CPU and device reads a second

Everything stays on 127.0.0.0/8; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

GOOD_PEERS = 20
CHANGES = 5


def peer_address(index: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("127.1.0.2")) + index))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- the registry process ----------------------------------------------------------
def run_registry(peers: int) -> None:
    import dataclasses
    import random

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.stdio import StandardIO
    from twisted.protocols.basic import LineReceiver

    from wgnat._types import Endpoint, PeerState, PublicKey
    from wgnat.device.memory import MemoryDevice
    from wgnat.limits import LimitedFactory, Limits
    from wgnat.registry.api import build_site
    from wgnat.registry.hub import Registry
    from wgnat.registry.metrics import RegistryMetrics
    from wgnat.registry.tap import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_PEER
    from wgnat.timing import repeat

    rng = random.Random(7)
    device = MemoryDevice(public_key=PublicKey(rng.randbytes(32)))
    keys = []
    now = time.time()
    for index in range(peers):
        key = PublicKey(rng.randbytes(32))
        keys.append(key)
        device.add_peer(
            PeerState(
                key,
                Endpoint(ipaddress.ip_address(f"203.0.113.{1 + index % 250}"), 1024 + index),
                (ipaddress.ip_network(f"{peer_address(index)}/32"),),
                now,
            )
        )
    reads = {"count": 0}
    real_read = device.read

    def counted_read():  # type: ignore[no-untyped-def]
        reads["count"] += 1
        return real_read()

    device.read = counted_read  # type: ignore[method-assign]
    metrics = RegistryMetrics()
    hub = Registry(device, reactor, metrics=metrics)
    hub.model.observe(device.snapshot(), reactor.seconds())
    limits = Limits(DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_CONNECTIONS)
    site = LimitedFactory(build_site(hub, metrics), limits, "the api", reactor.seconds)
    repeat(reactor, 1.0, hub.poll, "reading the device")

    def stats() -> dict[str, Any]:
        usage = os.times()
        with open("/proc/self/status") as handle:
            rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        return {
            "cpu": usage.user + usage.system,
            "rss_kib": rss,
            "fds": len(os.listdir("/proc/self/fd")),
            "open": site.open,
            "refused": site.refused,
            "reads": reads["count"],
            "streams": hub.streams(),
            "time": time.time(),
        }

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            word = line.decode().strip()
            if word == "change":
                key = keys[rng.randrange(GOOD_PEERS, peers)]
                peer = device.peers[key]
                assert peer.endpoint is not None
                device.peers[key] = dataclasses.replace(
                    peer, endpoint=Endpoint(peer.endpoint.host, peer.endpoint.port % 60000 + 1025)
                )
                self.sendLine(json.dumps({"changed_at": time.time(), **stats()}).encode())
            elif word == "touch":  # every peer handshook just now
                at = time.time()
                for key, peer in list(device.peers.items()):
                    device.peers[key] = dataclasses.replace(peer, latest_handshake=at)
                self.sendLine(json.dumps(stats()).encode())
            elif word == "stats":
                self.sendLine(json.dumps(stats()).encode())
            elif word == "quit":
                reactor.stop()

    def listening(port: Any) -> None:
        control = Control()
        StandardIO(control)
        control.sendLine(json.dumps({"port": port.getHost().port}).encode())

    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site).addCallback(listening)
    reactor.run()


# -- this process: the peers ---------------------------------------------------------
class Registry:
    def __init__(self, peers: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--registry", str(peers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = self.read()["port"]

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the registry process ended")
        return json.loads(line)

    def ask(self, word: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, SystemExit):
            pass
        self.process.wait(timeout=10)


def connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: registry\r\n\r\n".encode()


def get(port: int, source: str, path: str, timeout: float = 5.0) -> int:
    """One request on a new connection: the status code (0: no answer)."""
    try:
        with connect(port, source, timeout) as sock:
            sock.sendall(request(path))
            head = sock.recv(64)
    except OSError:
        return 0
    parts = head.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class Streams:
    """The well-behaved peers' streams: when each line arrives."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.socks = []
        for index in range(count):
            sock = connect(port, peer_address(index))
            sock.sendall(request("/v1/peers?stream=1"))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, index)
            self.socks.append(sock)
        self.drain(2.0)

    def drain(self, seconds: float) -> dict[int, float]:
        """Read what arrives for `seconds`: each stream's first arrival time."""
        first: dict[int, float] = {}
        deadline = time.time() + seconds
        while time.time() < deadline:
            for key, _ in self.selector.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                if data and b"{" in data:
                    first.setdefault(key.data, time.time())
        return first

    def push(self, registry: Registry) -> list[float]:
        """One endpoint change: seconds until each stream has its line."""
        changed_at = registry.ask("change")["changed_at"]
        arrived = self.drain(3.0)
        return [arrived[index] - changed_at for index in sorted(arrived)]


def summary(latencies: list[list[float]]) -> dict[str, Any]:
    flat = [value for change in latencies for value in change]
    got = [len(change) for change in latencies]
    if not flat:
        return {"delivered": got, "p50": None, "p99": None}
    return {
        "delivered": got,
        "p50": round(statistics.median(flat), 3),
        "p99": round(percentile(flat, 0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--registry", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.registry:
        run_registry(args.registry)
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    registry = Registry(args.peers)
    port = registry.port
    results: dict[str, Any] = {"peers": args.peers, "load": os.getloadavg()}
    streams = Streams(port, GOOD_PEERS)
    try:
        base = registry.ask("stats")
        results["baseline"] = {
            "push": summary([streams.push(registry) for _ in range(CHANGES)]),
            "fds": base["fds"],
            "rss_mib": round(base["rss_kib"] / 1024, 1),
        }

        # 1. One peer opens 1,100 connections and trickles into them.
        attacker = peer_address(GOOD_PEERS + 1)
        held = []
        for _ in range(1100):
            try:
                sock = connect(port, attacker, 2.0)
                sock.sendall(b"GET /v1/peers HTTP/1.1\r\n")
                held.append(sock)
            except OSError:
                pass
        pushes = []
        for _ in range(CHANGES):
            for sock in held:
                try:
                    sock.send(b"X")
                except OSError:
                    pass
            pushes.append(streams.push(registry))
        alive = 0
        for sock in held:
            try:
                sock.setblocking(False)
                alive += sock.recv(1) != b""
            except BlockingIOError:
                alive += 1  # nothing to read, still open
            except OSError:
                pass
        during = registry.ask("stats")
        results["connections"] = {
            "opened_by_attacker": len(held),
            "still_open_after_pushes": alive,
            "registry_open": during["open"],
            "registry_refused": during["refused"],
            "registry_fds": during["fds"],
            "healthz_from_another_peer": get(port, peer_address(2), "/healthz"),
            "full_answer_to_another_peer": get(port, peer_address(3), "/v1/peers"),
            "push": summary(pushes),
        }
        for sock in held:
            sock.close()
        time.sleep(1.0)

        # 2. One request, a byte a second.
        sock = connect(port, peer_address(GOOD_PEERS + 2), 30.0)
        started = time.time()
        cut_after = None
        for byte in request("/v1/peers"):
            try:
                sock.send(bytes([byte]))
                sock.setblocking(False)
                if sock.recv(1) == b"":
                    cut_after = time.time() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                cut_after = time.time() - started
                break
            finally:
                sock.setblocking(True)
            time.sleep(1.0)
            if time.time() - started > 25:
                break
        sock.close()
        results["trickle"] = {
            "cut_after_seconds": None if cut_after is None else round(cut_after, 1)
        }

        # 3. One peer pipelines 100 full requests and never reads.
        rss_before = registry.ask("stats")["rss_kib"]
        greedy = []
        for _ in range(8):
            sock = connect(port, peer_address(GOOD_PEERS + 3))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request("/v1/peers") * 13)
            greedy.append(sock)
        pushes = [streams.push(registry) for _ in range(CHANGES)]
        after = registry.ask("stats")
        results["no_reader"] = {
            "requests": 8 * 13,
            "push": summary(pushes),
            "rss_growth_mib": round((after["rss_kib"] - rss_before) / 1024, 1),
        }
        for sock in greedy:
            sock.close()
        time.sleep(1.0)

        # 4. Four senders from an address no peer holds, for 10 s.
        before = registry.ask("stats")
        sent = 0
        deadline = time.time() + 10
        unknown = [f"127.9.9.{n}" for n in range(1, 5)]
        while time.time() < deadline:
            for source in unknown:
                get(port, source, "/v1/peers", timeout=2.0)
                sent += 1
        after = registry.ask("stats")
        seconds = after["time"] - before["time"]
        results["unknown"] = {
            "requests": sent,
            "registry_cpu_share": round((after["cpu"] - before["cpu"]) / seconds, 2),
            "device_reads_per_second": round((after["reads"] - before["reads"]) / seconds, 2),
        }
    finally:
        registry.stop()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
