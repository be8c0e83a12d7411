"""Several registries (issue 15): merging their views, choosing the hub that
relays and moving it when that hub dies (back to the first hub once it has been
live for a while), and telling a symmetric NAT from the two hubs' views.  Pure,
on plain numbers."""

from __future__ import annotations

import pytest

from tests.helpers import device, ep, ip, nets, new_key, peer
from wgnat.client.hubs import HubChoice, HubSettings
from wgnat.client.merge import HubView, merge_views, own_endpoint, symmetric_nat
from wgnat.client.reconcile import Path
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


def test_everything_a_peer_announced_comes_from_one_record() -> None:
    """Its IPv6 and mapped endpoints and its flags too, not only its session and
    LAN endpoints: a candidate that came and went with whichever registry saw
    the newest handshake would make the client leave a working path."""
    import dataclasses

    now = Now()
    one, two = HubView(clock=now), HubView(clock=now)
    announced = dataclasses.replace(
        record(A, "192.0.2.1:1000", age=50.0, session="aa", lan=["192.168.1.5:51820"]),
        ipv6_endpoints=(ep("[2001:db8::5]:51820"),),
        mapped_endpoint=ep("192.0.2.1:51820"),
        punch_first=True,
    )
    one.apply(full(announced))
    two.apply(full(record(A, "192.0.2.1:2000", age=1.0, session=None)))
    merged = merge_views([one, two], [True, True]).peers[A]
    assert merged.endpoint == ep("192.0.2.1:2000")  # the freshest
    assert merged.ipv6_endpoints == (ep("[2001:db8::5]:51820"),)
    assert merged.mapped_endpoint == ep("192.0.2.1:51820")
    assert merged.punch_first and merged.session == "aa"


def test_a_symmetric_peers_endpoint_does_not_alternate_with_its_keepalives() -> None:
    """Each hub sees a peer behind a symmetric NAT at a port of its own, and its
    keepalives to each make either record the freshest in turn: the merge keeps
    the first followed registry's, or the peer's endpoint would "move" every
    few seconds and be probed anew each time (the Compose testbed's s-p)."""
    import dataclasses

    def said(endpoint: str, age: float) -> RemotePeer:
        return dataclasses.replace(record(A, endpoint, age=age), symmetric_nat=True)

    now = Now()
    one, two = HubView(clock=now), HubView(clock=now)
    one.apply(full(said("192.0.2.1:1000", age=20.0)))
    two.apply(full(said("192.0.2.1:2000", age=1.0)))
    assert merge_views([one, two], [True, True]).peers[A].endpoint == ep("192.0.2.1:1000")
    now.t += 12
    one.apply(delta(said("192.0.2.1:1000", age=0.5)))
    assert merge_views([one, two], [True, True]).peers[A].endpoint == ep("192.0.2.1:1000")
    # Hub 1 unreachable: hub 2's, the one we follow.
    assert merge_views([one, two], [False, True]).peers[A].endpoint == ep("192.0.2.1:2000")


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


def test_the_relay_comes_back_to_the_first_hub_once_it_has_been_live_for_a_while() -> None:
    """Every client must relay through the same hub (a relayed packet is taken
    only from the peer holding its source address): the first live hub in -r
    order is the one every client converges on, after RETURN_AFTER live."""
    hubs = Hubs()
    hubs.tick(5)
    assert len(hubs.tick(30, alive=(HUB2,))) == 1
    hubs.handshakes[HUB1] = hubs.now  # hub 1 is back (handshakes, keep-alives)
    back_at = hubs.now
    moves = hubs.tick(60)
    assert [move.to_key for _, move in moves] == [HUB1]
    at = T0 + moves[0][0]
    assert back_at + 30 <= at <= back_at + 32
    assert "again: live for 30 s and before" in moves[0][1].reason
    assert hubs.allowed[HUB1] == ("198.51.100.1/32", TUNNEL)
    assert hubs.allowed[HUB2] == ("198.51.100.101/32",)
    assert hubs.tick(300) == []  # and stays


def test_a_hub_that_comes_and_goes_never_takes_the_relay_back() -> None:
    """No flapping: each time hub 1 is back for less than RETURN_AFTER (as this
    client sees it: its death is noticed 17 s after it falls silent), the relay
    stays on hub 2."""
    hubs = Hubs()
    hubs.tick(5)
    assert len(hubs.tick(30, alive=(HUB2,))) == 1
    for _ in range(5):
        hubs.handshakes[HUB1] = hubs.now
        assert hubs.tick(10) == []  # back for 10 s, taken for live 10 + 17 s
        assert hubs.tick(25, alive=(HUB2,)) == []  # gone again
    assert hubs.choice.relay == HUB2 and hubs.choice.moves == 1


def test_a_client_restarted_on_the_first_hub_and_one_that_failed_over_converge() -> None:
    """The split the Compose testbed found: a client that failed over to hub 2
    and one restarted afterwards (its device configured with the routes on
    hub 1) relay through different hubs, so their relayed pair is cut; within
    RETURN_AFTER both relay through hub 1 again."""
    failed_over = Hubs()
    failed_over.tick(5)
    failed_over.tick(30, alive=(HUB2,))
    assert failed_over.choice.relay == HUB2
    failed_over.handshakes[HUB1] = failed_over.now
    restarted = Hubs()  # starts now, hub 1 configured with the routes, both hubs up
    restarted.now = failed_over.now
    for _ in range(35):
        failed_over.tick(1)
        restarted.tick(1)
    assert failed_over.choice.relay == restarted.choice.relay == HUB1


def test_the_device_is_read_again_when_the_first_hubs_wait_is_over() -> None:
    hubs = Hubs()
    hubs.tick(5)
    hubs.tick(30, alive=(HUB2,))
    hubs.handshakes[HUB1] = hubs.now
    hubs.tick(1)  # the read that sees it live again
    assert hubs.choice.next_check(hubs.now) == hubs.now + 30


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
    hubs.tick(2)  # the first read is the baseline; the second hears them
    assert hubs.choice.next_check(hubs.now) is None
    hubs.tick(11, alive=(HUB2,))
    assert hubs.choice.next_check(hubs.now) == hubs.now + 1


def test_status_snapshot_names_the_relay() -> None:
    hubs = Hubs()
    hubs.tick(2)
    rows = hubs.choice.snapshot(hubs.now)
    assert [row["relays"] for row in rows] == [True, False]
    assert all(row["live"] for row in rows)


# -- the wire: optional, compatible both ways -------------------------------------


def test_the_handshake_age_is_read_and_not_compared() -> None:
    from wgnat.wire import parse_answer

    document = {
        "epoch": "e",
        "version": 1,
        "full": True,
        "peers": [
            {"public_key": A.base64, "endpoint": "192.0.2.1:1", "last_handshake_age": 4.5},
            {"public_key": B.base64, "endpoint": "192.0.2.2:1"},  # an older registry's
        ],
    }
    first, second = parse_answer(document).peers
    assert first.handshake_age == 4.5 and second.handshake_age is None
    assert first == RemotePeer(A, ep("192.0.2.1:1"), (), (), None, 99.0)
    document["peers"][0]["last_handshake_age"] = "soon"
    try:
        parse_answer(document)
    except ValueError as exc:
        assert "last_handshake_age" in str(exc)
    else:
        raise AssertionError("a bad age was accepted")


def test_symmetric_nat_is_on_the_wire_only_when_true() -> None:
    from wgnat._types import Announcement
    from wgnat.wire import encode_announcement, encode_peer, parse_announcement, peer_digest

    plain, flagged = Announcement("aa"), Announcement("aa", (), symmetric_nat=True)
    # A registry older than the field refuses unknown fields: never sent unless set.
    assert "symmetric_nat" not in encode_announcement(plain)
    assert parse_announcement(encode_announcement(flagged)) == flagged
    assert parse_announcement(encode_announcement(plain)) == plain
    assert "symmetric_nat" not in encode_peer(A, None, (), plain, None)
    assert encode_peer(A, None, (), flagged, None)["symmetric_nat"] is True
    # Digests of peers without it are what older registries and clients compute.
    assert peer_digest(A, None, (), (), "aa") == peer_digest(A, None, (), (), "aa", False)
    assert peer_digest(A, None, (), (), "aa") != peer_digest(A, None, (), (), "aa", True)


# -- the agent with two registries, in memory ---------------------------------------


class TwoHubs:
    """Two registries sharing nothing, each over its own MemoryDevice; client
    hosts have both as peers (hub 1 with the tunnel network), each hub every
    client, all on one Clock."""

    HUB_ADDRESSES = ("198.51.100.1", "198.51.100.201")

    def __init__(self) -> None:
        import ipaddress

        from twisted.internet.task import Clock

        from wgnat.device.memory import MemoryDevice
        from wgnat.registry.hub import Registry

        self.ipaddress = ipaddress
        self.clock = Clock()
        self.clock.advance(T0)
        self.keys = (new_key(), new_key())
        self.devices = [MemoryDevice(public_key=key) for key in self.keys]
        self.registries = [Registry(device, self.clock) for device in self.devices]
        self.hosts: dict = {}

    def add_host(self, name: str, tunnel: str, publics: tuple[str, str]):
        from wgnat._types import PeerState
        from wgnat.device.memory import MemoryDevice

        key, now = new_key(), self.clock.seconds()
        host = MemoryDevice(public_key=key, addresses=[self.ipaddress.ip_interface(f"{tunnel}/24")])
        for index, hub in enumerate(self.keys):
            routes = (f"{self.HUB_ADDRESSES[index]}/32",) + ((TUNNEL,) if index == 0 else ())
            host.add_peer(
                PeerState(hub, ep(f"203.0.113.{10 + index}:51820"), nets(*routes), now, 0, 0, 25)
            )
            self.devices[index].add_peer(
                PeerState(key, ep(publics[index]), nets(f"{tunnel}/32"), now)
            )
        self.hosts[name] = (key, host, tunnel)
        return key, host

    def agent(self, name: str, port_mapper_from=None):
        """`port_mapper_from(clock)`: a mapping method its port mapper uses."""
        from twisted.internet.defer import succeed

        from wgnat.client.agent import AgentConfig, MeshAgent
        from wgnat.testing import MemoryRegistryClient

        _key, host, tunnel = self.hosts[name]
        clients = {
            ip(address): MemoryRegistryClient(registry, ip(tunnel))
            for address, registry in zip(self.HUB_ADDRESSES, self.registries, strict=True)
        }
        agent = MeshAgent(
            host,
            self.clock,
            AgentConfig(registry_key=self.keys[0], more_registries=(self.keys[1],)),
            lan_addresses=lambda ifname: succeed([]),
            client_factory=lambda reactor, address, port: clients[address],
            wall=self.clock.seconds,
        )
        if port_mapper_from is not None:
            from wgnat.client.portmap import PortMapper

            agent.port_mapper = PortMapper(
                self.clock, lambda: None, None, upnp=port_mapper_from(self.clock)
            )
        agent.startService()
        agent.test_clients = clients  # type: ignore[attr-defined]
        return agent


def test_an_agent_follows_both_registries_and_merges_them() -> None:
    net = TwoHubs()
    ka, da = net.add_host("a", "198.51.100.2", ("203.0.113.21:51820", "203.0.113.21:51820"))
    kb, _db = net.add_host("b", "198.51.100.3", ("203.0.113.22:51820", "203.0.113.22:51820"))
    a, b = net.agent("a"), net.agent("b")
    for agent in (a, b):
        assert [client.fetches for client in agent.test_clients.values()] == [1, 1]
        assert all(client.announced for client in agent.test_clients.values())
    assert set(a.view.peers) == {kb} and set(b.view.peers) == {ka}
    assert str(da.peers[kb].endpoint) == "203.0.113.22:51820"  # probing b
    assert not a.symmetric_nat and a.hubs is not None and a.hubs.relay == net.keys[0]
    # The other hub is never managed: its peer is untouched, not in the mesh.
    assert net.keys[1] not in a.paths()
    assert all(update.public_key not in net.keys for kind, update in da.operations if kind == "set")


def test_an_agent_moves_the_relay_when_its_hub_goes_silent() -> None:
    net = TwoHubs()
    _, da = net.add_host("a", "198.51.100.2", ("203.0.113.21:51820", "203.0.113.21:51820"))
    a = net.agent("a")
    hub1, hub2 = net.keys
    for second in range(40):
        net.clock.advance(1)
        da.traffic(hub2, rx=60)  # hub 2 keeps talking; hub 1 was killed
        da.handshake(hub2, net.clock.seconds())
        if second == 0:
            a.test_clients[ip("198.51.100.1")].down = "connection timed out"
    assert a.hubs is not None and a.hubs.relay == hub2
    assert da.peers[hub2].allowed_ips == nets("198.51.100.201/32", TUNNEL)
    assert da.peers[hub1].allowed_ips == nets("198.51.100.1/32")
    assert a.metrics.hub_moves is not None and a.metrics.hub_moves._value.get() == 1


def test_two_hubs_unmask_a_symmetric_nat_and_its_hopeless_pairs_are_not_probed() -> None:
    net = TwoHubs()
    ks, ds = net.add_host("s", "198.51.100.2", ("203.0.113.23:40001", "203.0.113.23:40002"))
    kt, _dt = net.add_host("t", "198.51.100.3", ("203.0.113.24:50001", "203.0.113.24:50002"))
    kp, _dp = net.add_host("p", "198.51.100.4", ("203.0.113.30:51820", "203.0.113.30:51820"))
    s, t, p = net.agent("s"), net.agent("t"), net.agent("p")
    net.clock.advance(1)
    assert s.symmetric_nat and t.symmetric_nat and not p.symmetric_nat
    for agent in (s, t):
        for client in agent.test_clients.values():
            assert client.announced[-1].symmetric_nat
    net.clock.advance(1)
    # s and t: both symmetric, never probed; each still tries p (public).
    assert kt not in s.paths() and ks not in t.paths()
    assert "symmetric" in s.mesh.unplanned[kt]
    assert ("set", kt) not in [(kind, u.public_key) for kind, u in ds.operations]
    assert kp in s.paths() and kp in t.paths()
    assert p.view.peers[ks].symmetric_nat


def two_symmetric_hosts():
    """Two hubs and hosts s and t, each seen by the hubs at two ports of one
    address (symmetric NATs): (net, s's key, s's device, t's key, t's device)."""
    net = TwoHubs()
    ks, ds = net.add_host("s", "198.51.100.2", ("203.0.113.23:40001", "203.0.113.23:40002"))
    kt, dt = net.add_host("t", "198.51.100.3", ("203.0.113.24:50001", "203.0.113.24:50002"))
    return net, ks, ds, kt, dt


def test_two_symmetric_nats_go_direct_when_one_holds_a_mapped_port() -> None:
    """s's gateway mapped a port, t has none: t probes that port, and s takes
    part (probes t's observed endpoint, which t's NAT drops) so that t's
    handshake, from wherever t's NAT sends it, completes.  Both tell why."""
    from tests.test_mapped_endpoint import OneShotGateway  # maps 203.0.113.23:51820

    net, ks, ds, kt, dt = two_symmetric_hosts()
    s, t = net.agent("s", port_mapper_from=OneShotGateway), net.agent("t")
    net.clock.advance(1)
    assert s.symmetric_nat and t.symmetric_nat
    assert s.mesh.my_mapped_endpoint == ep("203.0.113.23:51820")
    net.clock.advance(1)
    assert t.view.peers[ks].mapped_endpoint == ep("203.0.113.23:51820")
    assert t.paths()[ks] is Path.PROBING and s.paths()[kt] is Path.PROBING
    assert str(dt.peers[ks].endpoint) == "203.0.113.23:51820"  # s's mapped port
    assert str(ds.peers[kt].endpoint) in ("203.0.113.24:50001", "203.0.113.24:50002")
    chosen = s.mesh.paths[kt].candidate
    assert chosen is not None and "reaches our mapped port 203.0.113.23:51820" in chosen.reason
    assert kt not in s.mesh.unplanned and ks not in t.mesh.unplanned


def test_two_symmetric_nats_without_a_mapped_port_are_still_not_probed() -> None:
    net, ks, _ds, kt, _dt = two_symmetric_hosts()
    s, t = net.agent("s"), net.agent("t")
    net.clock.advance(2)
    assert s.mesh.my_mapped_endpoint is None
    assert kt not in s.paths() and ks not in t.paths()
    assert "both ends are behind symmetric NATs" in s.mesh.unplanned[kt]


def test_a_symmetric_verdict_is_kept_through_one_agreeing_answer() -> None:
    """A hub that comes back reports this host at a stale port until our next
    handshake with it (the namespace test found s probing t for a moment):
    the verdict clears only after the registries agree for 300 s."""
    from wgnat.client.merge import SymmetricVerdict

    verdict = SymmetricVerdict()
    assert not verdict.update(False, 0, starting=True) and not verdict.symmetric
    assert verdict.update(True, 1, starting=True) and verdict.symmetric  # at the start: at once
    assert not verdict.update(False, 2) and verdict.symmetric  # the stale answer
    assert not verdict.update(True, 3) and verdict.symmetric  # proven again: wait anew
    assert not verdict.update(False, 4)
    assert not verdict.update(False, 303) and verdict.symmetric
    assert verdict.update(False, 304) and not verdict.symmetric


def test_a_rebinding_seen_by_one_hub_first_does_not_make_a_symmetric_nat() -> None:
    """Once the client runs, a NAT rebinding shows one hub the new port up to a
    keepalive before the other: only a disagreement that lasts 30 s counts."""
    from wgnat.client.merge import SymmetricVerdict

    verdict = SymmetricVerdict()
    assert not verdict.update(False, 0, starting=True)
    assert not verdict.update(True, 100) and not verdict.symmetric  # hub 1 saw it first
    assert not verdict.update(True, 120) and not verdict.symmetric
    assert not verdict.update(False, 125)  # hub 2 caught up: one port again
    assert not verdict.update(True, 200) and not verdict.update(True, 229)
    assert verdict.update(True, 230) and verdict.symmetric  # 30 s apart: proven


def test_an_agent_keeps_its_symmetric_verdict_while_a_hub_briefly_agrees() -> None:
    net, ks, _ds, kt, _dt = two_symmetric_hosts()
    s, _t = net.agent("s"), net.agent("t")
    net.clock.advance(1)
    assert s.symmetric_nat
    # Hub 1 comes back with s at the port hub 2 sees (a stale endpoint), for
    # ten seconds, then sees s's own mapping again.
    net.devices[0].handshake(ks, net.clock.seconds(), endpoint=ep("203.0.113.23:40002"))
    net.registries[0].refresh()
    for _ in range(10):
        net.clock.advance(1)
        assert s.hub_views[0].my_endpoint == ep("203.0.113.23:40002")
        assert s.symmetric_nat and kt not in s.paths()
    net.devices[0].handshake(ks, net.clock.seconds(), endpoint=ep("203.0.113.23:40001"))
    net.registries[0].refresh()
    net.clock.advance(1)
    assert s.symmetric_nat and kt not in s.paths()


def test_the_reconcile_loop_merges_again_only_when_a_registry_came_or_went(monkeypatch) -> None:
    """A merge is O(peers x hubs); the loop runs every 50 ms while probing."""
    import wgnat.client.agent as agent_module

    net = TwoHubs()
    net.add_host("a", "198.51.100.2", ("203.0.113.21:51820", "203.0.113.21:51820"))
    net.add_host("b", "198.51.100.3", ("203.0.113.22:51820", "203.0.113.22:51820"))
    a, _b = net.agent("a"), net.agent("b")
    net.clock.advance(1)
    merges = []
    real = agent_module.merge_views
    monkeypatch.setattr(agent_module, "merge_views", lambda *args: merges.append(1) or real(*args))
    for _ in range(40):  # probing b: a pass every 50 ms, nothing new from the registries
        a.reconcile_soon()
        net.clock.advance(0.05)
    assert merges == []
    a.followers[1].up = False  # hub 2 went away: merged again
    a.reconcile_soon()
    net.clock.advance(0.05)
    assert merges


def test_a_handshake_from_before_the_start_does_not_keep_a_dead_hub_relaying() -> None:
    hubs = Hubs(handshake=T0 - 30)  # the client restarted; hub 1 died since
    moves = hubs.tick(10, alive=(HUB2,))
    at, move = moves[0]
    assert move.to_key == HUB2 and "since the start" in move.reason
    assert 6 <= at <= 7


# -- flags and status -------------------------------------------------------------


def test_r_may_be_given_again_for_each_further_registry() -> None:
    import pytest
    from twisted.python import usage

    from wgnat.client import tap

    def options(*argv: str) -> tap.Options:
        parsed = tap.Options()
        parsed.parseOptions(list(argv))
        return parsed

    one = options("-r", HUB1.base64)
    assert one["registry"] == HUB1 and one["more-registries"] == ()
    two = options("-r", HUB1.base64, "--registry", HUB2.base64, "-r", HUB3.base64)
    assert two["registry"] == HUB1 and two["more-registries"] == (HUB2, HUB3)
    with pytest.raises(usage.UsageError, match="given twice"):
        options("-r", HUB1.base64, "-r", HUB1.base64)
    with pytest.raises(usage.UsageError, match="-r:"):
        options("-r", HUB1.base64, "-r", "not-a-key")


def test_status_names_each_hub_and_the_relay() -> None:
    from wgnat.cli.tables import format_client
    from wgnat.client.status import client_info, client_status

    net = TwoHubs()
    net.add_host("s", "198.51.100.2", ("203.0.113.23:40001", "203.0.113.23:40002"))
    net.add_host("p", "198.51.100.4", ("203.0.113.30:51820", "203.0.113.30:51820"))
    s = net.agent("s")
    net.agent("p")
    net.clock.advance(1)
    document = client_status(
        client_info(s), s.mesh, s.view, s.device.snapshot(), net.clock.seconds()
    )
    assert document["relay_hub"] == net.keys[0].base64
    assert document["symmetric_nat"] is True
    assert [hub["sees_us_as"] for hub in document["hubs"]] == [
        "203.0.113.23:40001",
        "203.0.113.23:40002",
    ]
    # The second hub is no peer row ("configured by hand"): it is a hub.
    assert net.keys[1].base64 not in [row["public_key"] for row in document["peers"]]
    text = format_client(document)
    assert "RELAYS" in text and "standby" in text and "symmetric NAT" in text


def test_status_with_one_registry_is_as_before() -> None:
    from wgnat.client.status import client_info, client_status
    from wgnat.testing import SimulatedNetwork

    net = SimulatedNetwork()
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    a = net.agent("a")
    document = client_status(
        client_info(a), a.mesh, a.view, a.device.snapshot(), net.clock.seconds()
    )
    assert not {"hubs", "relay_hub", "symmetric_nat"} & set(document)
    assert a.hubs is None and a.view is a.hub_views[0]
    net.stop()


@pytest.mark.parametrize(
    "extension",
    [
        {"symmetric_nat": True},
        {"mapped_endpoint": ep("203.0.113.23:51820")},
        {"ipv6_endpoints": (ep("[2001:db8::5]:51820"),)},
        {"punch_first": True},
    ],
)
def test_an_older_registry_refusing_an_optional_field_is_announced_to_without_it(
    extension,
) -> None:
    from twisted.internet.defer import fail, succeed
    from twisted.internet.task import Clock

    from wgnat._types import Announcement
    from wgnat.client.follower import RegistryFollower
    from wgnat.client.metrics import ClientMetrics
    from wgnat.client.registry_client import RegistryError
    from wgnat.testing import ScriptedRegistryClient

    class OldRegistry(ScriptedRegistryClient):
        """Refuses any field it does not know, as registries before it did."""

        def __init__(self) -> None:
            super().__init__(A, [{"epoch": "e1", "version": 1, "full": True, "peers": []}])
            self.received: list[Announcement] = []

        refusals = 0

        def announce(self, announcement: Announcement):
            if announcement != Announcement("aa"):
                self.refusals += 1
                return fail(RegistryError("the registry refused the request: HTTP 400", status=400))
            self.received.append(announcement)
            return succeed({"version": 0})

    clock, old = Clock(), OldRegistry()
    follower = RegistryFollower(
        old,
        clock,
        HubView(),
        lambda: succeed(Announcement("aa", (), **extension)),
        lambda changed, full: None,
        ClientMetrics(),
        60.0,
    )
    follower.start()
    assert old.received == [Announcement("aa")]
    assert follower.plain_announcements and follower.up is True
    follower.resync()  # the -t check: nothing new to announce
    assert old.received == [Announcement("aa")]
    # The registry restarts under another epoch (upgraded, perhaps): asked
    # again with the fields, and without them once more when it still refuses.
    follower.view.epoch = "e2"
    follower.resync()
    assert old.refusals == 2 and old.received == [Announcement("aa")] * 2
    follower.stop()


def test_a_peer_removed_from_one_hub_stays_and_from_both_goes() -> None:
    net = TwoHubs()
    _, da = net.add_host("a", "198.51.100.2", ("203.0.113.21:51820", "203.0.113.21:51820"))
    kb, _ = net.add_host("b", "198.51.100.3", ("203.0.113.22:51820", "203.0.113.22:51820"))
    a, _ = net.agent("a"), net.agent("b")
    da.handshake(kb, net.clock.seconds())
    net.clock.advance(1)
    assert a.paths() == {kb: Path.DIRECT}
    net.devices[0].peers.pop(kb)  # hub 1's operator removes b
    net.registries[0].refresh()
    net.clock.advance(60)
    da.handshake(kb, net.clock.seconds())
    da.traffic(kb, rx=100)
    net.clock.advance(1)
    assert kb in a.view.peers and kb in a.paths()  # hub 2 still lists it
    net.devices[1].peers.pop(kb)  # and hub 2's
    net.registries[1].refresh()
    net.clock.advance(1)
    assert kb not in a.view.peers
    net.clock.advance(31)  # the removal grace
    assert kb not in a.paths() and kb not in da.peers
