"""The UAPI protocol byte by byte, with no socket: a memory reactor and string transports.

What the real wireguard-go says to these requests is checked in test_device_uapi.py;
here each answer is written by hand, so fragments, errors, oversized answers, early
closes and timeouts can be played exactly.
"""

from __future__ import annotations

import base64
import errno
import functools
import os
import pickle
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import error
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure

from tests.helpers import record_secret
from wgnat._types import Endpoint, PeerUpdate, PublicKey, parse_network
from wgnat.device import DeviceError, DeviceNotFound, DevicePermissionError, uapi
from wgnat.device.uapi import (
    GET_REQUEST,
    OPERATION_TIMEOUT,
    UAPIDevice,
    UAPIError,
    UAPIExchange,
    build_remove_request,
    build_set_request,
    parse_get_answer,
)

SOCKET = "/run/test-wireguard/wgt0.sock"
PRIVATE = bytes(range(1, 33))
PRIVATE_HEX = PRIVATE.hex()
OWN_PUBLIC = PublicKey(X25519PrivateKey.from_private_bytes(PRIVATE).public_key().public_bytes_raw())
PSK = bytes(range(100, 132))
PSK_HEX = PSK.hex()
# The leak check searches every test's output and logs for these two.
record_secret(PRIVATE)
record_secret(PSK)
PEER1 = PublicKey(bytes([0x11] * 32))
PEER2 = PublicKey(bytes([0x22] * 32))

# What wireguard-go 0.0.20220316 answers to get=1, with two peers.
GET_ANSWER = (
    f"private_key={PRIVATE_HEX}\n"
    "listen_port=51820\n"
    "fwmark=51\n"
    f"public_key={PEER1.hex}\n"
    f"preshared_key={PSK_HEX}\n"
    "protocol_version=1\n"
    "endpoint=203.0.113.50:51820\n"
    "last_handshake_time_sec=1764000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1234\n"
    "rx_bytes=5678\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=198.51.100.2/32\n"
    "allowed_ip=198.51.100.128/25\n"
    f"public_key={PEER2.hex}\n"
    f"preshared_key={'0' * 64}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
).encode()


# -- helpers -----------------------------------------------------------------------


def result_of(d: Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the operation has not finished"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred, kind: type[BaseException]) -> BaseException:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the operation has not finished"
    assert isinstance(box[0], Failure), f"expected {kind.__name__}, got {box[0]!r}"
    assert box[0].check(kind), f"expected {kind.__name__}, got {box[0].value!r}"
    return box[0].value


class Wire:
    """One UAPIDevice on a memory reactor, and the transport of its latest connection."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.device = UAPIDevice("wgt0", self.clock, SOCKET)
        self.transport: StringTransportWithDisconnection | None = None
        self.protocol: Any = None

    def connect(self) -> StringTransportWithDisconnection:
        """Accept the connection the last operation started."""
        address, factory, timeout, _ = self.clock.unixClients[-1]
        assert address == SOCKET
        assert timeout == self.device.timeout
        self.protocol = factory.buildProtocol(UNIXAddress(address))
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        return self.transport

    def refuse(self, reason: Exception) -> None:
        _, factory, _, _ = self.clock.unixClients[-1]
        factory.clientConnectionFailed(self.clock.connectors[-1], Failure(reason))

    def answer(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)


@pytest.fixture
def wire() -> Wire:
    return Wire()


def pending(d: Deferred) -> None:
    assert not d.called, "the operation finished early"


# -- request bytes -----------------------------------------------------------------


def test_get_request_bytes(wire: Wire) -> None:
    d = wire.device.read()
    transport = wire.connect()
    assert transport.value() == b"get=1\n\n" == GET_REQUEST
    pending(d)


def test_set_request_bytes_with_every_field() -> None:
    update = PeerUpdate(
        PEER1,
        endpoint=Endpoint.parse("203.0.113.50:51820"),
        allowed_ips=(parse_network("198.51.100.2/32"), parse_network("198.51.100.128/25")),
        replace_allowed_ips=True,
        persistent_keepalive=25,
        update_only=True,
    )
    assert build_set_request(update) == (
        b"set=1\n"
        b"public_key=" + PEER1.hex.encode() + b"\n"
        b"update_only=true\n"
        b"endpoint=203.0.113.50:51820\n"
        b"persistent_keepalive_interval=25\n"
        b"replace_allowed_ips=true\n"
        b"allowed_ip=198.51.100.2/32\n"
        b"allowed_ip=198.51.100.128/25\n"
        b"\n"
    )


@pytest.mark.parametrize(
    ("update", "lines"),
    [
        (PeerUpdate(PEER1), []),
        (
            PeerUpdate(PEER1, endpoint=Endpoint.parse("[2001:db8::1]:51820")),
            ["endpoint=[2001:db8::1]:51820"],
        ),
        (PeerUpdate(PEER1, persistent_keepalive=0), ["persistent_keepalive_interval=0"]),
        # Appending nothing sends nothing; replacing with nothing clears the list.
        (PeerUpdate(PEER1, allowed_ips=()), []),
        (PeerUpdate(PEER1, allowed_ips=(), replace_allowed_ips=True), ["replace_allowed_ips=true"]),
        # replace_allowed_ips without a list touches nothing.
        (PeerUpdate(PEER1, replace_allowed_ips=True), []),
        (
            PeerUpdate(PEER1, allowed_ips=(parse_network("0.0.0.0/0"), parse_network("::/0"))),
            ["allowed_ip=0.0.0.0/0", "allowed_ip=::/0"],
        ),
    ],
)
def test_set_request_bytes_only_name_the_fields_given(update: PeerUpdate, lines: list[str]) -> None:
    expected = "\n".join(["set=1", f"public_key={PEER1.hex}", *lines]) + "\n\n"
    assert build_set_request(update) == expected.encode()


def test_remove_request_bytes() -> None:
    assert build_remove_request(PEER2) == (
        b"set=1\npublic_key=" + PEER2.hex.encode() + b"\nremove=true\n\n"
    )


def test_set_peer_and_remove_peer_write_their_request_and_succeed_on_errno_0(wire: Wire) -> None:
    update = PeerUpdate(PEER1, endpoint=Endpoint.parse("203.0.113.50:51820"))
    d = wire.device.set_peer(update)
    assert wire.connect().value() == build_set_request(update)
    wire.answer(b"errno=0\n\n")
    assert result_of(d) is None
    assert not wire.transport.connected  # one connection per operation
    assert wire.clock.getDelayedCalls() == []  # the timeout was cancelled

    d = wire.device.remove_peer(PEER1)
    assert wire.connect().value() == build_remove_request(PEER1)
    wire.answer(b"errno=0\n\n")
    assert result_of(d) is None
    assert len(wire.clock.unixClients) == 2


# -- parsing a get answer -------------------------------------------------------------


def test_parse_a_realistic_get_answer(wire: Wire) -> None:
    d = wire.device.read()
    wire.connect()
    wire.answer(GET_ANSWER)
    state = result_of(d)

    assert state.public_key == OWN_PUBLIC  # derived from the private key
    assert state.listen_port == 51820
    first, second = state.peers
    assert first.public_key == PEER1
    assert first.endpoint == Endpoint.parse("203.0.113.50:51820")
    assert first.allowed_ips == (
        parse_network("198.51.100.2/32"),
        parse_network("198.51.100.128/25"),
    )
    assert first.latest_handshake == pytest.approx(1764000000.5)
    assert (first.tx_bytes, first.rx_bytes, first.persistent_keepalive) == (1234, 5678, 25)
    assert second.public_key == PEER2
    assert (second.endpoint, second.allowed_ips, second.latest_handshake) == (None, (), None)
    assert (second.tx_bytes, second.rx_bytes, second.persistent_keepalive) == (0, 0, 0)


def test_no_private_or_preshared_key_survives_parsing() -> None:
    state, code = parse_get_answer(GET_ANSWER.decode())
    assert code == 0
    everything = pickle.dumps(state) + repr(state).encode() + str(state).encode()
    for secret in (PRIVATE, PSK):
        assert secret not in everything
        assert secret.hex().encode() not in everything
        assert secret.hex().upper().encode() not in everything
        assert base64.b64encode(secret) not in everything


def test_reads_share_the_parsed_keys_endpoints_and_networks() -> None:
    """A device is read every few seconds and its peers rarely change: the parsed
    values are immutable and reused (parsing them was most of a read's cost)."""
    first, _ = parse_get_answer(GET_ANSWER.decode())
    second, _ = parse_get_answer(GET_ANSWER.decode())
    assert first == second
    for a, b in zip(first.peers, second.peers, strict=True):
        assert a.public_key is b.public_key and a.endpoint is b.endpoint
        assert all(x is y for x, y in zip(a.allowed_ips, b.allowed_ips, strict=True))
    # A refused value is refused every time (failures are not remembered as values).
    bad = GET_ANSWER.decode().replace("allowed_ip=198.51.100.2/32", "allowed_ip=198.51.100.2/33")
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_get_answer(bad)


def test_a_device_without_private_key_or_port() -> None:
    state, code = parse_get_answer("errno=0\n")
    assert (state.public_key, state.listen_port, state.peers, code) == (None, 0, (), 0)
    state, _ = parse_get_answer(f"private_key={'0' * 64}\nerrno=0\n")
    assert state.public_key is None


def test_an_unusable_endpoint_is_no_endpoint_and_the_rest_is_read(wire: Wire) -> None:
    # wireguard-go accepts `endpoint=IP:0`; one odd peer must not make the device unreadable.
    odd = GET_ANSWER.replace(b"endpoint=203.0.113.50:51820", b"endpoint=203.0.113.50:0")
    d = wire.device.read()
    wire.connect()
    wire.answer(odd)
    first, second = result_of(d).peers
    assert first.endpoint is None
    assert first.allowed_ips == (
        parse_network("198.51.100.2/32"),
        parse_network("198.51.100.128/25"),
    )
    assert first.persistent_keepalive == 25
    assert second.public_key == PEER2


def test_unreadable_answers_are_device_errors_without_secrets(wire: Wire) -> None:
    bad = GET_ANSWER.replace(b"allowed_ip=198.51.100.2/32", b"allowed_ip=198.51.100.2/33")
    d = wire.device.read()
    wire.connect()
    wire.answer(bad)
    exc = failure_of(d, DeviceError)
    assert str(exc).startswith("wgt0: unreadable answer from the device: ")
    assert "198.51.100.2/33" in str(exc)
    for secret in (PRIVATE, PSK):
        assert secret.hex() not in str(exc)
        assert base64.b64encode(secret).decode() not in str(exc)

    d = wire.device.read()
    wire.connect()
    wire.answer(b"listen_port=1\nthis line has no equals sign\nerrno=0\n\n")
    assert "unexpected line" in str(failure_of(d, DeviceError))

    # A set answer the parser cannot read is a DeviceError too, never a ValueError.
    d = wire.device.set_peer(PeerUpdate(PEER1))
    wire.connect()
    wire.answer(b"errno=what\n\n")
    exc = failure_of(d, DeviceError)
    assert str(exc).startswith("wgt0: unreadable answer from the device: ")


# -- fragments ------------------------------------------------------------------------


def test_an_answer_arriving_one_byte_at_a_time(wire: Wire) -> None:
    d = wire.device.read()
    wire.connect()
    for i in range(len(GET_ANSWER) - 1):
        wire.answer(GET_ANSWER[i : i + 1])
    pending(d)
    wire.answer(GET_ANSWER[-1:])
    assert result_of(d) == parse_get_answer(GET_ANSWER.decode())[0]


@pytest.mark.parametrize("split", [1, 7, 8, len("errno=0\n")])
def test_the_blank_line_split_across_chunks(wire: Wire, split: int) -> None:
    d = wire.device.set_peer(PeerUpdate(PEER1))
    wire.connect()
    answer = b"errno=0\n\n"
    wire.answer(answer[:split])
    pending(d)
    wire.answer(answer[split:])
    assert result_of(d) is None


def test_bytes_after_the_answer_are_ignored(wire: Wire) -> None:
    d = wire.device.set_peer(PeerUpdate(PEER1))
    wire.connect()
    wire.answer(b"errno=0\n\nerrno=22\n\n", b"more")
    assert result_of(d) is None


def test_a_large_answer_in_many_chunks_is_linear() -> None:
    # 32 MB in 64 KiB reads (a ~100,000-peer device): rescanning the whole buffer
    # for the blank line on every read took tens of seconds.  Parsing is not timed.
    exchange = UAPIExchange(GET_REQUEST)
    exchange.makeConnection(StringTransportWithDisconnection())
    exchange.transport.protocol = exchange
    chunk = b"allowed_ip=198.51.100.2/32\n" * (65536 // 27)
    started = time.monotonic()
    for _ in range(32 * 1024 * 1024 // len(chunk)):
        exchange.dataReceived(chunk)
    pending(exchange.answer)
    exchange.dataReceived(b"errno=0\n\n")
    elapsed = time.monotonic() - started
    assert result_of(exchange.answer).endswith("allowed_ip=198.51.100.2/32\nerrno=0\n")
    assert elapsed < 2.0, f"receiving the answer took {elapsed:.1f} s"


# -- errno ---------------------------------------------------------------------------


@pytest.mark.parametrize("written", [b"errno=-22\n\n", b"errno=22\n\n"])
def test_errno_on_get(wire: Wire, written: bytes) -> None:
    d = wire.device.read()
    wire.connect()
    wire.answer(written)
    exc = failure_of(d, UAPIError)
    assert exc.code == errno.EINVAL
    assert str(exc) == "wgt0: the WireGuard device refused get: errno 22 (EINVAL)"


def test_errno_on_set_and_remove(wire: Wire) -> None:
    d = wire.device.set_peer(PeerUpdate(PEER1))
    wire.connect()
    wire.answer(b"errno=-98\n\n")
    exc = failure_of(d, UAPIError)
    assert exc.code == errno.EADDRINUSE
    assert str(exc) == (
        f"wgt0: the WireGuard device refused setting peer {PEER1.short}: errno 98 (EADDRINUSE)"
    )

    d = wire.device.remove_peer(PEER2)
    wire.connect()
    wire.answer(b"errno=-1000\n\n")
    exc = failure_of(d, UAPIError)
    assert exc.code == 1000
    assert str(exc) == (
        f"wgt0: the WireGuard device refused removing peer {PEER2.short}: "
        "errno 1000 (unknown error)"
    )
    assert isinstance(exc, DeviceError)


# -- oversized, closed early, timeout ------------------------------------------------------


def test_an_oversized_answer_is_refused_and_the_connection_dropped() -> None:
    exchange = UAPIExchange(GET_REQUEST, max_bytes=1024)
    transport = StringTransportWithDisconnection()
    transport.protocol = exchange
    exchange.makeConnection(transport)
    exchange.dataReceived(b"x=" + b"y" * 600 + b"\n")
    pending(exchange.answer)
    exchange.dataReceived(b"x=" + b"y" * 600 + b"\n")
    exc = failure_of(exchange.answer, DeviceError)
    assert str(exc) == "the WireGuard device's answer is too large"
    assert not transport.connected
    assert len(exchange._buffer) == 0  # nothing kept


def test_an_answer_just_under_the_limit_is_fine() -> None:
    exchange = UAPIExchange(GET_REQUEST, max_bytes=1024)
    exchange.makeConnection(StringTransportWithDisconnection())
    exchange.transport.protocol = exchange
    exchange.dataReceived(b"listen_port=1\n" * 70 + b"errno=0\n\n")  # 989 bytes
    assert result_of(exchange.answer).endswith("errno=0\n")


def test_an_oversized_answer_through_the_device(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uapi, "UAPIExchange", functools.partial(UAPIExchange, max_bytes=4096))
    d = wire.device.read()
    wire.connect()
    for _ in range(10):
        wire.answer(b"allowed_ip=198.51.100.2/32\n" * 20)
    exc = failure_of(d, DeviceError)
    assert str(exc) == "wgt0: the WireGuard device's answer is too large"
    assert wire.clock.getDelayedCalls() == []


@pytest.mark.parametrize("partial", [b"", b"private_key=" + PRIVATE_HEX.encode()[:10]])
def test_the_device_closing_before_answering(wire: Wire, partial: bytes) -> None:
    d = wire.device.read()
    wire.connect()
    wire.answer(partial)
    wire.protocol.connectionLost(Failure(error.ConnectionDone()))
    exc = failure_of(d, DeviceError)
    assert type(exc) is DeviceError
    assert str(exc) == "wgt0: the WireGuard device closed its socket before answering"
    assert wire.clock.getDelayedCalls() == []


def test_no_answer_within_the_timeout(wire: Wire) -> None:
    d = wire.device.set_peer(PeerUpdate(PEER1))
    transport = wire.connect()
    wire.clock.advance(OPERATION_TIMEOUT - 0.1)
    pending(d)
    wire.clock.advance(0.1)
    exc = failure_of(d, DeviceError)
    assert str(exc) == f"wgt0: no answer from the WireGuard device on {SOCKET} within 10 s"
    assert transport.disconnected  # aborted


def test_the_timeout_follows_the_device_setting(wire: Wire) -> None:
    wire.device.timeout = 0.25
    d = wire.device.read()
    wire.connect()
    wire.clock.advance(0.25)
    assert "within 0.25 s" in str(failure_of(d, DeviceError))


# -- connecting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind", "text"),
    [
        (
            error.getConnectError((errno.ENOENT, os.strerror(errno.ENOENT))),
            DeviceNotFound,
            f"interface wgt0 not found: {SOCKET} is gone; start 'wireguard-go wgt0'",
        ),
        (
            error.getConnectError((errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))),
            DeviceNotFound,
            f"interface wgt0: nothing answers on {SOCKET} "
            "(a stale socket: the WireGuard process has exited)",
        ),
        (
            error.getConnectError((errno.EACCES, os.strerror(errno.EACCES))),
            DevicePermissionError,
            f"permission denied on {SOCKET}: run as root or with CAP_NET_ADMIN",
        ),
        (
            error.TimeoutError(),
            DeviceError,
            f"interface wgt0: cannot reach {SOCKET}: User timeout caused connection failure.",
        ),
    ],
)
def test_connect_failures(wire: Wire, reason: Exception, kind: type, text: str) -> None:
    d = wire.device.read()
    wire.refuse(reason)
    exc = failure_of(d, kind)
    assert type(exc) is kind
    assert str(exc) == text
