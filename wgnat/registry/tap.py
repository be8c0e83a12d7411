"""`wgnat-server` / `twistd wgnat-server`: options and the service they build."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from wgnat.daemon import StartupError, report_startup_failure
from wgnat.device import Device, link_is_up, open_device_or_exit
from wgnat.device.steady import SteadyDevice
from wgnat.duration import parse_go_duration
from wgnat.limits import METRICS_LIMITS, LimitedFactory, Limits, raise_descriptor_limit
from wgnat.logs import HeldLog, QuietSite
from wgnat.metrics import DEFAULT_SERVER_METRICS, MetricsResource
from wgnat.options import CommonOptions, port_number, tcp_endpoint
from wgnat.registry.api import build_site
from wgnat.registry.hub import Registry
from wgnat.registry.metrics import RegistryMetrics
from wgnat.registry.state import StateKeeper, default_state_path, encode_state, load_state
from wgnat.registry.status import status_provider
from wgnat.status_socket import StatusSocket, default_socket_path
from wgnat.timing import repeat, stop, use_steady_time

log = Logger(namespace="wgnat.registry")

# A client holds one stream (two for a moment when it reopens one) and makes
# short requests beside it; ten thousand clients fit with room to spare.
DEFAULT_MAX_CONNECTIONS = 16384
DEFAULT_MAX_CONNECTIONS_PER_PEER = 8
# Connections the kernel queues before the daemon accepts them.  Twisted's
# default, 50, dropped handshakes when thousands of clients came back to a
# restarted registry at once (bench/registry_scale.py: 1,909 connect timeouts
# and a 23 s p99 to reconnect at 10,000 clients, 7.8 s with 1024).
LISTEN_BACKLOG = 1024


class Options(CommonOptions):
    synopsis = "[-i IFACE] [--api-port PORT] [--metrics-listen HOST:PORT]"
    longdesc = (
        "Serve every peer's observed WireGuard endpoint to the other peers, over the "
        "tunnel only: the API listens on the interface's own tunnel addresses."
    )
    optParameters = [
        ["interface", "i", "wg0", "WireGuard interface to serve (must be up)"],
        ["api-port", None, None, "TCP port of the API (default: the interface's listen port)"],
        ["metrics-listen", None, DEFAULT_SERVER_METRICS, "Prometheus metrics HOST:PORT"],
        ["poll-interval", None, "1s", "How often the device is read for changes (Go duration)"],
        [
            "max-connections",
            None,
            str(DEFAULT_MAX_CONNECTIONS),
            "API connections held at once, in total (a client holds one)",
        ],
        [
            "max-connections-per-peer",
            None,
            str(DEFAULT_MAX_CONNECTIONS_PER_PEER),
            "API connections one peer (one source address) may hold at once",
        ],
        [
            "state-dir",
            None,
            "/var/lib/wgnat",
            "Where the registry keeps its view across restarts ('' for nowhere: a restart "
            "then sends every client a full answer)",
        ],
        ["log-format", None, "text", "text or json"],
        [
            "status-socket",
            None,
            None,
            "Unix socket for 'wgnat status --server' (default /run/wgnat/server-IFACE.sock; "
            "'' for none)",
        ],
    ]

    def postOptions(self) -> None:
        self.check_common()
        if self["status-socket"] is None:
            self["status-socket"] = default_socket_path("server", self["interface"])
        if self["api-port"] is not None:
            try:
                self["api-port"] = port_number(self["api-port"])
            except ValueError as exc:
                raise usage.UsageError(f"--api-port: {exc}") from None
        try:
            self["poll-interval"] = parse_go_duration(self["poll-interval"], minimum=0.0)
        except ValueError as exc:
            raise usage.UsageError(f"--poll-interval: {exc}") from None
        for name in ("max-connections", "max-connections-per-peer"):
            text = str(self[name])
            if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 1_000_000:
                raise usage.UsageError(f"--{name}: {text!r} is not a number from 1 to 1000000")
            self[name] = int(text)


def ip_forwarding_enabled(path: str = "/proc/sys/net/ipv4/ip_forward") -> bool | None:
    try:
        with open(path) as handle:
            return handle.read().strip() == "1"
    except OSError:
        return None


class RegistryDaemon(service.Service):
    """Reads the device, binds the API on the tunnel addresses, polls for changes."""

    failed = False
    stop_reactor_on_failure = True  # the daemon's process ends; tests keep their reactor

    def __init__(self, device: Device, reactor: Any, options: Options) -> None:
        self.device = device
        self.reactor = reactor
        self.options = options
        self.metrics = RegistryMetrics()
        self.hub = Registry(device, reactor, metrics=self.metrics)
        self.metrics.watch(self.hub)
        self.metrics.watch_connections(
            lambda: {name: factory.open for name, factory in self.listeners.items()}
        )
        self.ports: list[IListeningPort] = []
        self.tunnel_addresses: list[Any] = []  # the API's, once started
        self.listeners: dict[str, LimitedFactory] = {}
        self.keeper: StateKeeper | None = None
        # What start-up finds on the way, said after the first line (which names
        # the interface and its backend), or before the reason it cannot start.
        self.held = HeldLog(log)
        self.poller: LoopingCall | None = None
        path = options.get("status-socket")
        self.status = (
            StatusSocket(
                reactor,
                path,
                lambda: status_provider(
                    device, self.hub, reactor, lambda: [str(a) for a in self.tunnel_addresses]
                ),
                "wgnat-server",
            )
            if path
            else None
        )

    def startService(self) -> None:
        super().startService()
        if self.status is not None:
            self.status.start()
        self._start().addErrback(self._fatal)

    def _fatal(self, failure: Failure) -> None:
        self.held.release()
        self.failed = True
        report_startup_failure(
            "wgnat-server", failure, self.reactor if self.stop_reactor_on_failure else None
        )

    @inlineCallbacks
    def _start(self) -> Any:
        ifname = self.device.ifname
        up = yield deferToThreadPool(self.reactor, self.reactor.getThreadPool(), link_is_up, ifname)
        if not up:
            raise StartupError(
                f"interface {ifname} is down; bring it up first: ip link set {ifname} up"
            )
        state = yield self.device.read()
        held = self.held
        if self.options["state-dir"]:
            path = default_state_path(self.options["state-dir"], ifname)
            restored = load_state(path, ifname, state.public_key, self.hub.model.live_window, held)
            if restored is not None:
                restored.resume_after_restart()
                self.hub.model = restored
            hub_key = state.public_key
            self.keeper = StateKeeper(
                path, self.reactor, lambda: encode_state(self.hub.model, ifname, hub_key)
            )
            self.hub.on_change = self.keeper.changed
        if self.hub.model.observe(state, self.reactor.seconds()) and self.keeper is not None:
            self.keeper.changed()
        port = self.options["api-port"] or state.listen_port
        if not port:
            raise StartupError(f"interface {ifname} has no listen port; pass --api-port")
        addresses = yield self.device.addresses()
        usable = [a.ip for a in addresses if not a.ip.is_link_local]
        if not usable:
            raise StartupError(
                f"interface {ifname} has no tunnel address to serve the API on; "
                f"add one: ip address add 10.0.0.1/24 dev {ifname}"
            )
        self.tunnel_addresses = usable
        if state.public_key is not None:
            # Which hub this is, on every scrape (several hubs, one Prometheus).
            self.metrics.identify(ifname, state.public_key.short, [str(a) for a in usable])
        limits = Limits(
            per_source=self.options["max-connections-per-peer"],
            total=self.options["max-connections"],
        )
        raise_descriptor_limit(limits.total + METRICS_LIMITS.total, "wgnat-server", held)
        site = self._limited(build_site(self.hub, self.metrics), limits, "api")
        for address in usable:
            endpoint_class = (
                TCP6ServerEndpoint
                if isinstance(address, ipaddress.IPv6Address)
                else TCP4ServerEndpoint
            )
            try:
                listening = yield endpoint_class(
                    self.reactor, port, backlog=LISTEN_BACKLOG, interface=str(address)
                ).listen(site)
            except Exception as exc:
                raise StartupError(f"cannot listen on {address} port {port}: {exc}") from None
            self.ports.append(listening)
        metrics_host, metrics_port = self.options["metrics-listen"]
        metrics_at = f"{metrics_host}:{metrics_port}"
        try:
            listening = yield serverFromString(
                self.reactor, tcp_endpoint(self.options["metrics-listen"])
            ).listen(
                self._limited(
                    QuietSite(MetricsResource(self.metrics.registry)), METRICS_LIMITS, "metrics"
                )
            )
        except Exception as exc:
            raise StartupError(f"cannot serve metrics on {metrics_at}: {exc}") from None
        self.ports.append(listening)
        self.poller = repeat(
            self.reactor, self.options["poll-interval"], self.hub.poll, "reading the device"
        )
        log.info(
            "wgnat-server on {ifname} ({backend}): API on {addresses} port {port}, "
            "{live} of {known} peers live, metrics on {metrics}",
            ifname=ifname,
            backend=self.device.backend,
            addresses=", ".join(map(str, usable)),
            port=port,
            live=self.hub.model.live_count(),
            known=len(self.hub.model.known),
            metrics=metrics_at,
        )
        held.release()
        if ip_forwarding_enabled() is False:
            log.warn(
                "IP forwarding is off (net.ipv4.ip_forward=0): peers that cannot connect "
                "directly cannot be relayed through this registry; enable it with "
                "'sysctl -w net.ipv4.ip_forward=1'"
            )

    def _limited(self, factory: Factory[Any], limits: Limits, listener: str) -> LimitedFactory:
        refused = self.metrics.connections_refused.labels(listener=listener)
        limited = LimitedFactory(
            factory,
            limits,
            f"the registry's {listener} listener",
            self.reactor.seconds,
            refused.inc,
        )
        self.listeners[listener] = limited
        return limited

    def stopService(self) -> Deferred[list[Any]]:
        super().stopService()
        stop(self.poller)
        self.hub.stop()
        if self.keeper is not None:
            self.keeper.stop()
        ports, self.ports = self.ports, []
        stopping: list[Deferred[Any]] = [maybeDeferred(port.stopListening) for port in ports]
        if self.status is not None:
            stopping.append(self.status.stop())
        return gatherResults(stopping)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    use_steady_time(reactor)  # before any timer: none may run on the wall clock
    device = open_device_or_exit("wgnat-server", options["interface"], reactor)
    return RegistryDaemon(SteadyDevice(device, lambda: reactor.seconds()), reactor, options)
