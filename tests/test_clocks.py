"""Issue 17, finding 9: a step of the wall clock.  Timers run on a steady clock
(the wall clock read once, moved by the monotonic one); the handshake times
WireGuard reports in wall-clock time are placed on that steady clock by
SteadyDevice, so a step of either sign neither marks every peer gone at the hub
nor makes a client give up working direct paths."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from tests.helpers import new_key, peer
from wgnat.client.agent import AgentConfig, MeshAgent
from wgnat.client.reconcile import Path
from wgnat.device.memory import MemoryDevice
from wgnat.device.steady import HandshakeClock, SteadyDevice
from wgnat.registry.hub import Registry
from wgnat.testing import MemoryRegistryClient, MemoryStateStore, SimulatedNetwork
from wgnat.timing import SteadyClock, use_steady_time

START = 1_700_000_000.0


class Wall:
    """A wall clock that follows a Clock, until someone steps it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.step = 0.0

    def __call__(self) -> float:
        return self.clock.seconds() + self.step


def test_the_steady_clock_ignores_steps_of_the_wall_clock():
    wall = {"now": START}
    monotonic = {"now": 100.0}
    steady = SteadyClock(lambda: wall["now"], lambda: monotonic["now"])
    assert steady() == START
    monotonic["now"] += 10
    wall["now"] += 10 + 3600  # a forward step of an hour
    assert steady() == START + 10
    monotonic["now"] += 5
    wall["now"] -= 7200  # and back, past where it was
    assert steady() == START + 15


def test_only_a_real_reactor_without_timers_is_switched():
    clock = Clock()
    assert not use_steady_time(clock)  # a test's Clock: left alone

    class Reactor:
        def run(self) -> None: ...

        def __init__(self, pending: list) -> None:
            self.pending = pending

        def getDelayedCalls(self) -> list:
            return self.pending

        def seconds(self) -> float:
            return 0.0

    fresh, busy = Reactor([]), Reactor(["a timer"])
    assert use_steady_time(fresh) and isinstance(fresh.seconds, SteadyClock)
    assert not use_steady_time(busy) and not isinstance(busy.seconds, SteadyClock)


def test_a_handshake_keeps_its_place_whatever_the_wall_clock_does():
    key = new_key()
    handshakes = HandshakeClock()
    # Seen first 5 s after it happened.
    assert handshakes.place(key, START - 5, START, START) == START - 5
    # The wall clock jumps an hour ahead: the same handshake, the same place.
    assert handshakes.place(key, START - 5, START + 3610, START + 10) == START - 5
    # A new handshake after the jump: placed by its age on the stepped clock.
    assert handshakes.place(key, START + 3612, START + 3613, START + 13) == START + 12
    # The wall clock steps back two hours: a handshake then looks far in the
    # past by the wall clock, but it is new: placed now, never in the future.
    assert handshakes.place(key, START - 3590, START - 3585, START + 20) == START + 15


def test_a_forward_step_on_the_hub_does_not_mark_every_peer_gone():
    clock = Clock()
    clock.advance(START)
    wall = Wall(clock)
    memory = MemoryDevice(public_key=new_key())
    keys = [new_key() for _ in range(3)]
    for n, key in enumerate(keys):
        memory.add_peer(peer(key, f"203.0.113.{20 + n}:51820", (f"198.51.100.{2 + n}/32",), START))
    hub = Registry(SteadyDevice(memory, clock.seconds, wall), clock)
    hub.refresh()
    assert hub.model.live_count() == 3
    clock.advance(30)
    wall.step = 300.0  # NTP jumps the hub's clock five minutes ahead
    hub.refresh()
    assert hub.model.live_count() == 3  # nobody is gone: no handshake was missed
    # Time goes on and handshakes renew (reported in the stepped wall clock).
    for _ in range(10):
        clock.advance(25)
        for key in keys:
            memory.handshake(key, wall())
        hub.refresh()
    assert hub.model.live_count() == 3
    # A peer that really stops is gone 180 s after its last handshake.
    clock.advance(179)
    hub.refresh()
    assert hub.model.live_count() == 3
    clock.advance(2)
    hub.refresh()
    assert hub.model.live_count() == 0


def test_a_client_keeps_its_direct_paths_through_steps_both_ways():
    net = SimulatedNetwork()
    wall = Wall(net.clock)
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    host = net.hosts["a"]
    client = MemoryRegistryClient(net.hub, ipaddress.ip_address(host.tunnel))
    host.client = client
    lan = ipaddress.ip_interface("192.168.1.10/24")
    from twisted.internet.defer import succeed

    a = MeshAgent(
        SteadyDevice(host.device, net.clock.seconds, wall),
        net.clock,
        AgentConfig(registry_key=net.registry_key),
        lan_addresses=lambda ifname: succeed([lan]),
        client_factory=lambda reactor, address, port: client,
        state_store=MemoryStateStore(),
    )
    a.startService()
    host.agent = a
    net.agent("b")
    net.clock.advance(1.0)  # both known to the hub at its next read
    kb = net.key("b")
    net.handshake("a", "b")
    net.clock.advance(0.5)
    assert a.paths() == {kb: Path.DIRECT}
    for step in (+600.0, -1200.0):
        wall.step += step
        for _ in range(12):  # three minutes: keepalives both ways, nothing else
            net.clock.advance(15)
            host.device.traffic(kb, rx=32, tx=32)
            net.hosts["b"].device.traffic(net.key("a"), rx=32, tx=32)
            net.registry_device.handshake(net.key("a"), net.clock.seconds())
            net.registry_device.handshake(kb, net.clock.seconds())
            if net.clock.seconds() % 120 < 15:  # a rekey every two minutes
                stamp = wall()
                host.device.handshake(kb, stamp)
                net.hosts["b"].device.handshake(net.key("a"), net.clock.seconds())
        assert a.paths() == {kb: Path.DIRECT}, step
    net.stop()
