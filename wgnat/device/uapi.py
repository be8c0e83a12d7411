"""The cross-platform WireGuard UAPI (wireguard-go, BoringTun), spoken natively.

The UAPI is a line protocol on `/var/run/wireguard/<ifname>.sock`: a request is
`get=1` or `set=1` plus `key=value` lines and a blank line; the answer is the
device's lines (for `get`) then `errno=N` and a blank line.  Each operation uses
its own short connection, as `wg` does, so one slow operation never wedges the
others and there is no session state to lose.

The `get` answer contains the private key and preshared keys.  They are dropped
while parsing (the device's public key is derived first), so nothing above this
module ever holds them.
"""

from __future__ import annotations

import errno as errno_module
import functools
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from wgnat._types import (
    DeviceState,
    Endpoint,
    InvalidValue,
    IPInterface,
    IPNetwork,
    PeerState,
    PeerUpdate,
    PublicKey,
    parse_network,
)
from wgnat.device import (
    DeviceError,
    DeviceNotFound,
    DevicePermissionError,
    interface_addresses,
)

# A get answer is ~250 bytes a peer: this admits well over 100,000 peers and still
# bounds what a misbehaving socket can make us buffer.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
OPERATION_TIMEOUT = 10.0

# Keys the parser must never keep.  `private_key` is used once to derive the
# public key and then forgotten.
_SECRET_KEYS = frozenset({"private_key", "preshared_key"})


class UAPIError(DeviceError):
    def __init__(self, ifname: str, operation: str, code: int) -> None:
        name = errno_module.errorcode.get(code, "unknown error")
        super().__init__(
            f"{ifname}: the WireGuard device refused {operation}: errno {code} ({name})"
        )
        self.code = code


def public_key_from_private_hex(private_hex: str) -> PublicKey | None:
    raw = bytes.fromhex(private_hex)
    if raw == bytes(32):  # no private key set yet
        return None
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return PublicKey(public)


# A device is read every few seconds (the client's health check, the registry's
# poll) and its peers' keys, endpoints and allowed IPs rarely change, while
# parsing them (ipaddress) was most of the cost of a read: 1,000 peers, ~45 ms.
# The parsed values are immutable, so they are shared between reads.
PARSE_CACHE_SIZE = 16384


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _key(hex_text: str) -> PublicKey:
    return PublicKey.from_hex(hex_text)


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _endpoint(text: str) -> Endpoint | None:
    # An endpoint we could not use (0.0.0.0, multicast) is no endpoint; one odd
    # peer must not make the whole device unreadable.
    try:
        return Endpoint.parse(text)
    except InvalidValue:
        return None


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _network(text: str) -> IPNetwork:
    return parse_network(text)


def parse_get_answer(text: str) -> tuple[DeviceState, int]:
    """Parse the lines of a `get=1` answer into a DeviceState and its errno."""
    device_public: PublicKey | None = None
    listen_port = 0
    peers: list[PeerState] = []
    current: dict[str, Any] | None = None
    code = -1

    def finish_peer() -> None:
        if current is not None:
            peers.append(_peer_from_fields(current))

    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DeviceError(f"unexpected line in the WireGuard device's answer: {key[:40]!r}")
        if key == "errno":
            code = abs(int(value))
            break
        if key == "private_key":
            device_public = public_key_from_private_hex(value)
            del value  # the secret goes no further than this line
            continue
        if key in _SECRET_KEYS:
            continue
        if key == "listen_port":
            listen_port = int(value)
        elif key == "public_key":
            finish_peer()
            current = {"public_key": _key(value), "allowed_ips": []}
        elif current is None:
            continue  # device-level fields we do not use (fwmark)
        elif key == "endpoint":
            current["endpoint"] = _endpoint(value)
        elif key == "allowed_ip":
            current["allowed_ips"].append(_network(value))
        elif key in (
            "last_handshake_time_sec",
            "last_handshake_time_nsec",
            "rx_bytes",
            "tx_bytes",
            "persistent_keepalive_interval",
        ):
            current[key] = int(value)
    finish_peer()
    return DeviceState(device_public, listen_port, tuple(peers)), code


def _peer_from_fields(fields: dict[str, Any]) -> PeerState:
    seconds = fields.get("last_handshake_time_sec", 0)
    nanoseconds = fields.get("last_handshake_time_nsec", 0)
    handshake = seconds + nanoseconds / 1e9 if seconds or nanoseconds else None
    return PeerState(
        public_key=fields["public_key"],
        endpoint=fields.get("endpoint"),
        allowed_ips=tuple(fields["allowed_ips"]),
        latest_handshake=handshake,
        rx_bytes=fields.get("rx_bytes", 0),
        tx_bytes=fields.get("tx_bytes", 0),
        persistent_keepalive=fields.get("persistent_keepalive_interval", 0),
    )


def build_set_request(update: PeerUpdate) -> bytes:
    lines = ["set=1", f"public_key={update.public_key.hex}"]
    if update.update_only:
        lines.append("update_only=true")
    if update.endpoint is not None:
        lines.append(f"endpoint={update.endpoint}")
    if update.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={update.persistent_keepalive}")
    if update.allowed_ips is not None:
        if update.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in update.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


def build_remove_request(public_key: PublicKey) -> bytes:
    return f"set=1\npublic_key={public_key.hex}\nremove=true\n\n".encode("ascii")


GET_REQUEST = b"get=1\n\n"


class UAPIExchange(Protocol):
    """One request, one answer: fires `answer` with the text up to the blank line."""

    transport: ITCPTransport  # a Unix socket's: abortConnection as well

    def __init__(self, request: bytes, max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.request = request
        self.max_bytes = max_bytes
        self.answer: Deferred[str] = Deferred()
        self._buffer = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.answer.called:
            return
        # Search only the new bytes (and the last old one: a blank line may straddle
        # two chunks); rescanning the whole buffer made a large answer quadratic.
        start = max(len(self._buffer) - 1, 0)
        self._buffer += data
        end = self._buffer.find(b"\n\n", start)
        if end < 0 and self._buffer == b"\n":
            end = 0
        if end >= 0:
            text = bytes(self._buffer[: end + 1]).decode("ascii", "replace")
            self._buffer.clear()
            self.answer.callback(text)
            self.transport.loseConnection()
        elif len(self._buffer) > self.max_bytes:
            self._buffer.clear()
            self.answer.errback(Failure(DeviceError("the WireGuard device's answer is too large")))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._buffer.clear()
        if not self.answer.called:
            self.answer.errback(
                Failure(DeviceError("the WireGuard device closed its socket before answering"))
            )


class _QuietFactory(Factory):
    """One connection per operation: Twisted's "Starting factory" log line for
    each would drown the operator's log."""

    noisy = False

    def __init__(self, exchange: UAPIExchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: object) -> UAPIExchange:
        return self.exchange


class UAPIDevice:
    backend = "uapi"

    def __init__(self, ifname: str, reactor: Any, socket_path: str) -> None:
        self.ifname = ifname
        self.reactor = reactor
        self.socket_path = socket_path
        self.timeout = OPERATION_TIMEOUT

    def __repr__(self) -> str:
        return f"UAPIDevice({self.ifname!r}, {self.socket_path!r})"

    @inlineCallbacks
    def _exchange(self, request: bytes, operation: str) -> Any:
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=self.timeout)
        exchange = UAPIExchange(request)
        try:
            yield endpoint.connect(_QuietFactory(exchange))
        except Exception as exc:
            raise self._connect_error(exc) from None
        timer = self.reactor.callLater(self.timeout, exchange.transport.abortConnection)
        try:
            text = yield exchange.answer
        except DeviceError as exc:
            if not timer.active():
                raise DeviceError(
                    f"{self.ifname}: no answer from the WireGuard device on {self.socket_path} "
                    f"within {self.timeout:g} s"
                ) from None
            raise DeviceError(f"{self.ifname}: {exc}") from None
        finally:
            if timer.active():
                timer.cancel()
        return text

    def _connect_error(self, exc: Exception) -> DeviceError:
        text = str(exc)
        if "No such file" in text:
            return DeviceNotFound(
                f"interface {self.ifname} not found: {self.socket_path} is gone; "
                f"start 'wireguard-go {self.ifname}'"
            )
        if "Permission denied" in text:
            return DevicePermissionError(
                f"permission denied on {self.socket_path}: run as root or with CAP_NET_ADMIN"
            )
        if "refused" in text.lower():
            return DeviceNotFound(
                f"interface {self.ifname}: nothing answers on {self.socket_path} "
                "(a stale socket: the WireGuard process has exited)"
            )
        return DeviceError(f"interface {self.ifname}: cannot reach {self.socket_path}: {text}")

    @inlineCallbacks
    def read(self) -> Any:
        text = yield self._exchange(GET_REQUEST, "get")
        try:
            state, code = parse_get_answer(text)
        except (InvalidValue, ValueError) as exc:
            raise DeviceError(f"{self.ifname}: unreadable answer from the device: {exc}") from None
        if code:
            raise UAPIError(self.ifname, "get", code)
        return state

    @inlineCallbacks
    def _set(self, request: bytes, operation: str) -> Any:
        text = yield self._exchange(request, operation)
        try:
            _, code = parse_get_answer(text)
        except (InvalidValue, ValueError) as exc:
            raise DeviceError(f"{self.ifname}: unreadable answer from the device: {exc}") from None
        if code:
            raise UAPIError(self.ifname, operation, code)
        return None

    def set_peer(self, update: PeerUpdate) -> Deferred[None]:
        return self._set(build_set_request(update), f"setting peer {update.public_key.short}")

    def remove_peer(self, public_key: PublicKey) -> Deferred[None]:
        return self._set(build_remove_request(public_key), f"removing peer {public_key.short}")

    def addresses(self) -> Deferred[list[IPInterface]]:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), interface_addresses, self.ifname
        )
