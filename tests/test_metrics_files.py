"""metrics/: the Prometheus scrape config, alerting rules and Grafana dashboard
use only metrics the daemons really export, and promtool accepts them.

The names are collected from real ClientMetrics/RegistryMetrics registries after
watch(), as Prometheus would scrape them (histograms as _bucket/_sum/_count,
counters as _total).  The promtool checks run where `promtool` is on PATH or
in the virtualenv, where `make test` (so CI) unpacks it from Debian's
`prometheus` package (scripts/fetch-promtool.sh); PyPI has no promtool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from tests.helpers import device, new_key, peer
from wgnat.client.metrics import ClientMetrics
from wgnat.client.traffic import TrafficLedger
from wgnat.device.memory import MemoryDevice
from wgnat.registry.hub import Registry
from wgnat.registry.metrics import RegistryMetrics

METRICS = Path(__file__).resolve().parent.parent / "metrics"
ALERTS = METRICS / "alerts.yml"
DASHBOARD = METRICS / "grafana-dashboard.json"
SCRAPE = METRICS / "prometheus.yml"
NAME = re.compile(r"\bwgnat_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(wgnat_[a-z0-9_]+)\{([^}]*)\}")
EXACT_MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')  # `=` only, not =~ or !=
# `make test` unpacks promtool into the virtualenv (scripts/fetch-promtool.sh).
PROMTOOL = shutil.which("promtool") or shutil.which(
    "promtool", path=os.path.dirname(sys.executable)
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="needs promtool (make test unpacks it from Debian's 'prometheus' package with "
    "scripts/fetch-promtool.sh; PyPI has none)",
)


def exported_texts() -> dict[str, str]:
    """What each daemon serves on /metrics, with every labelled series present
    (the per-peer ones of --metrics-per-peer too)."""
    client = ClientMetrics(per_peer=True)
    client.watch(lambda: {"direct": 2, "relayed": 1, "probing": 0})
    hub, b = new_key(), new_key()
    ledger = TrafficLedger(hub)
    ledger.observe(device(peer(hub, rx=900, tx=800), peer(b, rx=5000, tx=4000)))
    client.watch_traffic(ledger, "wg0", lambda: {b: "direct"})
    client.device_errors.labels(operation="read").inc()
    client.device_operation_seconds.labels(operation="probe").observe(0.002)
    client.time_to_direct.observe(0.4)
    client.fallbacks.labels(reason="no_handshake").inc()
    client.watch_hubs(lambda: [(hub.short, True, True), (b.short, False, False)], lambda: True)
    registry = RegistryMetrics()
    registry.identify("wg0", hub.short, ["198.51.100.1"])
    registry.watch(Registry(MemoryDevice(), Clock()))
    registry.watch_connections(lambda: {"api": 3})
    registry.connections_refused.labels(listener="api").inc()
    registry.device_read_seconds.observe(0.001)
    return {
        "client": generate_latest(client.registry).decode(),
        "registry": generate_latest(registry.registry).decode(),
    }


def exported_series() -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it is exported with."""
    series: dict[str, list[dict[str, str]]] = {}
    for text in exported_texts().values():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def dashboard_expressions() -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                elif key == "query" and isinstance(value, str) and "(" in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def check_selectors(text: str, series: dict[str, list[dict[str, str]]]) -> list[str]:
    """Exact label matchers (`path="relayed"`) must match a label value exported."""
    problems = []
    for name, body in SELECTOR.findall(text):
        for label, value in EXACT_MATCHER.findall(body):
            if not any(labels.get(label) == value for labels in series.get(name, [])):
                problems.append(f'{name}{{{label}="{value}"}}')
    return problems


def test_the_export_has_the_names_expected():
    series = exported_series()
    assert "wgnat_client_time_to_direct_seconds_bucket" in series
    assert "wgnat_client_handshakes_attempted_total" in series
    assert "wgnat_registry_endpoint_changes_total" in series
    assert "wgnat_registry_device_read_seconds_count" in series
    assert {"path": "direct"} in series["wgnat_client_sent_bytes_total"]
    assert {"path": "relayed"} in series["wgnat_client_received_bytes_total"]
    for name in ("wgnat_client_peer_received_bytes_total", "wgnat_client_peer_sent_bytes_total"):
        assert all(set(labels) == {"interface", "public_key"} for labels in series[name])
    assert not any(name.startswith("wgnat_client_packets") for name in series)  # none counted


def test_alerts_use_only_exported_metrics():
    text = ALERTS.read_text()
    series = exported_series()
    used = set(NAME.findall(text))
    assert used, "no wgnat metric in alerts.yml"
    assert sorted(used - set(series)) == []
    assert check_selectors(text, series) == []
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE))
    assert {
        "WgnatRegistryUnreachable",
        "WgnatPeerRelayedLong",
        "WgnatDirectHandshakesFailing",
        "WgnatClientDeviceErrors",
        "WgnatRegistryDeviceReadFailures",
        "WgnatDirectShareDropped",
    } <= alerts
    # Prometheus' own `up` is the only metric from elsewhere.
    expressions = re.findall(r"expr: (?:>-\n)?(.+?)\n\s+(?:for|labels):", text, re.DOTALL)
    assert len(expressions) == len(alerts)
    for expression in expressions:
        assert NAME.search(expression) or expression.startswith("up{"), expression


def test_dashboard_uses_only_exported_metrics():
    document = json.loads(DASHBOARD.read_text())
    series = exported_series()
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for expression in expressions:
        names = set(NAME.findall(expression))
        assert names, f"uses no wgnat metric: {expression}"
        assert sorted(names - set(series)) == [], expression
        assert check_selectors(expression, series) == [], expression
    panels = [panel for panel in document["panels"] if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel.get("targets"), panel["title"]
        assert all(target.get("expr") for target in panel["targets"]), panel["title"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    # Every metric the daemons export is shown somewhere.
    shown = {name for expression in expressions for name in NAME.findall(expression)}
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in series
        if not name.endswith("_created")  # prometheus_client's creation times
    }
    assert "wgnat_client_time_to_direct_seconds" in families
    missing = [f for f in families if not any(name.startswith(f) for name in shown)]
    assert sorted(missing) == []


def test_scrape_config_scrapes_every_daemon_of_the_testbed():
    """metrics/prometheus.yml is the testbed's: its targets are exactly where the
    Compose file makes the daemons listen (their tunnel addresses)."""
    text = SCRAPE.read_text()
    compose = (METRICS.parent / "compose" / "docker-compose.yml").read_text()
    listening = set(re.findall(r'WGNAT_METRICS_LISTEN: "?([\d.]+:\d+)', compose))
    targets = set(re.findall(r"\b(\d+\.\d+\.\d+\.\d+:\d+)\b", text))
    assert len(listening) == 9, listening  # the two registries and seven clients (g: issue 16)
    assert targets == listening
    assert "192.0.2.1:9587" in targets  # the registry's default port, on its tunnel address
    assert "rule_files:" in text and "alerts.yml" in text


def test_every_label_value_is_exported_before_its_first_event():
    """rate() and increase() in the alerts and the dashboard need a series at
    zero, not one that appears with the first error."""
    client = ClientMetrics()
    client.watch(dict)
    text = generate_latest(client.registry).decode()
    for operation in ("probe", "promote", "endpoint", "kick", "remove"):
        assert f'wgnat_client_device_errors_total{{operation="{operation}"}} 0.0' in text
        assert f'wgnat_client_device_operation_seconds_count{{operation="{operation}"}} 0.0' in text
    assert 'wgnat_client_device_errors_total{operation="read"} 0.0' in text
    assert 'wgnat_client_fallbacks_total{reason="no_handshake"} 0.0' in text
    client.watch_traffic(TrafficLedger(new_key()), "wg0", dict)
    text = generate_latest(client.registry).decode()
    for path in ("direct", "relayed"):
        assert f'wgnat_client_received_bytes_total{{path="{path}"}} 0.0' in text
        assert f'wgnat_client_sent_bytes_total{{path="{path}"}} 0.0' in text


# -- promtool ----------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_checks_rules_and_config():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "config", str(SCRAPE))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("role", ["client", "registry"])
def test_promtool_accepts_what_the_daemons_export(role):
    result = promtool("check", "metrics", stdin=exported_texts()[role])
    assert result.returncode == 0, result.stdout + result.stderr


def without_annotations(text: str) -> str:
    """The rules with their annotation blocks dropped, for promtool's unit tests
    (which otherwise compare every rendered description word for word)."""
    kept, skip_deeper_than = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


RULE_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'wgnat_client_peers{path="relayed",instance="a:9588",job="wgnat-client"}'
        values: '1x40'
      - series: 'wgnat_client_registry_connected{instance="a:9588",job="wgnat-client"}'
        values: '1 1 0x20'
      - series: 'wgnat_client_handshakes_attempted_total{instance="a:9588",job="wgnat-client"}'
        values: '0+1x70'
      - series: 'wgnat_client_handshakes_succeeded_total{instance="a:9588",job="wgnat-client"}'
        values: '0x70'
      - series: 'wgnat_client_handshakes_attempted_total{instance="b:9588",job="wgnat-client"}'
        values: '0+1x70'
      - series: 'wgnat_client_handshakes_succeeded_total{instance="b:9588",job="wgnat-client"}'
        values: '0+1x70'
      - series: 'wgnat_registry_device_errors_total{instance="hub:9587",job="wgnat-registry"}'
        values: '0 0 0 0 0 1 2 3 4 5 6 7 8'
      - series: 'wgnat_client_device_errors_total{operation="probe",instance="a:9588"}'
        values: '0 0 0 1 1 1'
      # c: 1000 B/s direct and 100 B/s relayed for 25 hours, then every byte
      # relayed (2000 B/s): the direct share drops from 0.91 to 0.
      - series: 'wgnat_client_received_bytes_total{path="direct",instance="c",job="wgnat-client"}'
        values: '0+60000x1500 90000000+0x100'
      - series: 'wgnat_client_received_bytes_total{path="relayed",instance="c",job="wgnat-client"}'
        values: '0+6000x1500 9000000+120000x100'
      - series: 'wgnat_client_sent_bytes_total{path="direct",instance="c",job="wgnat-client"}'
        values: '0x1600'
      - series: 'wgnat_client_sent_bytes_total{path="relayed",instance="c",job="wgnat-client"}'
        values: '0x1600'
      # d: the same drop, but at 10 B/s: too little traffic to matter.
      - series: 'wgnat_client_received_bytes_total{path="direct",instance="d",job="wgnat-client"}'
        values: '0+600x1500 900000+0x100'
      - series: 'wgnat_client_received_bytes_total{path="relayed",instance="d",job="wgnat-client"}'
        values: '0+60x1500 90000+600x100'
      - series: 'wgnat_client_sent_bytes_total{path="direct",instance="d",job="wgnat-client"}'
        values: '0x1600'
      - series: 'wgnat_client_sent_bytes_total{path="relayed",instance="d",job="wgnat-client"}'
        values: '0x1600'
    alert_rule_test:
      - eval_time: 29m
        alertname: WgnatPeerRelayedLong
        exp_alerts: []
      - eval_time: 31m
        alertname: WgnatPeerRelayedLong
        exp_alerts:
          - exp_labels: {severity: info, path: relayed, instance: "a:9588", job: wgnat-client}
      - eval_time: 6m
        alertname: WgnatRegistryUnreachable
        exp_alerts: []
      - eval_time: 8m
        alertname: WgnatRegistryUnreachable
        exp_alerts:
          - exp_labels: {severity: warning, instance: "a:9588", job: wgnat-client}
      - eval_time: 60m
        alertname: WgnatDirectHandshakesFailing
        exp_alerts:
          - exp_labels: {severity: warning, instance: "a:9588", job: wgnat-client}
      - eval_time: 9m
        alertname: WgnatRegistryDeviceReadFailures
        exp_alerts:
          - exp_labels: {severity: critical, instance: "hub:9587", job: wgnat-registry}
      - eval_time: 1499m
        alertname: WgnatDirectShareDropped
        exp_alerts: []
      - eval_time: 1550m
        alertname: WgnatDirectShareDropped
        exp_alerts:
          - exp_labels: {severity: warning, instance: c, job: wgnat-client}
      - eval_time: 4m
        alertname: WgnatClientDeviceErrors
        exp_alerts:
          - exp_labels: {severity: warning, operation: probe, instance: "a:9588"}
"""


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path):
    rules = tmp_path / "alerts.yml"
    rules.write_text(without_annotations(ALERTS.read_text()))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(f"rule_files:\n  - {rules}\n" + textwrap.dedent(RULE_TESTS))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
