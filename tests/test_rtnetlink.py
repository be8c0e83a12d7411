"""The interface addresses read over a plain rtnetlink socket: messages parsed
byte by byte, and the same answer as pyroute2 gives on this host."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from wgnat.client.lan import lan_addresses
from wgnat.device import DeviceNotFound, interface_addresses
from wgnat.rtnetlink import (
    IFA_ADDRESS,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_NEWADDR,
    dump_request,
    named_addresses,
    parse_messages,
)


def attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body


def new_address(family: int, prefix: int, index: int, address: str, label: bytes = b"") -> bytes:
    body = struct.pack("=BBBBI", family, prefix, 0, 0, index)
    body += attribute(2, socket.inet_pton(family, address))  # IFA_LOCAL: not used
    body += attribute(IFA_ADDRESS, socket.inet_pton(family, address))
    if label:
        body += attribute(3, label + b"\0")  # IFA_LABEL, padded
    return message(RTM_NEWADDR, body)


def test_request_is_a_dump_of_every_family():
    request = dump_request(7)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, sequence) == (len(request), 22, 0x301, 7)
    assert request[16] == socket.AF_UNSPEC


def test_addresses_of_both_families_then_done():
    data = (
        new_address(socket.AF_INET, 24, 3, "192.168.1.10", label=b"eth0")
        + new_address(socket.AF_INET6, 64, 3, "2001:db8::1")
        + message(99, b"\0" * 8)  # a message of a kind we do not read
    )
    found, done = parse_messages(data)
    assert not done
    assert found == [
        (3, ipaddress.ip_interface("192.168.1.10/24")),
        (3, ipaddress.ip_interface("2001:db8::1/64")),
    ]
    assert parse_messages(message(NLMSG_DONE, struct.pack("=i", 0))) == ([], True)


def test_a_netlink_error_is_raised_and_a_truncated_message_refused():
    with pytest.raises(OSError) as failure:
        parse_messages(message(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16))
    assert failure.value.errno == errno.EPERM
    whole = new_address(socket.AF_INET, 24, 3, "192.168.1.10")
    with pytest.raises(OSError):
        parse_messages(whole[:-4])


def test_same_answer_as_pyroute2_on_this_host():
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        expected = sorted(
            (names[m["index"]], str(ipaddress.ip_interface(f"{a}/{m['prefixlen']}")))
            for m in ipr.get_addr()
            if (a := m.get_attr("IFA_ADDRESS")) is not None
        )
    assert sorted((name, str(address)) for name, address in named_addresses()) == expected
    assert ipaddress.ip_interface("127.0.0.1/8") in interface_addresses("lo")
    assert all(not a.ip.is_loopback for a in lan_addresses("lo"))


def test_a_missing_link_is_device_not_found():
    with pytest.raises(DeviceNotFound, match="no link in this network namespace"):
        interface_addresses("wgnat-none0")
