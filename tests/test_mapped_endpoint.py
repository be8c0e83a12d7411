"""The mapped endpoint (port mapping) on its way: the client's announcement,
the registry's model, state file and answers, the other client's choice of
target, and compatibility with registries and clients that predate it."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import pytest
from twisted.internet.defer import succeed
from twisted.web import resource, server

from tests.helpers import ep, new_key, peer
from tests.memory_http import MemoryHTTP
from tests.test_reconcile import World, make_mesh, remote, view_of
from wgnat._types import Announcement, InvalidValue
from wgnat.client.portmap import PortMapper, PortMapping
from wgnat.client.reconcile import Path
from wgnat.client.registry_client import RegistryClient, RegistryError
from wgnat.device.memory import MemoryDevice
from wgnat.registry.model import RegistryModel
from wgnat.registry.state import decode_state, encode_state
from wgnat.testing import SimulatedNetwork
from wgnat.wire import (
    encode_announcement,
    encode_peer,
    parse_announcement,
    parse_answer,
    peer_digest,
    view_digest,
)

NOW = 1_700_000_000.0


def test_the_announcement_carries_a_mapped_endpoint_only_when_there_is_one():
    without = Announcement("ab", (ep("192.168.1.7:51820"),))
    assert "mapped_endpoint" not in encode_announcement(without)  # what old registries know
    with_it = Announcement("ab", (), mapped_endpoint=ep("198.51.100.23:40000"))
    body = encode_announcement(with_it)
    assert body["mapped_endpoint"] == "198.51.100.23:40000"
    assert parse_announcement(json.loads(json.dumps(body))) == with_it
    assert parse_announcement({"session": "ab", "mapped_endpoint": None}).mapped_endpoint is None


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:51820", "[::ffff:127.0.0.1]:51820", "169.254.1.1:5", "x", 51820, ["1.2.3.4:5"]],
)
def test_a_mapped_endpoint_no_other_host_could_use_is_refused(value):
    with pytest.raises(InvalidValue, match="mapped_endpoint"):
        parse_announcement({"session": "ab", "mapped_endpoint": value})


def hub_with_two_peers():
    """A registry's device and model with peers a (seen at 198.51.100.23:1111)
    and b: (device, model, a, b)."""
    device = MemoryDevice("wg0", public_key=new_key())
    a, b = new_key(), new_key()
    device.add_peer(peer(a, "198.51.100.23:1111", ("10.0.0.2/32",), NOW))
    device.add_peer(peer(b, "198.51.100.21:51820", ("10.0.0.3/32",), NOW))
    model = RegistryModel()
    model.observe(device.snapshot(), NOW)
    return device, model, a, b


def test_the_registry_passes_the_mapped_endpoint_on_and_versions_it():
    device, model, a, b = hub_with_two_peers()
    version = model.version
    assert model.announce(a, Announcement("ab", (), mapped_endpoint=ep("198.51.100.23:51820")))
    assert model.version == version + 1
    answer = parse_answer(json.loads(json.dumps(model.answer(b, None, NOW))))
    (listed,) = [p for p in answer.peers if p.public_key == a]
    assert listed.mapped_endpoint == ep("198.51.100.23:51820")
    # The client's digest of that view is the registry's: the -t check agrees.
    others = [p for p in answer.peers if p.public_key != b]
    assert view_digest(others, answer.my_endpoint) == model.view_digest(b)
    # Withdrawn (its lease expired): a new version without it.
    assert model.announce(a, Announcement("ab", ()))
    answer = parse_answer(model.answer(b, None, NOW))
    assert [p.mapped_endpoint for p in answer.peers if p.public_key == a] == [None]
    # The state file keeps it.
    model.announce(a, Announcement("ab", (), mapped_endpoint=ep("198.51.100.23:51820")))
    document = json.loads(json.dumps(encode_state(model, "wg0", device.public_key)))
    restored = decode_state(document, "wg0", device.public_key, 180.0)
    assert restored.announcements == model.announcements and restored.digest == model.digest


def test_peers_without_a_mapping_look_exactly_as_before():
    """Old clients and old registries see the same bytes and digests as before
    for every peer that has no mapped endpoint."""
    key = new_key()
    document = encode_peer(
        key, ep("198.51.100.21:51820"), (), Announcement("ab", (ep("192.168.1.7:51820"),)), 1.0
    )
    assert "mapped_endpoint" not in document
    assert peer_digest(key, None, (), (), "ab") == peer_digest(key, None, (), (), "ab", None)
    assert peer_digest(key, None, (), (), "ab") != peer_digest(
        key, None, (), (), "ab", ep("198.51.100.23:1")
    )


def test_an_old_state_file_without_mapped_endpoints_is_read():
    model = RegistryModel()
    document = encode_state(model, "wg0", None)
    document["announcements"] = [[new_key().base64, {"session": "ab", "lan": []}]]
    restored = decode_state(document, "wg0", None, 180.0)
    assert [a.mapped_endpoint for a in restored.announcements.values()] == [None]


# -- the other client's target ------------------------------------------------------


def mapped_remote(key, endpoint, mapped, lan=()):
    import dataclasses

    return dataclasses.replace(remote(key, endpoint, lan=lan), mapped_endpoint=mapped)


def test_a_peer_with_a_mapped_endpoint_is_probed_there_not_at_its_observed_one():
    b = new_key()
    world = World(make_mesh())
    world.step(view_of(mapped_remote(b, "198.51.100.23:61234", ep("198.51.100.23:51820"))), 0)
    assert str(world.device.peers[b].endpoint) == "198.51.100.23:51820"
    reason = world.mesh.paths[b].reason
    assert reason == "new peer"


def test_behind_the_same_nat_the_lan_endpoint_still_wins_over_a_mapped_one():
    b = new_key()
    world = World(make_mesh())
    view = view_of(
        mapped_remote(b, "203.0.113.21:1024", ep("203.0.113.21:51821"), ("192.168.1.11:51820",))
    )
    world.step(view, 0)
    assert str(world.device.peers[b].endpoint) == "192.168.1.11:51820"


def test_a_loopback_mapped_endpoint_is_never_a_target():
    b = new_key()
    world = World(make_mesh())
    bogus = ep("[::ffff:127.0.0.1]:51820")
    world.step(view_of(mapped_remote(b, "198.51.100.23:61234", bogus)), 0)
    assert str(world.device.peers[b].endpoint) == "198.51.100.23:61234"


# -- end to end in memory: the agent announces its mapping, the other probes it ------


class OneShotGateway:
    """A mapping method the PortMapper obtains from at once (PCP's part is
    tested in test_portmap.py); here only what the agents do with it counts."""

    name = "pcp"

    def __init__(self, clock):
        self.clock = clock

    def map(self, internal_port, lifetime):
        return succeed(
            PortMapping("pcp", ep("203.0.113.23:51820"), internal_port, 600, self.clock.seconds())
        )

    def delete(self, mapping):
        return succeed(None)

    def close(self):
        pass


def test_an_agent_announces_its_mapping_and_its_peer_probes_the_mapped_endpoint():
    net = SimulatedNetwork()
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
        net.add_host("s", "198.51.100.3", "203.0.113.23:40123")  # a symmetric NAT's port
        a = net.agent("a")
        s = net.agent("s", start=False)
        s.port_mapper = PortMapper(net.clock, lambda: None, None, upnp=OneShotGateway(net.clock))
        s.startService()
        net.clock.advance(0)
        assert s.port_mapper.state == "held"
        assert s.follower.announced.mapped_endpoint == ep("203.0.113.23:51820")
        ks = net.hosts["s"].key
        assert a.view.peers[ks].mapped_endpoint == ep("203.0.113.23:51820")
        assert str(net.hosts["a"].device.peers[ks].endpoint) == "203.0.113.23:51820"
        assert a.paths()[ks] is Path.PROBING
        # A clean stop deletes the mapping.
        stopped = s.stopService()
        net.clock.advance(0)
        assert stopped.called and s.port_mapper.mapping is None
    finally:
        net.stop()


# -- a registry that predates the field -----------------------------------------------


class OldAnnounce(resource.Resource):
    """POST /v1/announce as a registry before port mapping answers it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.bodies.append(body)
        if set(body) - {"session", "lan_endpoints"} or body["session"] == "dead":
            request.setResponseCode(400)
            return b'{"error": "expected {\\"session\\": \\"HEX\\", \\"lan_endpoints\\": []}"}'
        return b"{}"


def test_a_registry_that_refuses_the_field_says_so_with_its_status():
    """The follower announces again without the optional fields on a 400
    (tests/test_hubs.py::test_an_older_registry_refusing_an_optional_field_...):
    the client passes the refusal on with its HTTP status, sending once."""
    http = MemoryHTTP()
    old = OldAnnounce()
    http.serve(server.Site(old))  # the memory reactor resolves every host to 127.0.0.1
    client = RegistryClient(http.reactor, ipaddress.ip_address("198.51.100.1"), 51820)
    announcement = Announcement("ab", (), mapped_endpoint=ep("203.0.113.23:51820"))
    with pytest.raises(RegistryError, match="HTTP 400") as refused:
        http.result(client.announce(announcement))
    assert refused.value.status == 400
    assert [sorted(body) for body in old.bodies] == [
        ["lan_endpoints", "mapped_endpoint", "session"]
    ]
    assert http.result(client.announce(Announcement("ab"))) == {}


class LateGateway(OneShotGateway):
    """Answers when the test says so (a mapping announced after the peers
    first probed the observed endpoint)."""

    def __init__(self, clock):
        super().__init__(clock)
        self.pending = []

    def map(self, internal_port, lifetime):
        from twisted.internet.defer import Deferred

        answer = Deferred()
        self.pending.append((answer, internal_port))
        return answer

    def answer(self):
        answer, port = self.pending.pop()
        answer.callback(
            PortMapping("pcp", ep("203.0.113.23:51820"), port, 600, self.clock.seconds())
        )


def test_a_mapping_announced_while_a_peer_probes_makes_it_probe_anew_at_once():
    """WireGuard sends no second initiation for 5 s while one is pending: a
    peer already probing the observed endpoint is re-created at the mapped one."""
    net = SimulatedNetwork()
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
        net.add_host("s", "198.51.100.3", "203.0.113.23:40123")
        a = net.agent("a")
        s = net.agent("s", start=False)
        gateway = LateGateway(net.clock)
        s.port_mapper = PortMapper(net.clock, lambda: None, None, upnp=gateway)
        s.startService()
        net.clock.advance(0)
        ks = net.hosts["s"].key
        device = net.hosts["a"].device
        assert str(device.peers[ks].endpoint) == "203.0.113.23:40123"
        before = len(device.operations)
        gateway.answer()
        net.clock.advance(0)
        assert str(device.peers[ks].endpoint) == "203.0.113.23:51820"
        kinds = [kind for kind, _ in device.operations[before:]]
        assert kinds[:2] == ["remove", "set"]  # made anew: it initiates at once
        assert a.paths()[ks] is Path.PROBING and ks in a.mesh.managed
    finally:
        net.stop()


def test_a_mapping_of_another_address_than_the_public_one_is_not_announced(logged):
    """A gateway behind another NAT (a carrier's) maps its own outside address,
    which no peer can reach: the registry sees this host elsewhere."""
    net = SimulatedNetwork()
    try:
        net.add_host("a", "198.51.100.2", "203.0.113.21:51820")
        net.add_host("s", "198.51.100.3", "198.51.100.99:40123")  # the carrier's NAT
        a = net.agent("a")
        s = net.agent("s", start=False)
        s.port_mapper = PortMapper(net.clock, lambda: None, None, upnp=OneShotGateway(net.clock))
        s.startService()
        net.clock.advance(0)
        assert s.port_mapper.state == "held" and s.mapped_endpoint() is None
        assert s.follower.announced.mapped_endpoint is None
        ks = net.hosts["s"].key
        assert str(net.hosts["a"].device.peers[ks].endpoint) == "198.51.100.99:40123"
        assert a.view.peers[ks].mapped_endpoint is None
        warned = [line for line in logged if "not announced" in line]
        assert len(warned) == 1 and "another NAT lies beyond the gateway" in warned[0]
    finally:
        net.stop()


def test_status_and_metrics_say_which_mapping_is_held():
    from prometheus_client import generate_latest

    from wgnat.cli.tables import format_status
    from wgnat.client.status import client_info, client_status

    net = SimulatedNetwork()
    try:
        net.add_host("s", "198.51.100.3", "203.0.113.23:40123")
        s = net.agent("s", start=False)
        s.port_mapper = PortMapper(net.clock, lambda: None, None, upnp=OneShotGateway(net.clock))
        s.startService()
        net.clock.advance(0)
        net.clock.advance(100)
        document = client_status(
            client_info(s), s.mesh, s.view, net.hosts["s"].device.snapshot(), net.clock.seconds()
        )
        assert document["port_mapping"] == {
            "state": "held",
            "protocol": "pcp",
            "external_endpoint": "203.0.113.23:51820",
            "lifetime": 600,
            "expires_in": 500.0,
            "error": None,
            "announced": True,
        }
        assert (
            "  port mapping: 203.0.113.23:51820 (pcp, lifetime 600 s, expires in 500.0 s)"
            in format_status(document).splitlines()
        )
        scraped = generate_latest(s.metrics.registry).decode()
        assert 'wgnat_client_port_mapping_held{protocol="pcp"} 1.0' in scraped
        assert 'wgnat_client_port_mapping_held{protocol="upnp"} 0.0' in scraped
        assert (
            'wgnat_client_port_mapping_info{external_endpoint="203.0.113.23:51820"} 1.0' in scraped
        )
        assert "wgnat_client_port_mapping_remaining_seconds 500.0" in scraped
        s.stopService()
        net.clock.advance(0)
        scraped = generate_latest(s.metrics.registry).decode()
        assert 'wgnat_client_port_mapping_held{protocol="pcp"} 0.0' in scraped
        assert "wgnat_client_port_mapping_info{" not in scraped
    finally:
        net.stop()


def test_no_port_mapping_turns_the_mapper_off(monkeypatch):
    from twisted.internet.task import Clock

    from wgnat.client import tap

    monkeypatch.setattr(
        tap, "open_device_or_exit", lambda name, ifname, reactor: MemoryDevice(ifname)
    )
    monkeypatch.setattr(tap, "use_steady_time", lambda reactor: None)
    for flags, expected in (([], True), (["--no-port-mapping"], False)):
        options = tap.Options()
        options.parseOptions(["-r", new_key().base64, "--status-socket", "", *flags])
        daemon = tap.makeService(options, reactor=Clock())
        assert (daemon.agent.port_mapper is not None) is expected


def test_a_mapped_endpoint_at_another_address_than_the_peer_is_seen_is_not_passed_on():
    """A gateway maps a port of its own external address: a mapped endpoint
    elsewhere would aim every peer's probes at another host.  Kept, and served
    once the peer is seen at that address."""
    device, model, a, b = hub_with_two_peers()
    model.announce(a, Announcement("ab", (), mapped_endpoint=ep("192.0.2.99:51820")))

    def served_to_b():
        answer = parse_answer(json.loads(json.dumps(model.answer(b, None, NOW))))
        (listed,) = [p for p in answer.peers if p.public_key == a]
        others = [p for p in answer.peers if p.public_key != b]
        assert view_digest(others, answer.my_endpoint) == model.view_digest(b)
        return listed.mapped_endpoint

    assert served_to_b() is None
    assert model.announcements[a].mapped_endpoint == ep("192.0.2.99:51820")  # kept
    # a's NAT now sends from that address: the mapping is served.
    device.peers[a] = dataclasses.replace(device.peers[a], endpoint=ep("192.0.2.99:2222"))
    model.observe(device.snapshot(), NOW + 1)
    assert served_to_b() == ep("192.0.2.99:51820")


def test_the_registry_says_why_it_does_not_pass_a_mapped_endpoint_on(logged):
    from twisted.internet.task import Clock

    from wgnat.registry.hub import Registry

    device = MemoryDevice("wg0", public_key=new_key())
    a = new_key()
    device.add_peer(peer(a, "198.51.100.23:1111", ("10.0.0.2/32",), NOW))
    clock = Clock()
    clock.advance(NOW)
    hub = Registry(device, clock)
    hub.announce(a, Announcement("ab", (), mapped_endpoint=ep("192.0.2.99:51820")))
    assert any(
        "its mapped endpoint 192.0.2.99:51820 is not passed on: its packets come from "
        "198.51.100.23:1111" in line
        for line in logged
    ), logged
