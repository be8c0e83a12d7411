"""`wgnat-client` / `twistd wgnat-client`: options and the service they build."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from wgnat._types import InvalidValue, IPInterface, PublicKey, parse_network
from wgnat.client.agent import AgentConfig, MeshAgent
from wgnat.client.lan import lan_addresses
from wgnat.client.metrics import ClientMetrics
from wgnat.client.portmap import PortMapper, UdpChannel, UpnpIgd, default_gateway
from wgnat.client.reconcile import Settings
from wgnat.client.state_file import StateStore, default_state_path
from wgnat.client.status import status_provider
from wgnat.device import open_device_or_exit
from wgnat.device.steady import SteadyDevice
from wgnat.duration import parse_go_duration
from wgnat.limits import METRICS_LIMITS, LimitedFactory
from wgnat.logs import QuietSite
from wgnat.metrics import DEFAULT_CLIENT_METRICS, MetricsResource
from wgnat.options import CommonOptions, parse_listen, port_number, tcp_endpoint
from wgnat.status_socket import StatusSocket, default_socket_path
from wgnat.timing import use_steady_time

log = Logger(namespace="wgnat.client")


class Options(CommonOptions):
    synopsis = "-r REGISTRY_PUBLIC_KEY [-r ...] [-i IFACE] [-t DURATION] [options]"
    longdesc = (
        "Learn the other peers from the registry and add them as direct WireGuard peers "
        "through this host's one listen port (UDP hole punching); peers that cannot be "
        "reached directly stay relayed through the registry."
    )
    optParameters = [
        ["interface", "i", "wg0", "WireGuard interface to manage"],
        [
            "interval",
            "t",
            "1m0s",
            "Full resynchronisation period, Go duration (pushes carry "
            "changes at once; this is a safety net)",
        ],
        [
            "registry-address",
            None,
            None,
            "The registry's tunnel address (default: from its allowed IPs)",
        ],
        ["registry-port", None, None, "The registry API's TCP port (default: its endpoint's port)"],
        ["metrics-listen", None, DEFAULT_CLIENT_METRICS, "Prometheus metrics HOST:PORT"],
        [
            "state-dir",
            None,
            "/var/lib/wgnat",
            "Where the list of peers this client created is kept",
        ],
        ["keepalive", None, "25", "Persistent keepalive of direct peers, seconds"],
        [
            "status-socket",
            None,
            None,
            "Unix socket for 'wgnat status' (default /run/wgnat/client-IFACE.sock; '' for none)",
        ],
        ["log-format", None, "text", "text or json"],
    ]
    optFlags = [
        [
            "metrics-per-peer",
            None,
            "Also export each peer's traffic and path (one series per peer, "
            "labelled interface and public_key)",
        ],
        [
            "no-ipv6",
            None,
            "Neither announce this host's global IPv6 endpoints nor use other peers' "
            "(direct paths over IPv4 only)",
        ],
        [
            "punch-first",
            None,
            "This host's router accepts unsolicited packets on its INPUT chain (the "
            "conntrack race): announce it, so that peers let this host punch first "
            "and answer a moment later",
        ],
        [
            "no-port-mapping",
            None,
            "Do not ask the gateway for a port mapping (PCP, NAT-PMP, UPnP IGD) of the listen port",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["accept-routes"] = []
        self["registries"] = []

    def opt_registry(self, value: str) -> None:
        """The registry's public key (required; give -r again for each further
        registry: several hubs)"""
        self["registries"].append(value)

    opt_r = opt_registry

    def opt_accept_routes(self, value: str) -> None:
        """Also accept allowed IPs inside CIDR from peers (repeatable, or comma-separated)"""
        for item in value.split(","):
            try:
                self["accept-routes"].append(parse_network(item.strip()))
            except InvalidValue as exc:
                raise usage.UsageError(f"--accept-routes: {exc}") from None

    def postOptions(self) -> None:
        self.check_common()
        if not self["registries"] or not all(self["registries"]):
            raise usage.UsageError(
                "-r REGISTRY_PUBLIC_KEY is required (the registry's "
                "public key, as 'wg show' prints it)"
            )
        keys: list[PublicKey] = []
        for text in self["registries"]:
            try:
                key = PublicKey.from_base64(text)
            except InvalidValue as exc:
                raise usage.UsageError(f"-r: {exc}") from None
            if key in keys:
                raise usage.UsageError(f"-r: {key.short} is given twice")
            keys.append(key)
        self["registry"], self["more-registries"] = keys[0], tuple(keys[1:])
        try:
            self["interval"] = parse_go_duration(self["interval"], minimum=1.0)
        except InvalidValue as exc:
            raise usage.UsageError(f"-t: {exc}") from None
        if self["registry-address"] is not None:
            try:
                self["registry-address"] = ipaddress.ip_address(self["registry-address"])
            except ValueError:
                raise usage.UsageError(
                    f"--registry-address: {self['registry-address']!r} is not an IP address"
                ) from None
        if self["registry-port"] is not None:
            try:
                self["registry-port"] = port_number(str(self["registry-port"]))
            except ValueError as exc:
                raise usage.UsageError(f"--registry-port: {exc}") from None
        keepalive = str(self["keepalive"])
        if not (keepalive.isascii() and keepalive.isdigit()) or not 0 < int(keepalive) < 65536:
            raise usage.UsageError(
                f"--keepalive: {keepalive!r} is not a number of seconds (1-65535)"
            )
        self["keepalive"] = int(keepalive)
        if self["status-socket"] is None:
            self["status-socket"] = default_socket_path("client", self["interface"])


class ClientDaemon(service.MultiService):
    """The agent plus its metrics listener and status socket."""

    def __init__(
        self,
        agent: MeshAgent,
        reactor: Any,
        metrics_listen: tuple[str, int] | str,
        status_socket: str | None = None,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.reactor = reactor
        self.metrics_listen = (
            parse_listen(metrics_listen) if isinstance(metrics_listen, str) else metrics_listen
        )
        self.port: IListeningPort | None = None
        self.status = (
            StatusSocket(reactor, status_socket, lambda: status_provider(agent), "wgnat-client")
            if status_socket
            else None
        )
        agent.setServiceParent(self)

    @property
    def failed(self) -> bool:
        return self.agent.failed

    def startService(self) -> None:
        endpoint = serverFromString(self.reactor, tcp_endpoint(self.metrics_listen))
        site = LimitedFactory(
            QuietSite(MetricsResource(self.agent.metrics.registry)),
            METRICS_LIMITS,
            "wgnat-client's metrics listener",
            self.reactor.seconds,
        )

        def listening(port: IListeningPort) -> None:
            self.port = port

        def failed(failure: Failure) -> None:
            self.agent._fatal(failure)

        endpoint.listen(site).addCallbacks(listening, failed)
        if self.status is not None:
            self.status.start()
        super().startService()

    def stopService(self) -> Deferred[list[Any]]:
        stopping: list[Deferred[Any]] = []
        if self.port is not None:
            stopping.append(maybeDeferred(self.port.stopListening))
        stopping.append(maybeDeferred(super().stopService))
        if self.status is not None:
            stopping.append(self.status.stop())
        return gatherResults(stopping)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    ifname = options["interface"]
    use_steady_time(reactor)  # before any timer: none may run on the wall clock
    device = SteadyDevice(
        open_device_or_exit("wgnat-client", ifname, reactor), lambda: reactor.seconds()
    )
    config = AgentConfig(
        registry_key=options["registry"],
        more_registries=options["more-registries"],
        registry_address=options["registry-address"],
        registry_port=options["registry-port"],
        accept_routes=tuple(options["accept-routes"]),
        resync_interval=options["interval"],
        settings=Settings(
            keepalive=options["keepalive"],
            ipv6=not options["no-ipv6"],
            punch_first=bool(options["punch-first"]),
        ),
    )

    def find_lan(name: str) -> Deferred[list[IPInterface]]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), lan_addresses, name)

    def in_thread(function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    port_mapper = None
    if not options["no-port-mapping"]:
        port_mapper = PortMapper(
            reactor,
            default_gateway,
            lambda gateway, received: UdpChannel(reactor, gateway, received),
            upnp=UpnpIgd(reactor, in_thread),
        )
    agent = MeshAgent(
        device,
        reactor,
        config,
        metrics=ClientMetrics(per_peer=bool(options["metrics-per-peer"])),
        lan_addresses=find_lan,
        state_store=StateStore(default_state_path(options["state-dir"], ifname)),
        port_mapper=port_mapper,
    )
    return ClientDaemon(agent, reactor, options["metrics-listen"], options["status-socket"])
