"""`wgnat-server` / `twistd wgnat-server`: options and the service they build."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application import service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from wgnat.device import Device, DeviceError, link_is_up, open_device_or_exit
from wgnat.duration import parse_go_duration
from wgnat.logs import QuietSite
from wgnat.metrics import (
    DEFAULT_SERVER_METRICS,
    MetricsResource,
    RegistryMetrics,
    metrics_endpoint_description,
)
from wgnat.options import CommonOptions, port_number
from wgnat.registry.api import build_site
from wgnat.registry.hub import Registry
from wgnat.status import default_socket_path
from wgnat.status_server import StatusSocket, registry_status_provider

log = Logger(namespace="wgnat.registry")


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


class StartupError(Exception):
    pass


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
        self.ports: list[Any] = []
        self.poller: LoopingCall | None = None
        path = options.get("status-socket")
        self.status = (
            StatusSocket(
                reactor, path, registry_status_provider(device, self.hub, reactor), "wgnat-server"
            )
            if path
            else None
        )

    def startService(self) -> None:
        super().startService()
        if self.status is not None:
            self.status.start()
        self._start().addErrback(self._fatal)

    def _fatal(self, failure: Any) -> None:
        if failure.check(StartupError, DeviceError, OSError):
            log.critical("wgnat-server cannot start: {error}", error=failure.getErrorMessage())
        else:
            log.failure("wgnat-server cannot start", failure)
        self.failed = True
        if self.stop_reactor_on_failure and self.reactor.running:
            self.reactor.stop()

    @inlineCallbacks
    def _start(self) -> Any:
        ifname = self.device.ifname
        up = yield deferToThreadPool(self.reactor, self.reactor.getThreadPool(), link_is_up, ifname)
        if not up:
            raise StartupError(
                f"interface {ifname} is down; bring it up first: ip link set {ifname} up"
            )
        state = yield self.device.read()
        self.hub.model.observe(state, self.reactor.seconds())
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
        site = build_site(self.hub, self.metrics)
        for address in usable:
            endpoint_class = (
                TCP6ServerEndpoint
                if isinstance(address, ipaddress.IPv6Address)
                else TCP4ServerEndpoint
            )
            try:
                listening = yield endpoint_class(self.reactor, port, interface=str(address)).listen(
                    site
                )
            except Exception as exc:
                raise StartupError(f"cannot listen on {address} port {port}: {exc}") from None
            self.ports.append(listening)
        metrics_at = self.options["metrics-listen"]
        try:
            listening = yield serverFromString(
                self.reactor, metrics_endpoint_description(metrics_at)
            ).listen(QuietSite(MetricsResource(self.metrics.registry)))
        except Exception as exc:
            raise StartupError(f"cannot serve metrics on {metrics_at}: {exc}") from None
        self.ports.append(listening)
        self.poller = LoopingCall(self.hub.poll)
        self.poller.clock = self.reactor
        self.poller.start(self.options["poll-interval"], now=False)
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
        if ip_forwarding_enabled() is False:
            log.warn(
                "IP forwarding is off (net.ipv4.ip_forward=0): peers that cannot connect "
                "directly cannot be relayed through this registry; enable it with "
                "'sysctl -w net.ipv4.ip_forward=1'"
            )

    def stopService(self) -> Any:
        super().stopService()
        if self.poller is not None and self.poller.running:
            self.poller.stop()
        self.hub.stop()
        ports, self.ports = self.ports, []
        from twisted.internet.defer import gatherResults

        stopping = [port.stopListening() for port in ports]
        if self.status is not None:
            stopping.append(self.status.stop())
        return gatherResults(stopping)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return RegistryDaemon(
        open_device_or_exit("wgnat-server", options["interface"], reactor), reactor, options
    )
