"""The client's Prometheus metrics: counted where the agent applies decisions,
peers by path read from the mesh at scrape time, traffic by path from the
agent's latest device read (client/traffic.py) at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wgnat._types import PublicKey
from wgnat.client.reconcile import ACTION_KINDS
from wgnat.client.traffic import PATHS, TrafficLedger
from wgnat.metrics import LATENCY_BUCKETS, TIME_TO_DIRECT_BUCKETS, StateCollector, build_info

PORT_MAPPING_PROTOCOLS = ("pcp", "nat-pmp", "upnp")

# What the traffic metrics' HELP texts say "direct" and "relayed" mean.
_PATH_MEANING = (
    "path=relayed: the registry peer's counters, i.e. everything through the hub "
    "(relayed peers, the registry API, traffic to the hub and beyond it); "
    "path=direct: every other peer on the device (mesh peers, probes included, and "
    "peers configured by hand). From the device's counters at the client's latest "
    "read (every 5-15 s); WireGuard counts no packets"
)


class ClientMetrics:
    def __init__(self, per_peer: bool = False) -> None:
        """`per_peer`: also export each peer's traffic and path (one series per
        peer, labelled with its public key: --metrics-per-peer)."""
        self.per_peer = per_peer
        self.registry = CollectorRegistry()
        build_info(self.registry, "client")
        r = self.registry
        self.probes = Counter(
            "wgnat_client_handshakes_attempted_total",
            "Direct paths tried (peer added to probe for a handshake)",
            registry=r,
        )
        self.direct = Counter(
            "wgnat_client_handshakes_succeeded_total",
            "Direct paths proven by a handshake",
            registry=r,
        )
        self.fallbacks = Counter(
            "wgnat_client_fallbacks_total",
            "Peers sent back to the relay, by reason",
            ["reason"],
            registry=r,
        )
        for reason in ("no_handshake", "path_died"):
            self.fallbacks.labels(reason=reason)
        self.rebindings = Counter(
            "wgnat_client_rebindings_total", "Peer endpoint changes followed", registry=r
        )
        self.removals = Counter(
            "wgnat_client_peers_removed_total",
            "Managed peers removed after leaving the registry",
            registry=r,
        )
        self.time_to_direct = Histogram(
            "wgnat_client_time_to_direct_seconds",
            "From learning of a peer to a proven direct path",
            buckets=TIME_TO_DIRECT_BUCKETS,
            registry=r,
        )
        self.device_operation_seconds = Histogram(
            "wgnat_client_device_operation_seconds",
            "Time of device operations, by kind",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.device_errors = Counter(
            "wgnat_client_device_errors_total",
            "Failed device operations, by kind",
            ["operation"],
            registry=r,
        )
        # Every label value exported from the start (at zero), so that rate() and
        # increase() in alerts and dashboards have a series before the first event.
        for operation in ACTION_KINDS:
            self.device_operation_seconds.labels(operation=operation)
            self.device_errors.labels(operation=operation)
        self.device_errors.labels(operation="read")
        self.registry_connected = Gauge(
            "wgnat_client_registry_connected",
            "1 when the last registry request succeeded",
            registry=r,
        )
        self.last_sync = Gauge(
            "wgnat_client_registry_last_sync_timestamp_seconds",
            "Unix time the registry was last heard from (an answer or a stream keep-alive)",
            registry=r,
        )
        self.registry_errors = Counter(
            "wgnat_client_registry_errors_total", "Failed registry requests", registry=r
        )
        self.hub_moves: Counter | None = None  # several registries only (watch_hubs)

    def watch_hubs(
        self, hubs: Callable[[], list[tuple[str, bool, bool]]], symmetric: Callable[[], bool]
    ) -> None:
        """Several registries (several -r): each hub's connection and whether
        it relays (`hubs`: (short key, followed now, relays) in -r order), the
        relay's moves, and whether the hubs see this host behind a symmetric NAT."""
        self.hub_moves = Counter(
            "wgnat_client_relay_moves_total",
            "Relay routes moved to another hub (the one holding them was dead)",
            registry=self.registry,
        )

        def read() -> Iterable[GaugeMetricFamily]:
            connected = GaugeMetricFamily(
                "wgnat_client_hub_connected",
                "1 while this hub's registry stream is followed (several -r)",
                labels=["hub"],
            )
            relays = GaugeMetricFamily(
                "wgnat_client_hub_relaying",
                "1 for the hub holding the relay routes, 0 for the others (several -r)",
                labels=["hub"],
            )
            for hub, up, relaying in hubs():
                connected.add_metric([hub], 1.0 if up else 0.0)
                relays.add_metric([hub], 1.0 if relaying else 0.0)
            yield connected
            yield relays
            nat = GaugeMetricFamily(
                "wgnat_client_symmetric_nat",
                "1 when two registries see this host at one public address with different "
                "ports (a NAT that maps each destination to a port of its own)",
            )
            nat.add_metric([], 1.0 if symmetric() else 0.0)
            yield nat

        self.registry.register(StateCollector(read))

    def watch(self, paths: Callable[[], dict[str, int]]) -> None:
        def read() -> Iterable[GaugeMetricFamily]:
            family = GaugeMetricFamily("wgnat_client_peers", "Mesh peers by path", labels=["path"])
            counts = paths()
            for path in ("direct", "relayed", "probing"):
                family.add_metric([path], counts.get(path, 0))
            yield family

        self.registry.register(StateCollector(read))

    def watch_traffic(
        self,
        ledger: TrafficLedger,
        interface: str,
        peer_paths: Callable[[], Mapping[PublicKey, str]],
    ) -> None:
        """Export the ledger's totals at scrape time; per peer only when asked
        (`peer_paths`: each mesh peer's path, "direct", "relayed" or "probing")."""

        def read() -> Iterable[Metric]:
            received = CounterMetricFamily(
                "wgnat_client_received_bytes",
                f"Bytes received from WireGuard peers, by path. {_PATH_MEANING}",
                labels=["path"],
            )
            sent = CounterMetricFamily(
                "wgnat_client_sent_bytes",
                f"Bytes sent to WireGuard peers, by path. {_PATH_MEANING}",
                labels=["path"],
            )
            for path in PATHS:
                received.add_metric([path], ledger.by_path[path].received)
                sent.add_metric([path], ledger.by_path[path].sent)
            yield received
            yield sent
            if not self.per_peer:
                return
            labels = ["interface", "public_key"]
            peer_received = CounterMetricFamily(
                "wgnat_client_peer_received_bytes",
                "Bytes received from each peer ever on the device (the registry "
                "peer's: everything through the hub), kept across its removals; "
                "WireGuard counts no packets",
                labels=labels,
            )
            peer_sent = CounterMetricFamily(
                "wgnat_client_peer_sent_bytes",
                "Bytes sent to each peer ever on the device (the registry peer's: "
                "everything through the hub), kept across its removals",
                labels=labels,
            )
            for key, counted in sorted(ledger.by_peer.items()):
                peer_received.add_metric([interface, key.base64], counted.received)
                peer_sent.add_metric([interface, key.base64], counted.sent)
            yield peer_received
            yield peer_sent
            path_family = GaugeMetricFamily(
                "wgnat_client_peer_path",
                "1 for each mesh peer's current path (direct, relayed, probing), 0 for the others",
                labels=[*labels, "path"],
            )
            for key, current in sorted(peer_paths().items()):
                for path in ("direct", "relayed", "probing"):
                    path_family.add_metric(
                        [interface, key.base64, path], 1.0 if current == path else 0.0
                    )
            yield path_family

        self.registry.register(StateCollector(read))

    def watch_port_mapping(self, describe: Callable[[], Mapping[str, Any]]) -> None:
        """The port mapping at scrape time (`describe`: PortMapper.describe's
        document): held or not by protocol, and the external endpoint and
        lifetime of the one held."""

        def read() -> Iterable[Metric]:
            mapping = describe()
            held = GaugeMetricFamily(
                "wgnat_client_port_mapping_held",
                "1 for the protocol of the port mapping of the listen port held from the "
                "gateway (pcp, nat-pmp, upnp), 0 for the others",
                labels=["protocol"],
            )
            for protocol in PORT_MAPPING_PROTOCOLS:
                held.add_metric([protocol], 1.0 if mapping.get("protocol") == protocol else 0.0)
            yield held
            info = GaugeMetricFamily(
                "wgnat_client_port_mapping_info",
                "1, labelled with the external endpoint of the port mapping held (no "
                "series without one)",
                labels=["external_endpoint"],
            )
            lifetime = GaugeMetricFamily(
                "wgnat_client_port_mapping_lifetime_seconds",
                "Lifetime the gateway granted the port mapping held (renewed at half)",
            )
            remaining = GaugeMetricFamily(
                "wgnat_client_port_mapping_remaining_seconds",
                "Seconds until the port mapping held expires unless renewed",
            )
            if mapping.get("external_endpoint"):
                info.add_metric([str(mapping["external_endpoint"])], 1.0)
                lifetime.add_metric([], float(mapping.get("lifetime") or 0))
                remaining.add_metric([], float(mapping.get("expires_in") or 0))
            yield info
            yield lifetime
            yield remaining

        self.registry.register(StateCollector(read))
