"""NAT-PMP (RFC 6886) and PCP (RFC 6887) messages for one UDP mapping: pure
encoding and decoding, no I/O.

A client asks its gateway (UDP port 5351) to forward an external port to its
WireGuard listen port.  PCP is tried first; a gateway that speaks only NAT-PMP
answers a PCP request with NAT-PMP's "unsupported version" (RFC 6887 section 9),
and the client then asks again in NAT-PMP.  A mapping is deleted by asking for
it again with a lifetime of 0.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from wgnat._types import Endpoint, InvalidValue

SERVER_PORT = 5351
# What we ask for (RFC 6886 recommends two hours); the gateway may grant less.
REQUESTED_LIFETIME = 7200
# Sends of one request before giving up on an answer: at 0, 0.25, 0.75 and 1.75 s
# (RFC 6886's 250 ms doubling, cut short: a gateway that answers does so in
# milliseconds, and the client goes on without a mapping meanwhile).
RETRANSMIT_DELAYS = (0.25, 0.5, 1.0, 2.0)

PCP_VERSION = 2
PCP_OPCODE_MAP = 1
PCP_RESPONSE_BIT = 0x80
PCP_HEADER_BYTES = 24
PCP_MAP_BYTES = 36
NONCE_BYTES = 12
UDP = 17

NATPMP_VERSION = 0
NATPMP_OP_EXTERNAL_ADDRESS = 0
NATPMP_OP_MAP_UDP = 1
NATPMP_RESPONSE_BIT = 0x80

PCP_RESULTS = {
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}
RESULT_SUCCESS = 0
RESULT_UNSUPPORTED_VERSION = 1


@dataclass(frozen=True)
class MapResult:
    """A gateway's answer to a MAP request.  `result` 0 is success; then
    `external` is the mapped public endpoint (for NAT-PMP the port only until
    the external address is known: `external_port`) and `lifetime` the seconds
    granted (0 after a delete)."""

    protocol: str  # "pcp" or "nat-pmp"
    result: int
    internal_port: int
    external_port: int
    lifetime: int
    external_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    nonce: bytes = b""

    @property
    def ok(self) -> bool:
        return self.result == RESULT_SUCCESS

    @property
    def reason(self) -> str:
        """The result code as the RFC names it, for logs and `wgnat status`."""
        names = PCP_RESULTS if self.protocol == "pcp" else NATPMP_RESULTS
        return f"{self.protocol} result {self.result} ({names.get(self.result, 'unknown')})"

    @property
    def external(self) -> Endpoint | None:
        if self.external_address is None or not self.external_port:
            return None
        return Endpoint(self.external_address, self.external_port)


def _mapped_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address("::ffff:" + str(address)).packed
    return address.packed


def _unmapped(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    address = ipaddress.IPv6Address(raw)
    if address.ipv4_mapped is not None:
        address4 = address.ipv4_mapped
        return None if address4.is_unspecified else address4
    return None if address.is_unspecified else address


# -- PCP ----------------------------------------------------------------------


def pcp_map_request(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    internal_port: int,
    lifetime: int,
    nonce: bytes,
    suggested_port: int = 0,
) -> bytes:
    """A PCP MAP request for UDP `internal_port` of `client` (the address the
    request is sent from: the server refuses any other, ADDRESS_MISMATCH).  The
    same `nonce` renews or deletes (lifetime 0) the mapping it made."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError("a PCP nonce is 12 bytes")
    any_address = ipaddress.IPv4Address(0) if client.version == 4 else ipaddress.IPv6Address(0)
    header = struct.pack("!BBHI", PCP_VERSION, PCP_OPCODE_MAP, 0, lifetime) + _mapped_v6(client)
    body = (
        nonce + struct.pack("!B3xHH", UDP, internal_port, suggested_port) + _mapped_v6(any_address)
    )
    return header + body


def natpmp_unsupported_version(data: bytes) -> bool:
    """A NAT-PMP-only gateway's answer to a PCP request (RFC 6887 section 9)."""
    return (
        len(data) >= 4
        and data[0] == NATPMP_VERSION
        and struct.unpack("!H", data[2:4])[0] == RESULT_UNSUPPORTED_VERSION
    )


def parse_pcp_map_response(data: bytes) -> MapResult:
    """A PCP answer to our MAP request; InvalidValue when it is not one.  An
    error answer may be as short as its header (then it has no MAP body)."""
    if len(data) < PCP_HEADER_BYTES or len(data) > 1100:
        raise InvalidValue(f"a PCP answer of {len(data)} bytes")
    version, opcode, result = data[0], data[1], data[3]
    if opcode != PCP_RESPONSE_BIT | PCP_OPCODE_MAP:
        raise InvalidValue(f"a PCP answer with opcode {opcode:#x}, not MAP")
    (lifetime,) = struct.unpack("!I", data[4:8])
    if result == RESULT_UNSUPPORTED_VERSION or version != PCP_VERSION:
        return MapResult("pcp", result or RESULT_UNSUPPORTED_VERSION, 0, 0, 0)
    if len(data) < PCP_HEADER_BYTES + PCP_MAP_BYTES:
        if result == RESULT_SUCCESS:
            raise InvalidValue("a PCP MAP success without its MAP body")
        return MapResult("pcp", result, 0, 0, lifetime)
    body = data[PCP_HEADER_BYTES : PCP_HEADER_BYTES + PCP_MAP_BYTES]
    nonce = body[:NONCE_BYTES]
    protocol, internal_port, external_port = struct.unpack("!B3xHH", body[12:20])
    if protocol != UDP:
        raise InvalidValue(f"a PCP MAP answer for protocol {protocol}, not UDP")
    return MapResult(
        "pcp",
        result,
        internal_port,
        external_port,
        lifetime,
        _unmapped(body[20:36]),
        nonce,
    )


# -- NAT-PMP ------------------------------------------------------------------


def natpmp_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_OP_EXTERNAL_ADDRESS)


def natpmp_map_request(internal_port: int, lifetime: int, suggested_port: int = 0) -> bytes:
    """A NAT-PMP UDP mapping request; lifetime 0 (and suggested port 0) deletes."""
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, NATPMP_OP_MAP_UDP, 0, internal_port, suggested_port, lifetime
    )


def _natpmp_header(data: bytes, opcode: int, size: int) -> int:
    if len(data) < 4 or data[0] != NATPMP_VERSION:
        raise InvalidValue(f"not a NAT-PMP answer ({len(data)} bytes)")
    if data[1] != NATPMP_RESPONSE_BIT | opcode:
        raise InvalidValue(f"a NAT-PMP answer with opcode {data[1]}, not {128 + opcode}")
    (result,) = struct.unpack("!H", data[2:4])
    if result == RESULT_SUCCESS and len(data) < size:
        raise InvalidValue(f"a NAT-PMP answer of {len(data)} bytes, expected {size}")
    return int(result)


def parse_natpmp_address_response(data: bytes) -> tuple[int, ipaddress.IPv4Address | None]:
    """(result code, the gateway's external IPv4 address when it succeeded)."""
    result = _natpmp_header(data, NATPMP_OP_EXTERNAL_ADDRESS, 12)
    if result != RESULT_SUCCESS:
        return result, None
    address = ipaddress.IPv4Address(data[8:12])
    return result, None if address.is_unspecified else address


def parse_natpmp_map_response(data: bytes) -> MapResult:
    result = _natpmp_header(data, NATPMP_OP_MAP_UDP, 16)
    if result != RESULT_SUCCESS:
        return MapResult("nat-pmp", result, 0, 0, 0)
    internal_port, external_port, lifetime = struct.unpack("!HHI", data[8:16])
    return MapResult("nat-pmp", result, internal_port, external_port, lifetime)
