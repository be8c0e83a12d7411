"""One WireGuard interface behind one asynchronous interface, several backends.

`open_device(ifname)` picks the backend: the cross-platform UAPI socket when
wireguard-go (or BoringTun) serves the interface, kernel WireGuard over generic
netlink otherwise.  Every operation returns a Deferred; none blocks the reactor.

Peers are changed one at a time, never by replacing the whole peer list, which
would reset every session on the host.  Private and preshared keys never leave
this package: the states returned carry neither, and no error message quotes one.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from wgnat._types import DeviceState, IPInterface, PeerUpdate, PublicKey

UAPI_SOCKET_DIR = "/var/run/wireguard"


class DeviceError(Exception):
    """A device operation failed; the message is safe to show and to log."""


class DeviceNotFound(DeviceError):
    pass


class DevicePermissionError(DeviceError):
    pass


class Device(Protocol):
    """The operations every layer above uses; `memory.MemoryDevice` is the test double."""

    @property
    def ifname(self) -> str: ...

    @property
    def backend(self) -> str: ...

    def read(self) -> Deferred[DeviceState]: ...

    def set_peer(self, update: PeerUpdate) -> Deferred[None]: ...

    def remove_peer(self, public_key: PublicKey) -> Deferred[None]: ...

    def addresses(self) -> Deferred[list[IPInterface]]: ...


def uapi_socket_path(ifname: str, socket_dir: str = UAPI_SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"{ifname}.sock")


def validate_ifname(ifname: str) -> str:
    # Linux limits names to 15 bytes; a slash would escape the socket directory.
    if not ifname or len(ifname) > 15 or "/" in ifname or ifname in (".", ".."):
        raise DeviceError(f"invalid interface name {ifname!r}: 1-15 characters, no '/'")
    if not all(ch.isalnum() or ch in "-_.@" for ch in ifname):
        raise DeviceError(f"invalid interface name {ifname!r}: letters, digits, '-_.@' only")
    return ifname


def open_device(
    ifname: str,
    reactor: Any = None,
    socket_dir: str = UAPI_SOCKET_DIR,
) -> Device:
    """Return the backend serving `ifname`, or raise DeviceNotFound saying what to do."""
    validate_ifname(ifname)
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    path = uapi_socket_path(ifname, socket_dir)
    if os.path.exists(path):
        from wgnat.device.uapi import UAPIDevice

        return UAPIDevice(ifname, reactor, path)
    from wgnat.device import netlink

    if netlink.kernel_link_exists(ifname):
        return netlink.NetlinkDevice(ifname, reactor)
    raise DeviceNotFound(
        f"interface {ifname} not found: no {path} and no kernel WireGuard link named "
        f"{ifname}; start 'wireguard-go {ifname}' or 'ip link add {ifname} type wireguard'"
    )


def open_device_or_exit(program: str, ifname: str, reactor: Any = None) -> Device:
    """open_device for a daemon's start: a missing interface is one line, exit 1
    (twistd would print a traceback for any other exception)."""
    try:
        return open_device(ifname, reactor)
    except DeviceError as exc:
        raise SystemExit(f"{program}: error: {exc}") from None


def interface_addresses(ifname: str) -> list[IPInterface]:
    """The addresses configured on a link (blocking: call it from a thread)."""
    import socket

    from wgnat.rtnetlink import dump_addresses

    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise DeviceNotFound(f"interface {ifname} has no link in this network namespace") from None
    return [address for link, address in dump_addresses() if link == index]


def link_is_up(ifname: str) -> bool:
    """Whether the link is administratively up (blocking: call it from a thread)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname)
        return bool(links) and bool(links[0]["flags"] & 1)  # IFF_UP
