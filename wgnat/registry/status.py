"""The registry's status document (`wgnat status --server`): every peer on the
hub's interface, live or not, with its observed endpoint and the LAN endpoints
it announced.  `registry_status` is pure; `status_provider` reads the device and
builds it for the status socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from wgnat import __version__
from wgnat._types import DeviceState, PeerState
from wgnat.device import Device
from wgnat.formatting import (
    device_fields,
    duration,
    endpoint_text,
    first_address,
    row_order,
    timestamp,
)
from wgnat.registry.hub import Registry
from wgnat.registry.model import RegistryModel, is_live


def registry_status(
    model: RegistryModel,
    *,
    ifname: str,
    backend: str,
    device: DeviceState | None,
    now: float,
    waiting: int = 0,
    device_error: str | None = None,
    tunnel_addresses: Iterable[str] = (),
) -> dict[str, Any]:
    """The registry's status document: every peer on the hub's interface, live or
    not, with its observed endpoint and the LAN endpoints it announced."""
    peers: Iterable[PeerState] = device.peers if device is not None else model.known.values()
    rows = []
    for peer in peers:
        announcement = model.announcements.get(peer.public_key)
        live = is_live(peer, now, model.live_window)
        if live:
            why = f"handshake within the last {model.live_window:g} s"
        elif peer.endpoint is None:
            why = "no endpoint yet (it never reached this hub)"
        elif peer.latest_handshake is None:
            why = "no handshake yet"
        else:
            why = (
                f"no handshake for {duration(now - peer.latest_handshake)} "
                f"(live means within {model.live_window:g} s)"
            )
        rows.append(
            {
                "public_key": peer.public_key.base64,
                "address": first_address(peer.allowed_ips),
                "endpoint": endpoint_text(peer.endpoint),
                "live": live,
                "why": why,
                "wgnat_client": announcement is not None,
                "lan_endpoints": (
                    [str(e) for e in announcement.lan_endpoints] if announcement else []
                ),
                "ipv6_endpoints": (
                    [str(e) for e in announcement.ipv6_endpoints] if announcement else []
                ),
                "mapped_endpoint": (
                    endpoint_text(announcement.mapped_endpoint) if announcement else None
                ),
                **device_fields(peer, now),
            }
        )
    rows.sort(key=row_order)
    return {
        "role": "registry",
        "wgnat_version": __version__,
        "interface": ifname,
        "backend": backend,
        "now": timestamp(now),
        "public_key": device.public_key.base64 if device and device.public_key else None,
        # Which hub this is, for a client following several (and an operator
        # reading two hubs' status side by side): the API's tunnel addresses.
        "tunnel_addresses": list(tunnel_addresses),
        "listen_port": device.listen_port if device is not None else None,
        "device_error": device_error,
        "epoch": model.epoch,
        "version": model.version,
        "live_window": model.live_window,
        "peers_known": len(rows),
        "peers_live": sum(1 for row in rows if row["live"]),
        "waiting_clients": waiting,
        "peers": rows,
    }


def status_provider(
    device: Device,
    hub: Registry,
    clock: IReactorTime,
    tunnel_addresses: Callable[[], list[str]] = list,
) -> Deferred[dict[str, Any]]:
    """Read the device, then describe every peer the registry knows."""

    def build(state: DeviceState | None, error: str | None = None) -> dict[str, Any]:
        return registry_status(
            hub.model,
            ifname=device.ifname,
            backend=device.backend,
            device=state,
            now=clock.seconds(),
            waiting=hub.waiting(),
            device_error=error,
            tunnel_addresses=tunnel_addresses(),
        )

    def unreadable(failure: Failure) -> dict[str, Any]:
        return build(None, failure.getErrorMessage())

    return device.read().addCallbacks(build, unreadable)
