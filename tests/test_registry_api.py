"""The registry API over real loopback HTTP: callers are told apart by their
source address (127.0.0.x here, tunnel addresses in production)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.helpers import ep, new_key, peer
from wgnat._types import Announcement
from wgnat.client.registry_client import RegistryClient, RegistryError
from wgnat.device.memory import MemoryDevice
from wgnat.registry.api import MAX_BODY_BYTES, build_site
from wgnat.registry.hub import Registry
from wgnat.registry.model import RegistryModel


class Setup:
    def __init__(self) -> None:
        self.a, self.b = new_key(), new_key()
        self.device = MemoryDevice(public_key=new_key())
        now = reactor.seconds()
        self.device.add_peer(peer(self.a, "203.0.113.21:51820", ("127.0.0.2/32",), now))
        self.device.add_peer(peer(self.b, "203.0.113.22:51820", ("127.0.0.3/32",), now))
        self.hub = Registry(self.device, reactor, RegistryModel())
        self.port = None
        self.clients: list[RegistryClient] = []

    @inlineCallbacks
    def start(self):
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            build_site(self.hub)
        )
        return self

    def client(self, source: str) -> RegistryClient:
        from ipaddress import ip_address

        client = RegistryClient(
            reactor, ip_address("127.0.0.1"), self.port.getHost().port, bind_address=source
        )
        self.clients.append(client)
        return client

    @inlineCallbacks
    def raw(self, method: bytes, path: str, body: bytes | None = None, source="127.0.0.2"):
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        agent = Agent(reactor, bindAddress=(source, 0))
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()
        response = yield agent.request(method, url, Headers(), producer)
        text = yield readBody(response)
        return response.code, text

    @inlineCallbacks
    def stop(self):
        for client in self.clients:
            yield client.close()
        yield self.port.stopListening()


@pytest.fixture
def setup():
    s = Setup()
    pytest_twisted.blockon(s.start())
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.inlineCallbacks
def test_full_answer_names_the_caller_by_its_source_address(setup):
    answer = yield setup.client("127.0.0.2").fetch(None, None, 0)
    assert answer.full
    assert str(answer.my_endpoint) == "203.0.113.21:51820"
    assert [p.public_key for p in answer.peers] == [setup.b]
    other = yield setup.client("127.0.0.3").fetch(None, None, 0)
    assert [p.public_key for p in other.peers] == [setup.a]


@pytest_twisted.inlineCallbacks
def test_unknown_source_is_forbidden(setup):
    with pytest.raises(RegistryError, match=r"403.*127\.0\.0\.9 is not the tunnel address"):
        yield setup.client("127.0.0.9").fetch(None, None, 0)


@pytest_twisted.inlineCallbacks
def test_long_poll_is_woken_by_a_change_within_milliseconds(setup):
    client = setup.client("127.0.0.2")
    first = yield client.fetch(None, None, 0)
    waiting = client.fetch(first.version, first.epoch, 20)
    yield deferLater(reactor, 0.05, lambda: None)
    assert not waiting.called
    # b's NAT rebinds; the registry's next read sees it and pushes.
    setup.device.handshake(setup.b, reactor.seconds(), endpoint=ep("203.0.113.22:40000"))
    started = reactor.seconds()
    yield setup.hub.refresh()
    answer = yield waiting
    assert reactor.seconds() - started < 1.0
    assert not answer.full
    assert [(p.public_key, str(p.endpoint)) for p in answer.peers] == [
        (setup.b, "203.0.113.22:40000")
    ]


@pytest_twisted.inlineCallbacks
def test_long_poll_times_out_with_an_empty_delta(setup):
    client = setup.client("127.0.0.2")
    first = yield client.fetch(None, None, 0)
    answer = yield client.fetch(first.version, first.epoch, 0.2)
    assert answer.version == first.version and answer.peers == () and not answer.full


@pytest_twisted.inlineCallbacks
def test_announce_is_validated_and_served(setup):
    yield setup.client("127.0.0.3").announce(Announcement("0b", (ep("192.168.1.11:51820"),)))
    answer = yield setup.client("127.0.0.2").fetch(None, None, 0)
    assert [str(e) for e in answer.peers[0].lan_endpoints] == ["192.168.1.11:51820"]

    code, text = yield setup.raw(b"POST", "/v1/announce", b"{not json")
    assert code == 400 and b"not JSON" in text
    code, text = yield setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": ["127.0.0.1:1"]}).encode()
    )
    assert code == 400 and b"not reachable" in text
    code, text = yield setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": ["x"] * 9}).encode()
    )
    assert code == 400
    code, text = yield setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": [], "session": "NOT HEX"}).encode()
    )
    assert code == 400 and b"session" in text
    code, text = yield setup.raw(b"POST", "/v1/announce", b"[" + b" " * MAX_BODY_BYTES + b"]")
    assert code == 413


@pytest_twisted.inlineCallbacks
def test_bad_query_parameters_get_a_clear_400(setup):
    code, text = yield setup.raw(b"GET", "/v1/peers?since=abc")
    assert code == 400 and b"since" in text
    code, text = yield setup.raw(b"GET", "/v1/peers?since=1&epoch=zz")
    assert code == 400 and b"epoch" in text
    code, text = yield setup.raw(b"GET", "/v1/peers?wait=-1")
    assert code == 400


@pytest_twisted.inlineCallbacks
def test_waiting_requests_per_peer_are_bounded(setup):
    client = setup.client("127.0.0.2")
    first = yield client.fetch(None, None, 0)
    path = f"/v1/peers?since={first.version}&epoch={first.epoch}&wait=2"
    pending = [setup.raw(b"GET", path) for _ in range(4)]
    yield deferLater(reactor, 0.1, lambda: None)
    code, _text = yield setup.raw(b"GET", path)
    assert code == 429
    for waiting in pending:
        code, _ = yield waiting
        assert code == 200


@pytest_twisted.inlineCallbacks
def test_a_cancelled_long_poll_is_a_cancellation_not_a_registry_failure(setup):
    # The client's -t resync and its shutdown cancel the waiting request; that
    # must not be reported as "registry unreachable".
    from twisted.internet.defer import CancelledError

    client = setup.client("127.0.0.2")
    first = yield client.fetch(None, None, 0)
    waiting = client.fetch(first.version, first.epoch, 20)
    yield deferLater(reactor, 0.05, lambda: None)
    waiting.cancel()
    with pytest.raises(CancelledError):
        yield waiting
    yield deferLater(reactor, 0.05, lambda: None)
    assert setup.hub.waiting() == 0  # the registry let go of the waiter too


@pytest_twisted.inlineCallbacks
def test_requests_are_counted_not_logged_one_by_one(setup):
    """An access-log line per request would be 10,000 lines per change on a large
    registry (every waiting client answered and polling again)."""
    from twisted.logger import capturedLogs, formatEvent

    with capturedLogs() as events:
        code, _ = yield setup.raw(b"GET", "/v1/peers")
        assert code == 200
        code, _ = yield setup.raw(b"GET", "/v1/peers", source="127.0.0.9")
        assert code == 403
    lines = [formatEvent(event) for event in events]
    assert not [line for line in lines if "/v1/peers" in line], lines


# -- the stream (GET /v1/peers?stream=1) ----------------------------------------


def next_answer(stream, timeout=5.0):
    return stream.next().addTimeout(timeout, reactor)


@pytest_twisted.inlineCallbacks
def test_stream_gives_the_callers_answer_then_every_change_as_it_happens(setup, monkeypatch):
    from wgnat.registry.api import StreamWriter

    through = []
    write_through = StreamWriter._write_through
    monkeypatch.setattr(
        StreamWriter,
        "_write_through",
        lambda self, line: through.append(write_through(self, line)) or through[-1],
    )
    a = setup.client("127.0.0.2").follow(None, None, 25)
    first = yield next_answer(a)
    assert first.full and [p.public_key for p in first.peers] == [setup.b]
    assert str(first.my_endpoint) == "203.0.113.21:51820"
    assert setup.hub.streams() == 1 and setup.hub.waiting() == 1
    # b's NAT rebinds: one line, a delta, within milliseconds of the device read.
    setup.device.handshake(setup.b, reactor.seconds(), endpoint=ep("203.0.113.22:40000"))
    started = reactor.seconds()
    yield setup.hub.refresh()
    change = yield next_answer(a)
    assert reactor.seconds() - started < 1.0
    assert not change.full and change.version == setup.hub.model.version
    assert [(p.public_key, str(p.endpoint)) for p in change.peers] == [
        (setup.b, "203.0.113.22:40000")
    ]
    # a's own NAT rebinds: the shared line lists a, which a takes as its own endpoint.
    setup.device.handshake(setup.a, reactor.seconds(), endpoint=ep("203.0.113.21:40001"))
    yield setup.hub.refresh()
    own = yield next_answer(a)
    assert own.peers == () and own.removed == ()
    assert str(own.my_endpoint) == "203.0.113.21:40001"
    assert through == [True, True]  # both changes went straight to the socket
    a.close()


@pytest_twisted.inlineCallbacks
def test_stream_from_a_version_starts_with_the_delta_since(setup):
    client = setup.client("127.0.0.2")
    first = yield client.fetch(None, None, 0)
    setup.device.handshake(setup.b, reactor.seconds(), endpoint=ep("203.0.113.22:40000"))
    yield setup.hub.refresh()
    stream = client.follow(first.version, first.epoch, 25)
    answer = yield next_answer(stream)
    assert not answer.full and [p.public_key for p in answer.peers] == [setup.b]
    stream.close()
    # Another epoch (the registry restarted): a full answer.
    again = client.follow(first.version, "0123abcd", 25)
    answer = yield next_answer(again)
    assert answer.full
    again.close()


@pytest_twisted.inlineCallbacks
def test_a_closed_stream_is_forgotten_by_the_registry(setup):
    stream = setup.client("127.0.0.2").follow(None, None, 25)
    yield next_answer(stream)
    assert setup.hub.streams() == 1
    stream.close()
    for _ in range(50):
        if setup.hub.streams() == 0:
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert setup.hub.streams() == 0 and setup.hub.waiting() == 0
    assert setup.hub._keepalive is None  # no timer left behind


@pytest_twisted.inlineCallbacks
def test_streams_per_peer_are_bounded_the_newest_replacing_the_oldest(setup):
    from wgnat.registry.api import MAX_STREAMS_PER_CALLER

    streams = []
    for _ in range(MAX_STREAMS_PER_CALLER + 1):
        streams.append(setup.client("127.0.0.2").follow(None, None, 25))
        yield next_answer(streams[-1])
    with pytest.raises(RegistryError, match="cut off"):
        yield next_answer(streams[0])
    assert setup.hub.streams() == MAX_STREAMS_PER_CALLER
    # Another peer's streams are not counted against it.
    other = setup.client("127.0.0.3").follow(None, None, 25)
    yield next_answer(other)
    assert setup.hub.streams() == MAX_STREAMS_PER_CALLER + 1
    for stream in [*streams[1:], other]:
        stream.close()


@pytest_twisted.inlineCallbacks
def test_stream_requests_are_validated_and_identified(setup):
    code, text = yield setup.raw(b"GET", "/v1/peers?stream=yes")
    assert code == 400 and b"stream" in text
    with pytest.raises(RegistryError, match=r"403.*127\.0\.0\.9 is not the tunnel address"):
        yield next_answer(setup.client("127.0.0.9").follow(None, None, 25))
    assert setup.hub.streams() == 0


class CannedRegistry:
    """A registry of another kind on loopback: answers /v1/peers with `body` and
    `content_type`, then (`hold`) keeps the response open without a word."""

    def __init__(self, body: bytes, content_type: bytes, hold: bool = False) -> None:
        from twisted.web import resource, server

        canned = self

        class Peers(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                canned.requests.append(request.uri)
                request.setHeader(b"content-type", content_type)
                if not hold:
                    return body
                request.write(body)
                return server.NOT_DONE_YET

        self.requests: list[bytes] = []
        root = resource.Resource()
        v1 = resource.Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"peers", Peers())
        self.site = server.Site(root)
        self.port = None

    @inlineCallbacks
    def start(self):
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        from ipaddress import ip_address

        return RegistryClient(reactor, ip_address("127.0.0.1"), self.port.getHost().port)


def answer_document(version: int, **extra) -> dict:
    you = {"public_key": new_key().base64, "endpoint": "203.0.113.21:51820"}
    return {"epoch": "e1", "version": version, "full": False, "you": you, "peers": [], **extra}


@pytest_twisted.inlineCallbacks
def test_a_registry_without_streams_answers_each_request_once_as_a_long_poll():
    from wgnat.client.registry_client import StreamEnded

    canned = CannedRegistry(json.dumps(answer_document(7)).encode(), b"application/json")
    client = yield canned.start()
    try:
        stream = client.follow(5, "e1", 25)
        answer = yield next_answer(stream)
        assert answer.version == 7 and not answer.full
        with pytest.raises(StreamEnded):
            yield next_answer(stream)
        assert b"stream=1" in canned.requests[0] and b"wait=25" in canned.requests[0]
    finally:
        yield client.close()
        yield canned.port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_malformed_line_on_the_stream_is_refused_with_the_reason():
    first = json.dumps(answer_document(1)).encode()
    bad = json.dumps({"epoch": "e1", "version": 2, "full": False, "peers": [{"public_key": "x"}]})
    canned = CannedRegistry(
        first + b"\n\n" + bad.encode() + b"\n", b"application/x-ndjson", hold=True
    )
    client = yield canned.start()
    try:
        stream = client.follow(None, None, 25)
        assert (yield next_answer(stream)).version == 1
        assert (yield next_answer(stream)) is None  # the keep-alive line
        with pytest.raises(RegistryError, match=r"refused the registry's answer: peers\[0\]"):
            yield next_answer(stream)
    finally:
        yield client.close()
        yield canned.port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_silent_stream_is_taken_for_dead(monkeypatch):
    from wgnat.client import registry_client

    monkeypatch.setattr(registry_client, "STREAM_SILENCE_SECONDS", 0.3)
    canned = CannedRegistry(
        json.dumps(answer_document(1)).encode() + b"\n", b"application/x-ndjson", hold=True
    )
    client = yield canned.start()
    try:
        stream = client.follow(None, None, 25)
        yield next_answer(stream)
        with pytest.raises(RegistryError, match=r"silent for 0\.3 s"):
            yield next_answer(stream)
    finally:
        yield client.close()
        yield canned.port.stopListening()
