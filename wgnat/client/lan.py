"""This host's LAN endpoints: the addresses a peer behind the same NAT can reach
us at (Linux NATs do not hairpin), each with our one WireGuard listen port."""

from __future__ import annotations

import ipaddress

from wgnat._types import Endpoint, IPInterface


def usable_lan_interface(address: IPInterface) -> bool:
    ip = address.ip
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def lan_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Addresses of every link but the WireGuard one and loopback (blocking)."""
    from pyroute2 import IPRoute

    result: list[IPInterface] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for message in ipr.get_addr():
            if names.get(message["index"]) in (exclude_ifname, "lo"):
                continue
            address = message.get_attr("IFA_ADDRESS")
            if address is None:
                continue
            interface = ipaddress.ip_interface(f"{address}/{message['prefixlen']}")
            if usable_lan_interface(interface):
                result.append(interface)
    return result


def lan_endpoints(addresses: list[IPInterface], listen_port: int, limit: int = 8) -> list[Endpoint]:
    return [Endpoint(address.ip, listen_port) for address in addresses][:limit]
