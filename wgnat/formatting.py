"""How both daemons' status documents and the `wgnat` command write times, sizes
and rows: shared so that a duration reads the same in a reason, a log line and a
table."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from wgnat._types import Endpoint, IPNetwork, PeerState


def duration(seconds: float | None) -> str:
    """A short human duration: 4s, 2m05s, 3h07m, 2d04h."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def size(count: int | None) -> str:
    """Bytes as `wg show` prints them: B, KiB, MiB, GiB, TiB."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{count} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


# -- pieces of a status document (JSON-ready values) ----------------------------


def timestamp(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def endpoint_text(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else str(endpoint)


def first_address(*candidates: Iterable[IPNetwork]) -> str | None:
    for networks in candidates:
        for network in networks:
            return str(network.network_address)
    return None


def device_fields(peer: PeerState | None, now: float) -> dict[str, Any]:
    """What the device says of a peer, as both daemons' documents show it."""
    if peer is None:
        return {
            "on_device": False,
            "latest_handshake": None,
            "handshake_age": None,
            "rx_bytes": None,
            "tx_bytes": None,
            "keepalive": None,
            "allowed_ips": [],
        }
    handshake = peer.latest_handshake
    return {
        "on_device": True,
        "latest_handshake": timestamp(handshake),
        "handshake_age": None if handshake is None else timestamp(max(0.0, now - handshake)),
        "rx_bytes": peer.rx_bytes,
        "tx_bytes": peer.tx_bytes,
        "keepalive": peer.persistent_keepalive,
        "allowed_ips": [str(net) for net in peer.allowed_ips],
    }


def row_order(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Rows by tunnel address (IPv4 first), rows without one last."""
    address = row.get("address")
    if address is None:
        return (2, b"", row["public_key"])
    parsed = ipaddress.ip_address(address)
    return (parsed.version, parsed.packed, row["public_key"])
