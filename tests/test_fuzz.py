"""Property-based tests (hypothesis) of every input an attacker controls.

- The registry API, driven through the real twisted.web Site (HTTP parsing,
  BoundedRequest, the resources, Registry, RegistryModel) over an in-memory
  transport: arbitrary query parameters, announce bodies, oversized and chunked
  bodies, many waiting requests.  Only 200/400/403/413/429 answers, never 500; an
  error is JSON with an "error" string; rejected input leaves the model as it
  was; the API keeps answering afterwards.
- Every answer a client can receive: `parse_answer` gives an Answer or a clean
  InvalidValue; the RegistryClient turns any body into an Answer or a
  RegistryError; a MeshAgent fed those answers leaves its device unchanged for a
  refused one and never puts a forbidden allowed IP on it for accepted ones.

The default run is quick.  `make fuzz` runs the same tests with
WGNAT_FUZZ_EXAMPLES examples each and prints how many inputs were tried.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from tests.helpers import new_key, peer
from wgnat._types import Announcement, Endpoint, InvalidValue, PublicKey, parse_network
from wgnat.client.agent import AgentConfig, MeshAgent
from wgnat.client.registry_client import (
    RegistryClient,
    RegistryError,
    StreamEnded,
)
from wgnat.device.memory import MemoryDevice
from wgnat.registry.api import MAX_WAITERS_PER_CALLER, build_site
from wgnat.registry.hub import Registry
from wgnat.registry.model import RegistryModel
from wgnat.testing import ScriptedRegistryClient
from wgnat.wire import MAX_BODY_BYTES, Answer, StreamDecoder, parse_answer

# Twisted's own 404/405/501 pages for wrong methods and paths warn of their age.
pytestmark = pytest.mark.filterwarnings("ignore:.*_Unsafe.*:DeprecationWarning")

EXAMPLES = int(os.environ.get("WGNAT_FUZZ_EXAMPLES", "100"))
settings.register_profile(
    "wgnat-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)
fuzz = settings(settings.get_profile("wgnat-fuzz"))

# Inputs tried, per test; printed at the end of the module (`make fuzz` shows it).
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried():
    yield
    total = sum(TRIED.values())
    lines = [f"  {name}: {count}" for name, count in sorted(TRIED.items())]
    print(
        f"\nfuzz: {total} inputs tried ({EXAMPLES} examples per test requested)\n"
        + "\n".join(lines)
    )


START = 1_700_000_000.0
TUNNEL = "198.51.100.0/24"
ALLOWED_STATUSES = {200, 400, 403, 413, 429}

# -- strategies shared by both sides -----------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
any_json = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

BOGUS_ENDPOINTS = [
    "192.168.1.7:51820",
    "10.1.2.3:1",
    "[2001:db8::1]:51820",
    "203.0.113.9:65535",
    "127.0.0.1:51820",
    "0.0.0.0:51820",
    "224.0.0.1:51820",
    "255.255.255.255:1",
    "1.2.3.4:0",
    "1.2.3.4:65536",
    "1.2.3.4:-1",
    "1.2.3.4:+80",
    "1.2.3.4: 80",
    "1.2.3.4:\u0663",
    "1.2.3.4",
    ":51820",
    "host.example:51820",
    "2001:db8::1:51820",
    "[2001:db8::1]",
    "[fe80::1%eth0]:51820",
    "[::1]:51820",
    "[::]:51820",
    "[1.2.3.4]:80",
    "169.254.1.1:51820",
    # IPv4-mapped IPv6: Python's is_loopback and friends do not see through these.
    "[::ffff:127.0.0.1]:51820",
    "[::ffff:169.254.169.254]:80",
    "[::ffff:224.0.0.251]:5353",
    "[::ffff:0.0.0.0]:51820",
    "1.2.3.4:99999999999999999999999",
    "x" * 100,
    "",
]
endpoint_like = st.one_of(
    st.sampled_from(BOGUS_ENDPOINTS),
    st.builds(
        lambda a, p: f"{ipaddress.IPv4Address(a)}:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(-5, 70000),
    ),
    st.builds(
        lambda a, p: f"[{ipaddress.IPv6Address(a)}]:{p}",
        st.integers(0, 2**128 - 1),
        st.integers(0, 70000),
    ),
    st.builds(
        lambda a, p: f"[::ffff:{ipaddress.IPv4Address(a)}]:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(0, 70000),
    ),
    st.text(max_size=70),
    json_leaves,
)


def snapshot(model: RegistryModel) -> tuple:
    return (
        model.epoch,
        model.version,
        model.horizon,
        dict(model.records),
        dict(model.tombstones),
        dict(model.announcements),
        model.endpoint_changes,
    )


# -- the registry API over an in-memory transport -----------------------------


class Hub:
    """A registry with two live peers, its Site, and a Clock for every timer."""

    A, B, UNKNOWN = "198.51.100.2", "198.51.100.3", "198.51.100.9"

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.a, self.b = new_key(), new_key()
        self.device = MemoryDevice(public_key=new_key())
        self.device.add_peer(peer(self.a, "203.0.113.21:51820", (f"{self.A}/32",), START))
        self.device.add_peer(peer(self.b, "203.0.113.22:51820", (f"{self.B}/32",), START))
        self.hub = Registry(self.device, self.clock, RegistryModel())
        self.hub.model.observe(self.device.snapshot(), START)
        self.site = build_site(self.hub)
        self.site.reactor = self.clock  # idle timeouts on the Clock too

    def connect(self, source: str) -> tuple[Any, StringTransport]:
        address: Any = (
            IPv6Address("TCP", source, 40000)
            if ":" in source
            else IPv4Address("TCP", source, 40000)
        )
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, source: str, raw: bytes) -> tuple[Any, StringTransport]:
        protocol, transport = self.connect(source)
        protocol.dataReceived(raw)
        return protocol, transport

    def finish(self) -> None:
        """Let every long poll (at most 60 s) end; the peers stay live (180 s)."""
        for _ in range(7):
            self.clock.advance(10)


def request_bytes(
    method: str,
    target: str,
    body: bytes | None = None,
    chunked: bool = False,
    declared_length: int | None = None,
) -> bytes:
    head = [f"{method} {target} HTTP/1.0", "Host: registry"]
    if body is not None:
        if chunked:
            head = [f"{method} {target} HTTP/1.1", "Host: registry", "Connection: close"]
            head.append("Transfer-Encoding: chunked")
            encoded = b""
            for i in range(0, len(body), 4096):
                part = body[i : i + 4096]
                encoded += b"%x\r\n%s\r\n" % (len(part), part)
            body = encoded + b"0\r\n\r\n"
        else:
            head.append(f"Content-Length: {declared_length or len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return raw + (body or b"")


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) of a complete HTTP answer, None when none yet."""
    if b"\r\n\r\n" not in raw:
        return None
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return status, headers, body


def check_answer(hub: Hub, transport: StringTransport, before: tuple) -> tuple[int, Any]:
    parsed = parse_response(transport.value())
    assert parsed is not None, "no answer at all"
    status, headers, body = parsed
    assert status in ALLOWED_STATUSES, (status, body[:300])
    assert headers.get("content-type") == "application/json", headers
    document = json.loads(body)
    if status != 200:
        assert isinstance(document, dict) and set(document) == {"error"}, document
        assert isinstance(document["error"], str) and len(document["error"]) > 5, document
        assert snapshot(hub.hub.model) == before, "rejected input changed the registry's view"
    return status, document


def still_answers(hub: Hub) -> None:
    """A well-formed request from a known peer after the fuzzed one: a full view."""
    _, transport = hub.send(hub.A, request_bytes("GET", "/v1/peers"))
    status, document = check_answer(hub, transport, snapshot(hub.hub.model))
    assert status == 200, document
    assert document["you"]["public_key"] == hub.a.base64
    # A full answer lists every live peer, the caller too (a client drops its own).
    assert sorted(p["public_key"] for p in document["peers"]) == sorted(
        [hub.a.base64, hub.b.base64]
    )
    assert parse_answer(document).full


QUERY_SPECIALS = [
    "",
    "0",
    "-1",
    "-0",
    "1e999",
    "-1e999",
    "inf",
    "-inf",
    "nan",
    "NaN",
    "1_000",
    " 5 ",
    "0x10",
    "1.5",
    "9" * 5000,
    "<epoch>",
    "<version>",
    "abcdef",
    "A" * 33,
    "f" * 32,
    "\u0663",
    "%ff%fe",
    "%00",
]

query_value = st.one_of(
    st.sampled_from(QUERY_SPECIALS),
    st.integers(-(10**20), 10**20).map(str),
    st.floats().map(repr),
    st.text(max_size=40),
    st.binary(max_size=20).map(lambda raw: "".join(f"%{b:02x}" for b in raw)),
)
query_param = st.tuples(
    st.sampled_from(["since", "epoch", "wait", "since", "wait", "x", "Since", "epoch[]"]),
    query_value,
)


def encode_query(hub: Hub, params: list[tuple[str, str]]) -> str:
    parts = []
    for name, value in params:
        value = value.replace("<epoch>", hub.hub.model.epoch).replace(
            "<version>", str(hub.hub.model.version)
        )
        if re.fullmatch(r"(%[0-9a-f]{2})*", value) and value:
            encoded = value  # raw bytes, percent-encoded already
        else:
            encoded = "".join(
                ch
                if ch.isascii() and (ch.isalnum() or ch in "-._~")
                else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
                for ch in value
            )
        parts.append(f"{name}={encoded}")
    return "&".join(parts)


@fuzz
@given(
    params=st.lists(query_param, max_size=6),
    source=st.sampled_from(
        [Hub.A, Hub.B, Hub.UNKNOWN, "10.0.0.1", "::ffff:198.51.100.2", "2001:db8::1"]
    ),
)
def test_peers_query_parameters(params, source):
    TRIED["api: GET /v1/peers query"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    target = "/v1/peers" + ("?" + encode_query(hub, params) if params else "")
    _, transport = hub.send(source, request_bytes("GET", target))
    hub.finish()
    status, document = check_answer(hub, transport, before)
    if status == 200:
        answer = parse_answer(document)  # what the registry says, a client accepts
        assert answer.version == hub.hub.model.version
    else:
        assert status in (400, 403), (status, document)
    if source in (Hub.UNKNOWN, "10.0.0.1", "2001:db8::1"):
        assert status in (400, 403), "a caller no peer owns got an answer"
    still_answers(hub)


def session_value() -> Any:
    return st.one_of(
        st.text("0123456789abcdef", min_size=1, max_size=32),
        st.sampled_from(["", "A" * 4, "0" * 33, "5f0c ", "\u0663"]),
        json_leaves,
        st.lists(json_leaves, max_size=3),
    )


def lan_endpoints_value() -> Any:
    return st.one_of(
        st.lists(endpoint_like, max_size=12),
        st.lists(st.sampled_from(BOGUS_ENDPOINTS[:4]), min_size=9, max_size=3000),
        st.lists(st.just("192.168.1.7:51820"), min_size=1, max_size=8),
        any_json,
    )


announce_document = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "session": session_value(),
            "lan_endpoints": lan_endpoints_value(),
            "extra": any_json,
        },
    ),
    any_json,
)
announce_body = st.one_of(
    announce_document.map(lambda doc: json.dumps(doc).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.integers(1, 40_000).map(lambda n: b"[" * n),
    st.integers(MAX_BODY_BYTES - 2, 3 * MAX_BODY_BYTES).map(
        lambda n: b'{"session": "ab", "lan_endpoints": []' + b" " * n + b"}"
    ),
)


def servable_lan_endpoint(endpoint: Endpoint) -> bool:
    """The oracle, written apart from the code under test: an address another
    host could send to, its IPv4-mapped IPv6 form unwrapped first."""
    host = endpoint.host
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return not (host.is_loopback or host.is_link_local or host.is_multicast or host.is_unspecified)


@pytest.mark.parametrize(
    "text",
    ["[::ffff:127.0.0.1]:51820", "[::ffff:169.254.169.254]:80", "[::ffff:224.0.0.251]:5353"],
)
def test_the_oracle_and_the_registry_refuse_ipv4_mapped_lan_endpoints(text):
    assert not servable_lan_endpoint(Endpoint.parse(text))
    hub = Hub()
    before = snapshot(hub.hub.model)
    body = json.dumps({"session": "ab", "lan_endpoints": ["192.168.1.7:51820", text]}).encode()
    _, transport = hub.send(Hub.A, request_bytes("POST", "/v1/announce", body))
    hub.finish()
    status, _ = check_answer(hub, transport, before)
    assert status == 400
    assert hub.a not in hub.hub.model.announcements


@fuzz
@given(
    body=announce_body,
    source=st.sampled_from([Hub.A, Hub.B, Hub.UNKNOWN]),
    chunked=st.booleans(),
)
def test_announce_bodies(body, source, chunked):
    TRIED["api: POST /v1/announce body"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    _, transport = hub.send(source, request_bytes("POST", "/v1/announce", body, chunked=chunked))
    hub.finish()
    status, document = check_answer(hub, transport, before)
    if len(body) > MAX_BODY_BYTES:
        assert status == 413, (status, document)
    if status == 200:
        assert set(document) == {"version"} and document["version"] == hub.hub.model.version
        caller = {Hub.A: hub.a, Hub.B: hub.b}[source]
        kept = hub.hub.model.announcements[caller]
        assert len(kept.lan_endpoints) <= 8
        for endpoint in kept.lan_endpoints:
            assert servable_lan_endpoint(endpoint), f"{endpoint} was accepted"
        # Nobody else's entry moved.
        other = hub.b if caller == hub.a else hub.a
        assert hub.hub.model.records[other] == before[3][other]
    if source == Hub.UNKNOWN:
        assert status in (400, 403, 413)
    still_answers(hub)


@fuzz
@given(declared=st.integers(MAX_BODY_BYTES + 1, 10**12), sent=st.integers(0, 2 * MAX_BODY_BYTES))
def test_declared_oversized_bodies_are_not_buffered(declared, sent):
    """A Content-Length over the bound: whatever arrives is dropped, not kept."""
    TRIED["api: oversized Content-Length"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    protocol, transport = hub.send(
        Hub.A, request_bytes("POST", "/v1/announce", b"x" * sent, declared_length=declared)
    )
    request = protocol.requests[0] if getattr(protocol, "requests", None) else None
    if request is not None and request.content is not None:
        request.content.seek(0, 2)
        assert request.content.tell() <= MAX_BODY_BYTES
    hub.finish()
    # The body is incomplete, so there is no answer yet (or a timeout); never a 500.
    parsed = parse_response(transport.value())
    if parsed is not None:
        assert parsed[0] in ALLOWED_STATUSES | {408}, parsed
    assert snapshot(hub.hub.model) == before
    still_answers(hub)


@fuzz
@given(
    waits=st.lists(
        st.tuples(st.sampled_from([Hub.A, Hub.B]), st.sampled_from(["1", "25", "60", "999"])),
        min_size=1,
        max_size=12,
    )
)
def test_waiting_requests_are_bounded_per_peer(waits):
    TRIED["api: concurrent long polls"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    model = hub.hub.model
    transports = []
    for source, wait in waits:
        target = f"/v1/peers?since={model.version}&epoch={model.epoch}&wait={wait}"
        transports.append((source, hub.send(source, request_bytes("GET", target))[1]))
    per_caller: Counter[str] = Counter()
    for source, transport in transports:
        per_caller[source] += 1
        answered = parse_response(transport.value())
        if per_caller[source] <= MAX_WAITERS_PER_CALLER:
            assert answered is None, "a long poll answered before anything changed"
        else:
            assert answered is not None and answered[0] == 429, answered
    assert hub.hub.waiting() == sum(min(n, MAX_WAITERS_PER_CALLER) for n in per_caller.values())
    hub.finish()
    for _source, transport in transports:
        check_answer(hub, transport, before)
    assert hub.hub.waiting() == 0
    assert snapshot(hub.hub.model) == before
    still_answers(hub)


@fuzz
@given(
    params=st.lists(query_param, max_size=5),
    source=st.sampled_from([Hub.A, Hub.B, Hub.UNKNOWN, "::ffff:198.51.100.2", "2001:db8::1"]),
)
def test_stream_query_parameters(params, source):
    """A stream request with any other parameters: a stream whose first line a
    client accepts and whose next lines follow the changes, or a clean 400/403."""
    TRIED["api: GET /v1/peers?stream=1 query"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    target = "/v1/peers?" + encode_query(hub, [*params, ("stream", "1")])
    protocol, transport = hub.send(source, request_bytes("GET", target))
    parsed = parse_response(transport.value())
    if parsed is None:  # Twisted closes on a request line over 16 KiB, without a word
        assert transport.disconnecting and len(target) > 16000, "no answer at all"
        assert hub.hub.streams() == 0
        return
    status, headers, body = parsed
    if status != 200:
        assert hub.hub.streams() == 0
        hub.finish()
        check_answer(hub, transport, before)
        assert status in (400, 403), status
    else:
        assert source not in (Hub.UNKNOWN, "2001:db8::1"), "a caller no peer owns got a stream"
        assert headers.get("content-type") == "application/x-ndjson", headers
        assert hub.hub.streams() == 1
        decoder = StreamDecoder(1 << 20)
        [first] = list(decoder.feed(body))
        assert first is not None and first.version == hub.hub.model.version
        hub.device.handshake(hub.b, START + 1, endpoint=Endpoint.parse("203.0.113.22:40000"))
        hub.hub.refresh()
        hub.finish()  # 70 s: keep-alives, and the stream stays open
        assert not transport.disconnecting
        *_, later = [
            a for a in decoder.feed(parse_response(transport.value())[2][len(body) :]) if a
        ]
        assert later.version == hub.hub.model.version
        protocol.connectionLost(Failure(ConnectionDone()))
        assert hub.hub.streams() == 0
    still_answers(hub)


@fuzz
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    path=st.sampled_from(
        ["/v1/peers", "/v1/announce", "/v1/peers/x", "/v1", "/", "/healthz", "/v2/peers", "//"]
    ),
    body=st.one_of(st.none(), st.binary(max_size=100)),
)
def test_any_method_and_path_never_errors(method, path, body):
    """Methods and paths other than the API's: Twisted's own 404/405/501 pages (HTML),
    never a 500."""
    TRIED["api: methods and paths"] += 1
    hub = Hub()
    before = snapshot(hub.hub.model)
    _, transport = hub.send(Hub.A, request_bytes(method, path, body))
    hub.finish()
    parsed = parse_response(transport.value())
    assert parsed is not None
    assert parsed[0] in ALLOWED_STATUSES | {404, 405, 501}, parsed[:2]
    if (method, path) != ("POST", "/v1/announce") or parsed[0] != 200:
        assert snapshot(hub.hub.model) == before
    still_answers(hub)


# -- what a client accepts from a registry ---------------------------------

KEYS = [PublicKey(bytes([n]) * 32) for n in range(1, 7)]
MY_KEY, REGISTRY_KEY, HAND_KEY = KEYS[0], KEYS[1], KEYS[2]
REGISTRY_ADDRESS = ipaddress.ip_address("198.51.100.1")
MY_ADDRESS = ipaddress.ip_address("198.51.100.2")
# Routes the hand-configured peer holds: inside the tunnel and outside it.
HAND_ROUTES = ("198.51.100.240/28", "10.9.0.0/24")
ACCEPTED_ROUTES = ("10.0.0.0/8",)  # --accept-routes in the agent tests

NETWORK_SPECIALS = [
    "0.0.0.0/0",
    "::/0",
    "198.51.100.0/24",
    "198.51.100.0/25",
    "198.51.100.1/32",
    "198.51.100.2/32",
    "198.51.100.0/31",
    "198.51.100.2/31",
    "198.51.100.3/32",
    "198.51.100.4/32",
    "198.51.100.4/30",
    "198.51.100.240/28",
    "198.51.100.241/32",
    "198.51.100.248/29",
    "10.9.0.0/24",
    "10.9.0.5/32",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.168.1.0/24",
    "203.0.113.10/32",
    "2001:db8::/64",
    "198.51.100.5",
    "198.51.100.5/33",
    "198.51.100.5/24",
    "not a network",
    "",
]
network_like = st.one_of(
    st.sampled_from(NETWORK_SPECIALS),
    st.builds(
        lambda host, prefix: str(ipaddress.ip_network(f"198.51.100.{host}/{prefix}", strict=False)),
        st.integers(0, 255),
        st.integers(24, 32),
    ),
    st.builds(
        lambda a, prefix: str(ipaddress.ip_network((a, prefix), strict=False)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.text(max_size=20),
    json_leaves,
)
key_like = st.one_of(
    st.sampled_from([key.base64 for key in KEYS]),
    st.binary(min_size=32, max_size=32).map(lambda raw: PublicKey(raw).base64),
    st.sampled_from(["", "A" * 44, "A" * 43 + "=", "AAAA" * 11, "/" * 43 + "=", "x"]),
    json_leaves,
)
peer_document = st.fixed_dictionaries(
    {},
    optional={
        "public_key": key_like,
        "endpoint": st.one_of(st.none(), endpoint_like),
        "allowed_ips": st.one_of(st.lists(network_like, max_size=6), any_json),
        "lan_endpoints": st.one_of(st.lists(endpoint_like, max_size=9), any_json),
        "session": st.one_of(st.none(), st.text("0123456789abcdef", min_size=1, max_size=32)),
        "last_handshake_age": json_leaves,
        "bogus": any_json,
    },
)
# Mostly well-formed peers with hostile allowed IPs: the ones that reach the device.
plausible_peer = st.fixed_dictionaries(
    {
        "public_key": st.sampled_from([key.base64 for key in KEYS]),
        "endpoint": st.sampled_from(
            ["203.0.113.31:51820", "203.0.113.32:40000", "203.0.113.21:51820", None]
        ),
        "allowed_ips": st.lists(
            st.sampled_from(NETWORK_SPECIALS[:20])
            | st.builds(lambda n: f"198.51.100.{n}/32", st.integers(0, 255)),
            max_size=4,
        ),
        "lan_endpoints": st.lists(st.sampled_from(BOGUS_ENDPOINTS[:4]), max_size=3),
        "session": st.sampled_from(["0a", "0b", "5f0c", None]),
    }
)
answer_document = st.fixed_dictionaries(
    {
        "epoch": st.one_of(st.sampled_from(["e1", "e2"]), json_leaves),
        "version": st.one_of(st.integers(0, 50), json_leaves),
        "full": st.one_of(st.booleans(), json_leaves),
    },
    optional={
        "you": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "public_key": key_like,
                    "endpoint": st.one_of(st.none(), endpoint_like),
                    "allowed_ips": any_json,
                },
            ),
            any_json,
        ),
        "peers": st.one_of(
            st.lists(st.one_of(plausible_peer, peer_document), max_size=6),
            st.lists(plausible_peer, max_size=6),
            any_json,
        ),
        "removed": st.one_of(st.lists(key_like, max_size=4), any_json),
        "bogus": any_json,
    },
)
# Answers a registry would plausibly send, so most of them pass validation.
plausible_answer = st.fixed_dictionaries(
    {
        "epoch": st.sampled_from(["e1", "e2"]),
        "version": st.integers(0, 50),
        "full": st.booleans(),
        "you": st.fixed_dictionaries(
            {"endpoint": st.sampled_from(["203.0.113.21:51820", "203.0.113.29:1", None])}
        ),
        "peers": st.lists(plausible_peer, max_size=5, unique_by=lambda p: p["public_key"]),
        "removed": st.lists(st.sampled_from([key.base64 for key in KEYS]), max_size=2),
    }
)
any_answer = st.one_of(plausible_answer, answer_document, any_json)


def check_parse(document: Any) -> Answer | None:
    try:
        answer = parse_answer(document)
    except InvalidValue as exc:
        assert str(exc), "an InvalidValue without a message"
        return None
    assert isinstance(answer, Answer)
    assert len({p.public_key for p in answer.peers}) == len(answer.peers)
    for remote in answer.peers:
        assert isinstance(remote.public_key, PublicKey)
        assert len(remote.lan_endpoints) <= 8
    return answer


@fuzz
@given(document=any_answer)
def test_parse_answer_accepts_or_refuses_cleanly(document):
    TRIED["client: parse_answer"] += 1
    check_parse(document)
    # The same document after the JSON round trip the wire makes.
    check_parse(json.loads(json.dumps(document)))


@fuzz
@given(
    peers=st.integers(0, 3000),
    allowed=st.integers(0, 600),
    lan=st.integers(0, 20),
)
def test_parse_answer_with_huge_lists(peers, allowed, lan):
    TRIED["client: parse_answer huge lists"] += 1
    # Many plain peers, then one with long lists.
    entries = [
        {"public_key": PublicKey(n.to_bytes(32, "big")).base64, "allowed_ips": []}
        for n in range(1, peers + 1)
    ]
    entries.append(
        {
            "public_key": PublicKey(bytes(32)).base64,
            "endpoint": "203.0.113.31:51820",
            "allowed_ips": ["198.51.100.7/32"] * allowed,
            "lan_endpoints": ["192.168.1.7:51820"] * lan,
        }
    )
    answer = check_parse({"epoch": "e1", "version": 1, "full": True, "peers": entries})
    if allowed > 256 or lan > 8:
        assert answer is None
    else:
        assert answer is not None and len(answer.peers) == peers + 1


# -- the RegistryClient: any body a registry can send ---------------------


class CannedResponse:
    """What twisted.web.client.Agent.request gives: a code and a body delivered
    to the reader (here at once, in pieces, then ResponseDone)."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code, self.body = code, body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        for i in range(0, len(self.body), 65536):
            protocol.dataReceived(self.body[i : i + 65536])
            if protocol.done.called:
                return
        protocol.connectionLost(Failure(ResponseDone()))


class CannedAgent:
    def __init__(self) -> None:
        self.response = CannedResponse(200, b"")

    def request(self, method: bytes, url: bytes, headers: Any, body: Any) -> Deferred[Any]:
        return succeed(self.response)


wire_body = st.one_of(
    any_answer.map(lambda doc: json.dumps(doc).encode()),
    st.binary(max_size=100),
    st.integers(1, 100_000).map(lambda n: b"[" * n),
    st.sampled_from([b"", b"null", b"1e999", b"9" * 5000, b'{"error": 1}', b"\xff\xfe"]),
)


@fuzz
@given(body=wire_body, status=st.sampled_from([200, 200, 200, 400, 403, 429, 500, 503]))
def test_registry_client_turns_any_answer_into_a_document_or_a_registry_error(body, status):
    """The client's whole decoding path of a single answer (size bound, JSON,
    status): never another exception, which would end the follower's loop (it
    logs anything else as a bug)."""
    TRIED["client: RegistryClient decoding"] += 1
    client = RegistryClient(Clock(), ipaddress.ip_address("198.51.100.1"), 51820)
    client.http = CannedAgent()
    client.http.response = CannedResponse(status, body)
    outcome: list[Any] = []
    client.announce(Announcement("ab", ())).addBoth(outcome.append)
    assert len(outcome) == 1, "no outcome without any I/O"
    got = outcome[0]
    if isinstance(got, Failure):
        assert got.check(RegistryError), got.getTraceback()
        assert str(got.value)
    else:
        assert status == 200


class CannedStream:
    """A streamed response: a code, a content type and a body delivered in pieces."""

    def __init__(self, code: int, body: bytes, content_type: bytes, piece: int) -> None:
        self.code, self.body, self.piece = code, body, piece
        self.headers = Headers({b"content-type": [content_type]})

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        for i in range(0, len(self.body), self.piece):
            protocol.dataReceived(self.body[i : i + self.piece])
        protocol.connectionLost(Failure(ResponseDone()))


first_line = st.fixed_dictionaries(
    {
        "epoch": st.just("e1"),
        "version": st.integers(0, 5),
        "full": st.booleans(),
        "you": st.fixed_dictionaries(
            {"public_key": st.sampled_from([MY_KEY.base64, "x"]), "endpoint": endpoint_like}
        ),
        "peers": st.lists(plausible_peer, max_size=3, unique_by=lambda p: p["public_key"]),
    }
)
stream_line = st.one_of(
    st.one_of(first_line, plausible_answer, any_answer).map(lambda d: json.dumps(d).encode()),
    st.just(b""),
    st.binary(max_size=40),
)


@fuzz
@given(
    first=first_line,
    lines=st.lists(stream_line, max_size=5),
    cut=st.integers(0, 50),
    piece=st.integers(1, 300),
    status=st.sampled_from([200, 200, 200, 403, 500]),
    content_type=st.sampled_from([b"application/x-ndjson", b"application/json", b"text/html"]),
)
def test_registry_client_turns_any_stream_into_answers_then_an_end(
    first, lines, cut, piece, status, content_type
):
    """The client's whole stream path (content type, line splitting, JSON, the
    first line's "you", shared lines, validation): answers or keep-alives, then
    StreamEnded or a RegistryError; never another exception."""
    TRIED["client: RegistryClient stream decoding"] += 1
    body = b"\n".join([json.dumps(first).encode(), *lines]) + b"\n"
    body = body[: len(body) - cut] if cut < len(body) else body
    client = RegistryClient(Clock(), ipaddress.ip_address("198.51.100.1"), 51820)
    client.http = CannedAgent()
    client.http.response = CannedStream(status, body, content_type, piece)
    stream = client.follow(None, None)
    for _ in range(len(lines) + 3):
        outcome: list[Any] = []
        stream.next().addBoth(outcome.append)
        assert len(outcome) == 1, "no outcome without any I/O"
        got = outcome[0]
        if isinstance(got, Failure):
            assert got.check(RegistryError, StreamEnded), got.getTraceback()
            break
        assert got is None or isinstance(got, Answer)
        if isinstance(got, Answer) and content_type == b"application/x-ndjson":
            # A stream takes our own record out of every line (the agent also
            # never adds itself, whatever an answer lists: check_device).
            assert MY_KEY not in [p.public_key for p in got.peers]
    else:
        raise AssertionError("the stream never ended")


# -- a MeshAgent fed those answers -----------------------------------------


def client_device() -> MemoryDevice:
    device = MemoryDevice(public_key=MY_KEY, addresses=[ipaddress.ip_interface(f"{MY_ADDRESS}/24")])
    device.add_peer(peer(REGISTRY_KEY, "203.0.113.10:51820", (TUNNEL,), START, keepalive=25))
    device.add_peer(peer(HAND_KEY, "203.0.113.50:51820", HAND_ROUTES, START))
    return device


def run_agent(
    documents: list[Any], accept_routes: bool, per_stream: bool = False
) -> tuple[MemoryDevice, ScriptedRegistryClient, Clock]:
    clock = Clock()
    clock.advance(START)
    device = client_device()
    registry = ScriptedRegistryClient(MY_KEY, documents, per_stream)
    agent = MeshAgent(
        device,
        clock,
        AgentConfig(
            registry_key=REGISTRY_KEY,
            accept_routes=tuple(parse_network(n) for n in ACCEPTED_ROUTES) if accept_routes else (),
        ),
        client_factory=lambda reactor, address, port: registry,
    )
    agent.startService()
    # Play the network: every peer being probed answers at once, so each
    # accepted peer goes direct and its allowed IPs reach the device.
    for _ in range(40):
        for key in list(device.peers):
            if key not in (REGISTRY_KEY, HAND_KEY) and device.peers[key].latest_handshake is None:
                device.handshake(key, clock.seconds())
        clock.advance(0.5)
        check_device(device, accept_routes, agent)
    clock.advance(31)  # past the backoff of refused answers
    check_device(device, accept_routes, agent)
    agent.stopService()
    return device, registry, clock


def check_device(device: MemoryDevice, accept_routes: bool, agent: MeshAgent | None = None) -> None:
    original = client_device().peers
    # The registry peer and the hand-configured peer are never touched.
    assert device.peers[REGISTRY_KEY] == original[REGISTRY_KEY]
    assert device.peers[HAND_KEY] == original[HAND_KEY]
    held = {parse_network(n) for n in (TUNNEL, *HAND_ROUTES)}
    hand = [parse_network(n) for n in HAND_ROUTES]
    outer = [parse_network(TUNNEL)] + (
        [parse_network(n) for n in ACCEPTED_ROUTES] if accept_routes else []
    )
    for key, state in device.peers.items():
        if key in (REGISTRY_KEY, HAND_KEY):
            continue
        assert key != MY_KEY, "this host was added as its own peer"
        for network in state.allowed_ips:
            where = f"{network} on {key.short}"
            assert any(network.version == o.version and network.subnet_of(o) for o in outer), (
                f"{where}: outside the tunnel networks"
            )
            assert REGISTRY_ADDRESS not in network, f"{where}: holds the registry's address"
            assert MY_ADDRESS not in network, f"{where}: holds this host's own address"
            assert network not in held, f"{where}: a route another peer holds"
            assert not any(network.version == h.version and network.subnet_of(h) for h in hand), (
                f"{where}: inside a route the hand-configured peer holds"
            )
            # No route that would attract another peer's traffic: none may hold
            # a more specific route the registry lists for another peer (relayed
            # or not) or the hand-configured peer holds.
            others = list(hand) + [
                route
                for other, remote in (agent.view.peers.items() if agent is not None else ())
                if other not in (key, REGISTRY_KEY, MY_KEY)
                for route in remote.allowed_ips
            ]
            for inner in others:
                assert not (
                    inner.version == network.version
                    and inner != network
                    and inner.subnet_of(network)  # type: ignore[arg-type]
                ), f"{where}: holds {inner}, another peer's route"


@fuzz
@given(document=any_answer, accept_routes=st.booleans(), per_stream=st.booleans())
def test_agent_device_unchanged_by_a_refused_answer(document, accept_routes, per_stream):
    TRIED["client: agent, one answer"] += 1
    device, registry, _ = run_agent([document], accept_routes, per_stream)
    if registry.refused:
        assert device.operations == [], "a refused answer changed the device"
        assert device.peers == client_device().peers


@fuzz
@given(
    documents=st.lists(st.one_of(plausible_answer, any_answer), min_size=1, max_size=4),
    per_stream=st.booleans(),
)
def test_agent_never_puts_a_forbidden_allowed_ip_on_the_device(documents, per_stream):
    TRIED["client: agent, answer sequences"] += 1
    run_agent(documents, accept_routes=True, per_stream=per_stream)


def test_agent_fuzz_reaches_the_device():
    """The generators are not vacuous: a plausible answer does reach the device."""
    document = {
        "epoch": "e1",
        "version": 3,
        "full": True,
        "you": {"endpoint": "203.0.113.21:51820"},
        "peers": [
            {
                "public_key": KEYS[3].base64,
                "endpoint": "203.0.113.31:51820",
                "allowed_ips": ["198.51.100.3/32", "0.0.0.0/0", "198.51.100.241/32"],
                "session": "0a",
            }
        ],
    }
    device, registry, _ = run_agent([document], accept_routes=False, per_stream=True)
    assert registry.accepted == 1
    # 0.0.0.0/0 and a host inside the hand-configured peer's route were refused.
    assert device.peers[KEYS[3]].allowed_ips == (parse_network("198.51.100.3/32"),)
