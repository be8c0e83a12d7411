"""The client agent end to end in memory (wgnat.testing.SimulatedNetwork): a real
Registry (hub + model) over a MemoryDevice, MeshAgents over their own
MemoryDevices, all on one Clock."""

from __future__ import annotations

import errno
import os

import pytest

from tests.helpers import ep, nets, new_key, peer
from wgnat.client.agent import MeshAgent
from wgnat.client.reconcile import Path
from wgnat.client.registry_client import RegistryError, RegistryStream
from wgnat.testing import MemoryStateStore, SimulatedNetwork

START = 1_700_000_000.0


class Net(SimulatedNetwork):
    """The shipped simulated network, with the scenes these tests start from."""

    def direct_pair(self) -> tuple[MeshAgent, MeshAgent]:
        """a and b, two clients behind two NATs, direct with each other."""
        self.add_host("a", "198.51.100.2", "203.0.113.21:51820")
        self.add_host("b", "198.51.100.3", "203.0.113.22:51820")
        a, b = self.agent("a"), self.agent("b")
        self.handshake("a", "b")
        self.clock.advance(0.3)
        assert a.paths() == {self.key("b"): Path.DIRECT}
        return a, b


@pytest.fixture
def net():
    n = Net()
    yield n
    n.stop()


def test_mesh_forms_by_push_and_switches_together(net):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    a, b = net.agent("a"), net.agent("b")
    ka, kb = net.hosts["a"].key, net.hosts["b"].key
    # Each learned of the other at once, with no time passing: probing.
    assert a.paths() == {kb: Path.PROBING} and b.paths() == {ka: Path.PROBING}
    da, db = net.hosts["a"].device, net.hosts["b"].device
    assert da.peers[kb].allowed_ips == () and str(da.peers[kb].endpoint) == "203.0.113.22:51820"
    net.handshake("a", "b")
    net.clock.advance(0.05)
    net.clock.advance(0.25)
    assert a.paths() == {kb: Path.DIRECT} and b.paths() == {ka: Path.DIRECT}
    assert da.peers[kb].allowed_ips == nets("198.51.100.3/32")
    assert db.peers[ka].allowed_ips == nets("198.51.100.2/32")
    # The registry peer was never touched.
    assert ("set", net.registry_key) not in [
        (k, u.public_key) for k, u in da.operations if k == "set"
    ]
    assert net.hosts["a"].store.managed == {kb}


def test_a_new_peer_is_pushed_to_waiting_clients_without_any_time_passing(net):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    a = net.agent("a")
    assert a.paths() == {}
    c = net.add_host("c", "198.51.100.4", "203.0.113.23:51820")
    net.hub.refresh()  # the registry's periodic read sees c, live...
    assert a.paths() == {}  # ...but no wgnat client runs there to punch back
    net.agent("c")  # c's client announces itself: pushed to a at once
    assert a.paths() == {c.key: Path.PROBING}


def test_unreachable_registry_keeps_the_mesh_and_resumes(net):
    a, _ = net.direct_pair()
    kb = net.hosts["b"].key
    assert a.paths() == {kb: Path.DIRECT}
    client = net.hosts["a"].client
    client.down = "cannot reach the registry at http://198.51.100.1:51820: connection refused"
    for _ in range(30):  # past the -t resync, which cancels the long poll and fails
        net.clock.advance(10)
        net.alive("a", "b")
    assert a.registry_up is False
    assert a.paths() == {kb: Path.DIRECT}  # kept, well past the removal grace
    assert kb in net.hosts["a"].device.peers
    fetches = client.fetches
    client.down = None
    net.clock.advance(30)
    assert a.registry_up is True and client.fetches > fetches
    # The same registry (same epoch) still holds what a announced: not again.
    assert len(client.announced) == 1


def test_a_registry_restarted_afresh_gets_a_delta_request_a_full_answer_and_the_announcement(
    net,
):
    from wgnat.registry.model import RegistryModel

    a, _ = net.direct_pair()
    kb = net.hosts["b"].key
    client = net.hosts["a"].client
    epoch = a.view.epoch
    # The registry process restarts without its state: a new epoch, nothing announced.
    for stream in list(client.streams):
        stream.fail(RegistryError("the registry's stream was cut off"))
    net.hub.model = RegistryModel()
    net.clock.advance(1.0)  # the first backoff window
    assert a.registry_up is True and a.view.epoch not in (None, epoch)
    assert len(client.announced) == 2  # announced again, to the new epoch
    assert net.hub.model.announcements.get(net.hosts["a"].key) is not None
    assert a.paths() == {kb: Path.DIRECT}  # nothing disturbed meanwhile


def test_restart_keeps_peers_without_duplicates_or_orphans(net):
    a, _ = net.direct_pair()
    a.stopService()
    device = net.hosts["a"].device
    before = dict(device.peers)
    operations = len(device.operations)
    again = net.agent("a")
    kb = net.hosts["b"].key
    assert again.paths() == {kb: Path.DIRECT}
    net.clock.advance(1)
    assert device.peers == before
    assert len(device.operations) == operations  # nothing re-added


def test_peer_that_leaves_the_registry_is_removed_after_grace(net):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    a, _ = net.agent("a"), net.agent("b")
    kb = net.hosts["b"].key
    assert kb in net.hosts["a"].device.peers
    net.hosts["b"].agent.stopService()
    del net.registry_device.peers[kb]
    net.hub.refresh()
    net.clock.advance(29)
    assert kb in net.hosts["a"].device.peers
    net.clock.advance(16)  # the next health tick after the 30 s grace
    assert kb not in net.hosts["a"].device.peers
    assert a.paths() == {} and net.hosts["a"].store.managed == set()


def test_own_endpoint_change_kicks_direct_peers(net):
    net.direct_pair()
    ka, kb = net.hosts["a"].key, net.hosts["b"].key
    dev_a = net.hosts["a"].device
    before = len(dev_a.operations)
    # a's NAT rebinds: the registry sees a's new mapping.
    net.registry_device.handshake(ka, net.clock.seconds(), endpoint=ep("203.0.113.21:40001"))
    net.hub.refresh()
    kicks = [u for kind, u in dev_a.operations[before:] if kind == "set"]
    assert [u.persistent_keepalive for u in kicks] == [0, 25]
    assert all(u.public_key == kb for u in kicks)
    # And b follows a's new endpoint.
    assert str(net.hosts["b"].device.peers[ka].endpoint) == "203.0.113.21:40001"


def test_missing_registry_peer_is_a_clear_startup_error(net):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.hosts["a"].device.peers.clear()
    agent = net.agent("a")
    assert agent.failed
    failures = []
    agent.ready.addErrback(failures.append)
    assert not failures  # handled by _fatal, which logged the reason


def test_refused_registry_answer_changes_nothing(net):
    a, _ = net.direct_pair()
    kb = net.hosts["b"].key
    assert a.paths() == {kb: Path.DIRECT}
    device = net.hosts["a"].device
    before = dict(device.peers)
    client = net.hosts["a"].client
    original = client.follow

    def bad_follow(*args):
        stream = RegistryStream()
        stream.fail(RegistryError("refused the registry's answer: peers[0]: malformed key"))
        return stream

    client.follow = bad_follow
    a.follower._stream.fail(RegistryError("refused the registry's answer: peers[0]: malformed key"))
    for _ in range(20):  # past the -t resync: every answer is refused
        net.clock.advance(5)
        net.alive("a", "b")
    assert a.registry_up is False
    assert set(device.peers) == set(before)
    assert device.peers[kb].allowed_ips == before[kb].allowed_ips
    client.follow = original


def test_an_unexpected_error_does_not_stop_the_agent(net):
    # A bug (here: plan() raising) is logged; the timers and the registry loop go on.
    a, _ = net.direct_pair()
    original = a.mesh.plan
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("a bug")

    a.mesh.plan = broken
    net.clock.advance(16)
    net.clock.advance(16)
    assert len(calls) >= 2  # still woken by its health timer after the failure
    a.mesh.plan = original
    net.clock.advance(16)
    assert a.paths() == {net.hosts["b"].key: Path.DIRECT}


def test_changes_arrive_on_one_stream_and_keepalives_count_as_contact(net):
    a, _ = net.direct_pair()
    ka, kb = net.hosts["a"].key, net.hosts["b"].key
    client = net.hosts["a"].client
    opened = client.fetches
    assert net.hub.streams() == 2
    # b's NAT rebinds, then a's: both pushed on the open streams, nothing re-asked.
    net.registry_device.handshake(kb, net.clock.seconds(), endpoint=ep("203.0.113.22:40000"))
    net.hub.refresh()
    assert str(net.hosts["a"].device.peers[kb].endpoint) == "203.0.113.22:40000"
    net.registry_device.handshake(ka, net.clock.seconds(), endpoint=ep("203.0.113.21:40001"))
    net.hub.refresh()
    assert a.view.my_endpoint == ep("203.0.113.21:40001")
    assert ka not in a.view.peers  # its own record, on the shared line, is dropped
    assert client.fetches == opened
    # Nothing changes for 15 s: a keep-alive line, which counts as hearing from it.
    heard = a.follower.last_sync
    net.clock.advance(15)
    assert a.follower.last_sync == heard + 15 and a.registry_up is True
    assert client.fetches == opened


def test_a_cut_stream_is_reopened_after_the_first_backoff_step(net):
    a, _ = net.direct_pair()
    client = net.hosts["a"].client
    version = a.view.version
    [stream] = client.streams
    stream.fail(RegistryError("the registry's stream from http://198.51.100.1:51820 was cut off"))
    assert a.registry_up is False
    net.clock.advance(1)  # the first backoff step
    assert a.registry_up is True and len(client.streams) == 1
    assert net.hub.streams() == 2 and a.view.version == version


def test_a_device_that_vanishes_is_retried_every_second_and_logged_once(net):
    """The interface deleted under a running client (seen in the testbed: 20
    failed reads and error lines a second while a probe was under way)."""
    from twisted.logger import capturedLogs, formatEvent

    from wgnat.device import DeviceNotFound

    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    a = net.agent("a")
    net.agent("b")
    assert a.paths() == {net.hosts["b"].key: Path.PROBING}  # polled every 50 ms
    device = net.hosts["a"].device
    reads = []
    original_read = device.read
    device.read = lambda: (reads.append(1), original_read())[1]
    device.failure = DeviceNotFound("interface wg0 not found")
    with capturedLogs() as events:
        for _ in range(50):
            net.clock.advance(0.1)
    lines = [formatEvent(event) for event in events]
    assert len(reads) <= 6, len(reads)  # every second, not every 50 ms
    assert len([line for line in lines if "cannot read" in line]) == 1, lines
    assert a.read_error == "interface wg0 not found"
    device.failure = None
    with capturedLogs() as events:
        net.clock.advance(1.0)
    assert any("works again" in formatEvent(event) for event in events)
    assert a.read_error is None


def test_the_state_file_is_written_once_a_batch_and_before_the_peers_exist(net):
    """Each write holds every key and ends with an fsync: one per peer made
    applying N new peers O(N^2) (bench/client_cost.py: 17 s for 1,000)."""
    from wgnat._types import Announcement

    a = net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    others = []
    for index in range(40):
        key = new_key()
        net.registry_device.add_peer(
            peer(key, f"203.0.113.99:{1000 + index}", (f"198.51.100.{100 + index}/32",), START)
        )
        others.append(key)
    net.hub.refresh()
    for key in others:
        net.hub.model.announce(key, Announcement(key.raw[:8].hex(), ()))
    store, device = a.store, a.device
    on_device_at_save = []
    original = store.save

    def save(managed):
        on_device_at_save.append(sum(1 for key in others if key in device.peers))
        original(managed)

    store.save = save
    agent = net.agent("a")
    assert set(agent.paths()) == set(others)
    assert store.saves == 1 and store.managed == set(others)
    assert on_device_at_save == [0]  # written before any was created
    # No handshake comes: all 40 fall back together, one write again.
    net.clock.advance(6.1)
    assert all(path is Path.RELAYED for path in agent.paths().values())
    assert store.saves == 2 and store.managed == set()
    assert not any(key in device.peers for key in others)


def test_the_safety_net_check_costs_nothing_when_the_view_is_current(net):
    """-t asks the registry whether our view is its view (a digest): nothing is
    encoded, fetched or planned when it is; what differs comes back when not."""
    a, _ = net.direct_pair()
    client, device = net.hosts["a"].client, net.hosts["a"].device
    fetches, reads, checks = client.fetches, device.reads, client.checks
    a.follower.resync()  # the -t timer
    assert client.checks == checks + 1 and client.fetches == fetches
    assert device.reads == reads  # the health check's timer reads the device, not this
    # The view had drifted from the registry's (what the safety net is for): the
    # check answers with the whole view, which is planned.
    a.view.peers.clear()
    a.follower.resync()
    assert net.hosts["b"].key in a.view.peers and device.reads > reads
    # The stream is followed again from the view's version, not asked whole.
    assert len(client.streams) == 1 and a.view.version == net.hub.model.version


def test_the_safety_net_runs_on_its_timer_and_survives_a_failed_check(net, logged):
    a, _ = net.direct_pair()
    client = net.hosts["a"].client
    checks = client.checks
    net.clock.advance(60)  # -t 1m0s
    assert client.checks == checks + 1
    original = client.check

    def broken(*args):
        from twisted.internet.defer import fail

        return fail(RegistryError("the registry refused the request: HTTP 500"))

    client.check = broken
    fetches, full = client.fetches, client.full_answers
    net.clock.advance(60)
    # The stream is followed again from the view's version: not a whole view.
    assert client.fetches == fetches + 1 and client.full_answers == full
    assert any("the -t check failed" in line for line in logged)
    client.check = original
    net.clock.advance(60)
    assert client.checks == checks + 2 and a.registry_up is True


def test_a_direct_peer_is_never_given_a_route_holding_a_relayed_peers_address(net):
    """Issue 17, finding 4, on the clock: the hub gives g 198.51.100.16/28 and a
    (no wgnat client: relayed) 198.51.100.20/32.  c goes direct with g; traffic
    for a's address must still go to the registry, which relays it to a."""
    from dataclasses import replace

    for name, tunnel, public in (
        ("c", "198.51.100.2", "203.0.113.21:51820"),
        ("g", "198.51.100.7", "203.0.113.22:51820"),
        ("a", "198.51.100.20", "203.0.113.23:51820"),
    ):
        net.add_host(name, tunnel, public)
    kg = net.key("g")
    hub = net.registry_device.peers
    hub[kg] = replace(hub[kg], allowed_ips=nets("198.51.100.7/32", "198.51.100.16/28"))
    c, _ = net.agent("c"), net.agent("g")
    net.handshake("c", "g")
    net.clock.advance(0.3)
    assert c.paths() == {kg: Path.DIRECT}
    device = net.hosts["c"].device
    assert device.peers[kg].allowed_ips == nets("198.51.100.7/32")
    assert net.key("a") not in device.peers
    for _ in range(10):  # and it stays so
        net.alive("c", "g")
        net.clock.advance(15)
        assert device.peers[kg].allowed_ips == nets("198.51.100.7/32")


# -- the state file (issue 17, finding 5) --------------------------------------


class FullDisk(MemoryStateStore):
    """A state store whose writes fail with ENOSPC while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.failures = 0

    def save(self, managed):
        if self.full:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().save(managed)


def unlisted_peers(net, name):
    """Peers on the host's device that its state file does not list (orphans
    after a restart), the registry peer aside."""
    host = net.hosts[name]
    return {key for key in host.device.peers if key != net.registry_key} - host.store.managed


def test_a_failed_state_file_write_creates_no_peer_and_is_retried_and_logged_once(net, logged):
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    store = net.hosts["a"].store = FullDisk()
    a, _ = net.agent("a"), net.agent("b")
    kb = net.key("b")
    net.handshake("a", "b")
    net.clock.advance(0.3)
    assert a.paths() == {kb: Path.DIRECT} and store.managed == {kb}
    store.full = True
    net.add_host("c", "198.51.100.4", "203.0.113.23:51820")
    net.hub.refresh()
    net.agent("c")  # announced: pushed to a, which decides to probe c
    kc = net.key("c")
    device = net.hosts["a"].device
    assert kc not in device.peers, "a peer was created that the state file does not list"
    assert a.paths()[kc] is Path.RELAYED
    assert "state file could not be written" in a.mesh.paths[kc].reason
    for _ in range(8):  # two minutes of plans: retried, never created, b kept
        net.alive("a", "b")
        net.clock.advance(15)
        assert unlisted_peers(net, "a") == set()
        assert a.paths()[kb] is Path.DIRECT
    assert store.failures >= 8  # retried at every plan...
    errors = [line for line in logged if "cannot write the state file" in line]
    assert len(errors) == 1, errors  # ...and said once
    assert "No space left on device" in errors[0] and "--state-dir" in errors[0]
    assert not any("unexpected error" in line for line in logged)
    store.full = False
    net.alive("a", "b")
    net.clock.advance(15)
    assert kc in device.peers and store.managed == {kb, kc}
    assert any("state file is written again" in line for line in logged)
    # A restart takes every peer back: none is left unmanaged.
    a.stopService()
    again = net.agent("a")
    assert set(again.paths()) == {kb, kc}


def test_a_failed_write_after_a_removal_is_retried(net):
    a, _ = net.direct_pair()
    store = net.hosts["a"].store = a.state_store = FullDisk()
    store.managed = {net.key("b")}
    kb = net.key("b")
    net.hosts["b"].agent.stopService()
    del net.registry_device.peers[kb]
    net.hub.refresh()
    store.full = True
    net.clock.advance(45)  # past the removal grace: removed, the write fails
    assert kb not in net.hosts["a"].device.peers
    assert store.managed == {kb}  # harmless: dropped at the next start
    store.full = False
    net.clock.advance(15)
    assert store.managed == set()


def test_a_corrupt_state_file_is_set_aside_and_wgnats_peers_are_taken_back(net, tmp_path, logged):
    from wgnat.client.state_file import StateStore, default_state_path

    path = default_state_path(str(tmp_path), "wg0")
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    net.add_host("d", "198.51.100.5", "203.0.113.24:51820")
    net.hosts["a"].store = StateStore(path)  # type: ignore[assignment]
    a, _, _ = net.agent("a"), net.agent("b"), net.agent("d")
    kb, kd = net.key("b"), net.key("d")
    net.handshake("a", "b")
    net.clock.advance(0.3)
    assert a.paths()[kb] is Path.DIRECT
    device = net.hosts["a"].device
    # Peers configured by hand: one the registry does not list, and one for a
    # listed key (d, a wgnat client) but not in wgnat's shape (its own keepalive).
    hand = new_key()
    device.add_peer(peer(hand, "203.0.113.50:51820", ("198.51.100.50/32",), START))
    device.peers.pop(kd, None)
    device.add_peer(peer(kd, "203.0.113.24:51820", ("198.51.100.5/32",), START, keepalive=10))
    a.stopService()
    with open(path, "w") as handle:
        handle.write('{"format": 1, "managed_peers": ["')  # cut short by a full disk
    hand_before, d_before = device.peers[hand], device.peers[kd]
    store = net.hosts["a"].store
    written: list[set] = []
    real_save = store.save

    def save(managed):
        written.append(set(managed))
        real_save(managed)

    store.save = save

    again = net.agent("a")
    # No file listing none of them was written before they were taken back (a
    # crash then would have lost them for good).
    assert written == [{kb}]
    assert any("is corrupt" in line and "kept as" in line for line in logged)
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert again.paths() == {kb: Path.DIRECT}  # taken back, not orphaned
    assert StateStore(path).load() == {kb}  # and written down again
    assert device.peers[hand] == hand_before and device.peers[kd] == d_before
    assert any("left alone as configured by hand" in line for line in logged)
    # Managed again for real: when b leaves, its peer goes.
    net.hosts["b"].agent.stopService()
    del net.registry_device.peers[kb]
    net.hub.refresh()
    net.clock.advance(45)
    assert kb not in device.peers and StateStore(path).load() == set()
    assert device.peers[hand] == hand_before


def test_a_full_answer_to_the_check_leaves_a_view_the_next_check_finds_current(net):
    """Found in review: a full answer lists the caller too; through the check
    (not a stream's decoder) the client's own record entered its view, and its
    digest never matched again: a full answer at every -t, for good."""
    from wgnat.wire import view_digest

    a, _ = net.direct_pair()
    client = net.hosts["a"].client
    a.view.peers.clear()  # the view drifted: the check sends the whole view
    a.follower.resync()
    assert net.hosts["a"].key not in a.view.peers
    assert view_digest(a.view.peers.values(), a.view.my_endpoint) == net.hub.model.view_digest(
        net.hosts["a"].key
    )
    full = client.full_answers
    checks = client.checks
    a.follower.resync()
    assert client.checks == checks + 1 and client.full_answers == full
