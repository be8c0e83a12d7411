"""This host's LAN endpoints: the addresses a peer behind the same NAT can reach
us at (Linux NATs do not hairpin), each with our one WireGuard listen port."""

from __future__ import annotations

from wgnat._types import Endpoint, IPInterface


def usable_lan_interface(address: IPInterface) -> bool:
    ip = address.ip
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def lan_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Addresses of every link but the WireGuard one and loopback (blocking)."""
    from wgnat.rtnetlink import named_addresses

    return [
        address
        for name, address in named_addresses()
        if name not in (exclude_ifname, "lo") and usable_lan_interface(address)
    ]


def lan_endpoints(addresses: list[IPInterface], listen_port: int, limit: int = 8) -> list[Endpoint]:
    return [Endpoint(address.ip, listen_port) for address in addresses][:limit]
