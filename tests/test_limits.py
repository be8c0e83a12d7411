"""Issue 17's findings 1 and 2, each reproduced: one peer or one local user
cannot hold every descriptor, trickle requests forever, make the registry buffer
a body in a temporary file, or keep it reading its device with requests from
addresses no peer holds.  In memory, on one clock (tests/memory_http.py)."""

from __future__ import annotations

import json
import resource

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from tests.helpers import ep, new_key, peer
from tests.memory_http import TwoPeerRegistry
from wgnat.limits import REQUEST_DEADLINE_SECONDS, LimitedFactory, Limits, raise_descriptor_limit
from wgnat.registry.hub import UNKNOWN_READ_INTERVAL

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
URL = "http://127.0.0.1:51820"


def address(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def test_connections_past_the_limit_per_source_or_in_total_are_refused_unread(logged):
    clock = Clock()
    refusals = []
    limited = LimitedFactory(
        Factory.forProtocol(Protocol),
        Limits(per_source=3, total=5),
        "a test",
        clock.seconds,
        lambda: refusals.append(1),
    )
    mine = [limited.buildProtocol(address("10.0.0.2", n)) for n in range(4)]
    assert [p is not None for p in mine] == [True, True, True, False]
    others = [limited.buildProtocol(address(f"10.0.0.{n}")) for n in (3, 4, 5)]
    assert [p is not None for p in others] == [True, True, False]  # 5 open in total
    assert limited.open == 5 and len(refusals) == 2
    # One line for the refusals of a minute, not one each.
    assert len([line for line in logged if "refused a connection" in line]) == 1
    # A connection that ends frees its place.
    kept = [p for p in mine if p is not None]
    limited.unregisterProtocol(kept[0])
    assert limited.buildProtocol(address("10.0.0.2", 9)) is not None


class Hub(TwoPeerRegistry):
    def __init__(self, per_source: int = 8, total: int = 100) -> None:
        super().__init__(Limits(per_source, total))

    def connect(self, source: str) -> tuple[iosim.FakeTransport, Protocol | None]:
        """A raw connection from `source`, as a hostile peer opens one."""
        protocol = self.site.buildProtocol(address(source, 50000 + self.site.open))
        if protocol is None:
            return iosim.FakeTransport(Protocol(), True), None
        transport = iosim.FakeTransport(protocol, True, address("127.0.0.1", 51820))
        transport.peerAddress = address(source)
        protocol.makeConnection(transport)
        return transport, protocol


def test_one_peer_holding_unfinished_requests_leaves_the_others_served():
    """1,100 unfinished requests from one peer made every other request fail
    (and device reads: "Too many open files")."""
    hub = Hub()
    held = [hub.connect("127.0.0.2") for _ in range(1100)]
    for _, protocol in held:
        if protocol is not None:
            protocol.dataReceived(b"GET /v1/peers HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert sum(protocol is not None for _, protocol in held) == 8
    assert hub.site.open == 8
    code, text = hub.http.result(hub.http.request(b"GET", URL + "/healthz", source="127.0.0.3"))
    assert (code, text) == (200, b"ok\n")
    code, _ = hub.http.result(hub.http.request(b"GET", URL + "/v1/peers", source="127.0.0.3"))
    assert code == 200


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_its_deadline():
    hub = Hub()
    transport, protocol = hub.connect("127.0.0.2")
    assert protocol is not None
    request = b"GET /v1/peers HTTP/1.1\r\nHost: registry\r\n\r\n"
    for byte in request[:-1]:
        protocol.dataReceived(bytes([byte]))
        hub.http.reactor.advance(REQUEST_DEADLINE_SECONDS / len(request))
        if transport.disconnecting or transport.disconnected:
            break
    hub.http.reactor.advance(REQUEST_DEADLINE_SECONDS)
    assert transport.disconnecting or transport.disconnected


def test_a_stream_outlives_the_request_deadline():
    hub = Hub()
    transport, protocol = hub.connect("127.0.0.2")
    assert protocol is not None
    protocol.dataReceived(b"GET /v1/peers?stream=1 HTTP/1.1\r\nHost: registry\r\n\r\n")
    hub.http.reactor.advance(3 * REQUEST_DEADLINE_SECONDS)
    assert not (transport.disconnecting or transport.disconnected)
    assert hub.hub.streams() == 1


def test_a_long_or_chunked_body_is_never_buffered_in_a_temporary_file():
    hub = Hub()
    for head in (
        b"POST /v1/announce HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        b"POST /v1/announce HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        _, protocol = hub.connect("127.0.0.2")
        assert protocol is not None
        protocol.dataReceived(head + b"5\r\nhello\r\n" if b"chunked" in head else head + b"x" * 10)
        request = protocol.wrappedProtocol.requests[-1]
        assert type(request.content).__name__ == "BytesIO", type(request.content)


def test_requests_from_unknown_addresses_read_the_device_at_most_once_a_second():
    """Four looping senders from an address no peer holds kept the registry at
    96 % of a core: each request read the device before its 403."""
    hub = Hub(per_source=1000, total=1000)
    reads = hub.device.reads
    code, _ = hub.http.result(hub.http.request(b"GET", URL + "/v1/peers", source="127.0.0.9"))
    assert code == 403 and hub.device.reads - reads == 1
    waiting = [hub.http.request(b"GET", URL + "/v1/peers", source="127.0.0.9") for _ in range(200)]
    hub.http.pump()
    assert hub.device.reads - reads == 1  # they wait for the next read...
    hub.http.advance(UNKNOWN_READ_INTERVAL)
    assert hub.device.reads - reads == 2  # ...which serves them all
    assert {hub.http.result(request)[0] for request in waiting} == {403}


def test_too_low_a_descriptor_limit_is_raised_or_reported(monkeypatch, logged):
    limits = {"now": (1024, 4096)}

    def getrlimit(which):
        return limits["now"]

    def setrlimit(which, value):
        limits["now"] = value

    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_descriptor_limit(2000, "wgnat-server") == 2064  # raised, quietly
    assert not [line for line in logged if "may open only" in line]
    assert raise_descriptor_limit(16384, "wgnat-server") == 4096  # the hard limit: said so
    [line] = [line for line in logged if "may open only" in line]
    assert "16384 connections" in line and "LimitNOFILE" in line


def test_the_registry_daemon_has_connection_flags():
    from wgnat.registry import tap

    options = tap.Options()
    options.parseOptions(["--max-connections", "100", "--max-connections-per-peer", "3"])
    assert (options["max-connections"], options["max-connections-per-peer"]) == (100, 3)
    for bad in ("0", "x", "-1"):
        with pytest.raises(Exception, match="max-connections"):
            tap.Options().parseOptions(["--max-connections", bad])


class FillingTransport(StringTransport):
    """A connection whose buffers hold `room` bytes: past them it pauses its
    producer, as Twisted's TCP transport does while the peer does not read."""

    def __init__(self, room: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.room = room
        self.read = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) - self.read > self.room:
            self.producer.pauseProducing()

    def writeSequence(self, data) -> None:  # a chunked response writes through here
        self.write(b"".join(data))

    def drain(self) -> None:
        """The peer reads everything buffered so far."""
        self.read = len(self.value())
        if self.producer is not None:
            self.producer.resumeProducing()


def hub_of_3000_with_a_slow_reader():
    """A hub whose full answer is hundreds of KB, and one connection whose
    reader has not read yet (64 KB fit in its socket)."""
    hub = Hub()
    now = hub.http.reactor.seconds()
    for n in range(3000):
        ip = f"10.9.{n // 250}.{n % 250}/32"
        hub.device.add_peer(peer(new_key(), f"203.0.113.{n % 250}:{1000 + n}", (ip,), now))
    hub.hub.model.observe(hub.device.snapshot(), now)
    source = address("127.0.0.2")
    protocol = hub.site.buildProtocol(source)
    transport = FillingTransport(64 * 1024, peerAddress=source)
    protocol.makeConnection(transport)
    return hub, now, protocol, transport


def test_a_full_answer_is_written_only_as_fast_as_the_caller_reads():
    """100 GET /v1/peers from one peer that never read made the registry buffer
    100 full answers (1.9 MB each at 10,000 peers) and stalled other peers."""
    hub, _, protocol, transport = hub_of_3000_with_a_slow_reader()
    # Pipelined requests, never read: one answer's first pieces are buffered.
    protocol.dataReceived(b"GET /v1/peers HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
    buffered = len(transport.value())
    assert 64 * 1024 < buffered < 128 * 1024
    assert hub.device.reads <= 2  # and the later requests were not even started
    # The caller reads: the rest comes, then the next request's answer.
    for _ in range(200):
        transport.drain()
    head, _, body = transport.value().partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 400_000 and json.loads(body[:length])["full"] is True
    assert transport.value().count(b"HTTP/1.1 200 OK") == 5


def test_a_streams_first_full_answer_is_written_as_the_reader_reads_then_its_lines():
    """A registry restarted without its state sends every client a full answer
    at once (2 MB each at 10,000 peers): each is written as its reader reads,
    from the encoding all callers share, and the lines of later changes follow
    it in order."""
    from tests.test_registry_stream import body_lines

    hub, now, protocol, transport = hub_of_3000_with_a_slow_reader()
    protocol.dataReceived(b"GET /v1/peers?stream=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.value()) < 200 * 1024  # not the whole 560 KB answer
    # A change meanwhile: its line waits behind the rest of the first answer.
    hub.device.handshake(hub.b, now + 1, endpoint=ep("203.0.113.22:40000"))
    hub.hub.refresh()
    for _ in range(100):
        transport.drain()
    first, change = [json.loads(line) for line in body_lines(transport)]
    assert first["full"] is True and len(first["peers"]) == 3002
    assert not change["full"] and change["peers"][0]["endpoint"] == "203.0.113.22:40000"


def test_a_request_pipelined_behind_a_long_poll_is_not_cut_while_it_waits():
    """Found in review: bytes of a pipelined request started its deadline while
    Twisted held them behind a long poll still being answered."""
    hub = Hub()
    hub.hub.refresh()
    version, epoch = hub.hub.model.version, hub.hub.model.epoch
    transport, protocol = hub.connect("127.0.0.2")
    assert protocol is not None
    poll = f"GET /v1/peers?since={version}&epoch={epoch}&wait=30 HTTP/1.1\r\nHost: x\r\n\r\n"
    protocol.dataReceived(poll.encode())
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # while it waits
    hub.http.reactor.advance(2 * REQUEST_DEADLINE_SECONDS)
    assert not (transport.disconnecting or transport.disconnected)
    hub.http.reactor.advance(30)  # the long poll ends, then the pipelined request is answered
    assert b"HTTP/1.1 200 OK" in transport.getOutBuffer()
