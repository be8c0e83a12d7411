"""Several registries (issue 15): merging their views, choosing the hub that
relays and moving it when that hub dies (never back for being preferred), and
telling a symmetric NAT from the two hubs' views.  Pure, on plain numbers."""

from __future__ import annotations

from tests.helpers import device, ep, ip, nets, new_key, peer
from wgnat.client.hubs import HubChoice, HubSettings
from wgnat.client.merge import HubView, merge_views, own_endpoint, symmetric_nat
from wgnat.wire import Answer, RemotePeer

T0 = 1_000_000.0
HUB1, HUB2, HUB3 = new_key(), new_key(), new_key()
A, B = new_key(), new_key()
TUNNEL = "198.51.100.0/24"


class Now:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def record(key, endpoint, age=None, session="5e55", lan=()):
    return RemotePeer(
        key, ep(endpoint), nets("198.51.100.9/32"), tuple(ep(x) for x in lan), session, age
    )


def full(*peers, me=None, version=1) -> Answer:
    return Answer("e", version, True, ep(me) if me else None, tuple(peers), ())


def delta(*peers, removed=(), version=2) -> Answer:
    return Answer("e", version, False, None, tuple(peers), tuple(removed))


# -- merging views -------------------------------------------------------------


def test_one_registry_is_its_own_view() -> None:
    view = HubView()
    assert merge_views([view], [None]) is view


def test_nothing_is_decided_before_any_registry_answered() -> None:
    assert merge_views([HubView(), HubView()], [False, None]).version is None


def test_the_record_of_the_newest_handshake_wins() -> None:
    now = Now()
    one, two = HubView(clock=now), HubView(clock=now)
    one.apply(full(record(A, "192.0.2.1:1000", age=30.0)))
    two.apply(full(record(A, "192.0.2.1:2000", age=5.0)))
    merged = merge_views([one, two], [True, True])
    assert merged.peers[A].endpoint == ep("192.0.2.1:2000")
    # Later the first registry sends a newer record (the peer's NAT rebound):
    # placed on our clock when it arrived, it is now the freshest.
    now.t += 60
    one.apply(delta(record(A, "192.0.2.1:3000", age=1.0)))
    assert merge_views([one, two], [True, True]).peers[A].endpoint == ep("192.0.2.1:3000")


def test_a_registry_we_follow_beats_one_we_cannot_reach() -> None:
    now = Now()
    one, two = HubView(clock=now), HubView(clock=now)
    one.apply(full(record(A, "192.0.2.1:1000", age=0.0)))
    two.apply(full(record(A, "192.0.2.1:2000", age=100.0)))
    assert merge_views([one, two], [False, True]).peers[A].endpoint == ep("192.0.2.1:2000")
    assert merge_views([one, two], [True, True]).peers[A].endpoint == ep("192.0.2.1:1000")


def test_ties_go_to_the_first_registry() -> None:
    one, two = HubView(), HubView()
    one.apply(full(record(A, "192.0.2.1:1000")))
    two.apply(full(record(A, "192.0.2.1:2000")))
    assert merge_views([one, two], [True, True]).peers[A].endpoint == ep("192.0.2.1:1000")


def test_an_announcement_one_registry_missed_comes_from_the_other() -> None:
    now = Now()
    one, two = HubView(clock=now), HubView(clock=now)
    one.apply(full(record(A, "192.0.2.1:1000", age=50.0, session="aa", lan=["192.168.1.5:51820"])))
    two.apply(full(record(A, "192.0.2.1:2000", age=1.0, session=None)))
    merged = merge_views([one, two], [True, True]).peers[A]
    assert merged.endpoint == ep("192.0.2.1:2000")  # the freshest
    assert merged.session == "aa" and merged.lan_endpoints == (ep("192.168.1.5:51820"),)


def test_a_peer_is_removed_only_when_no_registry_lists_it() -> None:
    one, two = HubView(), HubView()
    one.apply(full(record(A, "192.0.2.1:1000"), record(B, "192.0.2.2:1000")))
    two.apply(full(record(A, "192.0.2.1:1000"), record(B, "192.0.2.2:1000")))
    one.apply(delta(removed=[B]))
    assert set(merge_views([one, two], [True, True]).peers) == {A, B}
    two.apply(delta(removed=[B]))
    assert set(merge_views([one, two], [True, True]).peers) == {A}


def test_own_endpoint_is_one_registrys_not_alternating() -> None:
    one, two = HubView(), HubView()
    one.apply(full(me="192.0.2.7:4000"))
    two.apply(full(me="192.0.2.7:5000"))
    assert own_endpoint([one, two], [True, True]) == ep("192.0.2.7:4000")
    assert own_endpoint([one, two], [False, True]) == ep("192.0.2.7:5000")
    assert own_endpoint([one, two], [False, False]) == ep("192.0.2.7:4000")


def test_symmetric_nat_is_one_address_with_different_ports() -> None:
    assert symmetric_nat([ep("192.0.2.7:4000"), ep("192.0.2.7:5000")])
    assert not symmetric_nat([ep("192.0.2.7:51820"), ep("192.0.2.7:51820")])
    assert not symmetric_nat([ep("192.0.2.7:4000"), None])
    # Two addresses (a NAT with several, or a host that moved): not this proof.
    assert not symmetric_nat([ep("192.0.2.7:4000"), ep("192.0.2.8:5000")])


# -- which hub relays ------------------------------------------------------------


class Hubs:
    """Two (or three) hub peers on a device, their counters moved by hand."""

    def __init__(self, hubs=(HUB1, HUB2), relay_on=HUB1, handshake=T0) -> None:
        self.now = T0
        self.keys = hubs
        self.addresses = {key: ip(f"198.51.100.{1 + i * 100}") for i, key in enumerate(hubs)}
        self.rx = dict.fromkeys(hubs, 100)
        self.tx = dict.fromkeys(hubs, 100)
        self.handshakes = dict.fromkeys(hubs, handshake)
        self.allowed = {
            key: (f"{self.addresses[key]}/32",) + ((TUNNEL,) if key == relay_on else ())
            for key in hubs
        }
        self.choice = HubChoice.start(
            [(key, self.addresses[key]) for key in hubs], self.state(), T0, HubSettings()
        )

    def state(self):
        return device(
            *(
                peer(
                    key,
                    "203.0.113.10:51820",
                    tuple(self.allowed[key]),
                    self.handshakes[key],
                    self.rx[key],
                    self.tx[key],
                    25,
                )
                for key in self.keys
            )
        )

    def read(self, heard=None):
        move = self.choice.observe(self.state(), self.now, heard)
        if move is not None:
            for update in move.updates():
                self.allowed[update.public_key] = tuple(str(n) for n in update.allowed_ips)
        return move

    def tick(self, seconds: float, alive=(HUB1, HUB2, HUB3), sending=False):
        """`seconds` pass, one read a second: live hubs send something (their
        stream keep-alive, relayed traffic) and rekey; `sending`: we send data through
        the relay."""
        moves = []
        for _ in range(int(seconds)):
            self.now += 1
            for key in self.keys:
                if key in alive:
                    self.rx[key] += 60
                    handshake = self.handshakes[key]
                    if handshake is not None and self.now - handshake >= 120:
                        self.handshakes[key] = self.now  # WireGuard rekeys every 2 min
                if sending and self.choice.relay == key:
                    self.tx[key] += 1000
            move = self.read()
            if move is not None:
                moves.append((self.now - T0, move))
        return moves


def test_the_relay_is_the_hub_configured_with_the_tunnel_network() -> None:
    hubs = Hubs(relay_on=HUB2)
    assert hubs.choice.relay == HUB2 and hubs.choice.routes == nets(TUNNEL)
    assert hubs.tick(30) == []


def test_without_relay_routes_nothing_moves() -> None:
    hubs = Hubs(relay_on=None)
    assert hubs.choice.relay is None and hubs.choice.routes == ()
    assert hubs.tick(60, alive=(HUB2,)) == []


def test_a_silent_hub_loses_the_relay_to_the_next_live_one() -> None:
    hubs = Hubs()
    hubs.tick(5)
    moves = hubs.tick(30, alive=(HUB2,))  # hub 1 killed at +5 s
    assert len(moves) == 1
    at, move = moves[0]
    assert 5 + 17 <= at <= 5 + 19  # silence past the registry's 15 s keep-alive
    assert move.to_key == HUB2 and move.from_key == HUB1
    assert "nothing received" in move.reason
    assert hubs.allowed[HUB2] == ("198.51.100.101/32", TUNNEL)
    assert hubs.allowed[HUB1] == ("198.51.100.1/32",)
    assert hubs.choice.relay == HUB2


def test_unanswered_relayed_data_moves_the_relay_sooner() -> None:
    hubs = Hubs()
    hubs.tick(5, sending=True)
    moves = hubs.tick(30, alive=(HUB2,), sending=True)
    at, move = moves[0]
    assert at <= 5 + 13
    assert move.to_key == HUB2 and "data sent" in move.reason


def test_the_relay_does_not_come_back_when_the_first_hub_does() -> None:
    hubs = Hubs()
    hubs.tick(5)
    assert len(hubs.tick(30, alive=(HUB2,))) == 1
    # Hub 1 is back (handshakes, keep-alives): the relay stays where it is.
    hubs.handshakes[HUB1] = hubs.now
    assert hubs.tick(300) == []
    assert hubs.choice.relay == HUB2
    # Until hub 2 dies in turn: then back by the same rule.
    moves = hubs.tick(30, alive=(HUB1,))
    assert [move.to_key for _, move in moves] == [HUB1]


def test_no_move_while_no_other_hub_is_live() -> None:
    hubs = Hubs()
    assert hubs.tick(60, alive=()) == []
    assert hubs.choice.relay == HUB1
    # The second hub answers again: the relay goes there.
    hubs.handshakes[HUB2] = hubs.now
    moves = hubs.tick(3, alive=(HUB2,))
    assert [move.to_key for _, move in moves] == [HUB2]


def test_the_first_live_hub_in_r_order_takes_over() -> None:
    hubs = Hubs(hubs=(HUB1, HUB2, HUB3))
    moves = hubs.tick(30, alive=(HUB2, HUB3))
    assert [move.to_key for _, move in moves] == [HUB2]


def test_a_client_started_while_its_relay_hub_is_down_relays_through_another() -> None:
    hubs = Hubs(handshake=None)  # just started: no handshake with any hub yet
    hubs.handshakes[HUB2] = T0 + 0.1  # hub 2 answers at once, hub 1 never
    moves = hubs.tick(10, alive=(HUB2,))
    at, move = moves[0]
    assert move.to_key == HUB2 and "no handshake" in move.reason
    assert 6 <= at <= 7  # one lost initiation's grace, not more


def test_a_hub_slower_to_handshake_at_the_start_keeps_the_relay() -> None:
    hubs = Hubs(handshake=None)
    hubs.handshakes[HUB2] = T0 + 0.01
    hubs.tick(2, alive=(HUB2,))
    hubs.handshakes[HUB1] = hubs.now  # 2 s later: within the grace
    assert hubs.tick(60) == []
    assert hubs.choice.relay == HUB1


def test_the_registry_answering_counts_as_hearing_from_the_hub() -> None:
    hubs = Hubs()
    for _ in range(40):  # no rx on the device, but the stream answers
        hubs.now += 1
        assert hubs.read(heard={HUB1: hubs.now - 0.5, HUB2: hubs.now - 0.5}) is None


def test_quiet_relay_hub_is_read_every_second() -> None:
    hubs = Hubs()
    hubs.tick(1)
    assert hubs.choice.next_check(hubs.now) is None
    hubs.tick(11, alive=(HUB2,))
    assert hubs.choice.next_check(hubs.now) == hubs.now + 1


def test_status_snapshot_names_the_relay() -> None:
    hubs = Hubs()
    hubs.tick(1)
    rows = hubs.choice.snapshot(hubs.now)
    assert [row["relays"] for row in rows] == [True, False]
    assert all(row["live"] for row in rows)
