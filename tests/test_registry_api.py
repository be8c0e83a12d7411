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
