"""Kernel WireGuard over generic netlink, through pyroute2's WireGuard socket.

pyroute2's calls block, so every one runs in the reactor's thread pool.  Replies
are turned into the same DeviceState the UAPI backend returns; the private and
preshared key attributes are never read out of the messages.
"""

from __future__ import annotations

import errno as errno_module
import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from wgnat._types import (
    DeviceState,
    Endpoint,
    InvalidValue,
    IPInterface,
    PeerState,
    PeerUpdate,
    PublicKey,
    parse_network,
)
from wgnat.device import DeviceError, DeviceNotFound, DevicePermissionError, interface_addresses


def kernel_link_exists(ifname: str) -> bool:
    """True when a link of kind wireguard named `ifname` exists here."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in ipr.get_links(ifname=ifname):
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "wireguard":
                    return True
    except Exception:
        return False
    return False


def build_peer_dict(update: PeerUpdate) -> dict[str, Any]:
    """The peer structure pyroute2's WireGuard.set() takes for one update."""
    peer: dict[str, Any] = {"public_key": update.public_key.base64}
    if update.update_only:
        peer["update_only"] = True
    if update.endpoint is not None:
        peer["endpoint_addr"] = str(update.endpoint.host)
        peer["endpoint_port"] = update.endpoint.port
    if update.persistent_keepalive is not None:
        peer["persistent_keepalive"] = update.persistent_keepalive
    if update.allowed_ips is not None:
        peer["allowed_ips"] = [str(network) for network in update.allowed_ips]
        if update.replace_allowed_ips:
            peer["replace_allowed_ips"] = True
    return peer


def build_remove_dict(public_key: PublicKey) -> dict[str, Any]:
    return {"public_key": public_key.base64, "remove": True}


def _key(value: Any) -> PublicKey:
    if isinstance(value, dict) or hasattr(value, "get"):
        value = value.get("value", value.get("key"))
    if isinstance(value, bytes) and len(value) == 32:
        return PublicKey(value)
    if isinstance(value, bytes):
        value = value.decode("ascii")
    return PublicKey.from_base64(value)


def _peer_from_nla(nla: Any) -> PeerState:
    key = _key(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
    endpoint = None
    raw_endpoint = nla.get_attr("WGPEER_A_ENDPOINT")
    if raw_endpoint is not None and raw_endpoint.get("port"):
        host = ipaddress.ip_address(raw_endpoint["addr"])
        try:
            endpoint = Endpoint(host, int(raw_endpoint["port"]))
        except InvalidValue:  # unusable (0.0.0.0, multicast): no endpoint
            endpoint = None
    allowed = tuple(
        parse_network(str(ipaddress.ip_network(item["addr"], strict=False)))
        for item in (nla.get_attr("WGPEER_A_ALLOWEDIPS") or ())
        if item.get("addr")
    )
    handshake = None
    raw_time = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    if raw_time is not None and (raw_time.get("tv_sec") or raw_time.get("tv_nsec")):
        handshake = raw_time["tv_sec"] + raw_time["tv_nsec"] / 1e9
    return PeerState(
        public_key=key,
        endpoint=endpoint,
        allowed_ips=allowed,
        latest_handshake=handshake,
        rx_bytes=int(nla.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(nla.get_attr("WGPEER_A_TX_BYTES") or 0),
        persistent_keepalive=int(nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
    )


def state_from_messages(messages: Iterable[Any]) -> DeviceState:
    """Merge a (possibly multi-part) WG_CMD_GET_DEVICE dump into one DeviceState.

    The kernel splits a large device over several messages, and one peer's
    allowed IPs over several of them too, so peers are merged by key.
    """
    public_key: PublicKey | None = None
    listen_port = 0
    order: list[PublicKey] = []
    merged: dict[PublicKey, PeerState] = {}
    for message in messages:
        own = message.get_attr("WGDEVICE_A_PUBLIC_KEY")
        if own is not None:
            public_key = _key(own)
        port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
        if port:
            listen_port = int(port)
        for nla in message.get_attr("WGDEVICE_A_PEERS") or ():
            peer = _peer_from_nla(nla)
            previous = merged.get(peer.public_key)
            if previous is None:
                order.append(peer.public_key)
                merged[peer.public_key] = peer
            else:
                merged[peer.public_key] = PeerState(
                    public_key=previous.public_key,
                    endpoint=previous.endpoint or peer.endpoint,
                    allowed_ips=previous.allowed_ips + peer.allowed_ips,
                    latest_handshake=previous.latest_handshake or peer.latest_handshake,
                    rx_bytes=previous.rx_bytes or peer.rx_bytes,
                    tx_bytes=previous.tx_bytes or peer.tx_bytes,
                    persistent_keepalive=previous.persistent_keepalive or peer.persistent_keepalive,
                )
    return DeviceState(public_key, listen_port, tuple(merged[key] for key in order))


def _translate(ifname: str, exc: BaseException) -> DeviceError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    if code in (errno_module.EPERM, errno_module.EACCES):
        return DevicePermissionError(
            f"permission denied configuring {ifname}: run as root or with CAP_NET_ADMIN"
        )
    if code in (errno_module.ENODEV, errno_module.ENOENT):
        return DeviceNotFound(f"interface {ifname} not found: no kernel WireGuard link")
    if isinstance(exc, InvalidValue):
        # Our own message about a value in the kernel's answer: it quotes no secret.
        return DeviceError(f"{ifname}: unreadable answer from the kernel: {exc}")
    if not isinstance(code, int):
        # Not an errno: name the exception's type only, never its text.
        return DeviceError(f"{ifname}: the WireGuard operation failed ({type(exc).__name__})")
    name = errno_module.errorcode.get(code, "unknown error")
    return DeviceError(f"{ifname}: the kernel refused the WireGuard operation: {code} {name}")


class NetlinkDevice:
    backend = "netlink"

    def __init__(self, ifname: str, reactor: Any, socket_factory: Any = None) -> None:
        self.ifname = ifname
        self.reactor = reactor
        if socket_factory is None:
            from pyroute2 import WireGuard

            socket_factory = WireGuard
        self._socket_factory = socket_factory

    def __repr__(self) -> str:
        return f"NetlinkDevice({self.ifname!r})"

    def _in_thread(self, function: Any, *args: Any) -> Deferred[Any]:
        def guarded() -> Any:
            try:
                return function(*args)
            except DeviceError:
                raise
            except Exception as exc:
                # Never let pyroute2's exception text (which may echo a request) out.
                raise _translate(self.ifname, exc) from None

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), guarded)

    def _read_blocking(self) -> DeviceState:
        wg = self._socket_factory()
        try:
            return state_from_messages(wg.info(self.ifname))
        finally:
            wg.close()

    def _set_blocking(self, peer: dict[str, Any]) -> None:
        wg = self._socket_factory()
        try:
            wg.set(self.ifname, peer=peer)
        finally:
            wg.close()

    def read(self) -> Deferred[DeviceState]:
        return self._in_thread(self._read_blocking)

    def set_peer(self, update: PeerUpdate) -> Deferred[None]:
        return self._in_thread(self._set_blocking, build_peer_dict(update))

    def remove_peer(self, public_key: PublicKey) -> Deferred[None]:
        return self._in_thread(self._set_blocking, build_remove_dict(public_key))

    def addresses(self) -> Deferred[list[IPInterface]]:
        return self._in_thread(interface_addresses, self.ifname)
