"""The client daemon's moving parts around the pure decisions in reconcile.py:
following the registry's pushes, reading the device, applying operations,
timers, logs and metrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from wgnat._types import Announcement, IPNetwork, PeerUpdate, PublicKey
from wgnat.client.lan import lan_endpoints
from wgnat.client.reconcile import Action, Mesh, Path, Policy, Settings, registry_address_of
from wgnat.client.registry_client import RegistryClient, RegistryError, StreamEnded
from wgnat.client.view import RegistryView
from wgnat.device import Device, DeviceError
from wgnat.metrics import ClientMetrics

log = Logger(namespace="wgnat.client")

LONG_POLL_WAIT = 25.0  # asked of a registry without streams (it long-polls instead)
REGISTRY_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A device that cannot be read (its interface deleted, say) is tried this often.
READ_RETRY_SECONDS = 1.0


class StartupError(Exception):
    pass


@dataclass
class AgentConfig:
    registry_key: PublicKey
    registry_address: Any = None  # IPAddress; None: derived from the registry peer
    registry_port: int | None = None  # None: the registry endpoint's port
    accept_routes: tuple[IPNetwork, ...] = ()
    resync_interval: float = 60.0
    state_path: str | None = None
    settings: Settings = Settings()  # noqa: RUF009 - frozen, shared safely


class MeshAgent(service.Service):
    failed = False

    def __init__(
        self,
        device: Device,
        reactor: Any,
        config: AgentConfig,
        metrics: ClientMetrics | None = None,
        lan_addresses: Callable[[str], list[Any]] | None = None,
        client_factory: Callable[..., Any] = RegistryClient,
        state_store: Any = None,
    ) -> None:
        self.device = device
        self.reactor = reactor
        self.config = config
        self.metrics = metrics or ClientMetrics()
        self._lan_addresses = lan_addresses
        self._client_factory = client_factory
        self.state_store = state_store
        self.view = RegistryView()
        self.mesh: Mesh | None = None
        self.client: Any = None
        self.lan: list[Any] = []
        self.listen_port = 0
        self.registry_up: bool | None = None
        # For `wgnat status` (wgnat/status.py): read, never acted on.
        self.registry_address: Any = None
        self.registry_port: int | None = None
        self.registry_error: str | None = None
        self.last_sync: float | None = None
        self.last_probe: dict[PublicKey, float] = {}
        self._inflight: Deferred[Any] | None = None
        self._stream: Any = None
        self._force_full = True
        self._wakeup: Any = None
        self._reconciling = False
        self.read_error: str | None = None  # the last device read's, until one works
        self._planned = False  # set once a plan ran: the health timer runs from then
        self._again = False
        self._resync: Any = None
        self._poll_loop: Deferred[None] | None = None
        self.session = os.urandom(8).hex()  # new at every start: peers re-probe us at once

    # -- start and stop ---------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.ready = self._start()
        self.ready.addErrback(self._fatal)

    def _fatal(self, failure: Any) -> None:
        if failure.check(StartupError, DeviceError, OSError, ValueError):
            log.critical("wgnat-client cannot start: {error}", error=failure.getErrorMessage())
        else:
            log.failure("wgnat-client cannot start", failure)
        self.failed = True
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    @inlineCallbacks
    def _start(self) -> Any:
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
        addresses = yield self.device.addresses()
        tunnel = [a for a in addresses if not a.ip.is_link_local]
        if not tunnel:
            raise StartupError(f"interface {self.device.ifname} has no tunnel address")
        self.listen_port = state.listen_port
        if self._lan_addresses is not None:
            self.lan = list((yield maybeDeferred(self._lan_addresses, self.device.ifname)))
        policy = Policy(
            tunnel_networks=tuple(a.network for a in tunnel),
            registry_address=address,
            own_addresses=tuple(a.ip for a in tunnel),
            accept_routes=config.accept_routes,
        )
        self.mesh = Mesh(
            state.public_key,
            config.registry_key,
            policy,
            config.settings,
            lan_networks=tuple(a.network for a in self.lan),
        )
        on_device = state.by_key()
        if self.state_store is not None:
            managed = self.state_store.load()
            self.mesh.managed = {key for key in managed if key in on_device}
            if self.mesh.managed != managed:
                self.state_store.save(self.mesh.managed)
        self.mesh.adopt(state, self.reactor.seconds())
        self.registry_address, self.registry_port = address, port
        self.client = self._client_factory(self.reactor, address, port)
        self.metrics.watch(self.mesh.counts)
        self.metrics.registry_connected.set(0)
        log.info(
            "wgnat-client on {ifname} ({backend}): registry {registry} at {address}:{port}, "
            "{kept} managed peers kept, LAN {lan}",
            ifname=self.device.ifname,
            backend=self.device.backend,
            registry=config.registry_key.short,
            address=address,
            port=port,
            kept=len(self.mesh.paths),
            lan=", ".join(str(a.ip) for a in self.lan) or "none",
        )
        self._resync = self.reactor.callLater(config.resync_interval, self._full_resync)
        self._poll_loop = self._follow_registry()

    def stopService(self) -> Any:
        super().stopService()
        for timer in (self._wakeup, self._resync):
            if timer is not None and timer.active():
                timer.cancel()
        if self._inflight is not None:
            self._inflight.cancel()
        self._close_stream()
        if self.client is not None:
            return self.client.close()
        return None

    # -- following the registry ------------------------------------------
    def _full_resync(self) -> None:
        """The safety net: a full answer every -t, whatever the pushes said."""
        self._force_full = True
        if self._inflight is not None:
            self._inflight.cancel()
        self._resync = self.reactor.callLater(self.config.resync_interval, self._full_resync)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @inlineCallbacks
    def _follow_registry(self) -> Any:
        """Follow the registry's stream: its first answer (full when asked, after
        announcing ourselves), then one per change, applied as they come.  A
        registry without streams answers each request once (a long poll) and the
        stream is opened again; a failure keeps the mesh and retries with backoff."""
        failures = 0
        while self.running:
            full = self._force_full or self.view.version is None
            try:
                if full or self._stream is None:
                    self._close_stream()
                    if full:
                        yield self._announce()
                    self._stream = self.client.follow(
                        None if full else self.view.version, self.view.epoch, LONG_POLL_WAIT
                    )
                self._inflight = self._stream.next()
                answer = yield self._inflight
            except CancelledError:
                continue
            except StreamEnded:
                self._stream = None  # ended cleanly: ask again, from our version
                continue
            except Exception as exc:  # the loop must outlive any failure
                self._close_stream()
                failures += 1
                if not isinstance(exc, RegistryError):
                    log.failure("unexpected error following the registry; retrying")
                self._registry_down(str(exc), failures)
                self._force_full = True
                delay = REGISTRY_BACKOFF[min(failures, len(REGISTRY_BACKOFF)) - 1]
                try:
                    self._inflight = deferLater(self.reactor, delay, lambda: None)
                    yield self._inflight
                except CancelledError:
                    pass
                continue
            finally:
                self._inflight = None
            failures = 0
            self._registry_is_up()
            if answer is None:
                continue  # a keep-alive: the registry is there, nothing changed
            if not answer.full and answer.epoch != self.view.epoch:
                self._force_full = True  # a delta from another epoch: ask again, whole
                continue
            if full:
                self._force_full = False
            previous_endpoint = self.view.my_endpoint
            changed = self.view.apply(answer)
            if (
                previous_endpoint is not None
                and self.view.my_endpoint != previous_endpoint
                and self.mesh is not None
            ):
                log.info(
                    "this host's public endpoint moved from {old} to {new}: refreshing "
                    "every direct path, retrying every relayed one",
                    old=previous_endpoint,
                    new=self.view.my_endpoint,
                )
                yield self._apply_all(self.mesh.kick_all("our own NAT mapping changed"))
                self.mesh.retry_relayed_now(self.reactor.seconds())
                changed = True  # the next plan retries the relayed peers
            # An unchanged full answer (the -t safety net, a reconnection) needs no
            # new plan: the health check reads the device on its own timer, and a
            # read and plan of every peer a minute for nothing was a fifth of an
            # idle client's CPU.  Only the first answer must start that timer.
            if changed or (full and not self._planned):
                self.reconcile_soon()

    @inlineCallbacks
    def _announce(self) -> Any:
        if self._lan_addresses is not None:
            self.lan = list((yield maybeDeferred(self._lan_addresses, self.device.ifname)))
        yield self.client.announce(
            Announcement(self.session, tuple(lan_endpoints(self.lan, self.listen_port)))
        )

    def _registry_down(self, error: str, failures: int) -> None:
        self.metrics.registry_errors.inc()
        self.metrics.registry_connected.set(0)
        self.registry_error = error
        if self.registry_up is not False:
            log.warn(
                "registry unreachable ({error}); keeping the mesh as it is and retrying "
                "with backoff",
                error=error,
            )
        self.registry_up = False

    def _registry_is_up(self) -> None:
        self.metrics.registry_connected.set(1)
        self.metrics.last_sync.set(self.reactor.seconds())
        self.last_sync, self.registry_error = self.reactor.seconds(), None
        if self.registry_up is False:
            log.info("registry reachable again; resynchronising")
        self.registry_up = True

    # -- reconciling the device ------------------------------------------
    def reconcile_soon(self) -> None:
        if self._reconciling:
            self._again = True
            return
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        self._reconcile()

    @inlineCallbacks
    def _reconcile(self) -> Any:
        assert self.mesh is not None
        self._reconciling = True
        try:
            while True:
                self._again = False
                if self.view.version is None:
                    break  # nothing is decided before the registry's first answer
                yield self._apply_all(self.mesh.promote_due(self.reactor.seconds()))
                try:
                    state = yield self.device.read()
                except DeviceError as exc:
                    self._read_failed(str(exc))
                    break
                if self.read_error is not None:
                    log.info("reading {ifname} works again", ifname=self.device.ifname)
                    self.read_error = None
                now = self.reactor.seconds()
                actions = self.mesh.plan(self.view, state, now)
                self._planned = True
                self._count_events()
                yield self._apply_all(actions)
                if not self._again:
                    break
        except Exception:
            # A bug must not stop the timers: log it, keep the mesh, try again later.
            log.failure("unexpected error while reconciling {ifname}", ifname=self.device.ifname)
        finally:
            self._reconciling = False
        if self.running:
            now = self.reactor.seconds()
            delay = (
                max(0.0, self.mesh.next_wakeup(now) - now)
                if self.view.version is not None
                else self.config.settings.health_interval
            )
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

    def _count_events(self) -> None:
        assert self.mesh is not None
        events, self.mesh.events = self.mesh.events, []
        for event in events:
            if event.kind == "probe":
                self.metrics.probes.inc()
                self.last_probe[event.public_key] = self.reactor.seconds()
            elif event.kind == "direct":
                self.metrics.direct.inc()
                self.metrics.time_to_direct.observe(event.seconds)
            elif event.kind == "fallback":
                self.metrics.fallbacks.labels(reason=event.detail).inc()
            elif event.kind == "rebinding":
                self.metrics.rebindings.inc()
            elif event.kind == "removed":
                self.metrics.removals.inc()
                self.last_probe.pop(event.public_key, None)
            elif event.kind == "rejected":
                log.warn(
                    "{peer}: refused allowed IPs from the registry: {detail}",
                    peer=self.describe(event.public_key),
                    detail=event.detail,
                )

    def describe(self, key: PublicKey) -> str:
        """How an operator recognises a peer: its tunnel address and key prefix."""
        remote = self.view.peers.get(key)
        if remote is not None and remote.allowed_ips:
            return f"{remote.allowed_ips[0].network_address} ({key.short})"
        return key.short

    @inlineCallbacks
    def _apply_all(self, actions: list[Action]) -> Any:
        # The state file is written once a batch, not once a peer: each write
        # holds every managed key and ends with an fsync, so a write per peer made
        # applying N new peers O(N^2) (1,000 peers: 17 s, mostly fsync).  The keys
        # of the peers about to be created are written before any is created; the
        # removed ones are dropped once they are gone.
        self._manage({action.public_key for action in actions if action.kind == "probe"}, True)
        removed: set[PublicKey] = set()
        for action in actions:
            done = yield self._apply(action)
            if action.kind == "probe":
                removed.discard(action.public_key)
            elif action.kind == "remove" and done:
                removed.add(action.public_key)
        self._manage(removed, False)

    @inlineCallbacks
    def _apply(self, action: Action) -> Any:
        assert self.mesh is not None
        key = action.public_key
        log.info("{peer} {reason}", peer=self.describe(key), reason=action.reason)
        started = self.reactor.seconds()
        try:
            if action.kind == "probe":
                yield self.device.set_peer(
                    PeerUpdate(
                        key,
                        endpoint=action.endpoint,
                        allowed_ips=(),
                        replace_allowed_ips=True,
                        persistent_keepalive=action.keepalive,
                    )
                )
            elif action.kind == "promote":
                yield self.device.set_peer(
                    PeerUpdate(
                        key,
                        allowed_ips=action.allowed_ips,
                        replace_allowed_ips=True,
                        update_only=True,
                    )
                )
            elif action.kind == "endpoint":
                yield self.device.set_peer(
                    PeerUpdate(key, endpoint=action.endpoint, update_only=True)
                )
            elif action.kind == "kick":
                yield self.device.set_peer(
                    PeerUpdate(key, persistent_keepalive=0, update_only=True)
                )
                yield self.device.set_peer(
                    PeerUpdate(key, persistent_keepalive=action.keepalive, update_only=True)
                )
            elif action.kind == "remove":
                yield self.device.remove_peer(key)
            return True
        except DeviceError as exc:
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

    def _manage(self, keys: set[PublicKey], managed: bool) -> None:
        assert self.mesh is not None
        changed = keys - self.mesh.managed if managed else keys & self.mesh.managed
        if not changed:
            return
        if managed:
            self.mesh.managed |= changed
        else:
            self.mesh.managed -= changed
        if self.state_store is not None:
            self.state_store.save(self.mesh.managed)

    # -- for status and tests --------------------------------------------
    def paths(self) -> dict[PublicKey, Path]:
        return {key: p.path for key, p in (self.mesh.paths.items() if self.mesh else ())}
