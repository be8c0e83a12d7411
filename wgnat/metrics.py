"""What both daemons' Prometheus metrics share (prometheus-client): the collector
read at scrape time, the build info, the HTTP resource and the listen address.
Each daemon's own metrics live in its package (registry/metrics.py,
client/metrics.py).

Each daemon has its own CollectorRegistry (so tests and two daemons in one process
never collide).  Counters are counted where the event happens; values that are
state (peers by path, the registry's version) are read at scrape time by a
collector, not copied on a timer.  Labels are bounded sets; never a key or secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from wgnat import __version__

DEFAULT_SERVER_METRICS = "127.0.0.1:9587"
DEFAULT_CLIENT_METRICS = "127.0.0.1:9588"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TIME_TO_DIRECT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class StateCollector(Collector):
    """Gauges computed from live state when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()

    def describe(self) -> Iterable[Metric]:
        return []


def build_info(registry: CollectorRegistry, role: str) -> None:
    info = Gauge(
        "wgnat_build_info",
        "wgnat version and role (always 1)",
        ["version", "role"],
        registry=registry,
    )
    info.labels(version=__version__, role=role).set(1)


class MetricsResource(Resource):
    """Prometheus text exposition, rendered on the reactor thread (so collectors
    read state without locks)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)
