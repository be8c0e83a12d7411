"""This host's LAN endpoints: the addresses a peer behind the same NAT can reach
us at (Linux NATs do not hairpin), each with our one WireGuard listen port; and
among them its global IPv6 endpoints, which a peer anywhere with IPv6 can reach
with no NAT between."""

from __future__ import annotations

from wgnat._types import Endpoint, InvalidValue, IPInterface
from wgnat.wire import (
    MAX_IPV6_ENDPOINTS,
    MAX_LAN_ENDPOINTS,
    global_ipv6,
    reachable_from_elsewhere,
)


def usable_lan_interface(address: IPInterface) -> bool:
    """Whether a peer on our LAN could reach us at this address: the registry's
    own test (`reachable_from_elsewhere`, which also sees through IPv4-mapped
    IPv6 such as ::ffff:127.0.0.1), so that the two can never disagree."""
    try:
        return reachable_from_elsewhere(Endpoint(address.ip, 1))  # the port plays no part
    except InvalidValue:
        return False  # multicast or unspecified: not even an endpoint


def lan_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Addresses of every link but the WireGuard one and loopback (blocking)."""
    from wgnat.rtnetlink import named_addresses

    return [
        address
        for name, address in named_addresses()
        if name not in (exclude_ifname, "lo") and usable_lan_interface(address)
    ]


def lan_endpoints(
    addresses: list[IPInterface], listen_port: int, limit: int = MAX_LAN_ENDPOINTS
) -> list[Endpoint]:
    """What we announce: only addresses the registry accepts (it refuses the whole
    announcement otherwise), at most `limit` of them."""
    return [
        Endpoint(address.ip, listen_port) for address in addresses if usable_lan_interface(address)
    ][:limit]


def ipv6_endpoints(
    addresses: list[IPInterface], listen_port: int, limit: int = MAX_IPV6_ENDPOINTS
) -> list[Endpoint]:
    """This host's global IPv6 endpoints (the registry's test, `global_ipv6`),
    each with our listen port (WireGuard listens on both families on that one
    port), at most `limit`, in the order the host lists its addresses."""
    found: list[Endpoint] = []
    for address in addresses:
        if address.version != 6:
            continue
        endpoint = Endpoint(address.ip, listen_port)
        if global_ipv6(endpoint) and endpoint not in found:
            found.append(endpoint)
    return found[:limit]
