"""The registry daemon's start-up on a real reactor: it serves only where it was
told to, and refuses to start, saying why, when it cannot bind there."""

from __future__ import annotations

import ipaddress
import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, readBody

from tests.helpers import new_key
from wgnat.device.memory import MemoryDevice
from wgnat.registry import tap


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def daemon_on_loopback(port: int, state_dir: str = "") -> tap.RegistryDaemon:
    # "lo" is a real, up link, so the daemon's link check passes; the device
    # itself is the in-memory double with loopback as its "tunnel address".
    device = MemoryDevice(
        "lo",
        public_key=new_key(),
        listen_port=port,
        addresses=[ipaddress.ip_interface("127.0.0.1/8")],
    )
    options = tap.Options()
    options.parseOptions(
        [
            "-i",
            "lo",
            "--metrics-listen",
            f"127.0.0.1:{free_port()}",
            "--status-socket",
            "",
            "--state-dir",
            state_dir,
        ]
    )
    daemon = tap.RegistryDaemon(device, reactor, options)
    daemon.stop_reactor_on_failure = False
    return daemon


@pytest_twisted.inlineCallbacks
def test_refuses_to_start_when_the_api_port_is_taken(logged):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        daemon = daemon_on_loopback(port)
        daemon.startService()
        for _ in range(100):
            if daemon.failed:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        assert daemon.failed
        assert any(f"cannot listen on 127.0.0.1 port {port}" in line for line in logged)
        yield daemon.stopService()
    finally:
        busy.close()


@pytest_twisted.inlineCallbacks
def test_serves_on_the_interface_address_and_port(logged):
    port = free_port()
    daemon = daemon_on_loopback(port)
    daemon.startService()
    for _ in range(100):
        if daemon.ports or daemon.failed:
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert not daemon.failed, logged
    response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
    assert response.code == 200 and (yield readBody(response)) == b"ok\n"
    assert any("wgnat-server on lo (memory): API on 127.0.0.1 port" in line for line in logged)
    yield daemon.stopService()


def test_logs_each_peer_that_comes_moves_or_goes_and_caps_a_flood(logged):
    from twisted.internet.task import Clock

    from tests.helpers import peer
    from wgnat.registry.hub import MAX_CHANGES_LOGGED, Registry

    clock = Clock()
    clock.advance(1000)
    device = MemoryDevice("wg0", public_key=new_key())
    a = new_key()
    device.add_peer(peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), 1000))
    hub = Registry(device, clock)
    hub.refresh()
    assert f"198.51.100.2 ({a.short}) live at 203.0.113.21:51820" in logged
    device.add_peer(peer(a, "203.0.113.21:40000", ("198.51.100.2/32",), 1000))
    hub.refresh()
    assert (
        f"198.51.100.2 ({a.short}) endpoint moved from 203.0.113.21:51820 to 203.0.113.21:40000"
        in logged
    )
    clock.advance(181)
    hub.refresh()
    assert any(line.startswith(f"198.51.100.2 ({a.short}) gone") for line in logged)
    # A read that changes many peers at once: a bounded number of lines.
    del logged[:]
    for index in range(MAX_CHANGES_LOGGED + 5):
        device.add_peer(
            peer(new_key(), "203.0.113.30:51820", (f"198.51.100.{100 + index}/32",), 1181)
        )
    hub.refresh()
    assert len(logged) == MAX_CHANGES_LOGGED + 1
    assert logged[-1] == "and 5 more peers changed in the same device read"
