"""This host's LAN endpoints: only what another host could reach, by the same
test the registry applies to announcements (wgnat.wire.reachable_from_elsewhere)."""

from __future__ import annotations

import ipaddress

import pytest

from wgnat.client.lan import ipv6_endpoints, lan_endpoints, usable_lan_interface
from wgnat.wire import MAX_IPV6_ENDPOINTS, parse_announcement

UNREACHABLE = [
    "127.0.0.1/8",
    "169.254.1.2/16",
    "fe80::1/64",
    "::1/128",
    "::ffff:127.0.0.1/128",
    "::ffff:169.254.169.254/128",
    "::ffff:224.0.0.251/128",
    "::ffff:0.0.0.0/128",
]


@pytest.mark.parametrize("text", UNREACHABLE)
def test_addresses_no_other_host_can_reach_are_not_lan_endpoints(text):
    address = ipaddress.ip_interface(text)
    assert not usable_lan_interface(address)
    assert lan_endpoints([address], 51820) == []


def test_what_the_client_announces_the_registry_accepts():
    addresses = [ipaddress.ip_interface(t) for t in [*UNREACHABLE, "192.168.1.10/24"]]
    announced = lan_endpoints(addresses, 51820)
    assert [str(e) for e in announced] == ["192.168.1.10:51820"]
    body = {"session": "ab", "lan_endpoints": [str(e) for e in announced]}
    assert parse_announcement(body).lan_endpoints == tuple(announced)


def test_at_most_the_registrys_limit_is_announced():
    addresses = [ipaddress.ip_interface(f"192.168.1.{n}/24") for n in range(1, 20)]
    announced = lan_endpoints(addresses, 51820)
    assert len(announced) == 8
    parse_announcement({"session": "ab", "lan_endpoints": [str(e) for e in announced]})


def test_global_ipv6_endpoints_are_the_ones_another_site_can_reach():
    addresses = [
        ipaddress.ip_interface(t)
        for t in [
            *UNREACHABLE,
            "192.168.1.10/24",
            "fd00::10/64",  # unique local: one site only
            "2001:db8:1::10/64",
            "2001:db8:1::10/64",  # listed twice (two links): announced once
            "2001:db8:9::10/64",
        ]
    ]
    announced = ipv6_endpoints(addresses, 51820)
    assert [str(e) for e in announced] == ["[2001:db8:1::10]:51820", "[2001:db8:9::10]:51820"]
    body = {"session": "ab", "ipv6_endpoints": [str(e) for e in announced]}
    assert parse_announcement(body).ipv6_endpoints == tuple(announced)
    many = [ipaddress.ip_interface(f"2001:db8::{n}/64") for n in range(1, 10)]
    assert len(ipv6_endpoints(many, 51820)) == MAX_IPV6_ENDPOINTS
