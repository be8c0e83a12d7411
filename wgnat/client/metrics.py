"""The client's Prometheus metrics: counted where the agent applies decisions,
peers by path read from the mesh at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from wgnat.client.reconcile import ACTION_KINDS
from wgnat.metrics import LATENCY_BUCKETS, TIME_TO_DIRECT_BUCKETS, StateCollector, build_info


class ClientMetrics:
    def __init__(self) -> None:
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

    def watch(self, paths: Callable[[], dict[str, int]]) -> None:
        def read() -> Iterable[GaugeMetricFamily]:
            family = GaugeMetricFamily("wgnat_client_peers", "Mesh peers by path", labels=["path"])
            counts = paths()
            for path in ("direct", "relayed", "probing"):
                family.add_metric([path], counts.get(path, 0))
            yield family

        self.registry.register(StateCollector(read))
