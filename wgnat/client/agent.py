"""The client daemon's moving parts around the pure decisions in reconcile.py:
reading the device, feeding what it and the registry say into the Mesh, and
carrying out the actions the Mesh returns (device operations, the state file,
logs and metrics).  The agent decides nothing itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import (
    Deferred,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgnat._types import (
    Announcement,
    DeviceState,
    Endpoint,
    IPAddress,
    IPInterface,
    IPNetwork,
    PublicKey,
    peer_label,
)
from wgnat.client.follower import RegistryConnection, RegistryFollower
from wgnat.client.hubs import HubChoice, HubSettings
from wgnat.client.lan import ipv6_endpoints, lan_endpoints
from wgnat.client.merge import HubView, SymmetricVerdict, merge_views, symmetric_nat
from wgnat.client.metrics import ClientMetrics
from wgnat.client.portmap import PortMapper, PortMapping
from wgnat.client.reconcile import (
    Action,
    Event,
    Mesh,
    Path,
    Policy,
    Settings,
    registry_address_of,
)
from wgnat.client.registry_client import RegistryClient
from wgnat.client.state_file import CorruptStateFile
from wgnat.client.traffic import TrafficLedger
from wgnat.client.view import RegistryView
from wgnat.daemon import StartupError, report_startup_failure
from wgnat.device import Device, DeviceError
from wgnat.timing import cancel

log = Logger(namespace="wgnat.client")

# A device that cannot be read (its interface deleted, say) is tried this often.
READ_RETRY_SECONDS = 1.0
# Several registries: the first plan waits this long at most for every one of
# them to answer, so that it knows whether they see a symmetric NAT here before
# it probes anyone (the streams answer within milliseconds when they can).
FIRST_ANSWERS_WAIT = 2.0


class StateStore(Protocol):
    """Where the managed keys are kept across restarts (client.state_file).
    `load` raises CorruptStateFile when what it holds is lost; `save` raises
    OSError when it cannot write."""

    def load(self) -> set[PublicKey]: ...

    def save(self, managed: set[PublicKey]) -> None: ...


ConnectionFactory = Callable[[IReactorTime, IPAddress, int], RegistryConnection]
# This host's addresses but the WireGuard link's (client.lan, in a thread).
LanLookup = Callable[[str], Deferred[list[IPInterface]]]


@dataclass
class AgentConfig:
    registry_key: PublicKey
    # Further registries (-r given again): followed at once, views merged
    # (client.merge), the relay on one live hub at a time (client.hubs).
    more_registries: tuple[PublicKey, ...] = ()
    registry_address: IPAddress | None = None  # None: derived from the registry peer
    registry_port: int | None = None  # None: the registry endpoint's port
    accept_routes: tuple[IPNetwork, ...] = ()
    resync_interval: float = 60.0
    settings: Settings = field(default_factory=Settings)

    @property
    def registry_keys(self) -> tuple[PublicKey, ...]:
        return (self.registry_key, *self.more_registries)


class MeshAgent(service.Service):
    failed = False

    def __init__(
        self,
        device: Device,
        reactor: IReactorTime,
        config: AgentConfig,
        metrics: ClientMetrics | None = None,
        lan_addresses: LanLookup | None = None,
        client_factory: ConnectionFactory = RegistryClient,
        state_store: StateStore | None = None,
        wall: Callable[[], float] = time.time,
        port_mapper: PortMapper | None = None,
    ) -> None:
        self.device = device
        self.reactor = reactor
        self.config = config
        self.metrics = metrics or ClientMetrics()
        self._lan_addresses = lan_addresses
        self._client_factory = client_factory
        self.state_store = state_store
        # None: --no-port-mapping.  Started after the registry is first asked.
        self.port_mapper = port_mapper
        self._mapping_withheld: Endpoint | None = None  # said once: not announced, why
        self.wall = wall  # the wall clock, for the retry moments both ends share
        # One view per registry, and the view the mesh plans from: with one
        # registry, that registry's view itself (client.merge).
        self.hub_views = [HubView(clock=lambda: reactor.seconds()) for _ in config.registry_keys]
        self.view: RegistryView = merge_views(self.hub_views, [None] * len(self.hub_views))
        self.mesh: Mesh | None = None
        # Bytes by path, from every device read the reconciliation makes (in order).
        self.traffic = TrafficLedger(config.registry_key, frozenset(config.more_registries))
        self.follower: RegistryFollower | None = None  # the first registry's
        self.followers: list[RegistryFollower] = []  # every registry's, in -r order
        # Several registries: which hub relays (None with one registry).
        self.hubs: HubChoice | None = None
        self.hub_endpoints: list[tuple[IPAddress, int]] = []
        self.symmetric_nat = False  # self.symmetric's verdict, as announced
        self.symmetric = SymmetricVerdict()
        self._first_answers_by: float | None = None  # several registries: see above
        self._merged_up: list[bool | None] = []  # the followers' state at the last merge
        self.registry_address: IPAddress | None = None
        self.registry_port: int | None = None
        self.lan: list[IPInterface] = []
        self.listen_port = 0
        self.read_error: str | None = None  # the last device read's, until one works
        self.state_error: str | None = None  # the last state file write's, until one works
        # What the state file holds, as last read or written (None: unknown, so
        # the next plan writes it).
        self._written: set[PublicKey] | None = None
        # Peers whose last device operation failed (`wgnat status`: degraded).
        self.operation_errors: dict[PublicKey, str] = {}
        self.session = os.urandom(8).hex()  # new at every start: peers re-probe us at once
        self.ready: Deferred[None] = Deferred()
        self._wakeup: IDelayedCall | None = None
        self._reconciling = False
        self._again = False
        self._planned = False  # set once a plan ran: the health timer runs from then

    # -- start and stop ---------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.ready = self._start()
        self.ready.addErrback(self._fatal)

    def _fatal(self, failure: Failure) -> None:
        self.failed = True
        report_startup_failure("wgnat-client", failure, self.reactor)

    @inlineCallbacks
    def _start(self) -> Generator[Deferred[Any], Any, Any]:
        config = self.config
        state = yield self.device.read()
        registry = state.peer(config.registry_key)
        if registry is None:
            raise StartupError(
                f"the registry peer {config.registry_key} is not configured on "
                f"{self.device.ifname}; check -r (the registry's public key, as 'wg show' "
                "prints it)"
            )
        address = config.registry_address or registry_address_of(registry)
        port = config.registry_port or (registry.endpoint.port if registry.endpoint else None)
        if port is None:
            raise StartupError(
                "the registry peer has no endpoint, so its port is unknown; pass --registry-port"
            )
        if not registry.persistent_keepalive:
            log.warn(
                "the registry peer has no persistent keepalive: without it the NAT "
                "mapping that other peers punch through closes; set it to 25 s"
            )
        more = [self._hub_endpoint(state, key) for key in config.more_registries]
        addresses = yield self.device.addresses()
        tunnel = [a for a in addresses if not a.ip.is_link_local]
        if not tunnel:
            raise StartupError(f"interface {self.device.ifname} has no tunnel address")
        self.listen_port = state.listen_port
        self.traffic.observe(state)
        self.lan = yield self._find_lan()
        policy = Policy(
            tunnel_networks=tuple(a.network for a in tunnel),
            registry_address=address,
            own_addresses=tuple(a.ip for a in tunnel),
            accept_routes=config.accept_routes,
            hub_addresses=tuple(hub for hub, _ in more),
        )
        mesh = Mesh(
            state.public_key,
            config.registry_key,
            policy,
            config.settings,
            lan_networks=tuple(a.network for a in self.lan),
            other_hubs=frozenset(config.more_registries),
        )
        remembered: set[PublicKey] | None = None
        if self.state_store is not None:
            try:
                remembered = self.state_store.load()
            except CorruptStateFile as exc:
                log.error("{error}", error=str(exc))
                remembered = set()
                mesh.recovering = True  # at the first plan, once the registry answered
            else:
                self._written = set(remembered)
        # A key dropped here (its peer is gone) is written out at the first plan:
        # until then the file lists a peer that no longer exists, which is harmless.
        mesh.adopt(state, self.reactor.seconds(), remembered)
        self.mesh = mesh
        self.registry_address, self.registry_port = address, port
        self.metrics.watch(mesh.counts)
        self.metrics.watch_traffic(self.traffic, self.device.ifname, self.path_names)
        if self.port_mapper is not None:
            mapper = self.port_mapper
            self.metrics.watch_port_mapping(lambda: mapper.describe(self.reactor.seconds()))
        self.metrics.registry_connected.set(0)
        log.info(
            "wgnat-client on {ifname} ({backend}): registry {registry} at {address}:{port}, "
            "{kept} managed peers kept, LAN {lan}",
            ifname=self.device.ifname,
            backend=self.device.backend,
            registry=config.registry_key.short,
            address=address,
            port=port,
            kept=len(mesh.paths),
            lan=", ".join(str(a.ip) for a in self.lan) or "none",
        )
        self.hub_endpoints = [(address, port), *more]
        if more:
            self.hubs = HubChoice.start(
                list(
                    zip(config.registry_keys, (hub for hub, _ in self.hub_endpoints), strict=True)
                ),
                state,
                self.reactor.seconds(),
                HubSettings(keepalive=registry.persistent_keepalive or 25),
            )
            self.metrics.watch_hubs(self.hub_metrics, lambda: self.symmetric_nat)
            log.info(
                "several registries: {hubs}; relaying through {relay}",
                hubs=", ".join(
                    f"{key.short} at {hub}:{hub_port}"
                    for key, (hub, hub_port) in zip(
                        config.registry_keys, self.hub_endpoints, strict=True
                    )
                ),
                relay=self.hubs.relay.short if self.hubs.relay else "no hub (no relay routes)",
            )
        for index, (hub, hub_port) in enumerate(self.hub_endpoints):
            follower = RegistryFollower(
                self._client_factory(self.reactor, hub, hub_port),
                self.reactor,
                self.hub_views[index],
                self._announcement,
                self._view_changed,
                # The first registry's connection is the one the registry
                # metrics describe (as with one -r); every hub's is in the
                # wgnat_client_hub_* metrics.
                self.metrics if index == 0 else ClientMetrics(),
                config.resync_interval,
            )
            self.followers.append(follower)
        self.follower = self.followers[0]
        if more:
            self._first_answers_by = self.reactor.seconds() + FIRST_ANSWERS_WAIT
        for follower in self.followers:
            follower.start()
        # In the background, after the registry's first contact has begun:
        # the gateway may take seconds to answer, or never.
        if self.port_mapper is not None:
            self.port_mapper.on_change = self._mapping_changed
            self.port_mapper.start(self.listen_port)

    def _hub_endpoint(self, state: DeviceState, key: PublicKey) -> tuple[IPAddress, int]:
        """A further registry's tunnel address (from its peer's allowed IPs)
        and API port (--registry-port, else its endpoint's)."""
        peer = state.peer(key)
        if peer is None:
            raise StartupError(
                f"the registry peer {key} is not configured on {self.device.ifname}; "
                "check -r (each registry's public key, as 'wg show' prints it)"
            )
        hosts = [net.network_address for net in peer.allowed_ips if net.num_addresses == 1]
        if not hosts:
            raise StartupError(
                f"the registry peer {key.short} has no single-address allowed IP, so its "
                "tunnel address is unknown; give every hub its own address as an allowed IP "
                "(AllowedIPs = <hub address>/32, the tunnel network on one hub only)"
            )
        port = self.config.registry_port or (peer.endpoint.port if peer.endpoint else None)
        if port is None:
            raise StartupError(
                f"the registry peer {key.short} has no endpoint, so its port is unknown; "
                "pass --registry-port"
            )
        if not peer.persistent_keepalive:
            log.warn(
                "the registry peer {key} has no persistent keepalive: set it to 25 s",
                key=key.short,
            )
        return hosts[0], port

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        cancel(self._wakeup)
        stopping: list[Deferred[Any]] = []
        if self.port_mapper is not None:
            stopping.append(self.port_mapper.stop())
        stopping.extend(follower.stop() for follower in self.followers)
        return gatherResults(stopping) if stopping else succeed(None)

    # -- what the registry says -------------------------------------------
    def _find_lan(self) -> Deferred[list[IPInterface]]:
        if self._lan_addresses is None:
            return succeed([])
        return maybeDeferred(self._lan_addresses, self.device.ifname)

    def _announcement(self) -> Deferred[Announcement]:
        def announce(lan: list[IPInterface]) -> Announcement:
            self.lan = lan
            ipv6 = tuple(ipv6_endpoints(lan, self.listen_port)) if self.config.settings.ipv6 else ()
            mapped = self.mapped_endpoint()
            mesh = self.mesh
            if mesh is not None and (mesh.my_ipv6_endpoints, mesh.my_mapped_endpoint) != (
                ipv6,
                mapped,
            ):
                # Our own IPv6 endpoints and mapped port decide which candidates
                # each peer has: a path over an address that went away is left at
                # once, and a peer behind a symmetric NAT is worth a probe only
                # while it can reach our mapped port.
                mesh.my_ipv6_endpoints = ipv6
                mesh.my_mapped_endpoint = mapped
                if self._planned:
                    self.reconcile_soon()
            return Announcement(
                self.session,
                tuple(lan_endpoints(lan, self.listen_port)),
                symmetric_nat=self.symmetric_nat,
                mapped_endpoint=mapped,
                ipv6_endpoints=ipv6,
                punch_first=self.config.settings.punch_first,
            )

        return self._find_lan().addCallback(announce)

    def mapped_endpoint(self) -> Endpoint | None:
        """The port mapping's external endpoint, to announce: only once the
        registry has seen this host at that address.  A gateway behind another
        NAT (a carrier's) maps an address no peer can reach, and peers would
        try it before the endpoint the registry observes."""
        mapping = self.port_mapper.mapping if self.port_mapper is not None else None
        mine = self.view.my_endpoint
        if mapping is None or mine is None:
            return None
        if mine.host != mapping.external.host:
            if self._mapping_withheld != mapping.external:
                self._mapping_withheld = mapping.external
                log.warn(
                    "port mapping {external} not announced: the registry sees this host at "
                    "{public}, so another NAT lies beyond the gateway",
                    external=mapping.external,
                    public=mine.host,
                )
            return None
        return mapping.external

    def _mapping_changed(self, mapping: PortMapping | None) -> None:
        if self.running:
            for follower in self.followers:
                follower.announcement_changed()

    def _view_changed(self, changed: bool, full: bool) -> None:
        # An unchanged full answer (the -t safety net, a reconnection) needs no
        # new plan: the health check reads the device on its own timer.  Only
        # the first answer must start that timer.
        if len(self.hub_views) > 1:
            self._merge()
        if changed or (full and not self._planned):
            self.reconcile_soon()
        if self.port_mapper is not None:
            mapped = self.mapped_endpoint()
            for follower in self.followers:
                announced = follower.announced.mapped_endpoint if follower.announced else None
                # A registry that refuses the field never gets it: not a change.
                if announced != mapped and not follower.plain_announcements:
                    follower.announcement_changed()  # our public address is known (or moved)

    def _waiting_for_answers(self) -> bool:
        """Several registries, before the first plan: some has not answered
        yet, and FIRST_ANSWERS_WAIT has not passed."""
        if self._first_answers_by is None or self._planned:
            return False
        if all(view.version is not None for view in self.hub_views):
            return False
        return self.reactor.seconds() < self._first_answers_by

    def _merge(self, changed: bool = True) -> None:
        """Several registries: the mesh's view from theirs, and whether they
        see this host behind a symmetric NAT.  `changed=False` (the reconcile
        loop's pass): merged again only if a registry came or went since, as a
        merge costs O(peers x hubs) (44 ms at 10,000 peers and two hubs) and
        the loop runs every 50 ms while a pair is probing."""
        up = [follower.up for follower in self.followers]
        if changed or up != self._merged_up:
            self.view = merge_views(self.hub_views, up)
            self._merged_up = up
        # Only registries followed now: a view kept from one we cannot reach
        # holds our endpoint as it was.
        proven = symmetric_nat(
            [
                view.my_endpoint
                for view, follower in zip(self.hub_views, self.followers, strict=False)
                if follower.up
            ]
        )
        if self.symmetric.update(proven, self.reactor.seconds(), starting=not self._planned):
            symmetric = self.symmetric_nat = self.symmetric.symmetric
            if self.mesh is not None:
                self.mesh.symmetric_nat = symmetric
            for follower in self.followers:
                follower.resync()  # re-announces this host (the flag changed)
            seen = ", ".join(
                f"{key.short} sees {view.my_endpoint}"
                for key, view in zip(self.config.registry_keys, self.hub_views, strict=True)
                if view.my_endpoint is not None
            )
            if symmetric:
                log.warn(
                    "this host is behind a symmetric NAT (a port per destination: {seen}): "
                    "pairs with peers behind one too stay relayed from the start",
                    seen=seen,
                )
            else:
                log.info(
                    "no symmetric NAT any more: the registries have agreed for {seconds:.0f} s "
                    "({seen})",
                    seconds=self.symmetric.clear_after,
                    seen=seen,
                )

    # -- reconciling the device ------------------------------------------
    def reconcile_soon(self) -> None:
        if self._reconciling:
            self._again = True
            return
        cancel(self._wakeup)
        self._wakeup = None
        self._reconcile()

    @inlineCallbacks
    def _reconcile(self) -> Generator[Deferred[Any], Any, Any]:
        mesh = self.mesh
        assert mesh is not None
        self._reconciling = True
        try:
            while True:
                self._again = False
                if self.view.version is None or self._waiting_for_answers():
                    break  # nothing is decided before the registry's first answer
                yield self._apply_all(mesh.promote_due(self.reactor.seconds()))
                try:
                    state = yield self.device.read()
                except DeviceError as exc:
                    self._read_failed(str(exc))
                    break
                self._read_works()
                self.traffic.observe(state)
                if self.hubs is not None:
                    self._merge(changed=False)
                    yield self._choose_hub(state)
                if not self._planned and len(self.hub_views) > 1:
                    log.info(
                        "first plan, {answered} of {total} registries answered",
                        answered=sum(view.version is not None for view in self.hub_views),
                        total=len(self.hub_views),
                    )
                # A peer that punches first learns of us once a registry has
                # our announcement: answering it waits for that.
                mesh.announced = any(f.announced is not None for f in self.followers)
                actions = mesh.plan(self.view, state, self.reactor.seconds(), self.wall())
                self._planned = True
                yield self._apply_all(actions)
                if not self._again:
                    break
        except Exception:
            # A bug must not stop the timers: log it, keep the mesh, try again later.
            log.failure("unexpected error while reconciling {ifname}", ifname=self.device.ifname)
        finally:
            self._reconciling = False
        if self.running:
            self._schedule(mesh)

    def _schedule(self, mesh: Mesh) -> None:
        now = self.reactor.seconds()
        delay = (
            max(0.0, mesh.next_wakeup(now) - now)
            if self.view.version is not None
            else self.config.settings.health_interval
        )
        if self._waiting_for_answers():
            assert self._first_answers_by is not None
            delay = max(0.0, self._first_answers_by - now)
        if self.hubs is not None and self.view.version is not None:
            check = self.hubs.next_check(now)
            if check is not None:
                delay = min(delay, max(0.0, check - now))
        if self.read_error is not None:
            # The plan's moments (a probe's 50 ms poll) assume a device to
            # read: without one, try again every second, not in a busy loop.
            delay = max(delay, READ_RETRY_SECONDS)
        self._wakeup = self.reactor.callLater(delay, self.reconcile_soon)

    def _read_failed(self, error: str) -> None:
        self.metrics.device_errors.labels(operation="read").inc()
        if error != self.read_error:  # once, not once a retry
            log.error(
                "cannot read {ifname}: {error}; keeping the mesh as it is and retrying "
                "every {retry:g} s",
                ifname=self.device.ifname,
                error=error,
                retry=READ_RETRY_SECONDS,
            )
        self.read_error = error

    def _read_works(self) -> None:
        if self.read_error is not None:
            log.info("reading {ifname} works again", ifname=self.device.ifname)
            self.read_error = None

    # -- which hub relays (several registries) ------------------------------
    @inlineCallbacks
    def _choose_hub(self, state: DeviceState) -> Generator[Deferred[Any], Any, Any]:
        assert self.hubs is not None
        heard = {
            key: follower.last_sync
            for key, follower in zip(self.config.registry_keys, self.followers, strict=True)
        }
        move = self.hubs.observe(state, self.reactor.seconds(), heard)
        if move is None:
            return
        log.warn("{reason}", reason=move.reason)
        if self.metrics.hub_moves is not None:
            self.metrics.hub_moves.inc()
        try:
            for update in move.updates():
                yield self.device.set_peer(update)
        except DeviceError as exc:
            self.metrics.device_errors.labels(operation="relay").inc()
            log.error("moving the relay routes failed: {error}", error=str(exc))

    def hub_metrics(self) -> list[tuple[str, bool, bool]]:
        """Each hub's (short key, followed now, relays) for the metrics."""
        relay = self.hubs.relay if self.hubs is not None else None
        return [
            (key.short, follower.up is True, key == relay)
            for key, follower in zip(self.config.registry_keys, self.followers, strict=True)
        ]

    # -- carrying out what the mesh decided ---------------------------------
    @inlineCallbacks
    def _apply_all(self, actions: list[Action]) -> Generator[Deferred[Any], Any, Any]:
        mesh = self.mesh
        assert mesh is not None
        # The state file is written once a batch, not once a peer (each write
        # holds every key and ends with two fsyncs), and always before the
        # device changes: the keys of the peers about to be created are written
        # before any is created, and if that write fails none of them is (their
        # probes are dropped, the mesh relays them and the next plan tries
        # again).  Whatever else is in the batch goes ahead: it concerns peers
        # the file already lists.  A file behind the mesh (a failed write, keys
        # dropped at the start) is written again here, at every plan.
        pending = mesh.take_unsaved()
        if self.state_store is None:
            mesh.saved(pending)
        elif mesh.recovering:
            # The lost file stays where it is until the first plan has taken our
            # peers back: an empty file written now, and a crash, would leave
            # them to a restart that sees a good file listing none of them.
            pass
        elif pending or self._written != mesh.managed:
            if self._write_state(mesh.managed | pending):
                mesh.saved(pending)
            elif pending:
                mesh.not_saved(pending, self.reactor.seconds(), self.state_error or "")
                actions = [action for action in actions if action.public_key not in pending]
        self._record(mesh.take_events())
        if not actions:
            return
        removed: set[PublicKey] = set()
        for action in actions:
            done = yield self._apply(action)
            if action.kind == "probe":
                removed.discard(action.public_key)
            elif action.kind == "remove" and done:
                removed.add(action.public_key)
        if removed & mesh.managed:
            mesh.forget(removed)
            # A failure here leaves keys of peers already gone in the file
            # (dropped at the next start): retried at the next plan.
            self._write_state(mesh.managed)

    @inlineCallbacks
    def _apply(self, action: Action) -> Generator[Deferred[Any], Any, Any]:
        key = action.public_key
        log.info("{peer} {reason}", peer=self.describe(key), reason=action.reason)
        started = self.reactor.seconds()
        try:
            if action.kind == "remove":
                yield self.device.remove_peer(key)
            for update in action.updates():
                yield self.device.set_peer(update)
            self.operation_errors.pop(key, None)
            return True
        except DeviceError as exc:
            self.operation_errors[key] = f"{action.kind}: {exc}"
            self.metrics.device_errors.labels(operation=action.kind).inc()
            log.error(
                "{peer}: device operation {kind} failed: {error}",
                peer=self.describe(key),
                kind=action.kind,
                error=str(exc),
            )
            return False
        finally:
            self.metrics.device_operation_seconds.labels(operation=action.kind).observe(
                self.reactor.seconds() - started
            )

    def _write_state(self, managed: set[PublicKey]) -> bool:
        """Write the state file; False when that failed (logged once, not once
        a retry, like a device read)."""
        assert self.state_store is not None
        try:
            self.state_store.save(set(managed))
        except OSError as exc:
            error = exc.strerror or str(exc)
            if error != self.state_error:
                log.error(
                    "cannot write the state file {path}: {error}; no new peer is created "
                    "until it can be (they stay relayed, the rest of the mesh is kept), "
                    "retrying at every plan; free space or fix the permissions of --state-dir",
                    path=getattr(self.state_store, "path", "(in memory)"),
                    error=error,
                )
            self.state_error = error
            return False
        if self.state_error is not None:
            log.info("the state file is written again")
            self.state_error = None
        self._written = set(managed)
        return True

    def _record(self, events: list[Event]) -> None:
        for event in events:
            if event.kind == "probe":
                self.metrics.probes.inc()
            elif event.kind == "direct":
                self.metrics.direct.inc()
                self.metrics.time_to_direct.observe(event.seconds)
            elif event.kind == "fallback":
                self.metrics.fallbacks.labels(reason=event.detail).inc()
            elif event.kind == "rebinding":
                self.metrics.rebindings.inc()
            elif event.kind == "removed":
                self.metrics.removals.inc()
            elif event.kind == "rejected" and event.public_key is not None:
                log.warn(
                    "{peer}: refused allowed IPs from the registry: {detail}",
                    peer=self.describe(event.public_key),
                    detail=event.detail,
                )
            elif event.kind == "recovered" and event.public_key is not None:
                log.warn(
                    "{peer}: taken back as a peer wgnat made (the state file was lost; "
                    "it has wgnat's keepalive and the registry's routes)",
                    peer=self.describe(event.public_key),
                )
            elif event.kind == "left_alone" and event.public_key is not None:
                log.warn(
                    "{peer}: left alone as configured by hand (the state file was lost; "
                    "{detail}); remove it yourself if wgnat made it",
                    peer=self.describe(event.public_key),
                    detail=event.detail,
                )
            elif event.kind in ("answer_later", "kept") and event.public_key is not None:
                log.info(
                    "{peer} {detail}", peer=self.describe(event.public_key), detail=event.detail
                )
            elif event.kind == "own_endpoint":
                log.info(
                    "this host's public endpoint moved ({change}): refreshing every direct "
                    "path, retrying every relayed one",
                    change=event.detail,
                )

    def describe(self, key: PublicKey) -> str:
        remote = self.view.peers.get(key)
        return peer_label(key, remote.allowed_ips if remote is not None else ())

    # -- for status and tests --------------------------------------------
    def paths(self) -> dict[PublicKey, Path]:
        return {key: p.path for key, p in (self.mesh.paths.items() if self.mesh else ())}

    def path_names(self) -> dict[PublicKey, str]:
        """Each mesh peer's path as status and metrics name it (a switching
        peer is still probing: its traffic is relayed until the switch)."""
        return {
            key: "probing" if path is Path.SWITCHING else path.value
            for key, path in self.paths().items()
        }

    @property
    def registry_up(self) -> bool | None:
        return self.follower.up if self.follower is not None else None
