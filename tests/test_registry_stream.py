"""The stream (GET /v1/peers?stream=1) at both ends, in memory on a Clock: the
registry encodes each change once for every caller, writes keep-alives, bounds
what a slow reader costs it; the client decodes lines (its own record dropped)
and refuses what is malformed."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.helpers import ep, new_key, peer
from wgnat._types import InvalidValue
from wgnat.device.memory import MemoryDevice
from wgnat.registry import api
from wgnat.registry.api import build_site
from wgnat.registry.hub import KEEPALIVE_SECONDS, Registry
from wgnat.registry.metrics import RegistryMetrics
from wgnat.registry.model import RegistryModel
from wgnat.wire import KEEPALIVE_LINE, StreamDecoder

START = 1_700_000_000.0


class Hub:
    """A registry with three live peers on a Clock, its Site, and streams to it."""

    ADDRESSES = ("198.51.100.2", "198.51.100.3", "198.51.100.4")

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.keys = [new_key() for _ in self.ADDRESSES]
        self.device = MemoryDevice(public_key=new_key())
        for n, (key, address) in enumerate(zip(self.keys, self.ADDRESSES, strict=True)):
            self.device.add_peer(peer(key, f"203.0.113.{21 + n}:51820", (f"{address}/32",), START))
        self.metrics = RegistryMetrics()
        self.hub = Registry(self.device, self.clock, RegistryModel(), self.metrics)
        self.hub.model.observe(self.device.snapshot(), START)
        self.site = build_site(self.hub, self.metrics)
        self.site.reactor = self.clock  # the idle timeout on the Clock too

    def open(self, n: int, query: str = "stream=1") -> tuple[object, StringTransport]:
        address = IPv4Address("TCP", self.ADDRESSES[n], 40000 + n)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(f"GET /v1/peers?{query} HTTP/1.1\r\nHost: registry\r\n\r\n".encode())
        return protocol, transport

    def rebind(self, n: int, port: int) -> None:
        self.device.handshake(
            self.keys[n], self.clock.seconds(), endpoint=ep(f"203.0.113.{21 + n}:{port}")
        )
        self.hub.refresh()


def body_lines(transport: StringTransport) -> list[bytes]:
    """The stream's lines so far (chunked transfer encoding undone)."""
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    assert b"content-type: application/x-ndjson" in head.lower(), head
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        body, rest = body + rest[:length], rest[length + 2 :]
    return body.split(b"\n")[:-1]


def test_each_change_is_encoded_once_and_written_to_every_stream():
    hub = Hub()
    sent: dict[int, list[bytes]] = {0: [], 1: []}
    for n in sent:
        hub.hub.open_stream(hub.keys[n], None, None, sent[n].append)
    # The first line is each caller's own answer: "you", then every peer (the
    # same encoded list for both), which the decoder takes its own record out of.
    for n, lines in sent.items():
        first = json.loads(lines[0])
        assert first["full"] and first["you"]["public_key"] == hub.keys[n].base64
        [answer] = list(StreamDecoder().feed(lines[0]))
        assert hub.keys[n] not in [p.public_key for p in answer.peers]
    assert sent[0][0].split(b',"peers":')[1] == sent[1][0].split(b',"peers":')[1]
    hub.rebind(0, 40000)
    assert sent[0][1] is sent[1][1]  # one encoding, the same bytes for both
    shared = json.loads(sent[0][1])
    assert set(shared) == {"epoch", "version", "full", "peers", "removed"}  # no "you"
    assert [p["public_key"] for p in shared["peers"]] == [hub.keys[0].base64]
    assert shared["version"] == hub.hub.model.version and not shared["full"]
    assert hub.metrics.pushes._value.get() == 2


def test_streams_at_different_versions_each_get_their_delta():
    hub = Hub()
    old: list[bytes] = []
    stream = hub.hub.open_stream(hub.keys[0], None, None, old.append).result
    hub.rebind(1, 40000)
    new: list[bytes] = []
    hub.hub.open_stream(hub.keys[1], None, None, new.append)
    stream.version -= 1  # as if a change had not reached it (never so in practice)
    hub.rebind(2, 40000)
    assert {p["public_key"] for p in json.loads(old[-1])["peers"]} == {
        hub.keys[1].base64,
        hub.keys[2].base64,
    }
    assert [p["public_key"] for p in json.loads(new[-1])["peers"]] == [hub.keys[2].base64]


def test_keepalives_keep_a_quiet_stream_talking_past_the_idle_timeout():
    hub = Hub()
    _, transport = hub.open(0)
    assert len(body_lines(transport)) == 1
    last, count = 0, 1
    for second in range(1, 200):
        hub.clock.advance(1)
        lines = body_lines(transport)
        if len(lines) > count:
            last, count = second, len(lines)
        # Never more than KEEPALIVE_SECONDS without a line, nor many more lines.
        assert second - last <= KEEPALIVE_SECONDS, second
    assert lines[1:] == [b""] * (len(lines) - 1)
    assert len(lines) - 1 <= 200 / (KEEPALIVE_SECONDS - 1)
    assert not transport.disconnecting  # the 75 s idle timeout does not end a stream
    # A change resets the count: no keep-alive right after it.
    hub.rebind(1, 40000)
    count = len(body_lines(transport))
    hub.clock.advance(KEEPALIVE_SECONDS / 3)
    assert len(body_lines(transport)) == count


def test_a_closed_stream_leaves_no_timer_and_no_waiter():
    hub = Hub()
    protocol, _ = hub.open(0)
    assert hub.hub.streams() == 1 and hub.clock.getDelayedCalls()
    protocol.connectionLost(Exception("gone"))
    assert hub.hub.streams() == 0 and hub.hub.waiting() == 0
    assert hub.hub._keepalive is None
    hub.rebind(1, 40000)  # nothing to write to


def test_a_slow_reader_is_dropped_instead_of_buffered(monkeypatch, logged):
    monkeypatch.setattr(api, "MAX_STREAM_BACKLOG_BYTES", 2000)
    hub = Hub()
    slow, slow_transport = hub.open(0)
    _, fast_transport = hub.open(1)
    # The slow reader's socket buffers are full: the transport pauses its producer
    # (the HTTP channel, which pauses the response's: the stream).
    slow_transport.producer.pauseProducing()
    for port in range(40000, 40100):
        hub.rebind(2, port)
        if slow_transport.disconnecting:
            break
    assert slow_transport.disconnecting and slow_transport.disconnected  # aborted
    written = len(slow_transport.value())
    assert any("dropping its stream: it reads too slowly" in line for line in logged)
    assert hub.metrics.streams_dropped._value.get() == 1
    slow.connectionLost(Exception("aborted"))
    hub.rebind(2, 41000)
    assert len(slow_transport.value()) == written
    # The other stream got every change.
    assert json.loads(body_lines(fast_transport)[-1])["peers"][0]["endpoint"].endswith(":41000")
    assert hub.hub.streams() == 1


def test_a_paused_stream_that_catches_up_is_kept(monkeypatch):
    monkeypatch.setattr(api, "MAX_STREAM_BACKLOG_BYTES", 2000)
    hub = Hub()
    _, transport = hub.open(0)
    for round_ in range(10):
        transport.producer.pauseProducing()
        hub.clock.advance(KEEPALIVE_SECONDS)  # no keep-alive queued while paused
        for port in range(3):
            hub.rebind(2, 40000 + 10 * round_ + port)
        transport.producer.resumeProducing()  # the reader drained the buffers
    assert not transport.disconnecting and hub.hub.streams() == 1


def test_a_failing_stream_does_not_stop_the_others(logged):
    hub = Hub()
    good: list[bytes] = []

    def broken(line: bytes) -> None:
        if line != b"\n" and b'"you"' not in line:
            raise RuntimeError("a bug")

    hub.hub.open_stream(hub.keys[0], None, None, broken)
    hub.hub.open_stream(hub.keys[1], None, None, good.append)
    hub.rebind(2, 40000)
    assert len(good) == 2 and hub.hub.streams() == 1
    assert any("cannot write to the stream of" in line for line in logged)


def test_stream_query_is_validated():
    hub = Hub()
    _, transport = hub.open(0, "stream=2")
    assert b" 400 " in transport.value().split(b"\r\n")[0]
    assert b"'stream' must be 0 or 1" in transport.value()
    _, transport = hub.open(0, "stream=0")  # the plain full answer
    assert b"application/json" in transport.value()
    assert hub.hub.streams() == 0


# -- the client's side: StreamDecoder ------------------------------------------


def line(document: dict) -> bytes:
    return json.dumps(document).encode() + b"\n"


ME, OTHER = new_key(), new_key()


def first(**extra) -> dict:
    document = {
        "epoch": "e1",
        "version": 4,
        "full": True,
        "you": {"public_key": ME.base64, "endpoint": "203.0.113.21:51820"},
        "peers": [{"public_key": OTHER.base64, "endpoint": "203.0.113.22:51820"}],
        "removed": [],
    }
    document.update(extra)
    return document


def shared(version: int, *peers: tuple, removed: tuple = (), **extra) -> dict:
    document = {
        "epoch": "e1",
        "version": version,
        "full": False,
        "peers": [{"public_key": key.base64, "endpoint": endpoint} for key, endpoint in peers],
        "removed": [key.base64 for key in removed],
    }
    document.update(extra)
    return document


def test_decoder_drops_its_own_record_and_takes_its_endpoint_from_it():
    decoder = StreamDecoder(1 << 20)
    [answer] = decoder.feed(line(first()))
    assert answer.full and str(answer.my_endpoint) == "203.0.113.21:51820"
    [moved] = decoder.feed(line(shared(5, (OTHER, "203.0.113.22:40000"))))
    assert [p.public_key for p in moved.peers] == [OTHER]
    assert str(moved.my_endpoint) == "203.0.113.21:51820"  # unchanged: not listed
    [mine] = decoder.feed(line(shared(6, (ME, "203.0.113.21:40001"))))
    assert mine.peers == () and str(mine.my_endpoint) == "203.0.113.21:40001"
    [gone] = decoder.feed(line(shared(7, removed=(ME, OTHER))))
    assert gone.removed == (OTHER,)


def test_decoder_joins_lines_across_reads_and_passes_keepalives():
    decoder = StreamDecoder(1 << 20)
    data = line(first()) + KEEPALIVE_LINE + line(shared(5, (OTHER, "203.0.113.22:40000")))
    got = []
    for i in range(0, len(data), 7):
        got.extend(decoder.feed(data[i : i + 7]))
        assert decoder.partial == (i + 7 < len(data) and not data[: i + 7].endswith(b"\n"))
    assert [answer and answer.version for answer in got] == [4, None, 5]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([shared(4)], "does not name this peer in 'you'"),
        ([first(), shared(5, epoch="e2")], "changed epoch from e1 to e2"),
        ([first(), shared(3)], "went back from version 4 to 3"),
        ([first(), {"version": 5}], "no valid 'epoch'"),
        ([first(), shared(5, (OTHER, "bogus"))], "peers[0]"),
    ],
)
def test_decoder_refuses_a_bad_line_with_the_reason(lines, message):
    decoder = StreamDecoder(1 << 20)
    data = b"".join(line(document) for document in lines)
    got = []
    with pytest.raises(InvalidValue, match=message.replace("[", r"\[").replace("]", r"\]")):
        for answer in decoder.feed(data):
            got.append(answer)
    assert len(got) == len(lines) - 1  # the good lines before it were given


def test_decoder_refuses_garbage_and_overlong_lines():
    with pytest.raises(InvalidValue, match="not JSON"):
        list(StreamDecoder(1 << 20).feed(b"\xff{\n"))
    decoder = StreamDecoder(100)
    with pytest.raises(InvalidValue, match="over 100 bytes"):
        for _ in range(20):
            list(decoder.feed(b"x" * 10))


def test_changes_reach_the_connection_in_order_as_the_response_writes_them():
    """Each change is one chunk of the response, written through twisted.web's
    public Request.write (no private transport fields), in version order."""
    hub = Hub()
    _, transport = hub.open(1)
    for port in (40001, 40002, 40003):
        hub.rebind(1, port)
    lines = body_lines(transport)
    assert [json.loads(text)["peers"][0]["endpoint"][-5:] for text in lines[1:]] == [
        "40001",
        "40002",
        "40003",
    ]


def test_a_stream_dropped_during_the_device_read_leaves_no_record():
    """A stream whose connection ends while its first answer waits for the
    device read was registered for good (ended() had forgotten the writer
    before opened() ran): 3,000 open-then-reset requests left 2,741 streams."""
    hub = Hub()
    reading = []
    original = hub.device.read

    def slow_read():
        from twisted.internet.defer import Deferred

        waiting: Deferred = Deferred()
        reading.append((waiting, original))
        return waiting

    hub.device.read = slow_read
    for _ in range(300):
        protocol, _ = hub.open(1)
        protocol.connectionLost(Failure(ConnectionLost()))  # reset during the read
    for waiting, read in reading:
        read().chainDeferred(waiting)
    assert hub.hub.streams() == 0
    assert api_streams(hub) == {}
    # The per-peer limit still holds for streams that stay.
    hub.device.read = original
    opened = [hub.open(1) for _ in range(3)]
    for protocol, transport in opened:
        if transport.disconnecting:  # aborted as the oldest: the connection ends
            protocol.connectionLost(Failure(ConnectionLost()))
    assert [transport.disconnecting for _, transport in opened] == [True, False, False]
    assert hub.hub.streams() == api.MAX_STREAMS_PER_CALLER


def api_streams(hub: Hub) -> dict:
    peers = hub.site.resource.children[b"v1"].children[b"peers"]
    return {key: writers for key, writers in peers.streams.items() if writers}
