"""The wire format (wgnat/wire.py) round-trips: whatever the registry encodes,
the client decodes to the same values, and the client's announcement likewise;
its limits are the ones both ends enforce."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from wgnat._types import Announcement, Endpoint, PublicKey
from wgnat.wire import (
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
    parse_announcement,
    parse_answer,
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
