"""The timers both daemons share (wgnat/timing.py), on a Clock: a periodic call
survives its own failures; reconnects are spread by full jitter."""

from __future__ import annotations

import random
import statistics

from twisted.internet.defer import fail
from twisted.internet.task import Clock

from wgnat.client.registry_client import RegistryError
from wgnat.testing import SimulatedNetwork
from wgnat.timing import full_jitter, repeat


def test_a_failing_tick_is_logged_and_the_loop_goes_on(logged):
    clock = Clock()
    calls = []

    def tick():
        calls.append(clock.seconds())
        if len(calls) == 2:
            raise RuntimeError("a bug in one tick")
        if len(calls) == 3:
            return fail(RuntimeError("a failed Deferred"))
        return None

    loop = repeat(clock, 1.0, tick, "the test's tick")
    for _ in range(5):
        clock.advance(1.0)
    assert calls == [1.0, 2.0, 3.0, 4.0, 5.0] and loop.running
    failures = [line for line in logged if "the test's tick failed" in line]
    assert len(failures) == 2
    loop.stop()


def test_full_jitter_stays_in_a_window_that_doubles_up_to_its_cap():
    rng = random.Random(7)
    policy = full_jitter(1.0, 30.0, rng=rng.random)
    for attempt, cap in enumerate([1, 2, 4, 8, 16, 30, 30, 30]):
        delays = [policy(attempt) for _ in range(2000)]
        assert 0 <= min(delays) and max(delays) <= cap
        # Spread over the whole window, not bunched at its end.
        assert statistics.median(delays) < 0.6 * cap
        assert max(delays) > 0.9 * cap


def test_clients_that_lose_the_registry_together_come_back_spread_out():
    """A registry restart cuts every stream at once; with full jitter the
    reconnects spread over the backoff window instead of coming in lock-step."""
    net = SimulatedNetwork()
    for n in range(40):
        net.add_host(f"h{n}", f"198.51.100.{10 + n}", f"203.0.113.{10 + n}:51820")
        net.agent(f"h{n}")
    net.clock.advance(1.0)  # joined in the same second: identified at the next read
    clients = [host.client for host in net.hosts.values()]
    assert all(client is not None and len(client.streams) == 1 for client in clients)
    opened = {id(client): client.fetches for client in clients if client is not None}
    for client in clients:
        assert client is not None
        client.down = "cannot reach the registry: connection refused"
        client.down = None  # back at once: only the backoff delays each client
    came_back: dict[int, int] = {}  # client -> the 50 ms step it reconnected in
    for step in range(20):
        net.clock.advance(0.05)
        for client in clients:
            assert client is not None
            if client.fetches > opened[id(client)]:
                came_back.setdefault(id(client), step)
    assert len(came_back) == 40  # all back within the first window (1 s)
    assert len(set(came_back.values())) >= 10, came_back  # spread, not at one moment
    net.stop()


def test_the_registry_loop_survives_an_unexpected_error_in_handling_an_answer(logged):
    net = SimulatedNetwork()
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    a = net.agent("a")
    calls = []

    def broken(changed, full):
        calls.append(changed)
        raise RuntimeError("a bug")

    assert a.follower is not None
    a.follower.on_change = broken
    net.agent("b")  # pushed to a: the handler fails
    assert calls and any("unexpected error handling" in line for line in logged)
    assert a.follower.up is True
    client = net.hosts["a"].client
    assert client is not None and len(client.streams) == 1  # still following
    net.stop()


def test_a_stream_failure_is_retried_not_fatal():
    net = SimulatedNetwork()
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    a = net.agent("a")
    client = net.hosts["a"].client
    assert client is not None and a.follower is not None
    [stream] = client.streams
    stream.fail(RegistryError("cut off"))
    assert a.follower.up is False
    net.clock.advance(1.0)  # the first window of the backoff
    assert a.follower.up is True and len(client.streams) == 1
    net.stop()


def test_the_hub_answers_its_waiters_even_when_a_broadcast_fails(logged):
    net = SimulatedNetwork()
    net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    hub = net.hub
    done = []
    hub.refresh().addCallback(done.append)
    waiter = hub.wait_for_change(hub.model.version, 60)
    answered = []
    waiter.addCallback(answered.append)

    def broken() -> int:
        raise RuntimeError("a bug while broadcasting")

    hub._broadcast = broken  # type: ignore[method-assign]
    net.registry_device.handshake(net.key("a"), net.clock.seconds() + 1)
    net.add_host("b", "198.51.100.3", "203.0.113.22:51820")  # a change to push
    refreshed = []
    hub.refresh().addCallback(refreshed.append)
    assert answered == [None] and refreshed == [None]
    assert any("unexpected error handling a device read" in line for line in logged)
