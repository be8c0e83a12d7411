"""Small frozen value types shared by every layer.

Bad data is rejected here, where it enters, with a message a user can act on;
everything past these constructors may trust the values.  None of these types can
hold a private or preshared key: the device layer drops those before building them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class InvalidValue(ValueError):
    """A user-facing value (flag, API field, device answer) that cannot be used."""


def _short(text: object, limit: int = 60) -> str:
    """Quote a bad value for an error message without echoing megabytes of it."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True, order=True)
class PublicKey:
    """A WireGuard public key: 32 bytes, written in standard base64 (44 chars)."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise InvalidValue("a WireGuard key is 32 bytes")

    @classmethod
    def from_base64(cls, text: object) -> PublicKey:
        if not isinstance(text, str) or len(text) != 44 or not text.endswith("="):
            raise InvalidValue(
                f"malformed WireGuard key {_short(text)}: expected 44 base64 characters "
                "ending in '=', as printed by 'wg pubkey'"
            )
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValue(
                f"malformed WireGuard key {_short(text)}: not valid base64"
            ) from None
        if len(raw) != 32:
            raise InvalidValue(f"malformed WireGuard key {_short(text)}: not 32 bytes")
        if base64.b64encode(raw).decode("ascii") != text:
            # Non-zero padding bits: a second spelling of some key, which `wg` refuses.
            raise InvalidValue(
                f"malformed WireGuard key {_short(text)}: not canonical base64 "
                "(its last character before '=' is wrong)"
            )
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidValue(f"malformed hex WireGuard key {_short(text)}") from None
        if len(raw) != 32:
            raise InvalidValue(f"malformed hex WireGuard key {_short(text)}: not 32 bytes")
        return cls(raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def short(self) -> str:
        """The first characters, as `wg show` users recognise a peer."""
        return self.base64[:8]

    def __str__(self) -> str:
        return self.base64

    def __repr__(self) -> str:
        return f"PublicKey({self.base64!r})"


@dataclass(frozen=True, order=True)
class Endpoint:
    """A UDP endpoint: an IP address and a port (never a host name)."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise InvalidValue(f"endpoint port {_short(self.port)} is not an integer")
        if not 1 <= self.port <= 65535:
            raise InvalidValue(f"endpoint port {self.port} is outside 1-65535")
        if self.host.is_unspecified or self.host.is_multicast:
            raise InvalidValue(f"endpoint address {self.host} cannot be used by a peer")

    @classmethod
    def parse(cls, text: object) -> Endpoint:
        """Parse `1.2.3.4:51820` or `[2001:db8::1]:51820` (what `wg` prints)."""
        if not isinstance(text, str) or len(text) > 64:
            raise InvalidValue(f"malformed endpoint {_short(text)}: expected 'IP:PORT'")
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not (port_text.isascii() and port_text.isdigit()):
            raise InvalidValue(f"malformed endpoint {_short(text)}: expected 'IP:PORT'")
        if host_text.startswith("[") and host_text.endswith("]"):
            host_text = host_text[1:-1]
            if "%" in host_text:  # a link-local scope id: keep the address only
                host_text = host_text.split("%", 1)[0]
        try:
            host = ipaddress.ip_address(host_text)
        except ValueError:
            raise InvalidValue(
                f"malformed endpoint {_short(text)}: {_short(host_text)} is not an IP address"
            ) from None
        if isinstance(host, ipaddress.IPv6Address) and not text.startswith("["):
            raise InvalidValue(f"malformed endpoint {_short(text)}: write IPv6 as [ADDR]:PORT")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_network(text: object) -> IPNetwork:
    """Parse an allowed-IP entry such as `10.0.0.2/32`; host bits must be zero."""
    if not isinstance(text, str) or len(text) > 64:
        raise InvalidValue(f"malformed network {_short(text)}: expected 'ADDR/PREFIX'")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidValue(f"malformed network {_short(text)}: {exc}") from None


@dataclass(frozen=True)
class Announcement:
    """What a client tells the registry about itself: its LAN endpoints (for peers
    behind the same NAT), its global IPv6 endpoints (no NAT between two peers
    that both have one), the endpoint its gateway mapped for it (port mapping;
    None without one) and a session id, new at every client start, which tells
    the others that a wgnat client now runs there and will punch back."""

    session: str
    lan_endpoints: tuple[Endpoint, ...] = ()
    # Two registries saw this host at one public address with different ports:
    # its NAT maps each destination to a port of its own (several -r only).
    symmetric_nat: bool = False
    mapped_endpoint: Endpoint | None = None
    ipv6_endpoints: tuple[Endpoint, ...] = ()
    # Its router accepts unsolicited packets on its INPUT chain (the conntrack
    # race): its peers let it punch first and answer a moment later.
    punch_first: bool = False

    def __post_init__(self) -> None:
        if (
            not isinstance(self.session, str)
            or not 0 < len(self.session) <= 32
            or not all(ch in "0123456789abcdef" for ch in self.session)
        ):
            raise InvalidValue("a session id is 1-32 lowercase hex digits")


@dataclass(frozen=True)
class PeerState:
    """What a device knows about one peer.  No preshared key, by construction."""

    public_key: PublicKey
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    latest_handshake: float | None = None  # Unix seconds; None when never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0  # seconds; 0 when off


@dataclass(frozen=True)
class DeviceState:
    """A snapshot of one WireGuard interface.  No private key, by construction."""

    public_key: PublicKey | None
    listen_port: int
    peers: tuple[PeerState, ...] = ()

    def peer(self, key: PublicKey) -> PeerState | None:
        for peer in self.peers:
            if peer.public_key == key:
                return peer
        return None

    def by_key(self) -> dict[PublicKey, PeerState]:
        return {peer.public_key: peer for peer in self.peers}


@dataclass(frozen=True)
class PeerUpdate:
    """Add or change one peer.  Fields left as None are not touched.

    `allowed_ips` replaces the peer's list when `replace_allowed_ips` is true and
    is appended to it otherwise.  `update_only` refuses to create a peer that is
    not there (so a racing removal is not undone).
    """

    public_key: PublicKey
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None
    replace_allowed_ips: bool = False
    persistent_keepalive: int | None = None
    update_only: bool = False

    def __post_init__(self) -> None:
        if self.persistent_keepalive is not None and not 0 <= self.persistent_keepalive <= 65535:
            raise InvalidValue(
                f"persistent keepalive {self.persistent_keepalive} is outside 0-65535 seconds"
            )


def peer_label(key: PublicKey, allowed_ips: tuple[IPNetwork, ...] = ()) -> str:
    """How an operator recognises a peer in a log line: its tunnel address (the
    first allowed IP) and the start of its key, as `wg show` users know it."""
    if allowed_ips:
        return f"{allowed_ips[0].network_address} ({key.short})"
    return key.short
