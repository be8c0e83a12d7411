"""Prometheus metrics of both daemons (prometheus-client).

Each daemon has its own CollectorRegistry (so tests and two daemons in one process
never collide).  Counters are counted where the event happens; values that are
state (peers by path, the registry's version) are read at scrape time by a
collector, not copied on a timer.  Labels are bounded sets; never a key or secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource

from wgnat import __version__
from wgnat.client.reconcile import ACTION_KINDS

DEFAULT_SERVER_METRICS = "127.0.0.1:9587"
DEFAULT_CLIENT_METRICS = "127.0.0.1:9588"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TIME_TO_DIRECT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class StateCollector:
    """Gauges computed from live state when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()

    def describe(self) -> Iterable[Metric]:
        return []


def _build_info(registry: CollectorRegistry, role: str) -> None:
    info = Gauge(
        "wgnat_build_info",
        "wgnat version and role (always 1)",
        ["version", "role"],
        registry=registry,
    )
    info.labels(version=__version__, role=role).set(1)


class RegistryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        _build_info(self.registry, "registry")
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
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.device_errors = Counter(
            "wgnat_registry_device_errors_total",
            "Failed reads of the WireGuard device",
            registry=self.registry,
        )

    def watch(self, hub: Any) -> None:
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

        self.registry.register(StateCollector(read))  # type: ignore[arg-type]


class ClientMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        _build_info(self.registry, "client")
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
            buckets=_TIME_TO_DIRECT_BUCKETS,
            registry=r,
        )
        self.device_operation_seconds = Histogram(
            "wgnat_client_device_operation_seconds",
            "Time of device operations, by kind",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
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

        self.registry.register(StateCollector(read))  # type: ignore[arg-type]


class MetricsResource(Resource):
    """Prometheus text exposition, rendered on the reactor thread (so collectors
    read state without locks)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:9587`) for --metrics-listen."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(
            f"invalid listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9587"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def metrics_endpoint_description(text: str) -> str:
    host, port = parse_listen(text)
    escaped = host.replace(":", "\\:")
    return f"tcp:{port}:interface={escaped}"
