"""The client's status document (`wgnat status`): what the agent's mesh, its
copy of the registry's view and a device snapshot say of every peer, and why
each path is what it is.  `client_status` is pure; `status_provider` reads the
device and builds it for the status socket.

Only public keys appear: the device layer never hands out a private or preshared
key, so none can reach this document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from wgnat import __version__
from wgnat._types import DeviceState, Endpoint, PublicKey
from wgnat.client.agent import MeshAgent
from wgnat.client.candidates import Candidate, describe_choice
from wgnat.client.lan import lan_endpoints
from wgnat.client.reconcile import Mesh, Path, PeerPath, Settings
from wgnat.client.view import RegistryView
from wgnat.formatting import (
    device_fields,
    duration,
    endpoint_text,
    first_address,
    row_order,
    timestamp,
)
from wgnat.wire import RemotePeer


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
    down_since: float | None = None  # without the registry since (None: connected)
    lan_endpoints: tuple[Endpoint, ...] = ()
    ipv6_endpoints: tuple[Endpoint, ...] = ()
    state_error: str | None = None  # the last state file write's, until one works
    # The peers whose last device operation failed, and how (until one works).
    operation_errors: dict[PublicKey, str] = field(default_factory=dict)
    # Several registries (several -r): each hub, as `hub_rows` describes it,
    # and whether they see this host behind a symmetric NAT.
    hubs: tuple[dict[str, Any], ...] = ()
    symmetric_nat: bool = False
    # PortMapper.describe()'s document; None with --no-port-mapping.
    port_mapping: dict[str, Any] | None = None


def hub_rows(agent: MeshAgent) -> tuple[dict[str, Any], ...]:
    """Each registry of a client given several -r: its link, how it sees this
    host, and whether it relays (no I/O)."""
    if agent.hubs is None:
        return ()
    now = agent.reactor.seconds()
    choice = {row["public_key"]: row for row in agent.hubs.snapshot(now)}
    rows = []
    for index, key in enumerate(agent.config.registry_keys):
        follower = agent.followers[index] if index < len(agent.followers) else None
        view = agent.hub_views[index]
        address, port = agent.hub_endpoints[index]
        rows.append(
            {
                "public_key": key.base64,
                "address": str(address),
                "port": port,
                "connected": follower.up if follower is not None else None,
                "error": follower.error if follower is not None else None,
                "last_sync": timestamp(follower.last_sync if follower is not None else None),
                "view_version": view.version,
                "sees_us_as": endpoint_text(view.my_endpoint),
                **choice.get(key.base64, {}),
            }
        )
    return tuple(rows)


def client_info(agent: MeshAgent) -> ClientInfo:
    """Read a MeshAgent's state (no I/O)."""
    follower = agent.follower
    announced = follower.announced if follower is not None else None
    return ClientInfo(
        ifname=agent.device.ifname,
        backend=agent.device.backend,
        registry_key=agent.config.registry_key,
        registry_address=None if agent.registry_address is None else str(agent.registry_address),
        registry_port=agent.registry_port,
        registry_up=follower.up if follower is not None else None,
        registry_error=follower.error if follower is not None else None,
        last_sync=follower.last_sync if follower is not None else None,
        down_since=follower.down_since if follower is not None else None,
        state_error=agent.state_error,
        operation_errors=dict(agent.operation_errors),
        hubs=hub_rows(agent),
        symmetric_nat=agent.symmetric_nat,
        port_mapping=(
            {
                **agent.port_mapper.describe(agent.reactor.seconds()),
                "announced": agent.mapped_endpoint() is not None,
            }
            if agent.port_mapper is not None
            else None
        ),
        lan_endpoints=(
            announced.lan_endpoints
            if announced is not None
            else tuple(lan_endpoints(agent.lan, agent.listen_port))
        ),
        ipv6_endpoints=announced.ipv6_endpoints if announced is not None else (),
    )


def _unplanned(remote: RemotePeer | None, mesh: Mesh | None, key: PublicKey) -> str:
    """Why a peer the registry lists has no path: what plan() recorded."""
    if remote is None:
        return "not in the registry's view"
    recorded = mesh.unplanned.get(key) if mesh is not None else None
    return recorded or "not decided yet (waiting for the next reconciliation)"


def _aim(peer_path: PeerPath) -> str:
    """What a probe aims at: its candidate's kind and endpoint when known."""
    chosen = peer_path.candidate
    if chosen is not None and chosen.endpoint == peer_path.endpoint:
        return str(chosen)
    return endpoint_text(peer_path.endpoint) or "?"


def _candidate(candidate: Candidate | None) -> dict[str, str] | None:
    if candidate is None:
        return None
    return {
        "kind": candidate.kind,
        "endpoint": str(candidate.endpoint),
        "reason": candidate.reason,
    }


def _why(peer_path: PeerPath, now: float, removal_grace: float) -> str:
    """A path's state in a sentence: how it got there, since when, what next."""
    last_probe = peer_path.probed_at
    path = peer_path.path
    if path is Path.DIRECT:
        why = (
            peer_path.reason
            if peer_path.reason.startswith("kept from before")
            else "handshake completed"
        )
        why += f"; direct for {duration(now - peer_path.since)}"
        chosen = peer_path.candidate
        if chosen is not None:
            # The observed endpoint is the usual case: its kind says enough.
            why += f"; over {chosen if chosen.kind == 'observed' else describe_choice(chosen)}"
    elif path is Path.SWITCHING:
        why = (
            f"handshake completed; both ends switch to direct in "
            f"{duration(max(0.0, peer_path.deadline - now))}"
        )
    elif path is Path.PROBING:
        why = (
            f"probing {_aim(peer_path)} ({peer_path.reason}), attempt "
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
        left = peer_path.gone_since + removal_grace - now
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
    hub_keys = {PublicKey.from_base64(hub["public_key"]) for hub in info.hubs}
    keys = (set(paths) | set(view.peers) | set(on_device)) - {info.registry_key, own} - hub_keys
    rows = []
    for key in keys:
        if key is None:
            continue
        remote = view.peers.get(key)
        peer_path = paths.get(key)
        device_peer = on_device.get(key)
        row: dict[str, Any] = {
            "public_key": key.base64,
            "address": first_address(
                remote.allowed_ips if remote else (),
                device_peer.allowed_ips if device_peer else (),
                peer_path.allowed_ips if peer_path else (),
            ),
            "managed": key in managed,
            "wgnat_client": remote is not None and remote.session is not None,
            "registry_endpoint": endpoint_text(remote.endpoint) if remote else None,
            "lan_endpoints": [str(e) for e in remote.lan_endpoints] if remote else [],
            "ipv6_endpoints": [str(e) for e in remote.ipv6_endpoints] if remote else [],
            "mapped_endpoint": endpoint_text(remote.mapped_endpoint) if remote else None,
            "in_registry": remote is not None,
            **device_fields(device_peer, now),
        }
        endpoint = device_peer.endpoint if device_peer is not None else None
        if device_peer is not None and key not in managed and peer_path is None:
            row.update(path="manual", phase="manual", reason="configured by hand")
            row["why"] = f"configured by hand on {info.ifname}: wgnat never changes it"
        elif peer_path is None:
            reason = _unplanned(remote, mesh, key)
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
                    mesh.settings.removal_grace if mesh is not None else Settings().removal_grace,
                ),
                since=timestamp(peer_path.since),
                attempts=peer_path.attempts,
                last_attempt=timestamp(peer_path.probed_at),
                retry_at=timestamp(peer_path.retry_at) if phase is Path.RELAYED else None,
                deadline=(
                    timestamp(peer_path.deadline)
                    if phase in (Path.PROBING, Path.SWITCHING)
                    else None
                ),
                gone_since=timestamp(peer_path.gone_since),
                # The endpoint tried or used now, its kind and why it is on the
                # list (candidates.py); every candidate, best first.
                candidate=_candidate(peer_path.candidate),
                candidates=[_candidate(c) for c in peer_path.candidates],
            )
            endpoint = endpoint or peer_path.endpoint or (remote.endpoint if remote else None)
        row["endpoint"] = endpoint_text(endpoint)
        if info.hubs and row["path"] in ("relayed", "probing"):
            # Several hubs: which one carries this peer's traffic now.
            row["relay_hub"] = next(
                (hub["public_key"] for hub in info.hubs if hub.get("relays")), None
            )
        failed = info.operation_errors.get(key)
        row["device_operation_error"] = failed
        if failed:
            row["why"] = f"device operation failed ({failed}); {row['why']}"
        rows.append(row)
    rows.sort(key=row_order)
    counts = {"direct": 0, "relayed": 0, "probing": 0, "manual": 0}
    for row in rows:
        counts[row["path"]] += 1
    registry_peer = on_device.get(info.registry_key)
    registry = {
        "public_key": info.registry_key.base64,
        "address": info.registry_address,
        "port": info.registry_port,
        "endpoint": endpoint_text(registry_peer.endpoint) if registry_peer else None,
        "connected": info.registry_up,
        "error": info.registry_error,
        "last_sync": timestamp(info.last_sync),
        "down_since": timestamp(info.down_since),
        "view_version": view.version,
        "view_epoch": view.epoch,
        **{
            name: value
            for name, value in device_fields(registry_peer, now).items()
            if name in ("latest_handshake", "handshake_age", "rx_bytes", "tx_bytes")
        },
    }
    several: dict[str, Any] = {}
    if info.hubs:
        relay = next((hub for hub in info.hubs if hub.get("relays")), None)
        several = {
            "hubs": list(info.hubs),
            "relay_hub": relay["public_key"] if relay is not None else None,
            "symmetric_nat": info.symmetric_nat,
        }
    return {
        "role": "client",
        "wgnat_version": __version__,
        "interface": info.ifname,
        "backend": info.backend,
        "state": "running" if mesh is not None else "starting",
        "now": timestamp(now),
        "public_key": own.base64 if own is not None else None,
        "listen_port": device.listen_port if device is not None else None,
        "device_error": device_error,
        "state_error": info.state_error,
        "public_endpoint": endpoint_text(view.my_endpoint),
        "lan_endpoints": [str(e) for e in info.lan_endpoints],
        "ipv6_endpoints": [str(e) for e in info.ipv6_endpoints],
        "port_mapping": info.port_mapping or {"state": "disabled (--no-port-mapping)"},
        "registry": registry,
        "counts": counts,
        "peers": rows,
        **several,
    }


def status_provider(agent: MeshAgent) -> Deferred[dict[str, Any]]:
    """Read the device, then describe the agent's mesh."""

    def build(state: DeviceState | None, error: str | None = None) -> dict[str, Any]:
        return client_status(
            client_info(agent),
            agent.mesh,
            agent.view,
            state,
            agent.reactor.seconds(),
            device_error=error,
        )

    def unreadable(failure: Failure) -> dict[str, Any]:
        return build(None, failure.getErrorMessage())

    return agent.device.read().addCallbacks(build, unreadable)
