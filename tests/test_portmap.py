"""Port mapping (client/portmap_wire.py, client/portmap.py): NAT-PMP and PCP
messages byte by byte, and the PortMapper on a Clock against a gateway made
of constructed answers, as RFC 6886 and RFC 6887 lay them out (the real
gateway, miniupnpd: tests/integration/test_portmap_gateway.py)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from tests.helpers import ep
from wgnat._types import InvalidValue
from wgnat.client import portmap_wire as wire
from wgnat.client.portmap import (
    MappingFailed,
    PcpOrNatPmp,
    PortMapper,
    PortMapping,
    UdpChannel,
    UpnpIgd,
    parse_proc_route,
)

CLIENT = ipaddress.ip_address("192.168.3.10")
GATEWAY = ipaddress.ip_address("192.168.3.1")
EXTERNAL = ipaddress.ip_address("198.51.100.23")
NONCE = bytes(range(12))


# -- messages --------------------------------------------------------------------


def test_a_pcp_map_request_is_laid_out_as_rfc_6887_says():
    request = wire.pcp_map_request(CLIENT, 51820, 7200, NONCE, 51820)
    assert len(request) == 60
    assert request[:4] == bytes([2, 1, 0, 0])  # version 2, R=0 MAP, reserved
    assert struct.unpack("!I", request[4:8])[0] == 7200
    assert request[8:24] == bytes(10) + b"\xff\xff" + CLIENT.packed  # IPv4-mapped
    assert request[24:36] == NONCE
    assert request[36] == 17 and request[37:40] == bytes(3)  # UDP
    assert struct.unpack("!HH", request[40:44]) == (51820, 51820)
    assert request[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # any external address


def pcp_answer(result=0, lifetime=7200, port=51820, address=EXTERNAL, nonce=NONCE, body=True):
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, lifetime, 12345) + bytes(12)
    if not body:
        return header
    mapped = ipaddress.IPv6Address("::ffff:" + str(address)).packed
    return header + nonce + struct.pack("!B3xHH", 17, 51820, port) + mapped


def test_a_pcp_map_answer_is_decoded_and_its_result_named():
    result = wire.parse_pcp_map_response(pcp_answer())
    assert result.ok and result.external == ep("198.51.100.23:51820")
    assert (result.lifetime, result.nonce, result.internal_port) == (7200, NONCE, 51820)
    refused = wire.parse_pcp_map_response(pcp_answer(result=2, body=False))
    assert not refused.ok and refused.reason == "pcp result 2 (NOT_AUTHORIZED)"
    assert wire.parse_pcp_map_response(pcp_answer(result=8)).reason.endswith("(NO_RESOURCES)")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02\x81" + bytes(10),  # shorter than a header
        pcp_answer()[:40],  # success without its MAP body
        bytes([2, 0x82]) + pcp_answer()[2:],  # PEER, not MAP
        pcp_answer()[:36] + b"\x06" + pcp_answer()[37:],  # TCP, not UDP
    ],
)
def test_a_pcp_answer_that_is_not_ours_is_refused(data):
    with pytest.raises(InvalidValue):
        wire.parse_pcp_map_response(data)


def test_nat_pmp_messages_are_laid_out_as_rfc_6886_says():
    assert wire.natpmp_address_request() == b"\x00\x00"
    assert wire.natpmp_map_request(51820, 7200, 51820) == struct.pack(
        "!BBHHHI", 0, 1, 0, 51820, 51820, 7200
    )
    assert wire.natpmp_map_request(51820, 0) == struct.pack("!BBHHHI", 0, 1, 0, 51820, 0, 0)
    address = struct.pack("!BBHI", 0, 128, 0, 99) + EXTERNAL.packed
    assert wire.parse_natpmp_address_response(address) == (0, EXTERNAL)
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 99, 51820, 40000, 3600)
    result = wire.parse_natpmp_map_response(mapped)
    assert (result.ok, result.external_port, result.lifetime) == (True, 40000, 3600)
    refused = wire.parse_natpmp_map_response(struct.pack("!BBHI", 0, 129, 2, 99))
    assert refused.reason == "nat-pmp result 2 (not authorized or refused)"
    with pytest.raises(InvalidValue):
        wire.parse_natpmp_map_response(mapped[:12])
    with pytest.raises(InvalidValue):
        wire.parse_natpmp_map_response(address)


def test_a_nat_pmp_gateway_answering_pcp_is_recognised():
    # RFC 6887 section 9: version 0, result 1 (unsupported version).
    assert wire.natpmp_unsupported_version(struct.pack("!BBHI", 0, 0x81, 1, 5))
    assert not wire.natpmp_unsupported_version(pcp_answer())


def test_the_default_gateway_is_read_from_the_kernel_routing_table():
    text = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0003A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t0103A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth1\t00000000\t0101A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n"
    )
    assert parse_proc_route(text) == ipaddress.ip_address("192.168.1.1")
    assert parse_proc_route(text.splitlines()[0] + "\n" + text.splitlines()[1]) is None


# -- a gateway made of constructed answers ------------------------------------------


class Gateway:
    """Answers PCP MAP requests (or, `natpmp_only`, only NAT-PMP), records them."""

    def __init__(self, clock, natpmp_only=False, result=0, lifetime=7200, port=51820):
        self.clock = clock
        self.natpmp_only = natpmp_only
        self.result, self.lifetime, self.port = result, lifetime, port
        self.answering = True
        self.requests: list[bytes] = []
        self.channels: list[Channel] = []

    def open(self, gateway, received):
        channel = Channel(self, received)
        self.channels.append(channel)
        return channel

    def answer(self, request: bytes) -> bytes | None:
        self.requests.append(request)
        if not self.answering:
            return None
        if request[0] == 2:
            if self.natpmp_only:
                return struct.pack("!BBHI", 0, 0x80 | request[1], 1, 5)
            lifetime = struct.unpack("!I", request[4:8])[0]
            granted = min(lifetime, self.lifetime)
            return pcp_answer(self.result, granted, self.port, nonce=request[24:36])
        if request[1] == 0:
            return struct.pack("!BBHI", 0, 128, self.result, 5) + EXTERNAL.packed
        lifetime = struct.unpack("!I", request[8:12])[0]
        if self.result:
            return struct.pack("!BBHI", 0, 129, self.result, 5)
        granted = min(lifetime, self.lifetime)
        return struct.pack("!BBHIHHI", 0, 129, 0, 5, 51820, self.port if granted else 0, granted)

    def lifetimes(self) -> list[int]:
        """The lifetime each request asked for (0: a deletion)."""
        out = []
        for request in self.requests:
            if request[0] == 2:
                out.append(struct.unpack("!I", request[4:8])[0])
            elif request[1] == 1:
                out.append(struct.unpack("!I", request[8:12])[0])
        return out


class Channel:
    local_address = CLIENT

    def __init__(self, gateway, received):
        self.gateway, self.received = gateway, received
        self.closed = False

    def send(self, data):
        answer = self.gateway.answer(data)
        if answer is not None:
            self.gateway.clock.callLater(0.002, self.received, answer)

    def close(self):
        self.closed = True


class FakeUpnp:
    name = "upnp"

    def __init__(self, clock, works=False):
        self.clock, self.works = clock, works
        self.asked = self.deleted = 0

    def map(self, internal_port, lifetime):
        self.asked += 1
        if not self.works:
            return fail(MappingFailed("no UPnP IGD answered discovery"))
        return succeed(
            PortMapping(
                "upnp", ep("198.51.100.23:51820"), internal_port, 3600, self.clock.seconds()
            )
        )

    def delete(self, mapping):
        self.deleted += 1
        return succeed(None)

    def close(self):
        pass


def mapper(clock, gateway, upnp=None, find=lambda: GATEWAY):
    changes = []
    m = PortMapper(clock, find, gateway.open, upnp=upnp)
    m.on_change = changes.append
    m.start(51820)
    return m, changes


def test_pcp_maps_the_listen_port_and_renews_at_half_the_lifetime(logged):
    clock = Clock()
    gateway = Gateway(clock, lifetime=600)
    m, changes = mapper(clock, gateway)
    clock.advance(0)
    clock.advance(0.01)
    assert m.state == "held" and m.mapping is not None
    assert (m.mapping.protocol, str(m.mapping.external), m.mapping.lifetime) == (
        "pcp",
        "198.51.100.23:51820",
        600,
    )
    assert changes == [m.mapping]
    assert any("port mapping held: 198.51.100.23:51820" in line for line in logged)
    clock.advance(299)
    assert len(gateway.requests) == 1
    clock.advance(1.01)
    clock.advance(0.01)
    assert len(gateway.requests) == 2  # renewed at half the lifetime, same nonce
    assert gateway.requests[1][24:36] == gateway.requests[0][24:36]
    assert m.mapping.expires_at == pytest.approx(clock.seconds() + 600, abs=0.1)
    assert len(changes) == 1  # the same endpoint: nothing to announce again
    clock.advance(400)  # past the first lease's end: renewed, still held
    assert m.state == "held"
    describe = m.describe(clock.seconds())
    assert describe["protocol"] == "pcp" and describe["external_endpoint"] == "198.51.100.23:51820"


def test_a_nat_pmp_gateway_is_asked_in_nat_pmp_after_refusing_pcp_s_version():
    clock = Clock()
    gateway = Gateway(clock, natpmp_only=True, port=40000)
    m, _ = mapper(clock, gateway)
    for _ in range(4):
        clock.advance(0.01)
    assert m.mapping is not None and m.mapping.protocol == "nat-pmp"
    assert str(m.mapping.external) == "198.51.100.23:40000"
    kinds = [(r[0], r[1]) for r in gateway.requests]
    assert kinds == [(2, 1), (0, 0), (0, 1)]  # PCP MAP, NAT-PMP address, NAT-PMP map
    clock.advance(3600)  # renewal: straight to NAT-PMP now
    clock.advance(0.01)
    clock.advance(0.01)
    assert [(r[0], r[1]) for r in gateway.requests[3:]] == [(0, 0), (0, 1)]


def test_a_refusal_falls_back_to_upnp_then_goes_on_without_with_the_reason_once(logged):
    clock = Clock()
    gateway = Gateway(clock, result=2)
    upnp = FakeUpnp(clock)
    m, changes = mapper(clock, gateway, upnp)
    clock.advance(0)
    clock.advance(0.01)
    assert m.mapping is None and m.state == "failed" and upnp.asked == 1
    assert "NOT_AUTHORIZED" in m.error and "no UPnP IGD answered discovery" in m.error
    warned = [line for line in logged if line.startswith("no port mapping")]
    assert len(warned) == 1 and "NOT_AUTHORIZED" in warned[0]
    assert changes == []
    clock.advance(30)  # asked again later; the same reason is not logged again
    clock.advance(0.01)
    assert len(gateway.requests) == 2 and upnp.asked == 2
    assert len([line for line in logged if line.startswith("no port mapping")]) == 1
    assert all(channel.closed for channel in gateway.channels)


def test_a_gateway_silent_to_pcp_is_asked_over_upnp_a_quarter_second_later():
    """Not after PCP's 3.75 s of retransmissions: a gateway that speaks PCP
    answers within a round trip.  UPnP's mapping is held, PCP stops."""
    clock = Clock()
    gateway = Gateway(clock)
    gateway.answering = False
    upnp = FakeUpnp(clock, works=True)
    m, changes = mapper(clock, gateway, upnp)
    clock.advance(0)
    clock.advance(0.24)
    assert upnp.asked == 0 and m.state == "searching"
    clock.advance(0.01)
    assert upnp.asked == 1
    assert m.mapping is not None and m.mapping.protocol == "upnp"
    assert changes == [m.mapping]
    sent = len(gateway.requests)
    clock.pump([0.5, 1.0, 2.0, 5.0])
    assert len(gateway.requests) == sent  # PCP's retransmissions stopped
    assert all(channel.closed for channel in gateway.channels)
    assert m.state == "held" and m.mapping.protocol == "upnp"


def test_a_gateway_answering_pcp_at_once_is_never_asked_over_upnp():
    clock = Clock()
    upnp = FakeUpnp(clock, works=True)
    m, _ = mapper(clock, Gateway(clock), upnp)
    clock.advance(0)
    clock.advance(0.01)
    assert m.mapping is not None and m.mapping.protocol == "pcp"
    clock.advance(1)
    assert upnp.asked == 0 and m.mapping.protocol == "pcp"


class SlowUpnp(FakeUpnp):
    """Maps when the test says so (miniupnpc's discovery, in its thread)."""

    def __init__(self, clock):
        super().__init__(clock, works=True)
        self.pending = []

    def map(self, internal_port, lifetime):
        from twisted.internet.defer import Deferred

        self.asked += 1
        answer = Deferred()
        self.pending.append(answer)
        return answer

    def answer(self):
        self.pending.pop().callback(
            PortMapping("upnp", ep("198.51.100.23:51820"), 51820, 3600, self.clock.seconds())
        )


def silent_to_pcp_with_slow_upnp():
    """A mapper started on a gateway that answers no PCP and a UPnP IGD that
    maps when told: (clock, gateway, upnp, mapper, changes)."""
    clock = Clock()
    gateway = Gateway(clock)
    gateway.answering = False
    upnp = SlowUpnp(clock)
    m, changes = mapper(clock, gateway, upnp)
    clock.advance(0)
    return clock, gateway, upnp, m, changes


def test_a_mapping_obtained_after_another_won_is_deleted_on_the_gateway():
    clock, gateway, upnp, m, changes = silent_to_pcp_with_slow_upnp()
    clock.advance(0.25)  # UPnP asked; its discovery takes a while
    assert upnp.asked == 1 and m.state == "searching"
    gateway.answering = True
    clock.advance(0.5)  # PCP's third request (at 0.75 s) is answered
    clock.advance(0.01)
    assert m.mapping is not None and m.mapping.protocol == "pcp"
    upnp.answer()  # UPnP maps too, later: that one is deleted
    assert upnp.deleted == 1
    assert m.mapping.protocol == "pcp" and changes == [m.mapping]


def test_a_silent_gateway_without_upnp_is_given_up_after_the_retransmissions(logged):
    clock = Clock()
    gateway = Gateway(clock)
    gateway.answering = False
    m, changes = mapper(clock, gateway)
    clock.advance(0)
    clock.pump([0.25, 0.5, 1.0])
    assert len(gateway.requests) == 4  # sent at 0, 0.25, 0.75, 1.75 s
    clock.advance(1.99)
    assert m.state == "searching"
    clock.advance(0.01)  # 2 s after the last: given up
    assert m.state == "failed" and "in 3.75 s" in m.error and changes == []


def test_a_stop_while_upnp_is_still_asking_deletes_what_it_maps_later():
    clock, _gateway, upnp, m, changes = silent_to_pcp_with_slow_upnp()
    clock.advance(0.25)
    assert upnp.asked == 1
    stopped = m.stop()
    assert stopped.called and m.state == "off"
    upnp.answer()
    assert upnp.deleted == 1 and m.mapping is None and changes == []
    assert clock.getDelayedCalls() == []


def test_no_default_gateway_is_a_reason_not_a_crash():
    clock = Clock()
    gateway = Gateway(clock)
    m, _ = mapper(clock, gateway, find=lambda: None)
    clock.advance(0)
    assert m.state == "failed" and m.error == "no IPv4 default gateway"


def test_a_lease_that_is_not_renewed_expires_and_is_withdrawn_with_the_reason(logged):
    clock = Clock()
    gateway = Gateway(clock, lifetime=120)
    m, changes = mapper(clock, gateway)
    clock.advance(0)
    clock.advance(0.01)
    held = m.mapping
    assert held is not None
    gateway.answering = False  # the gateway went away (rebooted, unplugged)
    clock.pump([0.05] * 2410)  # 120.5 s, in steps shorter than any wait
    assert m.mapping is None and m.state == "failed"
    assert changes == [held, None]  # announced, then withdrawn
    assert "expired without renewal" in m.error
    assert any("expired without renewal" in line for line in logged)
    # Renewals were tried again before the end, at half the time left each.
    assert len(gateway.requests) > 5


def test_a_clean_stop_deletes_the_mapping():
    clock = Clock()
    gateway = Gateway(clock)
    m, _ = mapper(clock, gateway)
    clock.advance(0)
    clock.advance(0.01)
    stopping = m.stop()
    clock.advance(0.01)
    assert stopping.called
    assert gateway.lifetimes() == [7200, 0]  # the same mapping (nonce), lifetime 0
    assert gateway.requests[1][24:36] == gateway.requests[0][24:36]
    assert gateway.channels[0].closed and m.mapping is None and m.state == "off"
    clock.advance(10_000)
    assert len(gateway.requests) == 2  # no renewal after the stop


def test_a_stop_with_a_silent_gateway_waits_at_most_a_second():
    clock = Clock()
    gateway = Gateway(clock)
    m, _ = mapper(clock, gateway)
    clock.advance(0)
    clock.advance(0.01)
    gateway.answering = False
    stopping = m.stop()
    clock.advance(0.5)
    clock.advance(0.5)
    assert stopping.called


def test_a_pcp_answer_to_another_nonce_is_ignored():
    clock = Clock()
    gateway = Gateway(clock)
    answers = []
    method = PcpOrNatPmp(clock, GATEWAY, gateway.open, nonce=NONCE)
    gateway.answering = False
    method.map(51820, 7200).addBoth(answers.append)
    method._received(pcp_answer(nonce=bytes(12)))
    assert answers == []
    method._received(pcp_answer())
    assert isinstance(answers[0], PortMapping)


class FakeMiniupnpc:
    lanaddr = "192.168.3.10"

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.calls = []

    def discover(self):
        return 1

    def selectigd(self):
        return "http://192.168.3.1:5000/rootDesc.xml"

    def externalipaddress(self):
        return "198.51.100.23"

    def addportmapping(self, *args):
        self.calls.append(("add", *args))
        if self.refuse:
            raise Exception("ConflictInMappingEntry")
        return True

    def deleteportmapping(self, *args):
        self.calls.append(("delete", *args))
        return True


def test_upnp_igd_through_miniupnpc_in_a_thread():
    clock = Clock()
    client = FakeMiniupnpc()

    def in_thread(function, *args):
        try:
            return succeed(function(*args))
        except Exception as exc:
            return fail(exc)

    upnp = UpnpIgd(clock, in_thread, lambda: client)
    results = []
    upnp.map(51820, 7200).addBoth(results.append)
    mapping = results[0]
    assert str(mapping.external) == "198.51.100.23:51820" and mapping.lifetime == 3600
    assert client.calls == [
        ("add", 51820, "UDP", "192.168.3.10", 51820, "wgnat WireGuard", "", 3600)
    ]
    upnp.delete(mapping)
    assert client.calls[-1] == ("delete", 51820, "UDP")
    refusing = UpnpIgd(clock, in_thread, lambda: FakeMiniupnpc(refuse=True))
    refusing.map(51820, 7200).addBoth(results.append)
    assert isinstance(results[1].value, MappingFailed)
    assert "ConflictInMappingEntry" in str(results[1].value)


@pytest_twisted.inlineCallbacks
def test_the_real_socket_survives_a_gateway_without_a_pcp_server():
    """Port unreachable (no PCP server on the gateway) must not close the
    socket: Twisted's epoll reactor closes a *connected* UDP socket on the
    ICMP error, and every later retransmission then failed with a traceback."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        free = holder.getsockname()[1]  # nobody listens there once closed
    channel = UdpChannel(reactor, ipaddress.ip_address("127.0.0.1"), lambda data: None)
    try:
        assert channel.local_address == ipaddress.ip_address("127.0.0.1")
        for _ in range(3):
            channel.port.write(b"\x02\x01", ("127.0.0.1", free))
            channel.send(b"\x02\x01")
            yield deferLater(reactor, 0.05, lambda: None)
        assert channel.port.connected  # still listening
    finally:
        channel.close()
