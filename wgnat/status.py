"""`wgnat status`: what a running daemon is doing, and why (like `wg show`).

Each daemon answers on a local Unix socket (`/run/wgnat/client-IFACE.sock`,
`/run/wgnat/server-IFACE.sock`; see status_server.py) with one JSON document.
That document is built here by pure functions, `client_status` and
`registry_status`, from the daemon's state and a device snapshot, and turned into
a table by `format_status`.  `main` is the `wgnat` command.

Only public keys appear: the device layer never hands out a private or preshared
key, so none can reach this document.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from wgnat import __version__
from wgnat._types import DeviceState, Endpoint, PeerState, PublicKey
from wgnat.client.reconcile import Mesh, Path, PeerPath
from wgnat.client.view import RegistryView, RemotePeer
from wgnat.registry.model import RegistryModel, is_live

STATUS_DIR = "/run/wgnat"
DEFAULT_TIMEOUT = 5.0
EXIT_FAILURE = 1


def default_socket_path(role: str, ifname: str, directory: str | None = None) -> str:
    """`role` is "client" or "server" (the daemon's program name without "wgnat-")."""
    return os.path.join(directory or STATUS_DIR, f"{role}-{ifname}.sock")


# -- building the document (pure) -------------------------------------------


def _t(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ep(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else str(endpoint)


def _first_address(*candidates: Iterable[Any]) -> str | None:
    for networks in candidates:
        for network in networks:
            return str(network.network_address)
    return None


def _device_fields(peer: PeerState | None, now: float) -> dict[str, Any]:
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
        "latest_handshake": _t(handshake),
        "handshake_age": None if handshake is None else _t(max(0.0, now - handshake)),
        "rx_bytes": peer.rx_bytes,
        "tx_bytes": peer.tx_bytes,
        "keepalive": peer.persistent_keepalive,
        "allowed_ips": [str(net) for net in peer.allowed_ips],
    }


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


@dataclass(frozen=True)
class ClientInfo:
    """What the client agent knows beside the mesh, the view and the device."""

    ifname: str
    backend: str
    registry_key: PublicKey
    registry_address: str | None = None
    registry_port: int | None = None
    registry_up: bool | None = None  # None: no answer or error yet
    registry_error: str | None = None
    last_sync: float | None = None
    lan_endpoints: tuple[Endpoint, ...] = ()
    last_probe: Mapping[PublicKey, float] = field(default_factory=dict)


def client_info(agent: Any) -> ClientInfo:
    """Read a MeshAgent's attributes (no I/O)."""
    from wgnat.client.lan import lan_endpoints

    address = getattr(agent, "registry_address", None)
    return ClientInfo(
        ifname=agent.device.ifname,
        backend=getattr(agent.device, "backend", "?"),
        registry_key=agent.config.registry_key,
        registry_address=None if address is None else str(address),
        registry_port=getattr(agent, "registry_port", None),
        registry_up=agent.registry_up,
        registry_error=getattr(agent, "registry_error", None),
        last_sync=getattr(agent, "last_sync", None),
        lan_endpoints=tuple(lan_endpoints(agent.lan, agent.listen_port))
        if agent.listen_port
        else (),
        last_probe=dict(getattr(agent, "last_probe", {})),
    )


def _unplanned_reason(remote: RemotePeer | None, mesh: Mesh | None, key: PublicKey) -> str:
    """Why a peer the registry lists has no path state: the cases plan() skips."""
    if remote is None:
        return "not in the registry's view"
    if remote.session is None:
        return (
            "no wgnat client has announced itself there, so nothing would punch back; "
            "relayed through the registry"
        )
    if remote.endpoint is None:
        return "the registry knows no endpoint for it; relayed through the registry"
    rejected = mesh.rejected_logged.get(key) if mesh is not None else None
    if rejected:
        return f"none of its allowed IPs is accepted ({'; '.join(rejected)}); relayed"
    if not remote.allowed_ips:
        return "it has no allowed IPs at the registry; relayed"
    return "not decided yet (waiting for the next reconciliation)"


def _why(
    peer_path: PeerPath, now: float, last_probe: float | None, settings_removal_grace: float
) -> str:
    path = peer_path.path
    if path is Path.DIRECT:
        why = (
            peer_path.reason
            if peer_path.reason.startswith("kept from before")
            else "handshake completed"
        )
        why += f"; direct for {duration(now - peer_path.since)}"
    elif path is Path.SWITCHING:
        why = (
            f"handshake completed; both ends switch to direct in "
            f"{duration(max(0.0, peer_path.deadline - now))}"
        )
    elif path is Path.PROBING:
        why = (
            f"probing {_ep(peer_path.endpoint) or '?'} ({peer_path.reason}), attempt "
            f"#{peer_path.attempts}: traffic stays relayed until a handshake; gives up in "
            f"{duration(max(0.0, peer_path.deadline - now))}"
        )
    else:
        why = f"{peer_path.reason or 'relayed'}; relayed for {duration(now - peer_path.since)}"
        if last_probe is not None:
            why += f", last direct attempt (#{peer_path.attempts}) {duration(now - last_probe)} ago"
        if peer_path.retry_at > now:
            why += f", retry in {duration(peer_path.retry_at - now)}"
        else:
            why += ", retry when the registry gives a usable endpoint"
    if peer_path.gone_since is not None:
        left = peer_path.gone_since + settings_removal_grace - now
        why = f"gone from the registry, removed in {duration(max(0.0, left))}; {why}"
    return why


def client_status(
    info: ClientInfo,
    mesh: Mesh | None,
    view: RegistryView,
    device: DeviceState | None,
    now: float,
    device_error: str | None = None,
) -> dict[str, Any]:
    """The client's status document: JSON-ready, public keys only."""
    on_device = device.by_key() if device is not None else {}
    own = mesh.my_key if mesh is not None else (device.public_key if device else None)
    paths = mesh.paths if mesh is not None else {}
    managed = mesh.managed if mesh is not None else set()
    keys = (set(paths) | set(view.peers) | set(on_device)) - {info.registry_key, own}
    rows = []
    for key in keys:
        if key is None:
            continue
        remote = view.peers.get(key)
        peer_path = paths.get(key)
        device_peer = on_device.get(key)
        row: dict[str, Any] = {
            "public_key": key.base64,
            "address": _first_address(
                remote.allowed_ips if remote else (),
                device_peer.allowed_ips if device_peer else (),
                peer_path.allowed_ips if peer_path else (),
            ),
            "managed": key in managed,
            "wgnat_client": remote is not None and remote.session is not None,
            "registry_endpoint": _ep(remote.endpoint) if remote else None,
            "lan_endpoints": [str(e) for e in remote.lan_endpoints] if remote else [],
            "in_registry": remote is not None,
            **_device_fields(device_peer, now),
        }
        endpoint = device_peer.endpoint if device_peer is not None else None
        if device_peer is not None and key not in managed and peer_path is None:
            row.update(path="manual", phase="manual", reason="configured by hand")
            row["why"] = f"configured by hand on {info.ifname}: wgnat never changes it"
        elif peer_path is None:
            reason = _unplanned_reason(remote, mesh, key)
            row.update(path="relayed", phase="relayed", reason=reason, why=reason)
            endpoint = endpoint or (remote.endpoint if remote else None)
        else:
            phase = peer_path.path
            row.update(
                path="probing" if phase is Path.SWITCHING else phase.value,
                phase=phase.value,
                reason=peer_path.reason,
                why=_why(
                    peer_path,
                    now,
                    info.last_probe.get(key),
                    mesh.settings.removal_grace if mesh is not None else 30.0,
                ),
                since=_t(peer_path.since),
                attempts=peer_path.attempts,
                last_attempt=_t(info.last_probe.get(key)),
                retry_at=_t(peer_path.retry_at) if phase is Path.RELAYED else None,
                deadline=(
                    _t(peer_path.deadline) if phase in (Path.PROBING, Path.SWITCHING) else None
                ),
                gone_since=_t(peer_path.gone_since),
            )
            endpoint = endpoint or peer_path.endpoint or (remote.endpoint if remote else None)
        row["endpoint"] = _ep(endpoint)
        rows.append(row)
    rows.sort(key=_row_order)
    counts = {"direct": 0, "relayed": 0, "probing": 0, "manual": 0}
    for row in rows:
        counts[row["path"]] += 1
    registry_peer = on_device.get(info.registry_key)
    registry = {
        "public_key": info.registry_key.base64,
        "address": info.registry_address,
        "port": info.registry_port,
        "endpoint": _ep(registry_peer.endpoint) if registry_peer else None,
        "connected": info.registry_up,
        "error": info.registry_error,
        "last_sync": _t(info.last_sync),
        "view_version": view.version,
        "view_epoch": view.epoch,
        **{
            name: value
            for name, value in _device_fields(registry_peer, now).items()
            if name in ("latest_handshake", "handshake_age", "rx_bytes", "tx_bytes")
        },
    }
    return {
        "role": "client",
        "wgnat_version": __version__,
        "interface": info.ifname,
        "backend": info.backend,
        "state": "running" if mesh is not None else "starting",
        "now": _t(now),
        "public_key": own.base64 if own is not None else None,
        "listen_port": device.listen_port if device is not None else None,
        "device_error": device_error,
        "public_endpoint": _ep(view.my_endpoint),
        "lan_endpoints": [str(e) for e in info.lan_endpoints],
        "registry": registry,
        "counts": counts,
        "peers": rows,
    }


def _row_order(row: Mapping[str, Any]) -> tuple[Any, ...]:
    address = row.get("address")
    if address is None:
        return (2, "", row["public_key"])
    import ipaddress

    parsed = ipaddress.ip_address(address)
    return (parsed.version, parsed.packed, row["public_key"])


def registry_status(
    model: RegistryModel,
    *,
    ifname: str,
    backend: str,
    device: DeviceState | None,
    now: float,
    waiting: int = 0,
    device_error: str | None = None,
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
                "address": _first_address(peer.allowed_ips),
                "endpoint": _ep(peer.endpoint),
                "live": live,
                "why": why,
                "wgnat_client": announcement is not None,
                "lan_endpoints": (
                    [str(e) for e in announcement.lan_endpoints] if announcement else []
                ),
                **_device_fields(peer, now),
            }
        )
    rows.sort(key=_row_order)
    return {
        "role": "registry",
        "wgnat_version": __version__,
        "interface": ifname,
        "backend": backend,
        "now": _t(now),
        "public_key": device.public_key.base64 if device and device.public_key else None,
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


# -- the table ------------------------------------------------------------


def _peer_name(row: Mapping[str, Any]) -> str:
    short = str(row["public_key"])[:8]
    return f"{row['address']} ({short})" if row.get("address") else short


def _ago(age: float | None, never: str = "never") -> str:
    return never if age is None else f"{duration(age)} ago"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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
    lines.append(f"  seen by the registry as {seen}; LAN endpoints announced: {lan}")
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
    if status.get("device_error"):
        lines.append(f"  cannot read {status['interface']}: {status['device_error']}")
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
            _table(
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


def _age(now: float, when: float | None) -> float | None:
    return None if when is None else max(0.0, now - when)


def format_registry(status: Mapping[str, Any]) -> str:
    lines = [
        f"wgnat-server on {status['interface']} ({status['backend']}): public key "
        f"{status.get('public_key') or '?'}, listening on port "
        f"{status.get('listen_port') or '?'}",
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
            _table(
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


# -- asking a daemon -------------------------------------------------------


class StatusError(Exception):
    """Why `wgnat status` got no status: one line for the user."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_status(
    path: str, *, who: str = "wgnat daemon", timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """GET the status document from the socket at `path`; StatusError on failure."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", "/status", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except FileNotFoundError:
        raise StatusError(f"no {who} is running (no {path})") from None
    except PermissionError:
        raise StatusError(
            f"permission denied on {path}: the status socket is only for the daemon's "
            "user (root); try: sudo wgnat status"
        ) from None
    except ConnectionRefusedError:
        raise StatusError(
            f"no {who} is running ({path} is left over: nothing answers on it)"
        ) from None
    except TimeoutError:
        raise StatusError(f"{who} did not answer on {path} within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise StatusError(f"cannot ask {who} on {path}: {reason}") from None
    finally:
        connection.close()
    if response.status != 200:
        text = body.decode("utf-8", "replace").strip()[:200]
        raise StatusError(f"{who} answered HTTP {response.status} on {path}: {text}")
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("role") not in ("client", "registry"):
        raise StatusError(f"unexpected answer on {path}: not a wgnat status document")
    return document


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgnat", description="Ask a running wgnat daemon what it is doing."
    )
    parser.add_argument("--version", action="version", version=f"wgnat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="peers, paths and why (like 'wg show')",
        description=(
            "Show the peers of a running wgnat-client (path, endpoint, handshake, "
            "traffic and why the path is what it is), or with --server every peer a "
            "wgnat-server sees."
        ),
    )
    status.add_argument(
        "-i", "--interface", default="wg0", help="the daemon's WireGuard interface (wg0)"
    )
    status.add_argument(
        "--server", action="store_true", help="ask the wgnat-server (registry) instead"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's status socket (default {STATUS_DIR}/client-IFACE.sock, "
        f"or {STATUS_DIR}/server-IFACE.sock with --server)",
    )
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=argparse.SUPPRESS)
    return parser


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    ifname = args.interface
    role = "server" if args.server else "client"
    program = f"wgnat-{role}"
    if "/" in ifname or not ifname or len(ifname) > 15:
        print(f"wgnat status: error: {ifname!r} is not an interface name", file=err)
        return EXIT_FAILURE
    path = args.socket or default_socket_path(role, ifname)
    who = program if args.socket else f"{program} for {ifname}"
    try:
        document = fetch_status(path, who=who, timeout=args.timeout)
    except StatusError as exc:
        message = str(exc)
        other = default_socket_path("client" if args.server else "server", ifname)
        if not args.socket and "is running" in message and os.path.exists(other):
            flag = "without --server" if args.server else "--server"
            kind = "wgnat-client" if args.server else "wgnat-server"
            message += f"; a {kind} runs on {ifname}: try {flag}"
        print(f"wgnat status: error: {message}", file=err)
        return EXIT_FAILURE
    if args.json:
        out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        out.write(format_status(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
