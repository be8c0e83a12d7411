"""The registry API through Twisted's real HTTP client and server, in memory
(tests/memory_http.py) on one clock: callers are told apart by their source
address (127.0.0.x here, tunnel addresses in production).  Nothing sleeps:
time moves only when a test advances the clock."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest
from twisted.internet.defer import CancelledError
from twisted.web import resource, server

from tests.helpers import ep, new_key
from tests.memory_http import MemoryHTTP, TwoPeerRegistry
from wgnat._types import Announcement
from wgnat.client.registry_client import RegistryClient, RegistryError
from wgnat.registry.api import MAX_STREAMS_PER_CALLER
from wgnat.wire import MAX_BODY_BYTES, parse_answer

URL = "http://127.0.0.1:51820"
# In-memory transports lack what readBody would use to cut a response short.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


class Setup(TwoPeerRegistry):
    def client(self, source: str) -> RegistryClient:
        return RegistryClient(self.http.reactor, ip_address("127.0.0.1"), 51820, source)

    def raw(self, method: bytes, path: str, body: bytes | None = None, source="127.0.0.2"):
        # An unknown source may wait up to a second for the device read that
        # tells it apart (hub.UNKNOWN_READ_INTERVAL).
        return self.http.result(self.http.request(method, URL + path, body, source), within=1.1)

    def get(self, path: str, source="127.0.0.2"):
        code, text = self.raw(b"GET", path, source=source)
        assert code == 200, text
        return parse_answer(json.loads(text))

    def next(self, stream):
        return self.http.result(stream.next(), within=1.1)

    def moved(self, key, endpoint: str) -> None:
        """`key`'s NAT rebinds; the registry's next device read sees it."""
        self.device.handshake(key, self.http.reactor.seconds(), endpoint=ep(endpoint))
        self.hub.refresh()


@pytest.fixture
def setup():
    return Setup()


def test_full_answer_names_the_caller_by_its_source_address(setup):
    answer = setup.get("/v1/peers")
    assert answer.full
    assert str(answer.my_endpoint) == "203.0.113.21:51820"
    both = sorted([setup.a, setup.b])  # a full answer lists the caller too
    assert sorted(p.public_key for p in answer.peers) == both
    other = setup.get("/v1/peers", source="127.0.0.3")
    assert str(other.my_endpoint) == "203.0.113.22:51820"
    assert sorted(p.public_key for p in other.peers) == both


def test_unknown_source_is_forbidden(setup):
    code, text = setup.raw(b"GET", "/v1/peers", source="127.0.0.9")
    assert code == 403 and b"127.0.0.9 is not the tunnel address" in text
    with pytest.raises(RegistryError, match=r"403.*127\.0\.0\.9 is not the tunnel address"):
        setup.next(setup.client("127.0.0.9").follow(None, None))
    assert setup.hub.streams() == 0


def test_long_poll_is_woken_by_a_change_at_once(setup):
    first = setup.get("/v1/peers")
    waiting = setup.http.request(
        b"GET", f"{URL}/v1/peers?since={first.version}&epoch={first.epoch}&wait=20"
    )
    setup.http.advance(5)
    assert setup.hub.waiting() == 1  # still waiting
    setup.moved(setup.b, "203.0.113.22:40000")
    code, text = setup.http.result(waiting)  # no time passed
    answer = parse_answer(json.loads(text))
    assert code == 200 and not answer.full
    assert [(p.public_key, str(p.endpoint)) for p in answer.peers] == [
        (setup.b, "203.0.113.22:40000")
    ]


def test_long_poll_times_out_with_an_empty_delta(setup):
    first = setup.get("/v1/peers")
    waiting = setup.http.request(
        b"GET", f"{URL}/v1/peers?since={first.version}&epoch={first.epoch}&wait=0.2"
    )
    setup.http.advance(0.1)
    assert setup.hub.waiting() == 1
    setup.http.advance(0.11)
    _, text = setup.http.result(waiting)
    answer = parse_answer(json.loads(text))
    assert answer.version == first.version and answer.peers == () and not answer.full


def test_announce_is_validated_and_served(setup):
    setup.http.result(
        setup.client("127.0.0.3").announce(Announcement("0b", (ep("192.168.1.11:51820"),)))
    )
    answer = setup.get("/v1/peers")
    [b] = [p for p in answer.peers if p.public_key == setup.b]
    assert [str(e) for e in b.lan_endpoints] == ["192.168.1.11:51820"]

    code, text = setup.raw(b"POST", "/v1/announce", b"{not json")
    assert code == 400 and b"not JSON" in text
    code, text = setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": ["127.0.0.1:1"]}).encode()
    )
    assert code == 400 and b"not reachable" in text
    code, text = setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": ["x"] * 9}).encode()
    )
    assert code == 400
    code, text = setup.raw(
        b"POST", "/v1/announce", json.dumps({"lan_endpoints": [], "session": "NOT HEX"}).encode()
    )
    assert code == 400 and b"session" in text
    code, text = setup.raw(b"POST", "/v1/announce", b"[" + b" " * MAX_BODY_BYTES + b"]")
    assert code == 413


def test_bad_query_parameters_get_a_clear_400(setup):
    code, text = setup.raw(b"GET", "/v1/peers?since=abc")
    assert code == 400 and b"since" in text
    code, text = setup.raw(b"GET", "/v1/peers?since=1&epoch=zz")
    assert code == 400 and b"epoch" in text
    code, text = setup.raw(b"GET", "/v1/peers?wait=-1")
    assert code == 400
    code, text = setup.raw(b"GET", "/v1/peers?stream=yes")
    assert code == 400 and b"stream" in text


def test_waiting_requests_per_peer_are_bounded(setup):
    first = setup.get("/v1/peers")
    path = f"{URL}/v1/peers?since={first.version}&epoch={first.epoch}&wait=2"
    pending = [setup.http.request(b"GET", path) for _ in range(4)]
    setup.http.pump()
    code, _text = setup.http.result(setup.http.request(b"GET", path))
    assert code == 429
    setup.http.advance(2)
    for waiting in pending:
        code, _ = setup.http.result(waiting)
        assert code == 200


def test_requests_are_counted_not_logged_one_by_one(setup, logged):
    """An access-log line per request would be 10,000 lines per change on a large
    registry (every waiting client answered and polling again)."""
    code, _ = setup.raw(b"GET", "/v1/peers")
    assert code == 200
    code, _ = setup.raw(b"GET", "/v1/peers", source="127.0.0.9")
    assert code == 403
    assert not [line for line in logged if "/v1/peers" in line], logged


# -- the stream (GET /v1/peers?stream=1) ----------------------------------------


def test_stream_gives_the_callers_answer_then_every_change_as_it_happens(setup):
    a = setup.client("127.0.0.2").follow(None, None)
    first = setup.next(a)
    assert first.full and [p.public_key for p in first.peers] == [setup.b]
    assert str(first.my_endpoint) == "203.0.113.21:51820"
    assert setup.hub.streams() == 1 and setup.hub.waiting() == 1
    # b's NAT rebinds: one line, a delta, as soon as the device read sees it.
    setup.moved(setup.b, "203.0.113.22:40000")
    change = setup.next(a)
    assert not change.full and change.version == setup.hub.model.version
    assert [(p.public_key, str(p.endpoint)) for p in change.peers] == [
        (setup.b, "203.0.113.22:40000")
    ]
    # a's own NAT rebinds: the shared line lists a, which a takes as its own endpoint.
    setup.moved(setup.a, "203.0.113.21:40001")
    own = setup.next(a)
    assert own.peers == () and own.removed == ()
    assert str(own.my_endpoint) == "203.0.113.21:40001"
    # Nothing changes for 15 s: a keep-alive line.
    setup.http.advance(15)
    assert setup.next(a) is None
    a.close()


def test_stream_from_a_version_starts_with_the_delta_since(setup):
    client = setup.client("127.0.0.2")
    first = setup.get("/v1/peers")
    setup.moved(setup.b, "203.0.113.22:40000")
    stream = client.follow(first.version, first.epoch)
    answer = setup.next(stream)
    assert not answer.full and [p.public_key for p in answer.peers] == [setup.b]
    stream.close()
    # Another epoch (the registry restarted): a full answer.
    again = client.follow(first.version, "0123abcd")
    assert setup.next(again).full
    again.close()


def test_a_closed_stream_is_a_cancellation_the_registry_forgets(setup):
    # The -t resync and a shutdown close the stream: not "registry unreachable".
    stream = setup.client("127.0.0.2").follow(None, None)
    setup.next(stream)
    assert setup.hub.streams() == 1
    waiting = stream.next()
    stream.close()
    with pytest.raises(CancelledError):
        setup.http.result(waiting)
    setup.http.pump()
    assert setup.hub.streams() == 0 and setup.hub.waiting() == 0
    assert setup.hub._keepalive is None  # no timer left behind


def test_streams_per_peer_are_bounded_the_newest_replacing_the_oldest(setup):
    streams = []
    for _ in range(MAX_STREAMS_PER_CALLER + 1):
        streams.append(setup.client("127.0.0.2").follow(None, None))
        setup.next(streams[-1])
    with pytest.raises(RegistryError, match="cut off"):
        setup.next(streams[0])
    assert setup.hub.streams() == MAX_STREAMS_PER_CALLER
    # Another peer's streams are not counted against it.
    other = setup.client("127.0.0.3").follow(None, None)
    setup.next(other)
    assert setup.hub.streams() == MAX_STREAMS_PER_CALLER + 1
    for stream in [*streams[1:], other]:
        stream.close()


# -- a registry that answers otherwise ------------------------------------------


class CannedRegistry:
    """A registry of another kind: answers /v1/peers with `body` and
    `content_type`, then (`hold`) keeps the response open without a word."""

    def __init__(self, body: bytes, content_type: bytes, hold: bool = False) -> None:
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
        self.http = MemoryHTTP()
        self.http.serve(server.Site(root, reactor=self.http.reactor))
        self.client = RegistryClient(self.http.reactor, ip_address("127.0.0.1"), 51820)

    def next(self, stream):
        return self.http.result(stream.next(), within=1.1)


def answer_document(version: int, **extra) -> dict:
    you = {"public_key": new_key().base64, "endpoint": "203.0.113.21:51820"}
    return {"epoch": "e1", "version": version, "full": False, "you": you, "peers": [], **extra}


def test_a_registry_answering_without_a_stream_is_an_error_saying_so():
    canned = CannedRegistry(json.dumps(answer_document(7)).encode(), b"application/json")
    stream = canned.client.follow(5, "e1")
    with pytest.raises(RegistryError, match="answered without a stream"):
        canned.next(stream)
    assert b"stream=1" in canned.requests[0] and b"since=5" in canned.requests[0]


def test_a_malformed_line_on_the_stream_is_refused_with_the_reason():
    first = json.dumps(answer_document(1)).encode()
    bad = json.dumps({"epoch": "e1", "version": 2, "full": False, "peers": [{"public_key": "x"}]})
    canned = CannedRegistry(
        first + b"\n\n" + bad.encode() + b"\n", b"application/x-ndjson", hold=True
    )
    stream = canned.client.follow(None, None)
    assert canned.next(stream).version == 1
    assert canned.next(stream) is None  # the keep-alive line
    with pytest.raises(RegistryError, match=r"refused the registry's answer: peers\[0\]"):
        canned.next(stream)


def test_a_silent_stream_is_taken_for_dead():
    from wgnat.client.registry_client import STREAM_SILENCE_SECONDS

    canned = CannedRegistry(
        json.dumps(answer_document(1)).encode() + b"\n", b"application/x-ndjson", hold=True
    )
    stream = canned.client.follow(None, None)
    canned.next(stream)
    waiting = stream.next()
    outcome = []
    waiting.addBoth(lambda result: (outcome.append(result), result)[1])
    canned.http.advance(STREAM_SILENCE_SECONDS - 1)
    assert outcome == []
    canned.http.advance(1)
    with pytest.raises(RegistryError, match=r"silent for 35 s"):
        canned.http.result(waiting)


def test_a_check_answered_current_fits_the_budget_for_ten_thousand_clients_at_rest(setup):
    """Issue 14: 10,000 clients on the default -t (one check a minute) may cost
    the registry at most 2 MiB a minute at rest, so one check on the client's
    open connection, request and answer, at most 2 MiB / 10,000 bytes, with its
    version as long as a busy registry's (seven digits)."""
    from wgnat.client.view import RegistryView
    from wgnat.wire import view_digest

    client = setup.client("127.0.0.2")
    stream = client.follow(None, None)
    view = RegistryView()
    view.apply(setup.next(stream))
    digest = view_digest(view.peers.values(), view.my_endpoint)
    setup.http.result(client.check(view.epoch, view.version, digest))  # opens the connection
    before = dict(setup.http.wire)
    assert setup.http.result(client.check(view.epoch, view.version, digest)) is None
    cost = sum(setup.http.wire.values()) - sum(before.values())
    longer_version = len("1000000") - len(str(view.version))
    assert cost + longer_version <= 2 * 1024 * 1024 // 10_000, cost
    stream.close()


def test_the_check_says_current_in_a_few_bytes_or_sends_what_changed(setup):
    from wgnat.client.view import RegistryView
    from wgnat.wire import view_digest

    client = setup.client("127.0.0.2")
    stream = client.follow(None, None)
    view = RegistryView()
    view.apply(setup.next(stream))
    digest = view_digest(view.peers.values(), view.my_endpoint)
    assert setup.http.result(client.check(view.epoch, view.version, digest)) is None
    code, text = setup.raw(
        b"GET", f"/v1/check?epoch={view.epoch}&version={view.version}&digest={digest}"
    )
    assert code == 200 and len(text) < 100 and json.loads(text)["current"] is True
    setup.moved(setup.b, "203.0.113.22:40000")
    answer = setup.http.result(client.check(view.epoch, view.version, digest))
    assert answer is not None and not answer.full
    assert [str(p.endpoint) for p in answer.peers] == ["203.0.113.22:40000"]
    for query in ("", "epoch=zz&version=1&digest=" + "0" * 16, "epoch=ab&version=1&digest=x"):
        code, text = setup.raw(b"GET", f"/v1/check?{query}")
        assert code == 400, (query, text)
    stream.close()


def test_a_registry_that_accepts_and_never_answers_is_a_registry_error_in_time():
    """Found in review: the request's own deadline surfaced as a plain
    CancelledError, which the follower takes for its own cancellation, and it
    then re-read the failed stream in a loop that never gave the reactor a turn."""
    from wgnat.client.registry_client import REQUEST_TIMEOUT

    canned = CannedRegistry(b"", b"application/x-ndjson", hold=True)
    silent = canned.http.sites[("127.0.0.1", 51820)].resource.children[b"v1"].children[b"peers"]
    silent.render_GET = lambda request: server.NOT_DONE_YET  # no head, no line
    stream = canned.client.follow(3, "e1")
    waiting = stream.next()
    outcome = []
    waiting.addBoth(lambda result: (outcome.append(result), None)[1])
    canned.http.advance(REQUEST_TIMEOUT + 0.1)
    [failure] = outcome
    assert failure.check(RegistryError) and "in time" in failure.getErrorMessage()
