"""How far one registry scales: N peers, N clients waiting for its push.

    python bench/registry_scale.py [--peers 1000,10000] [--changes 5] [--json FILE]
                                   [--mode stream|longpoll] [--poll-interval 1.0]
                                   [--check-connection persistent|short] [--backlog 1024]

For each N, the registry runs in its own process pinned to CPU 0, built as the
daemon builds it (RegistryMetrics, Registry hub, the device read once before
listening, build_site, a LoopingCall of hub.poll every --poll-interval), over a
MemoryDevice filled with N live peers (allowed IP 127.A.B.C/32, endpoint in
203.0.113.0/24 or 198.51.100.0/24).  This process (pinned to CPU 1) is the N
clients: one persistent HTTP/1.1 connection each, bound to the peer's loopback
address, speaking raw HTTP (10,000 Agents with their connection pools would
cost the client side more than the registry; the requests are the ones
RegistryClient sends).  --mode stream (the default, as wgnat-client does): each
client holds one stream (GET /v1/peers?stream=1&since=V&epoch=E&wait=25) on its
connection and takes each line's version without decoding the rest (10,000
decodings in this one process would measure it, not the registry); --mode
longpoll: the long poll of before streams (since=V&epoch=E&wait=25, every answer
decoded).  The two processes talk JSON lines on the registry's stdin/stdout: CPU
(getrusage), RSS (VmRSS), waiting clients, device changes, when the registry
observed each change (its read saw it and the push began).

Phases per N, each bounded by a deadline so the run ends by itself:
  1. full answers: clients fetch the whole view (GET /v1/peers), 32 at a
     time, until all N did or --full-seconds ran out: bytes and registry CPU per
     full answer, and so wg-nat's model (N full answers per minute);
  2. every client holds its stream (or long poll), the ones not in phase 1
     starting from the version phase 1 returned;
  3. at rest for --rest-seconds: registry CPU and bytes per minute (keep-alive
     lines, or long polls expiring every 25 s);
  4. --changes endpoint changes, one at a time: per-client latency from the
     device change to the answer's last byte at the client, split in two:
     device change -> registry observes (waiting for the periodic device read,
     then reading it) and registry observes -> each client (the push); registry
     CPU and bytes per change;
  5. (run first, while the registry is idle) in the registry process, the
     per-request CPU of the model's parts: identify, delta and full answers, JSON,
     the device read, the shared line a change costs a stream push;
  6. checks at rest (--mode stream): every client's -t check, GET
     /v1/check?epoch=E&version=V&digest=D with what its stream told it, once per
     --check-period (wgnat-client's default 1m0s), each at its own random moment
     in the period, on a second persistent connection from its own address
     (wgnat-client's pool keeps two: the stream and one for short requests),
     opened by its first check: one period of warm-up, then --check-seconds
     measured (connections reused, as at rest); the digest is each client's view
     digest, which the registry process hands over once (model.view_digest), as
     the client's cost is not what is measured: registry CPU per minute
     (absolute and over phase 3's), bytes sent and received, answers "current";
  7. restart (--mode stream): the registry SIGKILLed under the N streams and
     started again on its port, reading the state file the killed one's
     StateKeeper saved (as the daemon with --state-dir); every client reconnects
     as wgnat-client's follower does (full jitter below 1 s, then below 2, 4, ...
     30 s) from its version: kill -> each client's first line, the new registry's
     CPU (start-up included) and bytes, full answers (expected: none); then, for
     N <= --fresh-restart-max, the same without a state file (a fresh epoch).
A registry that answers no control command for --control-seconds (its reactor
busy with clients) ends the run for that N: what was measured is reported.
What bounds N: each process's descriptors.  The registry and this process each
hold a descriptor per connection: 2N with persistent check connections, N with
--check-connection short; RLIMIT_NOFILE's hard limit can be raised only with
CAP_SYS_RESOURCE (a container often lacks it: 20,000 here, so N < 10,000 with
persistent checks, < 20,000 with short ones; a run past it says so in its
notes).  Near the limit a few check connections fail (ConnectBindError: the
socket or its bind failed, the descriptors in flight or, for short checks,
whose TIME_WAITs hold ports of the one ephemeral range every loopback address
binds from).  Loopback addresses (16 million) and memory (12-15 KiB per client
in the registry) do not bound it first.
WGNAT_BENCH_PROFILE=PREFIX writes a cProfile of the registry over the changes.
Everything stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from twisted.internet import defer, protocol, reactor  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

# wgnat-client's: a connection within 5 s, a request's answer (a stream's head)
# within 15 s, else a failure and the follower's backoff.
from wgnat.client.registry_client import CONNECT_TIMEOUT, REQUEST_TIMEOUT  # noqa: E402

WAIT = 25  # the long poll's wait, as the client asks it
KEY_SEED = 20260101


# -- shared ---------------------------------------------------------------------
def peer_address(index: int) -> str:
    """127.1.0.2, 127.1.0.3, ...; never 127.0.0.1 (the registry listens there)."""
    value = int(ipaddress.IPv4Address("127.1.0.2")) + index
    return str(ipaddress.IPv4Address(value))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        # 50,000 clients hold 100,000 connections (a stream and a check connection
        # each): past the usual hard limit, which a process with CAP_SYS_RESOURCE
        # may raise up to fs.nr_open (not in a container without it).
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            soft, hard = need, need
        except (OSError, ValueError):
            pass
    want = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(cpu: int) -> bool:
    try:
        if cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})
            return True
    except (OSError, AttributeError):
        pass
    return False


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the registry process ----------------------------------------------------------
# The interface name written in (and required of) the bench registry's state file.
BENCH_IFNAME = "bench"


def next_endpoint(endpoint: Any) -> Any:
    """A NAT rebinding: the same host, the next port (the "change" command; replayed
    by a restarted registry so that its device is the one the killed one read, as a
    kernel interface outlives its registry)."""
    from wgnat._types import Endpoint

    return Endpoint(endpoint.host, endpoint.port % 64000 + 1024 + 1)


def run_registry(
    peers: int,
    poll_interval: float,
    state_dir: str | None = None,
    port: int = 0,
    replay: list[int] | None = None,
    backlog: int = 1024,
) -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.stdio import StandardIO
    from twisted.internet.task import LoopingCall

    from wgnat._types import Endpoint, PeerState, PublicKey
    from wgnat.device.memory import MemoryDevice
    from wgnat.registry.api import build_site
    from wgnat.registry.hub import Registry
    from wgnat.registry.metrics import RegistryMetrics
    from wgnat.registry.state import (
        StateKeeper,
        default_state_path,
        encode_state,
        load_state,
        write_atomically,
    )
    from wgnat.wire import encode_line

    pinned = pin(0)
    # A stream and a check connection per client.
    raise_nofile(2 * peers + 256)
    rng = random.Random(KEY_SEED)

    class TimedDevice(MemoryDevice):
        """Notes when the first read after a change starts (the poll that sees it)."""

        changed_at: float | None = None
        seen_at: float | None = None

        def read(self):  # type: ignore[no-untyped-def]
            if self.changed_at is not None and self.seen_at is None:
                self.seen_at = time.time()
            return super().read()

    device = TimedDevice(public_key=PublicKey(rng.randbytes(32)))
    now = time.time()
    keys = []
    for index in range(peers):
        key = PublicKey(rng.randbytes(32))
        keys.append(key)
        net = "203.0.113" if index % 2 == 0 else "198.51.100"
        endpoint = Endpoint(
            ipaddress.ip_address(f"{net}.{1 + index % 254}"), 1024 + rng.randrange(60000)
        )
        device.add_peer(
            PeerState(
                key,
                endpoint,
                (ipaddress.ip_network(f"{peer_address(index)}/32"),),
                now - rng.uniform(0, 100),
                persistent_keepalive=25,
            )
        )
    for index in replay or ():
        peer = device.peers[keys[index]]
        device.peers[keys[index]] = dataclasses.replace(peer, endpoint=next_endpoint(peer.endpoint))

    # As RegistryDaemon builds it (_start: the state file read before the first
    # observe, a StateKeeper saving on every change when --state-dir is set).
    metrics = RegistryMetrics()
    hub = Registry(device, reactor, metrics=metrics)
    metrics.watch(hub)
    keeper: StateKeeper | None = None
    restored = False
    saving = {"seconds": 0.0, "last": None, "bytes": None}
    if state_dir is not None:
        path = default_state_path(state_dir, BENCH_IFNAME)

        def timed_write(path: str, document: dict[str, Any]) -> None:
            # What a save costs the reactor (it runs on it): the JSON and the fsyncs.
            started = time.time()
            write_atomically(path, document)
            saving["last"] = time.time() - started
            saving["seconds"] += saving["last"]
            saving["bytes"] = os.path.getsize(path)

        started = time.process_time()
        model = load_state(path, BENCH_IFNAME, device.public_key, hub.model.live_window)
        saving["load_cpu"] = time.process_time() - started
        if model is not None:
            hub.model = model
            restored = True
        keeper = StateKeeper(
            path,
            reactor,
            lambda: encode_state(hub.model, BENCH_IFNAME, device.public_key),
            timed_write,
        )
        hub.on_change = keeper.changed
    if hub.model.observe(device.snapshot(), reactor.seconds()) and keeper is not None:
        keeper.changed()
    site = build_site(hub, metrics)
    poller = LoopingCall(hub.poll)
    poller.clock = reactor

    notices: dict[str, Any] = {}
    # WGNAT_BENCH_PROFILE=PREFIX: cProfile the registry from each change until the
    # woken clients wait again (PREFIX.N, cumulative over the changes).
    profiler = None
    if os.environ.get("WGNAT_BENCH_PROFILE"):
        import cProfile

        profiler = cProfile.Profile()
    real_notify = hub.notify

    def timed_notify() -> None:  # instrumentation only: the product's notify runs as is
        notices["waiters"] = hub.waiting()
        notices["start"] = time.time()
        real_notify()
        notices["end"] = time.time()

    hub.notify = timed_notify  # type: ignore[method-assign]

    def micro() -> dict[str, float]:
        """Per-request costs of the model's parts at this N (CPU seconds)."""
        import json as _json

        model = hub.model
        caller = keys[peers // 2]
        address = ipaddress.ip_address(peer_address(peers // 2))
        at = reactor.seconds()

        def timed(function: Any, repeat: int) -> float:
            started = time.process_time()
            for _ in range(repeat):
                function()
            return (time.process_time() - started) / repeat

        repeat = max(3, 20000 // peers)
        full_doc = model.answer(caller, None, at, model.epoch)
        delta_doc = model.answer(caller, model.version - 1, at, model.epoch)
        return {
            "identify_caller": timed(lambda: model.caller(address), repeat),
            "delta_answer_doc": timed(
                lambda: model.answer(caller, model.version - 1, at, model.epoch), repeat
            ),
            "delta_json": timed(lambda: _json.dumps(delta_doc, separators=(",", ":")), repeat),
            "full_answer_doc": timed(lambda: model.answer(caller, None, at, model.epoch), 3),
            "full_json": timed(lambda: _json.dumps(full_doc, separators=(",", ":")), 3),
            "device_read_observe": timed(lambda: model.observe(device.snapshot(), at), 3),
            "shared_line": timed(
                lambda: encode_line(model.broadcast(model.version - 1, at)), repeat
            ),
        }

    class Control(LineReceiver):
        delimiter = b"\n"

        def reply(self, **fields: Any) -> None:
            fields.update(
                cpu=cpu_seconds(),
                rss_kib=rss_kib(),
                waiting=hub.waiting(),
                version=hub.model.version,
                epoch=hub.model.epoch,
                time=time.time(),
                saves=keeper.saves if keeper is not None else None,
                save_pending=keeper is not None and keeper._timer is not None,
                saving=saving,
            )
            self.sendLine(json.dumps(fields).encode())

        def lineReceived(self, line: bytes) -> None:
            words = line.decode().split()
            if not words:
                return
            if words[0] == "stats":
                self.reply()
            elif words[0] == "touch":  # every peer handshook just now (keepalives)
                at = time.time()
                for key, peer in list(device.peers.items()):
                    device.peers[key] = dataclasses.replace(peer, latest_handshake=at)
                self.reply()
            elif words[0] == "change":  # a NAT rebinding of one peer
                key = keys[int(words[1])]
                peer = device.peers[key]
                assert peer.endpoint is not None
                notices.clear()
                device.seen_at = None
                device.peers[key] = dataclasses.replace(peer, endpoint=next_endpoint(peer.endpoint))
                device.changed_at = time.time()
                if profiler is not None:
                    profiler.enable()
                self.reply(changed_at=device.changed_at)
            elif words[0] == "changed":  # what the registry saw of the last change
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(os.environ["WGNAT_BENCH_PROFILE"] + f".{peers}")
                self.reply(seen_at=device.seen_at, notify=dict(notices))
            elif words[0] == "micro":
                self.reply(micro=micro())
            elif words[0] == "digests":
                # What each client's view hashes to (the digest its -t check sends),
                # once: the client side's cost of computing it is not measured here.
                self.reply(digests=[hub.model.view_digest(key) for key in keys])
            elif words[0] == "quit":
                poller.stop()
                reactor.stop()

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    def listening(port: Any) -> None:
        poller.start(poll_interval, now=False)
        control = Control()
        StandardIO(control)
        control.reply(
            port=port.getHost().port,
            pinned=pinned,
            peers=peers,
            restored=restored,
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )

    gc.collect()
    # The daemon's endpoint (default backlog) on loopback instead of the tunnel address;
    # a restarted registry listens on its predecessor's port (Twisted sets SO_REUSEADDR).
    # --backlog: the daemon's is 1024 (Twisted's default, 50, dropped a restart's
    # reconnects).
    TCP4ServerEndpoint(reactor, port, backlog=backlog, interface="127.0.0.1").listen(
        site
    ).addCallback(listening)
    reactor.run()


# -- the clients (this process) -------------------------------------------------
class Response:
    __slots__ = ("at", "body", "size", "status")

    def __init__(self, status: int, body: bytes, size: int, at: float) -> None:
        self.status, self.body, self.size, self.at = status, body, size, at


class HTTPClient(protocol.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; parses
    Content-Length and chunked answers (twisted.web streams chunked), or, after
    stream(), a streamed answer: chunked newline-delimited lines, each handed on
    with the time its last bytes arrived and the bytes it cost (framing too)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.pending: defer.Deferred[Response] | None = None
        self.size = 0
        self.connected_d: defer.Deferred[HTTPClient] = defer.Deferred()
        self.lost = False
        self.on_line: Any = None  # streaming: called with (line, arrival, bytes)
        self.ended: defer.Deferred[None] | None = None
        self.head_done = False
        self.chunk_left = 0  # bytes of the current chunk still to come (+2: its CRLF)
        self.line = b""
        self.sent = 0  # request bytes written on this connection

    def _send(self, request: bytes) -> None:
        self.sent += len(request)
        self.transport.write(request)  # type: ignore[union-attr]

    def stream(self, path: str, on_line: Any) -> defer.Deferred[None]:
        """Start a stream; the Deferred fails when it ends (it never ends well)."""
        assert self.pending is None and self.on_line is None
        self.on_line, self.ended = on_line, defer.Deferred()
        self.buffer, self.size, self.head_done, self.chunk_left, self.line = b"", 0, False, 0, b""
        self._send(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: application/x-ndjson, application/json\r\n\r\n".encode()
        )
        return self.ended

    def _stream_data(self, data: bytes) -> None:
        at = time.time()
        self.size += len(data)
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        if not self.head_done:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                self.buffer = buffer
                return
            head = buffer[:head_end].lower()
            status = head.split(b"\r\n")[0]
            if b" 200 " not in status or b"application/x-ndjson" not in head:
                self._stream_failed(f"not a stream: {status!r}")
                return
            self.head_done = True
            buffer = buffer[head_end + 4 :]
        offset = 0
        while offset < len(buffer):
            if self.chunk_left == 0:
                line_end = buffer.find(b"\r\n", offset)
                if line_end < 0:
                    self.buffer = buffer[offset:]
                    return
                length = int(buffer[offset:line_end].split(b";")[0], 16)
                if length == 0:
                    self._stream_failed("the stream ended")
                    return
                self.chunk_left = length + 2
                offset = line_end + 2
            take = min(self.chunk_left, len(buffer) - offset)
            data_bytes = max(0, min(take, self.chunk_left - 2))  # not the chunk's CRLF
            self.line += buffer[offset : offset + data_bytes]
            offset += take
            self.chunk_left -= take
            while b"\n" in self.line:
                line, self.line = self.line.split(b"\n", 1)
                size, self.size = self.size, 0
                self.on_line(line, at, size)

    def _stream_failed(self, why: str) -> None:
        ended, self.ended = self.ended, None
        self.on_line = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if ended is not None:
            ended.errback(ConnectionError(why))

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def get(self, path: str, accept: bool = True) -> defer.Deferred[Response]:
        """GET `path` as RegistryClient sends it (its checks carry no Accept)."""
        assert self.pending is None
        self.pending = defer.Deferred()
        self.buffer, self.size = b"", 0
        headers = "Accept: application/json\r\n" if accept else ""
        self._send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        return self.pending

    def dataReceived(self, data: bytes) -> None:
        if self.on_line is not None:
            self._stream_data(data)
            return
        self.size += len(data)
        self.buffer += data
        self._parse()

    def _parse(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.pending is None:
            return
        head = self.buffer[:head_end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self.buffer[head_end + 4 :]
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return
            body = rest[:length]
        elif headers.get("transfer-encoding") == "chunked":
            if not rest.endswith(b"0\r\n\r\n"):
                return
            parts, offset = [], 0
            while True:
                line_end = rest.find(b"\r\n", offset)
                length = int(rest[offset:line_end].split(b";")[0], 16)
                if length == 0:
                    break
                parts.append(rest[line_end + 2 : line_end + 2 + length])
                offset = line_end + 2 + length + 2
            body = b"".join(parts)
        else:
            return
        pending, self.pending = self.pending, None
        pending.callback(Response(status, body, self.size, time.time()))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if self.ended is not None:
            self._stream_failed("connection lost")
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.errback(ConnectionError("connection lost"))


class Client:
    def __init__(self, index: int, port: int) -> None:
        self.index = index
        self.address = peer_address(index)
        self.port = port
        self.conn: HTTPClient | None = None
        self.since: int | None = None
        self.epoch: str | None = None
        self.polling = False
        self.answers: list[tuple[int, float, int]] = []  # (version, arrival, bytes)
        self.watch: dict[str, Any] | None = None  # {"version", "got": [(arrival, bytes)]}
        self.keepalives: list[tuple[float, int]] = []  # (arrival, bytes)
        self.errors = 0
        self.reconnects = 0
        self.first = True
        # The -t check's own connection: wgnat-client's HTTPConnectionPool keeps two
        # persistent connections to the registry (maxPersistentPerHost = 2), the
        # stream on one, so its checks reuse the other (cached 240 s > the 60 s
        # period).  Modelled as a second persistent connection, opened once.
        self.check_conn: HTTPClient | None = None
        self.digest: str | None = None
        self.checks: list[tuple[float, float, int, int, str]] = []  # (sent, got, out, in, kind)
        # Reconnects as wgnat-client's follower: full jitter below a cap doubling
        # from 1 s to 30 s, counted from the last answer.
        self.failures = 0
        # Set by the restart phase: the first line after the registry was killed.
        self.restart: dict[str, Any] | None = None
        self.connect_attempts = 0

    async def open(self, timeout: float = 30) -> HTTPClient:
        """A new connection from this client's own address (the registry tells
        peers apart by it)."""
        built: defer.Deferred[HTTPClient] = defer.Deferred()

        class Factory(protocol.ClientFactory):
            noisy = False

            def buildProtocol(self, addr: Any) -> HTTPClient:
                proto = HTTPClient()
                proto.factory = self
                proto.connected_d.chainDeferred(built)
                return proto

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                if not built.called:
                    built.errback(reason)

        self.connect_attempts += 1
        reactor.connectTCP(
            "127.0.0.1", self.port, Factory(), timeout=timeout, bindAddress=(self.address, 0)
        )
        return await built

    async def connect(self, timeout: float = 30) -> None:
        try:
            self.conn = await self.open(timeout)
        except Exception as exc:
            if self.restart is not None:
                why = type(exc).__name__
                failed = self.restart.setdefault("failed", {})
                failed[why] = failed.get(why, 0) + 1
            raise

    async def check(self, epoch: str, version: int, short: bool = False) -> None:
        """One -t check (GET /v1/check), as RegistryClient.check sends it, on the
        check connection (opened again if the registry closed it); `short`: on a
        connection of its own, closed after the answer."""
        started = time.time()
        try:
            if self.check_conn is None or self.check_conn.lost:
                self.check_conn = await self.open(CONNECT_TIMEOUT)
            conn = self.check_conn
            sent_before = conn.sent
            answer = conn.get(
                f"/v1/check?epoch={epoch}&version={version}&digest={self.digest}", accept=False
            )
            answer.addTimeout(REQUEST_TIMEOUT, reactor)  # as RegistryClient's requests
            response = await answer
            if short:
                self.check_conn = None
                conn.transport.loseConnection()  # type: ignore[union-attr]
        except Exception as exc:
            # Its answer may still come: the next check opens a new connection.
            conn, self.check_conn = self.check_conn, None
            if conn is not None and not conn.lost:
                conn.transport.abortConnection()  # type: ignore[union-attr]
            self.errors += 1
            self.checks.append((started, time.time(), 0, 0, f"error: {type(exc).__name__}"))
            return
        if response.status != 200:
            kind = f"http {response.status}"
        elif b'"current":true' in response.body:
            kind = "current"
        else:
            kind = "full" if b'"full":true' in response.body else "delta"
        self.checks.append((started, response.at, conn.sent - sent_before, response.size, kind))

    async def request(self, path: str) -> Response:
        if self.conn is None or self.conn.lost:
            self.reconnects += 1
            await self.connect()
        assert self.conn is not None
        return await self.conn.get(path)

    async def full(self) -> Response:
        response = await self.request("/v1/peers")
        document = json.loads(response.body)
        self.since, self.epoch = document["version"], document["epoch"]
        return response

    async def poll_forever(self) -> None:
        self.polling = True
        while self.polling:
            try:
                response = await self.request(
                    f"/v1/peers?since={self.since}&epoch={self.epoch}&wait={WAIT}"
                )
            except Exception:
                self.errors += 1
                await sleep(1.0)
                continue
            if response.status != 200:
                self.errors += 1
                await sleep(1.0)
                continue
            document = json.loads(response.body)
            self.since, self.epoch = document["version"], document["epoch"]
            self.answers.append((self.since, response.at, response.size))
            watch = self.watch
            if watch is not None and self.since >= watch["version"]:
                watch["got"].append((response.at, response.size))
                self.watch = None

    def backoff(self) -> float:
        """wgnat-client's reconnect delay (follower: full_jitter(1, 30)), then
        one more failure counted (reset by the next line)."""
        delay = random.random() * min(30.0, 2.0**self.failures)
        self.failures += 1
        return delay

    async def stream_forever(self) -> None:
        """Hold a stream on this client's connection, as wgnat-client does; open
        it again from its version, after the follower's jittered backoff, when
        it ends."""
        self.polling = True
        while self.polling:
            if self.conn is None or self.conn.lost:
                self.reconnects += 1
                try:
                    # RegistryClient's connect timeout (a stalled handshake: the
                    # registry's accept queue full) once streams are up.
                    await self.connect(CONNECT_TIMEOUT if self.answers else 30)
                except Exception:
                    self.errors += 1
                    await sleep(self.backoff())
                    continue
            assert self.conn is not None
            path = f"/v1/peers?since={self.since}&epoch={self.epoch}&wait={WAIT}&stream=1"
            self.first = True
            sent_before = self.conn.sent
            conn = self.conn
            ended = conn.stream(path, self.line)
            if self.restart is not None:
                self.restart["sent"] += conn.sent - sent_before

            def no_head(conn: HTTPClient = conn) -> None:
                # RegistryClient: a stream's answer head within REQUEST_TIMEOUT, or
                # the stream failed (backoff, and a new connection).
                if not conn.head_done and conn.on_line is not None:
                    conn._stream_failed(f"no answer within {REQUEST_TIMEOUT:.0f} s")

            timer = reactor.callLater(REQUEST_TIMEOUT, no_head)
            try:
                await ended
            except Exception:
                pass
            if timer.active():
                timer.cancel()
            if self.restart is not None:
                self.restart.setdefault("lost_at", time.time())
            if self.polling:
                self.errors += 1
                await sleep(self.backoff())

    def line(self, line: bytes, at: float, size: int) -> None:
        self.failures = 0  # the follower counts failures since its last answer
        if not line:
            self.keepalives.append((at, size))
            return
        if self.first:  # the caller's own answer: where it stands
            self.first = False
            document = json.loads(line)
            self.since, self.epoch = document["version"], document["epoch"]
            restart = self.restart
            if restart is not None and "at" not in restart:
                restart.update(
                    at=at, received=size, full=bool(document.get("full")), version=self.since
                )
        else:  # a shared line: its version only
            start = line.index(b'"version":') + 10
            end = start
            while line[end : end + 1].isdigit():
                end += 1
            self.since = int(line[start:end])
        self.answers.append((self.since, at, size))
        watch = self.watch
        if watch is not None and self.since >= watch["version"]:
            watch["got"].append((at, size))
            self.watch = None


def progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class RegistryStuck(Exception):
    pass


class RegistryProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.replies: list[defer.Deferred[dict[str, Any]]] = []
        self.first: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""
        self.timeout = 60.0
        self.stuck = False
        self.peak_rss_kib = 0

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if not self.first.called:
                self.first.callback(message)
            elif self.replies:
                reply = self.replies.pop(0)
                if not reply.called:
                    reply.callback(message)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-4000:]

    def ask(self, command: str) -> defer.Deferred[dict[str, Any]]:
        """The registry's reply; RegistryStuck when it takes over `timeout` seconds
        (its reactor busy answering clients: then the run for this N ends)."""
        if self.stuck:
            return defer.fail(RegistryStuck(f"{command!r}: the registry stopped answering"))
        reply: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.replies.append(reply)
        self.transport.write(command.encode() + b"\n")  # type: ignore[union-attr]

        def late() -> None:
            self.stuck = True
            if not reply.called:
                reply.errback(RegistryStuck(f"no reply to {command!r} within {self.timeout:.0f} s"))

        timer = reactor.callLater(self.timeout, late)

        def answered(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, dict):
                self.peak_rss_kib = max(self.peak_rss_kib, result.get("rss_kib", 0))
            return result

        return reply.addBoth(answered)

    def processEnded(self, reason: Any) -> None:
        for reply in self.replies:
            if reply.called:
                continue
            reply.errback(RuntimeError("registry process ended: " + self.stderr.decode()[-2000:]))
        self.replies = []
        if not self.first.called:
            self.first.errback(RuntimeError("registry failed: " + self.stderr.decode()[-2000:]))
        self.ended.callback(None)


async def bounded_all(jobs: list[Any], concurrency: int, deadline: float) -> int:
    """Run coroutine factories `concurrency` at a time until done or `deadline`."""
    done = 0
    queue = list(jobs)

    async def worker() -> None:
        nonlocal done
        while queue and time.time() < deadline:
            job = queue.pop(0)
            await job()
            done += 1

    await defer.gatherResults(
        [defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True
    )
    return done


async def wait_until(predicate: Any, deadline: float, step: float = 0.05) -> bool:
    while time.time() < deadline:
        if await defer.maybeDeferred(predicate):
            return True
        await sleep(step)
    return False


async def start_registry(
    peers: int,
    args: argparse.Namespace,
    state_dir: str | None,
    port: int = 0,
    replay: list[int] | None = None,
) -> tuple[RegistryProcess, dict[str, Any]]:
    """The registry process and its first line (its port, once it listens)."""
    registry = RegistryProcess()
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--_registry",
        str(peers),
        "--poll-interval",
        str(args.poll_interval),
        "--_port",
        str(port),
        "--backlog",
        str(args.backlog),
    ]
    if state_dir is not None:
        argv += ["--_state-dir", state_dir]
    if replay:
        argv += ["--_replay", ",".join(map(str, replay))]
    reactor.spawnProcess(
        registry, sys.executable, argv, env=dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    )
    hello = await registry.first
    registry.timeout = args.control_seconds
    return registry, hello


async def checks_at_rest(
    registry: RegistryProcess, clients: list[Client], args: argparse.Namespace
) -> dict[str, Any]:
    """Every client does its -t check (GET /v1/check) once per --check-period, each
    at its own moment (uniform over the period, as clients started at random
    moments do), for --check-seconds, from what its stream told it: registry CPU
    and bytes per minute, and how many answers said "current"."""
    digests = (await registry.ask("digests"))["digests"]
    for client, digest in zip(clients, digests, strict=True):
        client.digest = digest
    stats = await registry.ask("stats")
    behind = sum(1 for c in clients if c.since != stats["version"] or c.epoch != stats["epoch"])

    # Each client's first check opens its check connection (the stream holds the
    # pool's first), as wgnat-client's does; the next ones reuse it (idle about
    # one period: under the registry's 75 s idle timeout).  So one period of
    # warm-up, then the window measured: the steady state at rest.
    short = args.check_connection == "short"
    marks = [(len(c.checks), len(c.keepalives)) for c in clients]
    await registry.ask("touch")
    start = time.time()
    measured_from = start + args.check_period
    end = measured_from + args.check_seconds
    rng = random.Random(11)
    inflight: list[defer.Deferred[None]] = []

    def schedule(client: Client, at: float) -> None:
        if at >= end:
            return

        def fire() -> None:
            assert client.epoch is not None and client.since is not None
            inflight.append(defer.ensureDeferred(client.check(client.epoch, client.since, short)))
            schedule(client, at + args.check_period)

        reactor.callLater(max(0.0, at - time.time()), fire)

    for client in clients:
        schedule(client, start + rng.uniform(0, args.check_period))
    first = await registry.ask("stats")
    await sleep(max(0.0, measured_from - time.time()))
    # The window starts here: what the warm-up period cost, then the marks.
    before = await registry.ask("stats")
    warmup = [item for c, m in zip(clients, marks, strict=True) for item in c.checks[m[0] :]]
    warmup_window = before["time"] - first["time"]
    marks = [(len(c.checks), len(c.keepalives)) for c in clients]
    await registry.ask("touch")
    await sleep(max(0.0, end - time.time()))
    # Checks still in flight at the window's end are part of it.
    await wait_until(
        lambda: all(d.called for d in inflight), time.time() + args.control_seconds, step=0.1
    )
    after = await registry.ask("stats")
    window = after["time"] - before["time"]
    done = [item for c, (m, _) in zip(clients, marks, strict=True) for item in c.checks[m:]]
    kinds: dict[str, int] = {}
    for item in done:
        kinds[item[4]] = kinds.get(item[4], 0) + 1
    keepalive_bytes = sum(
        size for c, (_, k) in zip(clients, marks, strict=True) for _, size in c.keepalives[k:]
    )
    sent = sum(item[2] for item in done)
    received = sum(item[3] for item in done)
    latencies = [item[1] - item[0] for item in done if not item[4].startswith("error")]
    cpu = after["cpu"] - before["cpu"]
    warmup_kinds: dict[str, int] = {}
    for item in warmup:
        warmup_kinds[item[4]] = warmup_kinds.get(item[4], 0) + 1
    return {
        "connection": args.check_connection,
        "period_seconds": args.check_period,
        "window_seconds": window,
        "warmup": {  # the first period: each client's check connection opened
            "window_seconds": warmup_window,
            "checks": len(warmup),
            "answers": warmup_kinds,
            "cpu_per_minute": (before["cpu"] - first["cpu"]) * 60 / warmup_window,
            "bytes_per_minute": sum(item[2] + item[3] for item in warmup) * 60 / warmup_window,
        },
        "clients_behind_at_start": behind,
        "checks": len(done),
        "answers": kinds,
        "current": kinds.get("current", 0),
        "checks_per_minute": len(done) * 60 / window,
        "cpu": cpu,
        "cpu_per_minute": cpu * 60 / window,
        "bytes_sent_per_minute": sent * 60 / window,
        "bytes_received_per_minute": received * 60 / window,
        "bytes_per_minute": (sent + received) * 60 / window,
        "bytes_per_check": (sent + received) / len(done) if done else None,
        "keepalive_bytes_per_minute": keepalive_bytes * 60 / window,
        "latency_p50": percentile(latencies, 0.5) if latencies else None,
        "latency_p99": percentile(latencies, 0.99) if latencies else None,
        "rss_mib": after["rss_kib"] / 1024,
    }


async def restart_registry(
    registry: RegistryProcess,
    clients: list[Client],
    args: argparse.Namespace,
    state_dir: str | None,
    port: int,
    replay: list[int],
) -> tuple[RegistryProcess, dict[str, Any]]:
    """SIGKILL the registry under its N streams and start another on the same
    port (reading the state file the killed one saved when `state_dir` is set;
    a fresh epoch otherwise); every client reconnects as wgnat-client does (full
    jitter below 1 s, then below 2, 4, ... 30 s while refused) from its version.
    Measured: kill -> each client's first line (it holds the current view), the
    new registry's CPU (all of it, start-up included) and bytes, full answers."""
    peers = len(clients)
    if state_dir is not None:
        # The daemon's StateKeeper saves at most SAVE_DELAY after a change: what
        # a kill loses is under a second of changes; here, none.
        last: dict[str, Any] = {}

        async def saved() -> bool:
            last.update(await registry.ask("stats"))
            return not last["save_pending"] and bool(last["saves"])

        await wait_until(saved, time.time() + 10, step=0.2)
    before = await registry.ask("stats")
    peak_before = registry.peak_rss_kib / 1024
    attempts = [c.connect_attempts for c in clients]
    for client in clients:
        client.restart = {"sent": 0}
    killed_at = time.time()
    registry.transport.signalProcess("KILL")  # type: ignore[union-attr]
    await registry.ended
    dead_after = time.time() - killed_at
    registry, hello = await start_registry(peers, args, state_dir, port, replay)
    listening_after = hello["time"] - killed_at
    # The device's handshakes are as fresh as the killed registry's were (a kernel
    # interface outlives its registry; without this, peers whose start-up
    # handshake ages past the live window would go "gone" during the phase).
    await registry.ask("touch")
    touched = time.time()
    progress(
        f"registry restarted ({'its state read' if hello['restored'] else 'a fresh epoch'}) "
        f"and listening {listening_after:.2f} s after the kill"
    )

    def current() -> int:
        return sum(1 for c in clients if c.restart is not None and "at" in c.restart)

    async def all_current() -> bool:
        nonlocal touched
        if time.time() - touched > 30:
            await registry.ask("touch")
            touched = time.time()
        return current() >= peers

    everyone = await wait_until(all_current, killed_at + args.restart_seconds, step=0.1)
    after = await registry.ask("stats")
    states = [c.restart or {} for c in clients]
    for client in clients:
        client.restart = None
    times = [item["at"] - killed_at for item in states if "at" in item]
    lost = [item["lost_at"] - killed_at for item in states if "lost_at" in item]
    failed: dict[str, int] = {}
    for item in states:
        for why, count in item.get("failed", {}).items():
            failed[why] = failed.get(why, 0) + count
    # Where the clients not current at the end were stuck.
    stuck: dict[str, int] = {}
    for client, item in zip(clients, states, strict=True):
        if "at" in item:
            continue
        conn = client.conn
        where = (
            "no connection"
            if conn is None or conn.lost
            else "stream asked, no answer head"
            if conn.on_line is not None and not conn.head_done
            else "answer head, no line"
            if conn.on_line is not None
            else "connected, no stream asked"
        )
        stuck[where] = stuck.get(where, 0) + 1
    result = {
        # What the killed registry's StateKeeper did (seconds on its reactor).
        "state_saves": before.get("saves"),
        "state_save": before.get("saving"),
        "state_load_cpu": hello.get("saving", {}).get("load_cpu"),  # the new one's read
        "dead_after": dead_after,
        "lost_p50": percentile(lost, 0.5) if lost else None,
        "lost_max": max(lost) if lost else None,
        "connect_failures": failed,
        "not_current": stuck,
        "state_file": state_dir is not None,
        "restored": hello["restored"],
        "epoch_kept": after["epoch"] == before["epoch"],
        "version_before": before["version"],
        "version_after": after["version"],
        "listening_after": listening_after,
        "current": len(times),
        "at_current_version": sum(1 for item in states if item.get("version") == after["version"]),
        "p50": percentile(times, 0.5) if times else None,
        "p99": percentile(times, 0.99) if everyone else None,
        "max": max(times) if everyone else None,
        "full_answers": sum(1 for item in states if item.get("full")),
        "cpu_startup": hello["cpu"],
        "cpu": after["cpu"],  # the new process's, from its start (getrusage)
        "bytes_received": sum(item.get("received", 0) for item in states),
        "bytes_sent": sum(item.get("sent", 0) for item in states),
        "connect_attempts": sum(
            c.connect_attempts - a for c, a in zip(clients, attempts, strict=True)
        ),
        "rss_mib": after["rss_kib"] / 1024,
        "rss_mib_peak_killed": peak_before,
    }
    if not everyone:
        result["p99_lower_bound"] = time.time() - killed_at
    return registry, result


async def measure(peers: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"peers": peers, "mode": args.mode, "notes": []}
    notes = result["notes"]
    # The registry keeps its state as the daemon does with --state-dir.
    state_dir = tempfile.mkdtemp(prefix="wgnat-bench-state-")
    registry, hello = await start_registry(peers, args, state_dir)
    port = hello["port"]
    # What bounds N here: each process's descriptors (RLIMIT_NOFILE), which only
    # CAP_SYS_RESOURCE may raise past the hard limit.  Every client holds a stream,
    # and with persistent checks a second connection: the registry and this
    # process each need that many descriptors, plus a few.
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hello["nofile"])
    per_client = 2 if args.check_seconds > 0 and args.check_connection == "persistent" else 1
    result["descriptor_limit"] = limit
    result["descriptors_needed"] = per_client * peers + 64
    if per_client * peers + 64 > limit:
        notes.append(
            f"{per_client * peers} connections need more descriptors than a process may "
            f"open here (RLIMIT_NOFILE {limit}, hard; raising it needs CAP_SYS_RESOURCE): "
            "some connections fail (EMFILE)"
        )
    replay: list[int] = []  # the endpoint changes made (a restarted device has them)
    result["registry_pinned_cpu0"] = hello["pinned"]
    result["rss_mib_idle"] = hello["rss_kib"] / 1024
    # 5 (first, while the registry is idle): the model's parts, per request.
    result["micro"] = (await registry.ask("micro"))["micro"]
    clients = [Client(index, port) for index in range(peers)]
    changes: list[dict[str, Any]] = []
    result["changes"] = changes
    phase_start = time.time()
    try:
        # Connections, a few at a time.
        async def connect(client: Client) -> None:
            try:
                await client.connect()
            except Exception:
                client.errors += 1

        connected = await bounded_all(
            [lambda c=c: connect(c) for c in clients], 32, time.time() + args.connect_seconds
        )
        result["connect_seconds"] = time.time() - phase_start
        result["connected"] = sum(1 for c in clients if c.conn is not None and not c.conn.lost)
        progress(f"{result['connected']} connected; full answers")
        del connected

        # 1. Full answers (each client's first fetch; wg-nat's every minute).
        await registry.ask("touch")
        before = await registry.ask("stats")
        sizes: list[int] = []
        started = time.time()

        async def full(client: Client) -> None:
            try:
                response = await client.full()
                sizes.append(response.size)
            except Exception:
                client.errors += 1

        fetched = await bounded_all(
            [lambda c=c: full(c) for c in clients], 32, time.time() + args.full_seconds
        )
        after = await registry.ask("stats")
        wall = time.time() - started
        count = len(sizes)
        result["full"] = {
            "fetched": count,
            "wall_seconds": wall,
            "bytes_per_answer": statistics.median(sizes) if sizes else None,
            "cpu_per_answer": (after["cpu"] - before["cpu"]) / count if count else None,
        }
        if count < peers:
            notes.append(
                f"full answers: {count} of {peers} clients fetched within "
                f"{args.full_seconds:.0f} s; the others start their long poll at the version "
                "those answers carried (the same state a full answer gives); wg-nat's "
                "per-minute cost is extrapolated from them"
            )
        del fetched
        version, epoch = after["version"], after["epoch"]
        for client in clients:
            if client.since is None:
                client.since, client.epoch = version, epoch

        # 2. Every client holds its stream (or long poll).
        progress(f"{count} full answers; {args.mode}s")
        settle_start = time.time()
        for client in clients:
            if args.mode == "stream":
                defer.ensureDeferred(client.stream_forever())
            else:
                defer.ensureDeferred(client.poll_forever())
        last: dict[str, Any] = {}

        async def all_waiting() -> bool:
            last.update(await registry.ask("stats"))
            return last["waiting"] >= peers

        settled = await wait_until(all_waiting, time.time() + args.settle_seconds, step=0.5)
        result["settle_seconds"] = time.time() - settle_start
        result["waiting_after_settle"] = last["waiting"]
        result["rss_mib_waiting"] = last["rss_kib"] / 1024
        if not settled:
            notes.append(
                f"only {last['waiting']} of {peers} {args.mode}s were waiting after "
                f"{args.settle_seconds:.0f} s: the registry could not take them in faster"
            )

        progress(f"{last['waiting']} {args.mode}s waiting; at rest")
        # 3. At rest: streams get a keep-alive line every 15 s (long polls expire and
        # are re-issued every 25 s), the device is read every poll; nothing changes.
        await registry.ask("touch")
        marks = [(len(c.answers), len(c.keepalives)) for c in clients]
        before = await registry.ask("stats")
        await sleep(args.rest_seconds)
        after = await registry.ask("stats")
        window = after["time"] - before["time"]
        pairs = list(zip(clients, marks, strict=True))
        rest_answers = sum(len(c.answers) - m for c, (m, _) in pairs)
        rest_keepalives = sum(len(c.keepalives) - k for c, (_, k) in pairs)
        rest_bytes = sum(
            sum(size for _, _, size in c.answers[m:]) + sum(size for _, size in c.keepalives[k:])
            for c, (m, k) in pairs
        )
        result["rest"] = {
            "window_seconds": window,
            "cpu_per_minute": (after["cpu"] - before["cpu"]) * 60 / window,
            "answers_per_minute": rest_answers * 60 / window,
            "keepalives_per_minute": rest_keepalives * 60 / window,
            "bytes_per_minute": rest_bytes * 60 / window,
            "waiting_at_end": after["waiting"],
        }
        result["rss_mib_waiting"] = max(result["rss_mib_waiting"], after["rss_kib"] / 1024)

        # 4. Endpoint changes, one at a time.
        progress("changes")
        rng = random.Random(7)
        for _ in range(args.changes):
            # Land anywhere in the poll period.
            await sleep(rng.uniform(0.2, 0.2 + args.poll_interval))
            before = await registry.ask("stats")
            got: list[tuple[float, int]] = []
            watch = {"version": before["version"] + 1, "got": got}
            for client in clients:
                client.watch = watch
            index = rng.randrange(peers)
            changed = await registry.ask(f"change {index}")
            replay.append(index)
            changed_at = changed["changed_at"]
            deadline = time.time() + args.change_seconds
            await wait_until(lambda got=got: len(got) >= peers, deadline, step=0.05)
            got = list(got)
            delivered_at = time.time()
            latencies = [at - changed_at for at, _ in got]
            change: dict[str, Any] = {
                "delivered": len(got),
                "p50": percentile(latencies, 0.5) if latencies else None,
                "p99": percentile(latencies, 0.99) if len(got) == peers else None,
                "max": max(latencies) if latencies and len(got) == peers else None,
                "bytes_total": sum(size for _, size in got),
                "bytes_per_client": statistics.median([size for _, size in got]) if got else None,
                "cpu": None,
            }
            if len(got) < peers:
                change["p99_lower_bound"] = delivered_at - changed_at
            changes.append(change)
            progress(
                f"change: {len(got)} of {peers} delivered in {delivered_at - changed_at:.2f} s"
            )
            # CPU: until the woken clients are waiting again (their next poll taken in;
            # a stream waits on at once).
            last = {}
            await wait_until(all_waiting, deadline + 5, step=0.2)
            after = last
            seen = await registry.ask("changed")
            notice = seen["notify"]
            change.update(
                seen_after=(seen["seen_at"] - changed_at) if seen["seen_at"] else None,
                cpu=after["cpu"] - before["cpu"],
                cpu_window=after["time"] - before["time"],
                notify_woke=notice.get("waiters"),
                notify_seconds=notice["end"] - notice["start"] if "end" in notice else None,
            )
            # The registry observes the change when its device read saw it and the
            # push begins (notify): before, the change waits for the poll.
            if "start" in notice and latencies:
                change["observed_after"] = notice["start"] - changed_at
                after_observed = [at - notice["start"] for at, _ in got]
                change["p50_after_observed"] = percentile(after_observed, 0.5)
                if len(got) == peers:
                    change["p99_after_observed"] = percentile(after_observed, 0.99)
            await registry.ask("touch")

        # 6. Every client's -t check on the default period, over the at-rest streams.
        if args.check_seconds > 0 and args.mode == "stream":
            progress(
                f"checks at rest: {args.check_period:.0f} s of warm-up, "
                f"{args.check_seconds:.0f} s measured"
            )
            result["checks"] = await checks_at_rest(registry, clients, args)
            checks = result["checks"]
            checks["cpu_per_minute_over_rest"] = checks["cpu_per_minute"] - result["rest"][
                "cpu_per_minute"
            ] * (1 if args.rest_seconds > 0 else 0)
            result["rss_mib_waiting"] = max(result["rss_mib_waiting"], checks["rss_mib"])
            progress(
                f"checks: {checks['current']} of {checks['checks']} current, "
                f"{checks['cpu_per_minute']:.2f} CPU-s/min"
            )

        # 7. The registry killed and restarted under N streams: with its state file,
        # then (N <= --fresh-restart-max) without one, for comparison.
        if args.restart_seconds > 0 and args.mode == "stream":
            progress("restart (state file)")
            registry, result["restart"] = await restart_registry(
                registry, clients, args, state_dir, port, replay
            )
            progress(
                f"restart: {result['restart']['current']} of {peers} current, p99 "
                f"{fmt(result['restart']['p99'], ' s')}, {result['restart']['full_answers']} full"
            )
            if peers <= args.fresh_restart_max:
                progress("restart (no state file: a fresh epoch)")
                await wait_until(
                    lambda: sum(1 for c in clients if c.conn and not c.conn.lost) >= peers,
                    time.time() + 30,
                    step=0.2,
                )
                registry, result["restart_fresh"] = await restart_registry(
                    registry, clients, args, None, port, replay
                )
                fresh = result["restart_fresh"]
                progress(
                    f"fresh restart: {fresh['current']} of {peers} current, p99 "
                    f"{fmt(fresh['p99'], ' s')}, {fresh['full_answers']} full"
                )
            else:
                notes.append(
                    f"restart without a state file skipped at N > {args.fresh_restart_max} "
                    "(--fresh-restart-max): N full answers on streams are buffered whole "
                    "by the registry"
                )
    except RegistryStuck as exc:
        progress(f"stopped early: {exc}")
        notes.append(f"stopped early: {exc} (its reactor was busy answering clients)")
    rest_rate = result.get("rest", {}).get("cpu_per_minute", 0.0) / 60

    def med(name: str, items: list[dict[str, Any]] = changes) -> float | None:
        values = [item[name] for item in items if item.get(name) is not None]
        return statistics.median(values) if values else None

    result["change"] = {
        "p50": med("p50"),
        "p99": med("p99"),
        "p50_after_observed": med("p50_after_observed"),
        "p99_after_observed": med("p99_after_observed"),
        "p99_lower_bound": med("p99_lower_bound"),
        "seen_after": med("seen_after"),
        "observed_after_p50": med("observed_after"),
        "observed_after_max": max(
            (c["observed_after"] for c in changes if c.get("observed_after") is not None),
            default=None,
        ),
        "notify_seconds": med("notify_seconds"),
        "delivered": min(item["delivered"] for item in changes) if changes else 0,
        "cpu": med("cpu"),
        "cpu_over_rest": med(
            "over",
            [
                {"over": max(0.0, item["cpu"] - rest_rate * item["cpu_window"])}
                for item in changes
                if item.get("cpu") is not None
            ],
        ),
        "bytes_total": med("bytes_total"),
        "bytes_per_client": med("bytes_per_client"),
    }

    for client in clients:
        client.polling = False
    full_info = result.get("full", {})
    if full_info.get("cpu_per_answer"):
        result["wgnat_model_per_minute"] = {
            "cpu_seconds": full_info["cpu_per_answer"] * peers,
            "bytes": full_info["bytes_per_answer"] * peers,
        }
    result["errors"] = sum(c.errors for c in clients)
    result["reconnects"] = sum(c.reconnects for c in clients)
    registry.transport.write(b"quit\n")  # type: ignore[union-attr]
    for client in clients:
        if client.conn is not None and not client.conn.lost:
            client.conn.transport.abortConnection()  # type: ignore[union-attr]
    killer = reactor.callLater(
        0 if registry.stuck else 10, lambda: registry.transport.signalProcess("KILL")
    )
    await registry.ended
    if killer.active():
        killer.cancel()
    result["seconds"] = time.time() - phase_start
    result["rss_mib_peak"] = max(
        registry.peak_rss_kib / 1024,
        *(
            result.get(name, {}).get("rss_mib_peak_killed", 0)
            for name in ("restart", "restart_fresh")
        ),
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    return result


def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if unit == "B":
        for scale, name in ((1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    return f"{value:.{digits}g}{unit}"


def table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = []

    def cell(getter: Any, result: dict[str, Any]) -> str:
        try:
            return str(getter(result))
        except (KeyError, TypeError):  # a phase that did not run (registry stuck)
            return "-"

    def row(name: str, getter: Any) -> None:
        rows.append((name, *[cell(getter, r) for r in results]))

    row("peers = waiting clients", lambda r: str(r["peers"]))
    row("clients waiting (settled)", lambda r: f"{r['waiting_after_settle']} {r['mode']}s")
    row(
        "change -> all clients p50",
        lambda r: fmt(r["change"]["p50"], " s"),
    )
    row(
        "change -> all clients p99 (target <= 1 s)",
        lambda r: (
            fmt(r["change"]["p99"], " s")
            if r["change"]["p99"] is not None
            else f"> {fmt(r['change']['p99_lower_bound'], ' s')} "
            f"({r['change']['delivered']}/{r['peers']} delivered)"
        ),
    )
    row(
        "  device change -> registry observes, median / max",
        lambda r: (
            f"{fmt(r['change']['observed_after_p50'], ' s')} / "
            f"{fmt(r['change']['observed_after_max'], ' s')}"
        ),
    )
    row(
        "  registry observes -> client p50 / p99",
        lambda r: (
            f"{fmt(r['change']['p50_after_observed'], ' s')} / "
            f"{fmt(r['change']['p99_after_observed'], ' s')}"
        ),
    )
    row("  notify loop (answers written)", lambda r: fmt(r["change"]["notify_seconds"], " s"))
    row("registry CPU per change", lambda r: fmt(r["change"]["cpu"], " s"))
    row("  over the rest baseline", lambda r: fmt(r["change"]["cpu_over_rest"], " s"))
    row("bytes per change, all clients", lambda r: fmt(r["change"]["bytes_total"], "B"))
    row("bytes per change, per client", lambda r: fmt(r["change"]["bytes_per_client"], "B"))
    row("registry RSS, N clients waiting (<= 300 MB)", lambda r: f"{r['rss_mib_waiting']:.0f} MiB")
    row("registry RSS, peak seen", lambda r: f"{r['rss_mib_peak']:.0f} MiB")
    row("full answer: bytes", lambda r: fmt(r["full"]["bytes_per_answer"], "B"))
    row("full answer: registry CPU", lambda r: fmt(r["full"]["cpu_per_answer"], " s"))
    row("  full answers measured", lambda r: f"{r['full']['fetched']}")
    row(
        "wg-nat model: CPU s per minute (N full)",
        lambda r: fmt(r.get("wgnat_model_per_minute", {}).get("cpu_seconds"), " s"),
    )
    row(
        "wg-nat model: bytes per minute",
        lambda r: fmt(r.get("wgnat_model_per_minute", {}).get("bytes"), "B"),
    )
    row("ours at rest: CPU s per minute", lambda r: fmt(r["rest"]["cpu_per_minute"], " s"))
    row("ours at rest: bytes per minute", lambda r: fmt(r["rest"]["bytes_per_minute"], "B"))
    row("ours at rest: answers per minute", lambda r: f"{r['rest']['answers_per_minute']:.0f}")
    row(
        "ours at rest: keep-alive lines per minute",
        lambda r: f"{r['rest'].get('keepalives_per_minute', 0):.0f}",
    )
    row(
        "checks at rest (-t each period): CPU s/min (<= 15)",
        lambda r: fmt(r["checks"]["cpu_per_minute"], " s"),
    )
    row("  over the rest baseline", lambda r: fmt(r["checks"]["cpu_per_minute_over_rest"], " s"))
    row(
        "checks at rest: bytes/min, sent + received (<= 2 MiB)",
        lambda r: (
            f"{fmt(r['checks']['bytes_per_minute'], 'B')} "
            f"({fmt(r['checks']['bytes_sent_per_minute'], 'B')} + "
            f"{fmt(r['checks']['bytes_received_per_minute'], 'B')})"
        ),
    )
    row(
        "  with the streams' keep-alives",
        lambda r: fmt(
            r["checks"]["bytes_per_minute"] + r["checks"]["keepalive_bytes_per_minute"], "B"
        ),
    )
    row(
        "checks answered current / made",
        lambda r: f"{r['checks']['current']} / {r['checks']['checks']}",
    )
    row(
        "check round trip p50 / p99",
        lambda r: (
            f"{fmt(r['checks']['latency_p50'], ' s')} / {fmt(r['checks']['latency_p99'], ' s')}"
        ),
    )
    for name, label in (("restart", "restart"), ("restart_fresh", "restart, no state")):

        def restart_p99(r: dict[str, Any], name: str = name) -> str:
            item = r[name]
            if item["p99"] is not None:
                return fmt(item["p99"], " s")
            return f"> {fmt(item['p99_lower_bound'], ' s')} ({item['current']}/{r['peers']})"

        row(
            f"{label}: kill -> all current p50 / p99 (<= 30 s)",
            lambda r, name=name, p99=restart_p99: f"{fmt(r[name]['p50'], ' s')} / {p99(r)}",
        )
        row(
            f"  {label}: listening again after",
            lambda r, name=name: fmt(r[name]["listening_after"], " s"),
        )
        row(
            f"  {label}: registry CPU, all / start-up (<= 30 s)",
            lambda r, name=name: (
                f"{fmt(r[name]['cpu'], ' s')} / {fmt(r[name]['cpu_startup'], ' s')}"
            ),
        )
        row(
            f"  {label}: bytes received / sent",
            lambda r, name=name: (
                f"{fmt(r[name]['bytes_received'], 'B')} / {fmt(r[name]['bytes_sent'], 'B')}"
            ),
        )
        row(
            f"  {label}: full answers (no state: N) / connects",
            lambda r, name=name: f"{r[name]['full_answers']} / {r[name]['connect_attempts']}",
        )
    row("per request: identify caller", lambda r: fmt(r["micro"]["identify_caller"], " s"))
    row("per request: delta answer (model)", lambda r: fmt(r["micro"]["delta_answer_doc"], " s"))
    row("per request: delta JSON encode", lambda r: fmt(r["micro"]["delta_json"], " s"))
    row("per request: full answer (model)", lambda r: fmt(r["micro"]["full_answer_doc"], " s"))
    row("per request: full JSON encode", lambda r: fmt(r["micro"]["full_json"], " s"))
    row("per poll: device read + observe", lambda r: fmt(r["micro"]["device_read_observe"], " s"))
    row("per change: shared line (model + JSON)", lambda r: fmt(r["micro"]["shared_line"], " s"))
    row("client errors / reconnects", lambda r: f"{r['errors']} / {r['reconnects']}")
    row("run time", lambda r: f"{r['seconds']:.0f} s")
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    lines = []
    for number, line in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(line)
            )
        )
        if number == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    pinned = pin(1)
    # A stream and a check connection per client.
    raise_nofile(2 * max(args.peers) + 256)
    results = []
    for peers in args.peers:
        print(f"N = {peers} ...", file=sys.stderr, flush=True)
        results.append(await measure(peers, args))
        print(table(results[-1:]), file=sys.stderr, flush=True)
        if args.json:  # kept after each N
            with open(args.json, "w") as handle:
                json.dump({"results": results}, handle, indent=2)
    load = os.getloadavg()
    document = {
        "clients_pinned_cpu1": pinned,
        "mode": args.mode,
        "poll_interval": args.poll_interval,
        "cpus": os.cpu_count(),
        "loadavg_after": load,
        "wait": WAIT,
        "results": results,
    }
    print()
    print(table(results))
    for result in results:
        for note in result["notes"]:
            print(f"N={result['peers']}: {note}")
    print(f"load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default="1000,10000")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--connect-seconds", type=float, default=60)
    parser.add_argument("--full-seconds", type=float, default=20, help="budget of phase 1")
    parser.add_argument("--settle-seconds", type=float, default=60, help="budget of phase 2")
    parser.add_argument("--rest-seconds", type=float, default=30, help="phase 3 (>= 25 s)")
    parser.add_argument("--change-seconds", type=float, default=20, help="budget per change")
    parser.add_argument(
        "--check-period", type=float, default=60, help="every client's -t (wgnat-client's 1m0s)"
    )
    parser.add_argument(
        "--check-seconds",
        type=float,
        default=60,
        help="phase 6: checks at rest for this long (0: skip)",
    )
    parser.add_argument(
        "--check-connection",
        choices=("persistent", "short"),
        default="persistent",
        help="a check's connection: a second persistent one per client (wgnat-client's "
        "pool) or one per check, closed after it (half the descriptors)",
    )
    parser.add_argument(
        "--restart-seconds",
        type=float,
        default=120,
        help="phase 7: budget from the registry's kill to every client current (0: skip)",
    )
    parser.add_argument(
        "--fresh-restart-max",
        type=int,
        default=1000,
        help="the restart without a state file runs up to this N",
    )
    parser.add_argument(
        "--control-seconds",
        type=float,
        default=60,
        help="a registry that answers no control command for this long ends the run for its N",
    )
    parser.add_argument(
        "--mode",
        choices=("stream", "longpoll"),
        default="stream",
        help="how clients wait for the push: a stream (as wgnat-client) or the long poll",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="the registry's device poll (s)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=1024,
        help="the registry's listen backlog (1024, as the daemon listens: "
        "wgnat.registry.tap.LISTEN_BACKLOG; 50 is Twisted's default)",
    )
    parser.add_argument("--_registry", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_replay", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._registry is None:
        args.peers = [int(part) for part in args.peers.split(",") if part]
    return args


if __name__ == "__main__":
    options = parse_args()
    if options._registry is not None:
        run_registry(
            options._registry,
            options.poll_interval,
            options._state_dir,
            options._port,
            [int(part) for part in options._replay.split(",") if part],
            options.backlog,
        )
    else:
        failures: list[Any] = []

        def run() -> None:
            done = defer.ensureDeferred(main(options))
            done.addErrback(failures.append)
            done.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(run)
        reactor.run()
        if failures:
            failures[0].printTraceback()
            sys.exit(1)
