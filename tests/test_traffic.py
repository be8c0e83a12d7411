"""Traffic by path: the pure ledger (client/traffic.py) and the client's metrics
built on it, which add up to the device's counters."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tests.helpers import device, new_key, peer
from wgnat.client.metrics import ClientMetrics
from wgnat.client.reconcile import Path
from wgnat.client.traffic import TrafficLedger
from wgnat.testing import SimulatedNetwork


def totals(ledger: TrafficLedger) -> dict[str, tuple[int, int]]:
    return {path: (b.received, b.sent) for path, b in ledger.by_path.items()}


def test_the_first_read_counts_everything_and_later_reads_the_difference():
    hub, b = new_key(), new_key()
    ledger = TrafficLedger(hub)
    ledger.observe(device(peer(hub, rx=1000, tx=500), peer(b, rx=70, tx=30)))
    assert totals(ledger) == {"relayed": (1000, 500), "direct": (70, 30)}
    ledger.observe(device(peer(hub, rx=1100, tx=900), peer(b, rx=75, tx=40)))
    assert totals(ledger) == {"relayed": (1100, 900), "direct": (75, 40)}
    assert (ledger.by_peer[b].received, ledger.by_peer[b].sent) == (75, 40)


def test_a_peer_removed_and_recreated_keeps_its_sum():
    hub, b = new_key(), new_key()
    ledger = TrafficLedger(hub)
    ledger.observe(device(peer(hub), peer(b, rx=500, tx=400)))
    ledger.observe(device(peer(hub)))  # b relayed: removed from the device
    assert totals(ledger)["direct"] == (500, 400)
    ledger.observe(device(peer(hub), peer(b, rx=20, tx=10)))  # re-created: from zero
    assert totals(ledger)["direct"] == (520, 410)
    assert (ledger.by_peer[b].received, ledger.by_peer[b].sent) == (520, 410)


def test_counters_that_went_down_between_two_reads_restarted():
    """Removed and re-created between two reads (or a restarted wireguard-go):
    a counter below the last read's is a new count, never a negative one."""
    hub = new_key()
    ledger = TrafficLedger(hub)
    ledger.observe(device(peer(hub, rx=5000, tx=5000)))
    ledger.observe(device(peer(hub, rx=300, tx=6000)))
    assert totals(ledger)["relayed"] == (5300, 11000)


def sample(metrics: ClientMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def path_bytes(metrics: ClientMetrics) -> dict[str, tuple[float | None, float | None]]:
    return {
        path: (
            sample(metrics, "wgnat_client_received_bytes_total", path=path),
            sample(metrics, "wgnat_client_sent_bytes_total", path=path),
        )
        for path in ("direct", "relayed")
    }


@pytest.fixture
def net():
    n = SimulatedNetwork()
    yield n
    n.stop()


def test_path_metrics_add_up_to_the_device_counters(net):
    """a direct with b, relayed to s (no handshake comes back): the direct bytes
    are b's counters, the relayed ones the registry peer's, and the totals stay
    put when b falls back to the relay and grow again when b returns."""
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    net.add_host("s", "198.51.100.4", "203.0.113.23:51820")
    a = net.agent("a")
    a.metrics.per_peer = True
    net.agent("b"), net.agent("s")
    net.clock.advance(1.0)  # b and s joined in a's second: known at the next read
    kb, ks = net.key("b"), net.key("s")
    net.handshake("a", "b")
    net.clock.advance(6.5)  # s's probe times out: relayed
    assert a.paths() == {kb: Path.DIRECT, ks: Path.RELAYED}
    dev = net.hosts["a"].device
    for _ in range(8):  # two minutes of traffic, b direct, s through the hub
        net.alive("a", "b")
        dev.traffic(kb, rx=3000, tx=2000)
        dev.traffic(net.registry_key, rx=900, tx=700)  # s's traffic and the registry API
        net.clock.advance(15)
    state = dev.snapshot()
    # Every byte the device counted, and nothing else.
    direct = [p for p in state.peers if p.public_key != net.registry_key]
    relayed = state.peer(net.registry_key)
    assert relayed is not None
    assert path_bytes(a.metrics) == {
        "direct": (sum(p.rx_bytes for p in direct), sum(p.tx_bytes for p in direct)),
        "relayed": (relayed.rx_bytes, relayed.tx_bytes),
    }
    before = path_bytes(a.metrics)["direct"]
    assert before[0] > 20000
    # b goes quiet: its path dies, it is removed from the device (its counters
    # with it), and the direct totals stay where they were.
    for _ in range(20):  # nothing received for 65 s
        dev.traffic(net.registry_key, rx=100)
        net.registry_device.handshake(net.key("a"), net.clock.seconds())
        net.clock.advance(5)
        if kb not in dev.peers:
            break
    assert kb not in dev.peers and a.paths()[kb] is Path.RELAYED
    assert path_bytes(a.metrics)["direct"] == before
    # b comes back (the retry meets b's): new counters from zero, added on top.
    ka, dev_b = net.key("a"), net.hosts["b"].device
    for _ in range(80):
        net.clock.advance(5)
        if kb in dev.peers and ka in dev_b.peers:  # both ends probing at once
            break
    net.handshake("a", "b")
    net.clock.advance(0.5)
    assert a.paths()[kb] is Path.DIRECT
    dev.traffic(kb, rx=10, tx=20)
    net.clock.advance(15)
    new = dev.peers[kb]
    assert path_bytes(a.metrics)["direct"] == (before[0] + new.rx_bytes, before[1] + new.tx_bytes)
    relayed = dev.peers[net.registry_key]
    assert path_bytes(a.metrics)["relayed"] == (relayed.rx_bytes, relayed.tx_bytes)
    # Per peer (--metrics-per-peer): b's series continues across its removal.
    ifname = net.hosts["a"].device.ifname
    assert sample(
        a.metrics, "wgnat_client_peer_received_bytes_total", interface=ifname, public_key=kb.base64
    ) == (before[0] + new.rx_bytes)
    assert (
        sample(
            a.metrics,
            "wgnat_client_peer_path",
            interface=ifname,
            public_key=kb.base64,
            path="direct",
        )
        == 1.0
    )


def test_per_peer_series_only_with_the_flag(net):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    quiet = net.agent("a")
    text = generate_latest(quiet.metrics.registry).decode()
    assert 'wgnat_client_sent_bytes_total{path="direct"} 0.0' in text
    assert 'wgnat_client_sent_bytes_total{path="relayed"} 0.0' in text
    assert "public_key" not in text
    flagged = ClientMetrics(per_peer=True)
    flagged.watch_traffic(quiet.traffic, "wg0", quiet.path_names)
    text = generate_latest(flagged.registry).decode()
    registry = net.registry_key.base64
    assert f'wgnat_client_peer_sent_bytes_total{{interface="wg0",public_key="{registry}"}}' in text


def test_metrics_per_peer_flag_reaches_the_metrics(monkeypatch):
    from wgnat.client import tap
    from wgnat.device.memory import MemoryDevice

    monkeypatch.setattr(tap, "open_device_or_exit", lambda program, ifname, reactor: MemoryDevice())
    for flags, expected in (([], False), (["--metrics-per-peer"], True)):
        options = tap.Options()
        options.parseOptions(["-r", new_key().base64, "--status-socket", "", *flags])
        service = tap.makeService(options, reactor=object())
        assert service.agent.metrics.per_peer is expected
