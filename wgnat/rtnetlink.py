"""The host's interface addresses, from one rtnetlink dump (RTM_GETADDR) on a
plain netlink socket.

pyroute2 answers the same question, but importing it costs about 0.3 s of CPU,
which was most of a client's start-up: the daemons ask this once at start (the
tunnel addresses, the LAN endpoints to announce), so it is spoken here with the
standard library.  Blocking: call it from a thread.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from wgnat._types import IPInterface

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, link index
_ATTRIBUTE = struct.Struct("=HH")  # rtattr: length, type
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 16}


def _align(length: int) -> int:
    return (length + 3) & ~3


def dump_request(sequence: int = 1) -> bytes:
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    header = _HEADER.pack(
        _HEADER.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0
    )
    return header + body


def parse_messages(data: bytes) -> tuple[list[tuple[int, IPInterface]], bool]:
    """The (link index, address) pairs in one datagram of a dump, and whether
    the dump is done.  A netlink error is raised as OSError."""
    found: list[tuple[int, IPInterface]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise OSError(errno.EPROTO, "truncated netlink message")
        body = offset + _HEADER.size
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, body)
            if code:
                raise OSError(-code, f"netlink: {errno.errorcode.get(-code, -code)}")
        elif kind == RTM_NEWADDR:
            family, prefix, _iflags, _scope, index = _IFADDRMSG.unpack_from(data, body)
            size = _FAMILIES.get(family)
            at = body + _IFADDRMSG.size
            while size is not None and at + _ATTRIBUTE.size <= offset + length:
                attr_length, attr_type = _ATTRIBUTE.unpack_from(data, at)
                if attr_length < _ATTRIBUTE.size:
                    break
                value = data[at + _ATTRIBUTE.size : at + attr_length]
                if attr_type == IFA_ADDRESS and len(value) == size:
                    address = ipaddress.ip_address(value)
                    found.append((index, ipaddress.ip_interface(f"{address}/{prefix}")))
                at += _align(attr_length)
        offset += _align(length)
    return found, False


def dump_addresses() -> list[tuple[int, IPInterface]]:
    """Every (link index, address) of this network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.sendto(dump_request(), (0, 0))
        result: list[tuple[int, IPInterface]] = []
        while True:
            found, done = parse_messages(sock.recv(1 << 20))
            result.extend(found)
            if done:
                return result


def named_addresses() -> list[tuple[str, IPInterface]]:
    """Every (link name, address) of this network namespace, in the kernel's order."""
    dumped = dump_addresses()
    names = dict(socket.if_nameindex())
    # A link that vanished since the dump has no name: its addresses are gone too.
    return [(names[index], address) for index, address in dumped if index in names]
