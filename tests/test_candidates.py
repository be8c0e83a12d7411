"""Where a peer is tried directly, in what order and why (candidates.py), and
the reconciliation walking down that list on a clock: each candidate chosen
for its reason, the next one when the first gives no handshake, and an IPv6
address that goes away (no longer announced, or no longer working)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import ep, nets, new_key
from tests.test_reconcile import ME, T0, World, make_mesh, view_of
from wgnat.client.candidates import Mine, candidates
from wgnat.client.reconcile import Path
from wgnat.testing import SimulatedNetwork
from wgnat.wire import RemotePeer

START = 1_700_000_000.0

MY_PUBLIC = "203.0.113.21:51820"
MY_V6 = "[2001:db8:1::10]:51820"
THEIR_V6 = "[2001:db8:2::10]:51820"


def remote(
    key,
    endpoint="203.0.113.22:51820",
    lan=(),
    ipv6=(),
    mapped=None,
    session="5e55",
    allowed=("198.51.100.3/32",),
) -> RemotePeer:
    return RemotePeer(
        key,
        ep(endpoint) if endpoint else None,
        nets(*allowed),
        tuple(ep(x) for x in lan),
        session,
        ipv6_endpoints=tuple(ep(x) for x in ipv6),
        mapped_endpoint=ep(mapped) if mapped else None,
    )


def mine(ipv6=(MY_V6,), public=MY_PUBLIC, use_ipv6=True) -> Mine:
    return Mine(ep(public), tuple(ep(x) for x in ipv6), nets("192.168.1.0/24"), use_ipv6)


def kinds(found) -> list[tuple[str, str]]:
    return [(c.kind, str(c.endpoint)) for c in found]


# -- the list ------------------------------------------------------------------


def test_the_order_is_lan_ipv6_mapped_observed_each_with_its_reason():
    peer = remote(
        new_key(),
        endpoint="203.0.113.21:40000",  # our public address: one NAT in front of both
        lan=("192.168.1.11:51820",),
        ipv6=(THEIR_V6,),
        mapped="203.0.113.21:50000",
    )
    found = candidates(peer, mine())
    assert kinds(found) == [
        ("lan", "192.168.1.11:51820"),
        ("ipv6", THEIR_V6),
        ("mapped", "203.0.113.21:50000"),
        ("observed", "203.0.113.21:40000"),
    ]
    reasons = [c.reason for c in found]
    assert "same public address 203.0.113.21 as ours" in reasons[0]
    assert reasons[1] == "both ends have global IPv6, no NAT between"
    assert reasons[2] == "its gateway mapped a port for it"
    assert reasons[3].startswith("its public endpoint as the registry sees it")


def test_lan_only_behind_the_same_public_address():
    peer = remote(new_key(), lan=("192.168.7.11:51820",))
    assert kinds(candidates(peer, mine(ipv6=()))) == [("observed", "203.0.113.22:51820")]


def test_ipv6_only_when_both_ends_have_it_and_it_is_not_turned_off():
    peer = remote(new_key(), ipv6=(THEIR_V6,))
    assert kinds(candidates(peer, mine()))[0] == ("ipv6", THEIR_V6)
    assert [c.kind for c in candidates(peer, mine(ipv6=()))] == ["observed"]
    assert [c.kind for c in candidates(peer, mine(use_ipv6=False))] == ["observed"]
    assert [c.kind for c in candidates(remote(new_key()), mine())] == ["observed"]


def test_addresses_of_one_site_are_never_ipv6_candidates():
    """A registry serving unique-local, link-local or IPv4-mapped addresses as
    IPv6 endpoints must not aim handshakes at them."""
    for bogus in ("[fd00::5]:51820", "[fe80::5]:51820", "[::ffff:127.0.0.1]:51820", "[::1]:1"):
        peer = RemotePeer(
            new_key(), ep("203.0.113.22:51820"), (), (), "5e55", ipv6_endpoints=(ep(bogus),)
        )
        assert [c.kind for c in candidates(peer, mine())] == ["observed"], bogus


def test_a_peer_without_an_observed_endpoint_still_has_its_ipv6_one():
    peer = remote(new_key(), endpoint=None, ipv6=(THEIR_V6,))
    assert kinds(candidates(peer, mine())) == [("ipv6", THEIR_V6)]
    assert candidates(remote(new_key(), endpoint=None), mine()) == []


def test_an_endpoint_is_listed_once():
    peer = remote(new_key(), mapped="203.0.113.22:51820")
    assert [c.kind for c in candidates(peer, mine(ipv6=()))] == ["mapped"]


# -- choosing by what works, on a clock --------------------------------------------


class AgentWorld(World):
    """World, applying a batch as the agent does: a peer removed and probed
    again in one batch (the next candidate) stays ours."""

    def step(self, view, now):
        actions = self.mesh.plan(view, self.device.snapshot(), now)
        self.mesh.saved(self.mesh.take_unsaved())
        removed = set()
        for action in actions:
            if action.kind == "remove":
                self.device.peers.pop(action.public_key, None)
                removed.add(action.public_key)
            elif action.kind == "probe":
                removed.discard(action.public_key)
            for update in action.updates():
                self.device.apply(update)
        self.mesh.forget(removed)
        return actions


def world(my_ipv6=(MY_V6,), **settings) -> AgentWorld:
    mesh = make_mesh(**settings)
    mesh.my_ipv6_endpoints = tuple(ep(x) for x in my_ipv6)
    return AgentWorld(mesh)


def go_direct(w: AgentWorld, view, key, now: float) -> list:
    """Handshake now; the switch at handshake + 0.25 s; the actions of both plans."""
    w.device.handshake(key, now)
    actions = w.step(view, now + 0.05)
    actions += w.step(view, now + 0.3)
    assert w.mesh.paths[key].path is Path.DIRECT
    return actions


def test_each_candidate_is_chosen_for_its_reason():
    cases = [
        (
            "lan",
            remote(new_key(), "203.0.113.21:40000", lan=("192.168.1.11:51820",)),
            "192.168.1.11:51820",
            "same public address 203.0.113.21 as ours",
        ),
        ("ipv6", remote(new_key(), ipv6=(THEIR_V6,)), THEIR_V6, "both ends have global IPv6"),
        (
            "mapped",
            remote(new_key(), mapped="203.0.113.22:50000"),
            "203.0.113.22:50000",
            "its gateway mapped a port for it",
        ),
        ("observed", remote(new_key()), "203.0.113.22:51820", "as the registry sees it"),
    ]
    for kind, peer, endpoint, reason in cases:
        w = world()
        view = view_of(peer, me=MY_PUBLIC)
        first = w.step(view, T0)
        assert [a.kind for a in first] == ["probe"], kind
        assert str(w.device.peers[peer.public_key].endpoint) == endpoint, kind
        assert first[0].reason.startswith(f"probing {w.mesh.paths[peer.public_key].candidate}")
        promote = [a for a in go_direct(w, view, peer.public_key, T0 + 0.02) if a.kind == "promote"]
        path = w.mesh.paths[peer.public_key]
        assert path.candidate is not None and path.candidate.kind == kind
        assert reason in promote[0].reason, (kind, promote[0].reason)


def test_no_handshake_on_ipv6_moves_to_the_observed_endpoint_at_once():
    b = new_key()
    w = world(candidate_timeout=2.0, probe_timeout=6.0)
    view = view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    w.step(view, T0)
    assert str(w.device.peers[b].endpoint) == THEIR_V6
    assert w.mesh.paths[b].deadline == T0 + 2.0  # others follow: the short timeout
    assert w.step(view, T0 + 1.9) == []
    actions = w.step(view, T0 + 2.0)
    # Re-created, so that WireGuard sends a fresh initiation at once.
    assert [a.kind for a in actions] == ["remove", "probe"]
    assert f"no direct handshake with IPv6 {THEIR_V6} within 2 s" in actions[0].reason
    assert "trying observed IPv4 endpoint 203.0.113.22:51820 next" in actions[0].reason
    path = w.mesh.paths[b]
    assert path.path is Path.PROBING and path.candidate.kind == "observed"
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"
    assert path.deadline == T0 + 2.0 + 6.0  # the last: the full probe timeout
    assert path.attempts == 1  # one attempt down the list, for the retry backoff
    assert b in w.mesh.managed
    promote = [a for a in go_direct(w, view, b, T0 + 2.5) if a.kind == "promote"]
    assert "observed IPv4 endpoint 203.0.113.22:51820" in promote[0].reason


def test_when_no_candidate_answers_the_peer_is_relayed_saying_what_was_tried():
    b = new_key()
    w = world(candidate_timeout=2.0, probe_timeout=6.0, align_retries=False)
    view = view_of(remote(b, ipv6=(THEIR_V6,), mapped="203.0.113.22:50000"), me=MY_PUBLIC)
    w.step(view, T0)
    assert [c.kind for c in w.mesh.paths[b].candidates] == ["ipv6", "mapped", "observed"]
    assert [a.kind for a in w.step(view, T0 + 2.0)] == ["remove", "probe"]
    assert [a.kind for a in w.step(view, T0 + 4.0)] == ["remove", "probe"]
    assert w.step(view, T0 + 9.9) == []
    actions = w.step(view, T0 + 10.0)
    assert [a.kind for a in actions] == ["remove"]
    reason = w.mesh.paths[b].reason
    assert reason.startswith("no direct handshake with 203.0.113.22:51820 within 6 s")
    assert f"before it IPv6 {THEIR_V6} gave none within 2 s" in reason
    assert "mapped port 203.0.113.22:50000 gave none within 2 s" in reason
    assert w.mesh.paths[b].path is Path.RELAYED and b not in w.device.peers
    # The retry starts again from the top of the list.
    w.step(view, w.mesh.paths[b].retry_at)
    assert str(w.device.peers[b].endpoint) == THEIR_V6


def test_an_ipv6_endpoint_no_longer_announced_falls_back_down_the_list_with_the_reason():
    b = new_key()
    w = world()
    with_v6 = view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    w.step(with_v6, T0)
    go_direct(w, with_v6, b, T0 + 0.02)
    assert w.device.peers[b].allowed_ips  # direct over IPv6
    without = view_of(remote(b), me=MY_PUBLIC)
    actions = w.step(without, T0 + 30)
    assert [a.kind for a in actions] == ["remove", "probe"]
    assert f"its IPv6 endpoint {THEIR_V6} is no longer announced" in actions[0].reason
    path = w.mesh.paths[b]
    assert path.path is Path.PROBING and path.candidate.kind == "observed"
    assert f"its IPv6 endpoint {THEIR_V6} is no longer announced" in path.reason
    assert w.device.peers[b].allowed_ips == ()  # relayed until the new path is proven
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"
    go_direct(w, without, b, T0 + 30.1)


def test_a_direct_path_whose_mapping_lapsed_is_kept_while_it_works_then_falls_back():
    """A lease that ran out (its gateway stopped answering renewals) removes no
    flow the gateway's connection tracking holds: the direct path is kept,
    saying why once, until the health check finds it dead."""
    b = new_key()
    w = world(my_ipv6=())
    mapped = view_of(remote(b, mapped="203.0.113.22:40000"), me=MY_PUBLIC)
    w.step(mapped, T0)
    go_direct(w, mapped, b, T0 + 0.02)
    assert w.mesh.paths[b].candidate.kind == "mapped"
    w.mesh.take_events()
    without = view_of(remote(b), me=MY_PUBLIC)
    assert w.step(without, T0 + 30) == []
    path = w.mesh.paths[b]
    assert path.path is Path.DIRECT and str(w.device.peers[b].endpoint) == "203.0.113.22:40000"
    (kept,) = w.mesh.take_events()
    assert kept.kind == "kept"
    assert "its mapped endpoint 203.0.113.22:40000 is no longer announced" in kept.detail
    assert "then: observed IPv4 endpoint 203.0.113.22:51820" in kept.detail
    assert "kept while it works" in path.candidate.reason
    assert w.step(without, T0 + 31) == [] and w.mesh.take_events() == []  # said once
    # The path dies (no handshake for 180 s): relayed, and the retry probes what
    # there is now, the observed endpoint.
    actions = w.step(without, T0 + 0.02 + 181)
    assert w.mesh.paths[b].path is Path.RELAYED, actions
    w.step(without, w.mesh.paths[b].retry_at)
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"


def test_a_probe_at_a_mapping_that_lapsed_moves_on_at_once():
    b = new_key()
    w = world(my_ipv6=())
    w.step(view_of(remote(b, mapped="203.0.113.22:40000"), me=MY_PUBLIC), T0)
    actions = w.step(view_of(remote(b), me=MY_PUBLIC), T0 + 1)
    assert [a.kind for a in actions] == ["remove", "probe"]
    assert "its mapped endpoint 203.0.113.22:40000 is no longer announced" in actions[0].reason
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"


def test_our_own_ipv6_address_gone_falls_back_with_the_reason():
    b = new_key()
    w = world()
    view = view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    w.step(view, T0)
    go_direct(w, view, b, T0 + 0.02)
    w.mesh.my_ipv6_endpoints = ()  # the agent's announcement found none
    actions = w.step(view, T0 + 30)
    assert [a.kind for a in actions] == ["remove", "probe"]
    assert "this host has no global IPv6 address any more" in actions[0].reason
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"


def test_an_ipv6_path_that_stops_working_falls_back_then_tries_down_the_list():
    b = new_key()
    w = world(rx_stall_after=65.0, align_retries=False)
    view = view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    w.step(view, T0)
    go_direct(w, view, b, T0 + 0.02)
    w.device.traffic(b, rx=100)
    w.step(view, T0 + 30)
    actions = w.step(view, T0 + 96)
    assert [a.kind for a in actions] == ["remove"]
    path = w.mesh.paths[b]
    assert path.path is Path.RELAYED
    assert "direct path died" in path.reason and f"(on IPv6 {THEIR_V6})" in path.reason
    # The retry tries IPv6 first again, and the observed endpoint when it stays silent.
    w.step(view, path.retry_at)
    assert str(w.device.peers[b].endpoint) == THEIR_V6
    actions = w.step(view, path.retry_at + 2.0)
    assert [a.kind for a in actions] == ["remove", "probe"]
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"


def test_a_relayed_peer_that_gains_an_ipv6_endpoint_is_tried_at_once():
    b = new_key()
    w = world(align_retries=False, retry_backoff=(100.0,))
    view = view_of(remote(b), me=MY_PUBLIC)
    w.step(view, T0)
    w.step(view, T0 + 6)
    assert w.mesh.paths[b].path is Path.RELAYED
    actions = w.step(view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC), T0 + 7)
    assert [a.kind for a in actions] == ["probe"]
    assert f"a new candidate: IPv6 {THEIR_V6}" in actions[0].reason
    assert str(w.device.peers[b].endpoint) == THEIR_V6


def test_a_rebinding_of_the_observed_endpoint_is_still_followed():
    b = new_key()
    w = world()
    view = view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    w.step(view, T0)
    w.step(view, T0 + 2.0)  # IPv6 silent: observed now
    go_direct(w, view, b, T0 + 2.1)
    moved = view_of(remote(b, "203.0.113.22:40000", ipv6=(THEIR_V6,)), me=MY_PUBLIC)
    actions = w.step(moved, T0 + 10)
    assert [a.kind for a in actions] == ["endpoint", "kick"]
    assert w.mesh.paths[b].path is Path.DIRECT


def test_no_ipv6_setting_keeps_to_ipv4():
    b = new_key()
    w = world(ipv6=False)
    w.step(view_of(remote(b, ipv6=(THEIR_V6,)), me=MY_PUBLIC), T0)
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"
    assert ME not in w.device.peers


# -- the agents, the registry and the wire together (in memory) ------------------------


def test_two_agents_announce_ipv6_and_go_direct_over_it_then_leave_it_when_it_goes():
    """Both clients announce their global IPv6 endpoints through the real
    registry; each probes the other's; when a's address goes (seen at its next
    -t check) both leave IPv6 for the observed endpoints, saying why."""
    net = SimulatedNetwork(start=START)
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820", ipv6="2001:db8:1::10")
        net.add_host("b", "198.51.100.3", "203.0.113.22:51820", ipv6="2001:db8:2::10")
        a, b = net.agent("a"), net.agent("b")
        ka, kb = net.key("a"), net.key("b")
        da, db = net.hosts["a"].device, net.hosts["b"].device
        assert str(da.peers[kb].endpoint) == "[2001:db8:2::10]:51820"
        assert str(db.peers[ka].endpoint) == "[2001:db8:1::10]:51820"
        assert net.hub.model.announcements[ka].ipv6_endpoints == (ep("[2001:db8:1::10]:51820"),)
        net.handshake("a", "b")
        net.clock.advance(0.3)
        assert a.paths() == {kb: Path.DIRECT} and b.paths() == {ka: Path.DIRECT}
        assert a.mesh.paths[kb].candidate.kind == "ipv6"

        net.hosts["a"].ipv6 = None  # the address is removed from a's interface
        a.follower.resync()  # the -t check finds the host's addresses changed
        assert a.mesh.my_ipv6_endpoints == ()
        assert str(da.peers[kb].endpoint) == "203.0.113.22:51820"
        assert str(db.peers[ka].endpoint) == "203.0.113.21:51820"
        assert a.mesh.paths[kb].reason == "this host has no global IPv6 address any more"
        assert b.mesh.paths[ka].reason == (
            "its IPv6 endpoint [2001:db8:1::10]:51820 is no longer announced"
        )
        net.handshake("a", "b")
        net.clock.advance(0.3)
        assert a.paths() == {kb: Path.DIRECT} and b.paths() == {ka: Path.DIRECT}
        assert a.mesh.paths[kb].candidate.kind == "observed"
    finally:
        net.stop()


def test_no_ipv6_neither_announces_nor_uses_it():
    net = SimulatedNetwork(start=START)
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820", ipv6="2001:db8:1::10")
        net.add_host("b", "198.51.100.3", "203.0.113.22:51820", ipv6="2001:db8:2::10")
        net.agent("a", ipv6=False)
        net.agent("b")
        ka, kb = net.key("a"), net.key("b")
        assert net.hub.model.announcements[ka].ipv6_endpoints == ()
        assert str(net.hosts["a"].device.peers[kb].endpoint) == "203.0.113.22:51820"
        assert str(net.hosts["b"].device.peers[ka].endpoint) == "203.0.113.21:51820"
    finally:
        net.stop()


# -- the conntrack race: a peer that punches first -------------------------------------


def punching(key, **kwargs) -> RemotePeer:
    return dataclasses.replace(remote(key, **kwargs), punch_first=True)


def test_a_peer_that_punches_first_is_answered_a_moment_later_and_saying_why():
    b = new_key()
    w = world(answer_delay=0.5)
    view = view_of(punching(b), me=MY_PUBLIC)
    assert w.step(view, T0) == []  # nothing sent yet: b's packet must leave its router first
    path = w.mesh.paths[b]
    assert path.path is Path.RELAYED and b not in w.device.peers
    assert "it punches first (its router accepts unsolicited packets)" in path.reason
    assert [e.kind for e in w.mesh.take_events()] == ["answer_later"]
    assert w.mesh.next_wakeup(T0) == T0 + 0.5
    assert w.step(view, T0 + 0.49) == []
    actions = w.step(view, T0 + 0.5)
    assert [a.kind for a in actions] == ["probe"]
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"
    go_direct(w, view, b, T0 + 0.52)


def test_a_peer_that_punches_first_is_answered_late_at_every_retry_too():
    b = new_key()
    w = world(answer_delay=0.5, align_retries=False, retry_backoff=(10.0,))
    view = view_of(punching(b), me=MY_PUBLIC)
    w.step(view, T0)
    w.step(view, T0 + 0.5)
    w.step(view, T0 + 6.5)  # no handshake: relayed, retry 10 s later
    assert w.mesh.paths[b].path is Path.RELAYED and w.mesh.paths[b].retry_at == T0 + 16.5
    assert w.step(view, T0 + 16.5) == []  # the retry moment: b punches now, we a moment later
    assert [a.kind for a in w.step(view, T0 + 17.0)] == ["probe"]


def test_two_ends_that_both_punch_first_or_neither_probe_at_once():
    for mine, theirs in ((True, True), (False, False)):
        b = new_key()
        w = world(punch_first=mine)
        peer = punching(b) if theirs else remote(b)
        assert [a.kind for a in w.step(view_of(peer, me=MY_PUBLIC), T0)] == ["probe"]


def test_punch_first_is_announced_and_passed_on():
    net = SimulatedNetwork(start=START)
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
        net.add_host("x", "198.51.100.3", "203.0.113.24:51820")
        a = net.agent("a")
        net.agent("x", punch_first=True)
        kx = net.key("x")
        assert net.hub.model.announcements[kx].punch_first
        assert a.view.peers[kx].punch_first
        assert a.paths() == {kx: Path.RELAYED}  # waiting for x to punch first
        net.clock.advance(1.0)
        assert a.paths() == {kx: Path.PROBING}
    finally:
        net.stop()


def test_answering_a_peer_that_punches_first_waits_for_our_announcement_to_reach_it():
    """It learns of us when the registry has our announcement: before that,
    our packet would reach its router before its own left."""
    b = new_key()
    w = world(answer_delay=0.5)
    w.mesh.announced = False
    view = view_of(punching(b), me=MY_PUBLIC)
    assert w.step(view, T0) == []
    assert "once the registry has told it of this host" in w.mesh.paths[b].reason
    assert w.mesh.next_wakeup(T0) == pytest.approx(T0 + 0.1)
    assert w.step(view, T0 + 0.1) == []  # still not announced
    w.mesh.announced = True
    assert w.step(view, T0 + 0.2) == []  # announced now: answered 0.5 s from here
    assert w.step(view, T0 + 0.69) == []
    assert [a.kind for a in w.step(view, T0 + 0.7)] == ["probe"]


def test_an_announcement_that_never_arrives_delays_the_answer_a_few_seconds_only():
    b = new_key()
    w = world(answer_delay=0.5)
    w.mesh.announced = False
    view = view_of(punching(b), me=MY_PUBLIC)
    w.step(view, T0)
    assert w.step(view, T0 + 4.9) == []
    assert w.step(view, T0 + 5.0) == []  # waited long enough: answered 0.5 s from here
    assert [a.kind for a in w.step(view, T0 + 5.5)] == ["probe"]


def test_two_symmetric_nats_still_try_ipv6_but_never_the_observed_endpoints():
    """No hole punching gets through two symmetric NATs (several -r tell it),
    but IPv6 does not go through them at all."""
    b, c = new_key(), new_key()
    w = world()
    w.mesh.symmetric_nat = True
    with_v6 = dataclasses.replace(remote(b, ipv6=(THEIR_V6,)), symmetric_nat=True)
    without = dataclasses.replace(
        remote(c, "203.0.113.23:1111", allowed=("198.51.100.4/32",)), symmetric_nat=True
    )
    view = view_of(with_v6, without, me=MY_PUBLIC)
    w.step(view, T0)
    assert [cand.kind for cand in w.mesh.paths[b].candidates] == ["ipv6"]
    assert str(w.device.peers[b].endpoint) == THEIR_V6
    assert c not in w.mesh.paths and "both ends are behind symmetric NATs" in w.mesh.unplanned[c]


def test_through_two_symmetric_nats_only_our_mapped_port_keeps_the_observed_endpoint():
    from wgnat.client.candidates import through_symmetric_nats

    b = new_key()
    theirs = remote(b, "203.0.113.23:1111")
    found = candidates(theirs, mine(ipv6=()))
    assert through_symmetric_nats(found, theirs, mine(ipv6=())) == []
    mapped = dataclasses.replace(mine(ipv6=()), mapped_endpoint=ep("203.0.113.21:40000"))
    (kept,) = through_symmetric_nats(found, theirs, mapped)
    assert (kept.kind, str(kept.endpoint)) == ("observed", "203.0.113.23:1111")
    assert "reaches our mapped port 203.0.113.21:40000" in kept.reason
    # Anything that goes through no NAT mapping is tried instead, as before.
    with_v6 = remote(b, "203.0.113.23:1111", ipv6=(THEIR_V6,))
    dual = dataclasses.replace(mine(), mapped_endpoint=ep("203.0.113.21:40000"))
    assert kinds(through_symmetric_nats(candidates(with_v6, dual), with_v6, dual)) == [
        ("ipv6", THEIR_V6)
    ]


def test_a_handshake_through_another_candidate_than_the_one_probed_credits_that_one():
    """We moved on from its mapped port (no handshake within 2 s: our first
    initiation reached it before it knew us) to its observed endpoint; then its
    own initiation came from the mapped port and WireGuard took that address.
    The path is credited to the mapped port, which is where it runs."""
    b = new_key()
    w = world(my_ipv6=())
    view = view_of(remote(b, mapped="203.0.113.22:40000"), me=MY_PUBLIC)
    w.step(view, T0)
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:40000"
    w.step(view, T0 + 2.0)  # the candidate timeout: the observed endpoint next
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:51820"
    w.device.handshake(b, T0 + 2.5, endpoint=ep("203.0.113.22:40000"))
    w.step(view, T0 + 2.55)
    w.step(view, T0 + 2.8)
    path = w.mesh.paths[b]
    assert path.path is Path.DIRECT
    assert path.candidate.kind == "mapped" and str(path.endpoint) == "203.0.113.22:40000"
    assert w.step(view, T0 + 30) == []  # nothing to follow: it is where it runs
    # A port nobody announced (a symmetric NAT's) leaves the probed one credited.
    c = new_key()
    w2 = world(my_ipv6=())
    view2 = view_of(remote(c), me=MY_PUBLIC)
    w2.step(view2, T0)
    w2.device.handshake(c, T0 + 0.5, endpoint=ep("203.0.113.22:33333"))
    w2.step(view2, T0 + 0.55)
    w2.step(view2, T0 + 0.8)
    assert w2.mesh.paths[c].candidate.kind == "observed"


def test_a_direct_peer_behind_a_symmetric_nat_is_not_aimed_at_a_hubs_port():
    """Its observed endpoint is the port its NAT gave a hub; the path runs at
    the port WireGuard took from its packets.  A move of the hub's record
    (the two hubs' records take turns) leaves the device alone."""
    b = new_key()
    w = world(my_ipv6=())
    symmetric = dataclasses.replace(remote(b, "203.0.113.25:58432"), symmetric_nat=True)
    view = view_of(symmetric, me=MY_PUBLIC)
    w.step(view, T0)
    w.device.handshake(b, T0 + 0.2, endpoint=ep("203.0.113.25:51820"))  # roamed
    w.step(view, T0 + 0.25)
    w.step(view, T0 + 0.5)
    assert w.mesh.paths[b].path is Path.DIRECT
    moved = view_of(dataclasses.replace(symmetric, endpoint=ep("203.0.113.25:47521")), me=MY_PUBLIC)
    assert w.step(moved, T0 + 5) == []
    assert str(w.device.peers[b].endpoint) == "203.0.113.25:51820"
    # Flagged so but still at the endpoint we set (two hubs see two ports while
    # a rebinding reaches one first): followed, as a rebinding must be.
    d = new_key()
    w3 = world(my_ipv6=())
    flagged = dataclasses.replace(remote(d, "203.0.113.22:51820"), symmetric_nat=True)
    w3.step(view_of(flagged, me=MY_PUBLIC), T0)
    go_direct(w3, view_of(flagged, me=MY_PUBLIC), d, T0 + 0.1)
    rebound = dataclasses.replace(flagged, endpoint=ep("203.0.113.22:45619"))
    actions = w3.step(view_of(rebound, me=MY_PUBLIC), T0 + 5)
    assert [a.kind for a in actions] == ["endpoint", "kick"]
    assert str(w3.device.peers[d].endpoint) == "203.0.113.22:45619"
    # A peer not behind one is followed as before (a NAT rebinding).
    c = new_key()
    w2 = world(my_ipv6=())
    w2.step(view_of(remote(c), me=MY_PUBLIC), T0)
    go_direct(w2, view_of(remote(c), me=MY_PUBLIC), c, T0 + 0.1)
    actions = w2.step(view_of(remote(c, "203.0.113.22:40001"), me=MY_PUBLIC), T0 + 5)
    assert [a.kind for a in actions] == ["endpoint", "kick"]


def test_a_path_running_at_a_candidate_announced_after_its_handshake_is_credited_to_it():
    """We probed its observed endpoint; its handshake came from its mapped port
    (WireGuard took that) before its mapping was announced; once it is, the
    path is credited to the mapped port, where it runs."""
    b = new_key()
    w = world(my_ipv6=())
    plain = view_of(remote(b), me=MY_PUBLIC)
    w.step(plain, T0)
    w.device.handshake(b, T0 + 0.2, endpoint=ep("203.0.113.22:40000"))
    w.step(plain, T0 + 0.25)
    w.step(plain, T0 + 0.5)
    assert w.mesh.paths[b].path is Path.DIRECT
    assert w.mesh.paths[b].candidate.kind == "observed"  # nothing else known yet
    mapped = view_of(remote(b, mapped="203.0.113.22:40000"), me=MY_PUBLIC)
    assert w.step(mapped, T0 + 1) == []
    path = w.mesh.paths[b]
    assert path.candidate.kind == "mapped" and str(path.endpoint) == "203.0.113.22:40000"
    assert str(w.device.peers[b].endpoint) == "203.0.113.22:40000"
    assert w.step(mapped, T0 + 2) == []
