"""The registry's Prometheus metrics: counted where events happen (the API, the
hub), state read from the hub at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wgnat.metrics import LATENCY_BUCKETS, StateCollector, build_info
from wgnat.registry.model import RegistryModel


class Watched(Protocol):
    """What the metrics read of the hub (registry.hub.Registry) at scrape time."""

    model: RegistryModel

    def waiting(self) -> int: ...

    def streams(self) -> int: ...


class RegistryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        build_info(self.registry, "registry")
        self.api_requests = Counter(
            "wgnat_registry_api_requests_total",
            "API requests answered, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("ok", "bad_request", "forbidden", "error"):
            self.api_requests.labels(outcome=outcome)
        self.pushes = Counter(
            "wgnat_registry_pushes_total",
            "Changes pushed to a waiting client (a long poll woken or a line on a stream)",
            registry=self.registry,
        )
        self.streams_dropped = Counter(
            "wgnat_registry_streams_dropped_total",
            "Streams dropped because their client read too slowly",
            registry=self.registry,
        )
        self.device_read_seconds = Histogram(
            "wgnat_registry_device_read_seconds",
            "Time to read the WireGuard device",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.device_errors = Counter(
            "wgnat_registry_device_errors_total",
            "Failed reads of the WireGuard device",
            registry=self.registry,
        )

        self.checks = Counter(
            "wgnat_registry_checks_total",
            "Clients' -t checks: their view was current, or they were sent what changed",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("current", "changed"):
            self.checks.labels(outcome=outcome)
        self.connections_refused = Counter(
            "wgnat_registry_connections_refused_total",
            "Connections closed unread: over the limit per source or in total, by listener",
            ["listener"],
            registry=self.registry,
        )
        for listener in ("api", "metrics"):
            self.connections_refused.labels(listener=listener)

    def identify(self, interface: str, hub: str, tunnel_addresses: list[str]) -> None:
        """wgnat_registry_info: which hub this is (its public key as logs and
        `wgnat status` abbreviate it, its tunnel addresses), so that a
        Prometheus scraping several hubs tells them apart and can join the
        label onto every other series (`* on(instance) group_left(hub)`)."""
        info = Gauge(
            "wgnat_registry_info",
            "Which hub this registry is (always 1): interface, abbreviated public key, "
            "tunnel addresses",
            ["interface", "hub", "tunnel_address"],
            registry=self.registry,
        )
        info.labels(interface=interface, hub=hub, tunnel_address=",".join(tunnel_addresses)).set(1)

    def watch_connections(self, open_by_listener: Callable[[], dict[str, int]]) -> None:
        def read() -> Iterable[Metric]:
            family = GaugeMetricFamily(
                "wgnat_registry_connections", "Connections open, by listener", labels=["listener"]
            )
            counts = {"api": 0, "metrics": 0, **open_by_listener()}
            for listener, count in sorted(counts.items()):
                family.add_metric([listener], count)
            yield family

        self.registry.register(StateCollector(read))

    def watch(self, hub: Watched) -> None:
        def read() -> Iterable[Metric]:
            model = hub.model
            yield GaugeMetricFamily(
                "wgnat_registry_peers_known",
                "Peers configured on the registry's interface",
                value=len(model.known),
            )
            yield GaugeMetricFamily(
                "wgnat_registry_peers_live",
                "Peers with a handshake in the last 180 s",
                value=model.live_count(),
            )
            yield GaugeMetricFamily(
                "wgnat_registry_waiting_clients",
                "Clients waiting for a change: long polls and open streams",
                value=hub.waiting(),
            )
            yield GaugeMetricFamily(
                "wgnat_registry_streams",
                "Open streams (GET /v1/peers?stream=1)",
                value=hub.streams(),
            )
            yield GaugeMetricFamily(
                "wgnat_registry_version",
                "Version of the mesh view (grows on every change)",
                value=model.version,
            )
            # A counter family is named without "_total": the exposition adds it
            # (naming it "..._total" gave HELP/TYPE lines for "..._total_total").
            yield CounterMetricFamily(
                "wgnat_registry_endpoint_changes",
                "Peer endpoint changes observed (NAT rebindings)",
                value=model.endpoint_changes,
            )

        self.registry.register(StateCollector(read))
