"""The wire format (wgnat/wire.py) round-trips: whatever the registry encodes,
the client decodes to the same values, and the client's announcement likewise;
its limits are the ones both ends enforce."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed

from wgnat._types import Announcement, Endpoint, InvalidValue, PublicKey
from wgnat.wire import (
    MAX_IPV6_ENDPOINTS,
    MAX_LAN_ENDPOINTS,
    RemotePeer,
    StreamDecoder,
    decode_json,
    encode_announcement,
    encode_answer,
    encode_body,
    encode_line,
    encode_peer,
    encode_you,
    global_ipv6,
    parse_announcement,
    parse_answer,
    peer_digest,
    reachable_from_elsewhere,
)

keys = st.binary(min_size=32, max_size=32).map(PublicKey)
ipv4 = st.integers(1, 2**32 - 2).map(ipaddress.IPv4Address)
ipv6 = st.integers(1, 2**128 - 2).map(ipaddress.IPv6Address)
hosts = st.one_of(ipv4, ipv6).filter(lambda a: not (a.is_multicast or a.is_unspecified))
endpoints = st.builds(Endpoint, hosts, st.integers(1, 65535))
lan_endpoints = endpoints.filter(reachable_from_elsewhere)
networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), ipv4, st.integers(8, 32)
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), ipv6, st.integers(32, 128)
    ),
)
sessions = st.text("0123456789abcdef", min_size=1, max_size=32)
# A peer as the registry knows it: LAN endpoints come only with an announcement.
remote_peers = st.builds(
    lambda key, endpoint, allowed, lan, session: RemotePeer(
        key, endpoint, allowed, lan if session is not None else (), session
    ),
    keys,
    st.none() | endpoints,
    st.lists(networks, max_size=4, unique=True).map(tuple),
    st.lists(lan_endpoints, max_size=MAX_LAN_ENDPOINTS, unique=True).map(tuple),
    st.none() | sessions,
)


def encoded(peer: RemotePeer, age: float | None) -> dict:
    announcement = (
        Announcement(peer.session, peer.lan_endpoints) if peer.session is not None else None
    )
    return encode_peer(peer.public_key, peer.endpoint, peer.allowed_ips, announcement, age)


@settings(max_examples=200, deadline=None)
@given(
    me=keys,
    my_endpoint=st.none() | endpoints,
    peers=st.lists(remote_peers, max_size=6, unique_by=lambda p: p.public_key),
    removed=st.lists(keys, max_size=3, unique=True),
    epoch=st.text("0123456789abcdef", min_size=1, max_size=32),
    version=st.integers(0, 2**40),
    full=st.booleans(),
    age=st.none() | st.floats(0, 1e6),
)
def test_an_answer_round_trips_through_a_stream_line(
    me, my_endpoint, peers, removed, epoch, version, full, age
):
    peers = [peer for peer in peers if peer.public_key != me]
    removed = [key for key in removed if key != me]
    you = encode_you(me, my_endpoint, ())
    document = encode_answer(epoch, version, full, [encoded(p, age) for p in peers], removed, you)
    line = encode_line(document)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    [answer] = list(StreamDecoder().feed(line))
    assert answer == parse_answer(decode_json(line, "a line"))
    assert (answer.epoch, answer.version, answer.full) == (epoch, version, full)
    assert answer.my_endpoint == my_endpoint
    assert list(answer.peers) == peers
    assert list(answer.removed) == removed


@settings(max_examples=200, deadline=None)
@given(
    session=sessions,
    lan=st.lists(lan_endpoints, max_size=MAX_LAN_ENDPOINTS, unique=True),
)
def test_an_announcement_round_trips(session, lan):
    announcement = Announcement(session, tuple(lan))
    body = encode_body(encode_announcement(announcement))
    assert parse_announcement(decode_json(body, "the body")) == announcement


def test_ipv4_mapped_addresses_are_seen_through():
    for text in ("[::ffff:127.0.0.1]:1", "[::ffff:169.254.169.254]:80", "[::ffff:224.0.0.251]:1"):
        assert not reachable_from_elsewhere(Endpoint.parse(text)), text
    assert reachable_from_elsewhere(Endpoint.parse("[::ffff:192.168.1.7]:51820"))
    assert reachable_from_elsewhere(Endpoint.parse("[2001:db8::7]:51820"))


# -- IPv6 and mapped endpoints: optional fields, compatible both ways -----------------

global_ipv6_endpoints = st.builds(
    Endpoint,
    st.integers(0x2001_0DB8 << 96, (0x2001_0DB8 << 96) + 2**96 - 1).map(ipaddress.IPv6Address),
    st.integers(1, 65535),
)


@settings(max_examples=100, deadline=None)
@given(
    session=sessions,
    lan=st.lists(lan_endpoints, max_size=MAX_LAN_ENDPOINTS, unique=True),
    ipv6=st.lists(global_ipv6_endpoints, max_size=MAX_IPV6_ENDPOINTS, unique=True),
    mapped=st.none() | lan_endpoints,
    punch_first=st.booleans(),
    key=keys,
    observed=st.none() | endpoints,
)
def test_ipv6_and_mapped_endpoints_round_trip_from_announcement_to_peer(
    session, lan, ipv6, mapped, punch_first, key, observed
):
    announcement = Announcement(
        session,
        tuple(lan),
        ipv6_endpoints=tuple(ipv6),
        mapped_endpoint=mapped,
        punch_first=punch_first,
    )
    body = encode_body(encode_announcement(announcement))
    assert parse_announcement(decode_json(body, "the body")) == announcement
    record = encode_peer(key, observed, (), announcement, None)
    line = encode_line(encode_answer("e", 1, False, [record], []))
    [peer] = parse_answer(decode_json(line, "a line")).peers
    assert (peer.ipv6_endpoints, peer.mapped_endpoint, peer.punch_first) == (
        tuple(ipv6),
        mapped,
        punch_first,
    )


def test_without_the_new_fields_documents_and_digests_are_as_before():
    """An older client or registry sees exactly what it saw before for a peer
    with neither IPv6 nor a mapped endpoint: no new keys, the same digest."""
    key, lan = PublicKey(b"k" * 32), (Endpoint.parse("192.168.1.7:51820"),)
    announcement = Announcement("ab", lan)
    assert set(encode_announcement(announcement)) == {"session", "lan_endpoints"}
    record = encode_peer(key, Endpoint.parse("203.0.113.9:1"), (), announcement, None)
    assert "ipv6_endpoints" not in record and "mapped_endpoint" not in record
    # The digest as it was computed before these fields existed.
    text = "|".join((key.base64, "203.0.113.9:1", "", "192.168.1.7:51820", "ab"))
    before = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    assert peer_digest(key, Endpoint.parse("203.0.113.9:1"), (), lan, "ab") == before
    with_ipv6 = peer_digest(
        key, Endpoint.parse("203.0.113.9:1"), (), lan, "ab", (Endpoint.parse("[2001:db8::1]:1"),)
    )
    assert with_ipv6 != before
    # An older client's announcement is still accepted.
    assert parse_announcement({"session": "ab", "lan_endpoints": []}) == Announcement("ab")


def test_bad_ipv6_and_mapped_endpoints_are_refused_with_the_reason():
    bad = [
        ({"ipv6_endpoints": ["203.0.113.9:1"]}, "not a global IPv6 endpoint"),
        ({"ipv6_endpoints": ["[fd00::1]:1"]}, "not a global IPv6 endpoint"),
        ({"ipv6_endpoints": ["[fe80::1]:1"]}, "not a global IPv6 endpoint"),
        ({"ipv6_endpoints": ["[::ffff:198.51.100.1]:1"]}, "not a global IPv6 endpoint"),
        ({"ipv6_endpoints": ["[2001:db8::1]:1"] * 2 + [None]}, "not a global IPv6 endpoint"),
        ({"ipv6_endpoints": [f"[2001:db8::{n}]:1" for n in range(1, 6)]}, "at most 4"),
        ({"ipv6_endpoints": "[2001:db8::1]:1"}, "must be a list"),
        ({"mapped_endpoint": "127.0.0.1:5"}, "not reachable from another host"),
        ({"mapped_endpoint": "nonsense"}, "mapped_endpoint: malformed endpoint"),
        ({"punch_first": "yes"}, "'punch_first' is not true or false"),
    ]
    for extra, message in bad:
        with pytest.raises(InvalidValue, match=message):
            parse_announcement({"session": "ab", "lan_endpoints": [], **extra})
    # In a registry's answer an odd entry is left out, not the whole answer
    # refused (test_an_answer_with_an_odd_ipv6_endpoint_keeps_the_rest); a
    # value that is not a list still is.
    peer = {"public_key": PublicKey(b"k" * 32).base64, "ipv6_endpoints": ["10.0.0.1:1"]}
    answer = parse_answer({"epoch": "e", "version": 1, "full": True, "peers": [peer]})
    assert answer.peers[0].ipv6_endpoints == ()
    peer["ipv6_endpoints"] = "[2001:db8::1]:1"
    with pytest.raises(InvalidValue, match=r"peers\[0\]: ipv6_endpoints"):
        parse_answer({"epoch": "e", "version": 1, "full": True, "peers": [peer]})


def test_global_ipv6():
    assert global_ipv6(Endpoint.parse("[2001:db8::7]:51820"))  # the documentation range
    assert global_ipv6(Endpoint.parse("[2a01:4f8::1]:51820"))
    for text in ("[fd12::1]:1", "[fec0::1]:1", "[fe80::1]:1", "[::1]:1", "[::c000:201]:1"):
        assert not global_ipv6(Endpoint.parse(text)), text
    assert not global_ipv6(Endpoint.parse("198.51.100.1:1"))


def test_a_client_refused_by_an_older_registry_announces_again_without_the_new_fields():
    """A registry from before the optional announcement fields answers 400 to
    fields it does not know: the follower repeats the announcement with the
    session and LAN endpoints only, so this host is still announced (and
    probed back), and keeps to that for that registry."""
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock

    from wgnat.client.follower import RegistryFollower
    from wgnat.client.metrics import ClientMetrics
    from wgnat.client.registry_client import RegistryError
    from wgnat.client.view import RegistryView
    from wgnat.testing import ScriptedRegistryClient

    class OldRegistry(ScriptedRegistryClient):
        def __init__(self) -> None:
            super().__init__(PublicKey(b"a" * 32), [{"epoch": "e", "version": 1, "full": True}])
            self.received: list[Announcement] = []

        def announce(self, announcement: Announcement):
            if set(encode_announcement(announcement)) - {"session", "lan_endpoints"}:
                return fail(RegistryError("the registry refused the request: HTTP 400", status=400))
            self.received.append(announcement)
            return succeed({"version": 0})

    v6 = (Endpoint.parse("[2001:db8::7]:51820"),)
    lan = (Endpoint.parse("192.168.1.7:51820"),)
    old = OldRegistry()
    follower = RegistryFollower(
        old,
        Clock(),
        RegistryView(),
        lambda: succeed(Announcement("ab", lan, ipv6_endpoints=v6, punch_first=True)),
        lambda changed, full: None,
        ClientMetrics(),
        60.0,
    )
    follower.start()
    assert old.received == [Announcement("ab", lan)]
    assert follower.plain_announcements
    follower.resync()  # nothing new to announce: not again
    assert old.received == [Announcement("ab", lan)]
    follower.stop()


def test_an_answer_with_an_odd_ipv6_endpoint_keeps_the_rest() -> None:
    """A registry's answer is parsed leniently there: one entry a later
    registry's rules allow (or too many) must not cost the whole answer."""
    from wgnat.wire import MAX_IPV6_ENDPOINTS, parse_answer

    good = [f"[2001:db8::{n}]:51820" for n in range(1, MAX_IPV6_ENDPOINTS + 2)]
    document = {
        "epoch": "e",
        "version": 1,
        "full": True,
        "peers": [
            {
                "public_key": "A" * 43 + "=",
                "endpoint": "192.0.2.1:51820",
                "allowed_ips": ["198.51.100.2/32"],
                "ipv6_endpoints": ["[fe80::1]:51820", "nonsense", *good],
            }
        ],
    }
    peer = parse_answer(document).peers[0]
    assert [str(e) for e in peer.ipv6_endpoints] == good[:MAX_IPV6_ENDPOINTS]
