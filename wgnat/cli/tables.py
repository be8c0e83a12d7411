"""The `wgnat status` tables: a status document (client/status.py,
registry/status.py), as JSON decoded, turned into text like `wg show`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wgnat.formatting import duration, size


def _peer_name(row: Mapping[str, Any]) -> str:
    short = str(row["public_key"])[:8]
    return f"{row['address']} ({short})" if row.get("address") else short


def _ago(age: float | None, never: str = "never") -> str:
    return never if age is None else f"{duration(age)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for cells in (headers, *rows):
        padded = [cell.ljust(width) for cell, width in zip(cells[:-1], widths, strict=False)]
        lines.append("  ".join([*padded, cells[-1]]).rstrip())
    return lines


def format_client(status: Mapping[str, Any]) -> str:
    now = float(status["now"])
    key = status.get("public_key") or "?"
    lines = [
        f"wgnat-client on {status['interface']} ({status['backend']}): public key {key}, "
        f"listening on port {status.get('listen_port') or '?'}"
    ]
    seen = status.get("public_endpoint") or "unknown"
    lan = ", ".join(status.get("lan_endpoints") or []) or "none"
    ipv6 = ", ".join(status.get("ipv6_endpoints") or []) or "none"
    lines.append(f"  seen by the registry as {seen}; LAN endpoints announced: {lan}; IPv6: {ipv6}")
    registry = status["registry"]
    where = f"{registry['address']}:{registry['port']}" if registry.get("address") else "(starting)"
    if registry.get("connected"):
        link = f"connected, last answer {_ago(_age(now, registry.get('last_sync')))}"
    elif registry.get("connected") is False:
        link = f"UNREACHABLE ({registry.get('error') or 'no answer'})"
        if registry.get("last_sync") is not None:
            link += f", last answer {_ago(_age(now, registry['last_sync']))}"
        link += "; the mesh is kept as it is"
    else:
        link = "no answer yet"
    lines.append(
        f"registry {where} ({str(registry['public_key'])[:8]}): {link}; "
        f"view version {registry.get('view_version')}, "
        f"handshake {_ago(registry.get('handshake_age'))}"
    )
    lines.extend(_hub_lines(status, now))
    if status.get("device_error"):
        lines.append(f"  cannot read {status['interface']}: {status['device_error']}")
    mapping = status.get("port_mapping") or {}
    if mapping.get("external_endpoint"):
        lines.append(
            f"  port mapping: {mapping['external_endpoint']} ({mapping.get('protocol')}, "
            f"lifetime {mapping.get('lifetime')} s, expires in {mapping.get('expires_in')} s)"
        )
    elif mapping:
        state = mapping.get("state") or "unknown"
        error = f": {mapping['error']}" if mapping.get("error") else ""
        lines.append(f"  port mapping: none ({state}{error})")
    counts = status["counts"]
    summary = f"peers: {counts['direct']} direct, {counts['relayed']} relayed, "
    summary += f"{counts['probing']} probing"
    if counts.get("manual"):
        summary += f", {counts['manual']} configured by hand"
    lines.append(summary)
    if status.get("state") == "starting":
        lines.append("(starting: the mesh is not set up yet)")
    peers = status["peers"]
    if peers:
        lines.append("")
        lines.extend(
            table(
                ("PEER", "PATH", "ENDPOINT", "HANDSHAKE", "RECEIVED", "SENT", "WHY"),
                [
                    (
                        _peer_name(row),
                        row["path"],
                        row.get("endpoint") or "-",
                        _ago(row.get("handshake_age"), "never" if row.get("on_device") else "-"),
                        size(row.get("rx_bytes")),
                        size(row.get("tx_bytes")),
                        row.get("why") or "",
                    )
                    for row in peers
                ],
            )
        )
    return "\n".join(lines) + "\n"


def _hub_lines(status: Mapping[str, Any], now: float) -> list[str]:
    """Several registries: one line per hub (its link, how it sees us, whether
    it relays), and whether they see this host behind a symmetric NAT."""
    lines = []
    for hub in status.get("hubs") or []:
        if hub.get("connected"):
            link = f"connected, last answer {_ago(_age(now, hub.get('last_sync')))}"
        elif hub.get("connected") is False:
            link = f"UNREACHABLE ({hub.get('error') or 'no answer'})"
        else:
            link = "no answer yet"
        role = "RELAYS" if hub.get("relays") else "standby"
        if hub.get("dead_because"):
            role += f", dead: {hub['dead_because']}"
        lines.append(
            f"  hub {hub['address']}:{hub['port']} ({str(hub['public_key'])[:8]}): {role}; "
            f"{link}; sees us as {hub.get('sees_us_as') or 'unknown'}"
        )
    if status.get("hubs"):
        relay = status.get("relay_hub")
        lines.append(
            f"  relayed peers go through hub {str(relay)[:8]}"
            if relay
            else "  no hub holds the relay routes (no tunnel network on any hub peer)"
        )
    if status.get("symmetric_nat"):
        lines.append(
            "  behind a symmetric NAT (the hubs see one address with different ports): "
            "peers behind one too are relayed from the start"
        )
    return lines


def _age(now: float, when: float | None) -> float | None:
    return None if when is None else max(0.0, now - when)


def format_registry(status: Mapping[str, Any]) -> str:
    lines = [
        f"wgnat-server on {status['interface']} ({status['backend']}): public key "
        f"{status.get('public_key') or '?'}, listening on port "
        f"{status.get('listen_port') or '?'}",
        f"hub {str(status.get('public_key') or '?')[:8]} at "
        f"{', '.join(status.get('tunnel_addresses') or []) or '?'}: "
        f"view version {status['version']} (epoch {status['epoch']}), "
        f"{status['peers_live']} of {status['peers_known']} peers live, "
        f"{status['waiting_clients']} clients waiting",
    ]
    if status.get("device_error"):
        lines.append(
            f"  cannot read {status['interface']}: {status['device_error']} "
            "(showing the last view read)"
        )
    peers = status["peers"]
    if peers:
        lines.append("")
        lines.extend(
            table(
                ("PEER", "LIVE", "ENDPOINT", "HANDSHAKE", "RECEIVED", "SENT", "WGNAT", "LAN"),
                [
                    (
                        _peer_name(row),
                        "yes" if row["live"] else "no",
                        row.get("endpoint") or "-",
                        _ago(row.get("handshake_age")),
                        size(row.get("rx_bytes")),
                        size(row.get("tx_bytes")),
                        "yes" if row.get("wgnat_client") else "no",
                        ", ".join(row.get("lan_endpoints") or []) or "-",
                    )
                    for row in peers
                ],
            )
        )
    return "\n".join(lines) + "\n"


def format_status(status: Mapping[str, Any]) -> str:
    if status.get("role") == "registry":
        return format_registry(status)
    return format_client(status)
