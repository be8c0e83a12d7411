"""The kernel WireGuard backend (wgnat.device.netlink).

Most of it is tested without the kernel module: the peer structures handed to
pyroute2's WireGuard.set() are run through pyroute2's own message builder and
decoded again; GET_DEVICE replies are built as the kernel builds them, encoded
and decoded by pyroute2, and fed to state_from_messages; NetlinkDevice is driven
on the real reactor with a fake socket.  One class round-trips through a real
kernel device, where `ip link add X type wireguard` works.
"""

from __future__ import annotations

import base64
import errno
import functools
import ipaddress
import os
import subprocess
import sys
import threading
import uuid
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

import leakcheck
import pytest
import pytest_twisted
from netns import kernel_wireguard_unavailable
from pyroute2.netlink import NLM_F_ACK, NLM_F_MULTI, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    AsyncWireGuard,
    wgmsg,
)
from twisted.internet import reactor

from tests.helpers import record_secret, secret_b64
from wgnat._types import DeviceState, Endpoint, PeerUpdate, PublicKey, parse_network
from wgnat.device import DeviceError, DeviceNotFound, DevicePermissionError
from wgnat.device.netlink import (
    NetlinkDevice,
    build_peer_dict,
    build_remove_dict,
    kernel_link_exists,
    state_from_messages,
)

GENL_FAMILY_ID = 0x15  # any id: the kernel assigns it, pyroute2 resolves it by name


def new_key() -> PublicKey:
    return PublicKey(os.urandom(32))


def nets(*texts: str) -> tuple:
    return tuple(parse_network(text) for text in texts)


# -- pyroute2's message builder, as AsyncWireGuard.set() drives it -------------------


def set_request(ifname: str, peer: dict[str, Any]) -> wgmsg:
    """Encode a SET_DEVICE request exactly as AsyncWireGuard.set() does, then decode it."""
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    # _wg_set_peer/_wg_test_key/_wg_build_allowedips use no socket state.
    AsyncWireGuard._wg_set_peer(AsyncWireGuard.__new__(AsyncWireGuard), msg, peer)
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["header"]["type"] = GENL_FAMILY_ID
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["pid"] = 4242
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def only_peer(msg: wgmsg) -> Any:
    peers = msg.get_attr("WGDEVICE_A_PEERS")
    assert peers is not None and len(peers) == 1
    return peers[0]


def peer_attr_names(peer: Any) -> set[str]:
    return {name for name, *_ in peer["attrs"]}


def allowed_of(peer: Any) -> list[str]:
    return [item["addr"] for item in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()]


class TestBuildPeerDict:
    def test_full_update_structure(self) -> None:
        key = new_key()
        update = PeerUpdate(
            key,
            endpoint=Endpoint.parse("203.0.113.7:51820"),
            allowed_ips=nets("10.0.0.2/32", "fd00:1::/64"),
            replace_allowed_ips=True,
            persistent_keepalive=25,
            update_only=True,
        )
        assert build_peer_dict(update) == {
            "public_key": key.base64,
            "update_only": True,
            "endpoint_addr": "203.0.113.7",
            "endpoint_port": 51820,
            "persistent_keepalive": 25,
            "allowed_ips": ["10.0.0.2/32", "fd00:1::/64"],
            "replace_allowed_ips": True,
        }

    def test_key_only_update_touches_nothing_else(self) -> None:
        key = new_key()
        assert build_peer_dict(PeerUpdate(key)) == {"public_key": key.base64}

    def test_replace_without_a_list_does_not_clear_the_peers_ips(self) -> None:
        # replace_allowed_ips with allowed_ips=None must not become "replace with nothing".
        peer = build_peer_dict(PeerUpdate(new_key(), replace_allowed_ips=True))
        assert "replace_allowed_ips" not in peer
        assert "allowed_ips" not in peer

    def test_remove_structure(self) -> None:
        key = new_key()
        assert build_remove_dict(key) == {"public_key": key.base64, "remove": True}

    def test_full_update_through_pyroute2(self) -> None:
        key = new_key()
        update = PeerUpdate(
            key,
            endpoint=Endpoint.parse("203.0.113.7:51820"),
            allowed_ips=nets("10.0.0.2/32", "fd00:1::/64"),
            replace_allowed_ips=True,
            persistent_keepalive=25,
            update_only=True,
        )
        msg = set_request("wg0", build_peer_dict(update))
        assert msg["cmd"] == WG_CMD_SET_DEVICE
        assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg0"
        peer = only_peer(msg)
        assert peer.get_attr("WGPEER_A_PUBLIC_KEY") == key.base64.encode()
        endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
        assert endpoint["family"] == AF_INET
        assert (endpoint["addr"], endpoint["port"]) == ("203.0.113.7", 51820)
        assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
        assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS | WGPEER_F_UPDATE_ONLY
        assert allowed_of(peer) == ["10.0.0.2/32", "fd00:1::/64"]
        assert "WGPEER_A_PRESHARED_KEY" not in peer_attr_names(peer)
        # The key travels as its 32 raw bytes.
        assert key.raw in msg.data

    def test_ipv6_endpoint_through_pyroute2(self) -> None:
        update = PeerUpdate(new_key(), endpoint=Endpoint.parse("[2001:db8::7]:4500"))
        peer = only_peer(set_request("wg0", build_peer_dict(update)))
        endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
        assert endpoint["family"] == AF_INET6
        assert (endpoint["addr"], endpoint["port"]) == ("2001:db8::7", 4500)
        assert peer.get_attr("WGPEER_A_FLAGS") == 0
        assert "WGPEER_A_ALLOWEDIPS" not in peer_attr_names(peer)
        assert "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL" not in peer_attr_names(peer)

    def test_appending_allowed_ips_sets_no_replace_flag(self) -> None:
        update = PeerUpdate(new_key(), allowed_ips=nets("10.9.0.0/16"))
        peer = only_peer(set_request("wg0", build_peer_dict(update)))
        assert peer.get_attr("WGPEER_A_FLAGS") == 0
        assert allowed_of(peer) == ["10.9.0.0/16"]
        assert "WGPEER_A_ENDPOINT" not in peer_attr_names(peer)

    def test_keepalive_zero_is_sent_to_turn_it_off(self) -> None:
        update = PeerUpdate(new_key(), persistent_keepalive=0, update_only=True)
        peer = only_peer(set_request("wg0", build_peer_dict(update)))
        assert "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL" in peer_attr_names(peer)
        assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0
        assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY

    def test_replace_with_an_empty_list_clears_the_peers_ips(self) -> None:
        update = PeerUpdate(new_key(), allowed_ips=(), replace_allowed_ips=True)
        peer = only_peer(set_request("wg0", build_peer_dict(update)))
        assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
        assert allowed_of(peer) == []

    def test_remove_through_pyroute2(self) -> None:
        key = new_key()
        peer = only_peer(set_request("wg0", build_remove_dict(key)))
        assert peer.get_attr("WGPEER_A_PUBLIC_KEY") == key.base64.encode()
        assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
        assert peer_attr_names(peer) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS"}


# -- GET_DEVICE replies, built the way the kernel builds them ------------------------


def allowed_ip_nla(text: str) -> dict[str, Any]:
    network = ipaddress.ip_network(text)
    family = AF_INET if network.version == 4 else AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", inet_pton(family, str(network.network_address))],
            ["WGALLOWEDIP_A_CIDR_MASK", network.prefixlen],
        ]
    }


def peer_nla(
    key: PublicKey,
    *,
    allowed: tuple[str, ...] = (),
    first_part: bool = True,
    preshared: str | None = None,
    endpoint: tuple[str, int] | None = None,
    handshake: tuple[int, int] = (0, 0),
    rx: int = 0,
    tx: int = 0,
    keepalive: int = 0,
) -> dict[str, Any]:
    """One peer as the kernel's get_peer() emits it.  A continuation (first_part=False)
    carries only the public key and more allowed IPs."""
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", key.base64]]
    if first_part:
        attrs += [
            ["WGPEER_A_PRESHARED_KEY", preshared or base64.b64encode(bytes(32)).decode()],
            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive],
            ["WGPEER_A_TX_BYTES", tx],
            ["WGPEER_A_RX_BYTES", rx],
            ["WGPEER_A_PROTOCOL_VERSION", 1],
        ]
        if endpoint is not None:
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": endpoint[0], "port": endpoint[1]}])
    attrs.append(["WGPEER_A_ALLOWEDIPS", [allowed_ip_nla(text) for text in allowed]])
    return {"attrs": attrs}


def get_reply(
    peers: list[dict[str, Any]],
    *,
    private_key: str | None = None,
    public_key: PublicKey | None = None,
    listen_port: int | None = 51820,
    first: bool = True,
) -> wgmsg:
    """One message of a GET_DEVICE dump, encoded and decoded by pyroute2.  Device
    attributes are only in the first message, as in the kernel's dump."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["header"]["type"] = GENL_FAMILY_ID
    msg["header"]["flags"] = NLM_F_MULTI
    if first:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", listen_port or 0])
        msg["attrs"].append(["WGDEVICE_A_FWMARK", 0])
        msg["attrs"].append(["WGDEVICE_A_IFINDEX", 7])
        msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
        if private_key is not None:
            msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private_key])
        if public_key is not None:
            msg["attrs"].append(["WGDEVICE_A_PUBLIC_KEY", public_key.base64])
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


class TestStateFromMessages:
    def test_one_message_device(self) -> None:
        own, a, b = new_key(), new_key(), new_key()
        private, psk_a, psk_b = secret_b64(), secret_b64(), secret_b64()
        reply = get_reply(
            [
                peer_nla(
                    a,
                    allowed=("10.0.0.2/32", "192.168.2.0/24"),
                    preshared=psk_a,
                    endpoint=("198.51.100.4", 51820),
                    handshake=(1_700_000_000, 500_000_000),
                    rx=1234,
                    tx=5678,
                    keepalive=25,
                ),
                peer_nla(
                    b,
                    allowed=("10.0.0.3/32", "fd00::3/128"),
                    preshared=psk_b,
                    endpoint=("2001:db8::3", 4500),
                ),
            ],
            private_key=private,
            public_key=own,
            listen_port=51821,
        )
        # The reply really carries the secrets: the parser must leave them behind.
        assert reply.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None

        state = state_from_messages([reply])

        assert isinstance(state, DeviceState)
        assert state.public_key == own
        assert state.listen_port == 51821
        assert [p.public_key for p in state.peers] == [a, b]
        pa, pb = state.peers
        assert pa.endpoint == Endpoint.parse("198.51.100.4:51820")
        assert pa.allowed_ips == nets("10.0.0.2/32", "192.168.2.0/24")
        assert pa.latest_handshake == pytest.approx(1_700_000_000.5)
        assert (pa.rx_bytes, pa.tx_bytes, pa.persistent_keepalive) == (1234, 5678, 25)
        assert pb.endpoint == Endpoint.parse("[2001:db8::3]:4500")
        assert pb.allowed_ips == nets("10.0.0.3/32", "fd00::3/128")
        assert pb.latest_handshake is None  # tv_sec = tv_nsec = 0: never
        assert (pb.rx_bytes, pb.tx_bytes, pb.persistent_keepalive) == (0, 0, 0)

        shown = repr(state) + str(state)
        for secret in (private, psk_a, psk_b):
            raw = base64.b64decode(secret)
            assert secret not in shown
            assert raw.hex() not in shown
            assert repr(raw) not in shown

    def test_dump_split_over_two_messages_is_merged(self) -> None:
        own, a, b = new_key(), new_key(), new_key()
        first = get_reply(
            [
                peer_nla(
                    a,
                    allowed=("10.0.0.2/32", "10.1.0.0/16"),
                    endpoint=("198.51.100.4", 51820),
                    handshake=(1_700_000_100, 0),
                    rx=10,
                    tx=20,
                    keepalive=25,
                )
            ],
            private_key=secret_b64(),
            public_key=own,
        )
        second = get_reply(
            [
                peer_nla(a, allowed=("10.2.0.0/16", "fd00:2::/64"), first_part=False),
                peer_nla(b, allowed=("10.0.0.3/32",), endpoint=("192.0.2.9", 1000)),
            ],
            first=False,
        )
        assert second.get_attr("WGDEVICE_A_PUBLIC_KEY") is None

        state = state_from_messages([first, second])

        assert state.public_key == own
        assert state.listen_port == 51820
        assert [p.public_key for p in state.peers] == [a, b]
        pa = state.peer(a)
        assert pa is not None
        assert pa.allowed_ips == nets("10.0.0.2/32", "10.1.0.0/16", "10.2.0.0/16", "fd00:2::/64")
        # The continuation carries no endpoint or counters: the first part's stay.
        assert pa.endpoint == Endpoint.parse("198.51.100.4:51820")
        assert pa.latest_handshake == pytest.approx(1_700_000_100)
        assert (pa.rx_bytes, pa.tx_bytes, pa.persistent_keepalive) == (10, 20, 25)
        pb = state.peer(b)
        assert pb is not None and pb.endpoint == Endpoint.parse("192.0.2.9:1000")

    def test_device_without_key_or_peers(self) -> None:
        state = state_from_messages([get_reply([], listen_port=0)])
        assert state == DeviceState(None, 0, ())

    def test_peer_without_endpoint_or_allowed_ips(self) -> None:
        key = new_key()
        state = state_from_messages([get_reply([peer_nla(key)], public_key=new_key())])
        assert state.peers[0].public_key == key
        assert state.peers[0].endpoint is None
        assert state.peers[0].allowed_ips == ()

    def test_non_canonical_allowed_ip_from_the_kernel_is_masked(self) -> None:
        # The kernel masks host bits itself, but a stray one must not crash the read.
        key = new_key()
        nla = peer_nla(key)
        nla["attrs"][-1][1] = [
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", AF_INET],
                    ["WGALLOWEDIP_A_IPADDR", inet_pton(AF_INET, "10.0.0.9")],
                    ["WGALLOWEDIP_A_CIDR_MASK", 24],
                ]
            }
        ]
        state = state_from_messages([get_reply([nla])])
        assert state.peers[0].allowed_ips == nets("10.0.0.0/24")


def test_kernel_link_exists_is_false_for_other_links() -> None:
    assert kernel_link_exists("lo") is False
    assert kernel_link_exists("nosuchif0") is False


# -- NetlinkDevice on the real reactor, with a fake pyroute2 socket -------------------


class FakeWireGuard:
    """Stands in for pyroute2.WireGuard: records calls and the thread they ran in."""

    def __init__(self, owner: FakeFactory) -> None:
        self.owner = owner

    def info(self, ifname: str) -> Any:
        self.owner.calls.append(("info", ifname, threading.get_ident()))
        if self.owner.error is not None:
            raise self.owner.error
        return self.owner.replies

    def set(self, ifname: str, **kwargs: Any) -> Any:
        self.owner.calls.append(("set", ifname, kwargs, threading.get_ident()))
        if self.owner.error is not None:
            raise self.owner.error
        return ()

    def close(self) -> None:
        self.owner.closed += 1


class FakeFactory:
    def __init__(self, replies: Any = (), error: BaseException | None = None) -> None:
        self.replies = replies
        self.error = error
        self.factory_error: BaseException | None = None
        self.calls: list[tuple[Any, ...]] = []
        self.opened = 0
        self.closed = 0
        self.threads: list[int] = []

    def __call__(self) -> FakeWireGuard:
        self.threads.append(threading.get_ident())
        if self.factory_error is not None:
            raise self.factory_error
        self.opened += 1
        return FakeWireGuard(self)


# Strings a pyroute2 error could echo: a key from the request, for instance.
LEAKY_TEXT = "request carried private_key=" + base64.b64encode(b"S" * 32).decode()
record_secret(b"S" * 32)


class TestNetlinkDeviceWithFakeSocket:
    @pytest_twisted.ensureDeferred
    async def test_read_runs_in_a_thread_and_parses(self) -> None:
        own, peer = new_key(), new_key()
        replies = (
            get_reply(
                [peer_nla(peer, allowed=("10.0.0.2/32",), endpoint=("192.0.2.1", 51820))],
                private_key=secret_b64(),
                public_key=own,
            ),
        )
        factory = FakeFactory(replies=replies)
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        assert device.backend == "netlink"
        assert device.ifname == "wg7"

        state = await device.read()

        assert state.public_key == own
        assert state.peer(peer) is not None
        assert state.peer(peer).endpoint == Endpoint.parse("192.0.2.1:51820")
        [(op, ifname, thread)] = factory.calls
        assert (op, ifname) == ("info", "wg7")
        main = threading.get_ident()
        assert thread != main
        assert all(t != main for t in factory.threads)
        assert (factory.opened, factory.closed) == (1, 1)

    @pytest_twisted.ensureDeferred
    async def test_set_peer_passes_the_peer_dict(self) -> None:
        factory = FakeFactory()
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        update = PeerUpdate(
            new_key(),
            endpoint=Endpoint.parse("192.0.2.1:51820"),
            allowed_ips=nets("10.0.0.2/32"),
            replace_allowed_ips=True,
            persistent_keepalive=25,
        )

        result = await device.set_peer(update)

        assert result is None
        [(op, ifname, kwargs, thread)] = factory.calls
        assert (op, ifname) == ("set", "wg7")
        assert kwargs == {"peer": build_peer_dict(update)}
        assert thread != threading.get_ident()
        assert (factory.opened, factory.closed) == (1, 1)

    @pytest_twisted.ensureDeferred
    async def test_remove_peer_passes_the_remove_dict(self) -> None:
        factory = FakeFactory()
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        key = new_key()

        result = await device.remove_peer(key)

        assert result is None
        [(op, ifname, kwargs, _thread)] = factory.calls
        assert (op, ifname, kwargs) == ("set", "wg7", {"peer": build_remove_dict(key)})
        assert factory.closed == 1

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (NetlinkError(errno.EPERM, LEAKY_TEXT), DevicePermissionError),
            (NetlinkError(errno.EACCES, LEAKY_TEXT), DevicePermissionError),
            (PermissionError(errno.EPERM, LEAKY_TEXT), DevicePermissionError),
            (NetlinkError(errno.ENODEV, LEAKY_TEXT), DeviceNotFound),
            (OSError(errno.ENODEV, LEAKY_TEXT), DeviceNotFound),
        ],
    )
    @pytest.mark.parametrize("operation", ["read", "set_peer", "remove_peer"])
    @pytest_twisted.ensureDeferred
    async def test_errno_becomes_a_device_error(
        self, error: BaseException, expected: type[DeviceError], operation: str
    ) -> None:
        factory = FakeFactory(error=error)
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        with pytest.raises(expected) as caught:
            await call(device, operation)
        assert_safe(caught.value, "wg7")
        if expected is DevicePermissionError:
            assert "root" in str(caught.value) or "CAP_NET_ADMIN" in str(caught.value)
        assert factory.closed == factory.opened == 1  # closed even when it fails

    @pytest.mark.parametrize(
        "error",
        [
            NetlinkError(errno.EINVAL, LEAKY_TEXT),
            OSError(errno.EMSGSIZE, LEAKY_TEXT),
            ValueError(LEAKY_TEXT),
            RuntimeError(LEAKY_TEXT),
            KeyError(LEAKY_TEXT),
        ],
    )
    @pytest.mark.parametrize("operation", ["read", "set_peer", "remove_peer"])
    @pytest_twisted.ensureDeferred
    async def test_other_errors_become_device_error_without_their_text(
        self, error: BaseException, operation: str
    ) -> None:
        factory = FakeFactory(error=error)
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        with pytest.raises(DeviceError) as caught:
            await call(device, operation)
        assert type(caught.value) is DeviceError
        assert_safe(caught.value, "wg7")
        if isinstance(error, NetlinkError) and error.code == errno.EINVAL:
            assert "EINVAL" in str(caught.value)

    @pytest_twisted.ensureDeferred
    async def test_socket_that_cannot_open_is_translated(self) -> None:
        # What WireGuard() raises where the module is not loaded: no genl family.
        factory = FakeFactory()
        factory.factory_error = NetlinkError(errno.ENOENT, LEAKY_TEXT)
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        with pytest.raises(DeviceNotFound) as caught:
            await device.read()
        assert_safe(caught.value, "wg7")

    @pytest_twisted.ensureDeferred
    async def test_an_unusable_endpoint_reads_as_no_endpoint(self) -> None:
        # A peer whose endpoint is 0.0.0.0 cannot be used; one odd peer must not
        # make the whole device unreadable.
        key = new_key()
        reply = get_reply([peer_nla(key, endpoint=("0.0.0.0", 51820))])
        factory = FakeFactory(replies=(reply,))
        device = NetlinkDevice("wg7", reactor, socket_factory=factory)
        state = await device.read()
        assert state.peer(key) is not None and state.peer(key).endpoint is None

    @pytest_twisted.ensureDeferred
    async def test_addresses_of_a_missing_link(self) -> None:
        device = NetlinkDevice("nosuchif0", reactor, socket_factory=FakeFactory())
        with pytest.raises(DeviceNotFound):
            await device.addresses()

    @pytest_twisted.ensureDeferred
    async def test_addresses_of_loopback(self) -> None:
        device = NetlinkDevice("lo", reactor, socket_factory=FakeFactory())
        addresses = await device.addresses()
        assert ipaddress.ip_interface("127.0.0.1/8") in addresses

    def test_repr_names_only_the_interface(self) -> None:
        assert repr(NetlinkDevice("wg7", reactor, socket_factory=FakeFactory())) == (
            "NetlinkDevice('wg7')"
        )


def call(device: NetlinkDevice, operation: str) -> Any:
    if operation == "read":
        return device.read()
    if operation == "set_peer":
        return device.set_peer(PeerUpdate(new_key(), persistent_keepalive=25))
    return device.remove_peer(new_key())


def assert_safe(exc: BaseException, ifname: str) -> None:
    text = str(exc)
    assert ifname in text
    assert "\n" not in text
    assert LEAKY_TEXT not in text and LEAKY_TEXT not in repr(exc)
    assert "private_key" not in text
    assert exc.__cause__ is None and exc.__suppress_context__


# -- a real kernel device, where the module exists ------------------------------------


KERNEL_UNAVAILABLE = kernel_wireguard_unavailable()


def run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=True, timeout=10
    ).stdout


class KernelDevice:
    def __init__(self, netns: str, ifname: str, private: str, public: PublicKey) -> None:
        self.netns = netns
        self.ifname = ifname
        self.private = private
        self.public = public

    def wg(self, *args: str) -> str:
        return run("ip", "netns", "exec", self.netns, "wg", *args)

    def device(self, ifname: str | None = None) -> NetlinkDevice:
        from pyroute2 import WireGuard

        return NetlinkDevice(
            ifname or self.ifname,
            reactor,
            socket_factory=functools.partial(WireGuard, netns=self.netns),
        )


@pytest.fixture
def kernel_device(tmp_path: Any) -> Any:
    netns = f"wgnat-nl-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", netns)
    try:
        run("ip", "-n", netns, "link", "add", "wgk0", "type", "wireguard")
        private = run("wg", "genkey").strip()
        leakcheck.record_secret(private)  # the leak check searches every output for it
        public = PublicKey.from_base64(run("wg", "pubkey", stdin=private + "\n").strip())
        key_file = tmp_path / "private"
        key_file.write_text(private + "\n")
        key_file.chmod(0o600)
        run(
            "ip", "netns", "exec", netns,
            "wg", "set", "wgk0", "private-key", str(key_file), "listen-port", "51820",
        )  # fmt: skip
        run("ip", "-n", netns, "link", "set", "wgk0", "up")
        yield KernelDevice(netns, "wgk0", private, public)
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)


@pytest.mark.skipif(KERNEL_UNAVAILABLE is not None, reason=KERNEL_UNAVAILABLE or "")
class TestKernelDevice:
    @pytest_twisted.ensureDeferred
    async def test_read_hides_private_and_preshared_keys(
        self, kernel_device: KernelDevice, tmp_path: Any
    ) -> None:
        peer = new_key()
        psk = run("wg", "genpsk").strip()
        leakcheck.record_secret(psk)
        psk_file = tmp_path / "psk"
        psk_file.write_text(psk + "\n")
        kernel_device.wg(
            "set", "wgk0", "peer", peer.base64, "preshared-key", str(psk_file),
            "endpoint", "192.0.2.1:51820", "allowed-ips", "10.0.0.2/32,fd00::2/128",
            "persistent-keepalive", "25",
        )  # fmt: skip

        state = await kernel_device.device().read()

        assert state.public_key == kernel_device.public
        assert state.listen_port == 51820
        got = state.peer(peer)
        assert got is not None
        assert got.endpoint == Endpoint.parse("192.0.2.1:51820")
        assert set(got.allowed_ips) == set(nets("10.0.0.2/32", "fd00::2/128"))
        assert got.persistent_keepalive == 25
        assert got.latest_handshake is None
        shown = repr(state)
        for secret in (kernel_device.private, psk):
            assert secret not in shown
            assert base64.b64decode(secret).hex() not in shown

    @pytest_twisted.ensureDeferred
    async def test_set_update_and_remove_round_trip(self, kernel_device: KernelDevice) -> None:
        device = kernel_device.device()
        key = new_key()

        await device.set_peer(
            PeerUpdate(
                key,
                endpoint=Endpoint.parse("198.51.100.4:4500"),
                allowed_ips=nets("10.0.0.3/32"),
                persistent_keepalive=25,
            )
        )
        got = (await device.read()).peer(key)
        assert got is not None
        assert got.endpoint == Endpoint.parse("198.51.100.4:4500")
        assert got.allowed_ips == nets("10.0.0.3/32")
        assert got.persistent_keepalive == 25
        assert key.base64 in kernel_device.wg("show", "wgk0", "peers")

        # Appending, then replacing, allowed IPs; an IPv6 endpoint; keepalive off.
        await device.set_peer(PeerUpdate(key, allowed_ips=nets("10.3.0.0/16")))
        got = (await device.read()).peer(key)
        assert got is not None
        assert set(got.allowed_ips) == set(nets("10.0.0.3/32", "10.3.0.0/16"))
        await device.set_peer(
            PeerUpdate(
                key,
                endpoint=Endpoint.parse("[2001:db8::4]:4501"),
                allowed_ips=nets("10.0.0.4/32"),
                replace_allowed_ips=True,
                persistent_keepalive=0,
                update_only=True,
            )
        )
        got = (await device.read()).peer(key)
        assert got is not None
        assert got.endpoint == Endpoint.parse("[2001:db8::4]:4501")
        assert got.allowed_ips == nets("10.0.0.4/32")
        assert got.persistent_keepalive == 0

        # update_only never creates a peer.
        ghost = new_key()
        await device.set_peer(PeerUpdate(ghost, persistent_keepalive=25, update_only=True))
        assert (await device.read()).peer(ghost) is None

        await device.remove_peer(key)
        assert (await device.read()).peer(key) is None
        assert key.base64 not in kernel_device.wg("show", "wgk0", "peers")
        await device.remove_peer(key)  # removing an absent peer is not an error

    @pytest_twisted.ensureDeferred
    async def test_many_allowed_ips_survive_a_split_dump(self, kernel_device: KernelDevice) -> None:
        device = kernel_device.device()
        key = new_key()
        many = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(600))
        await device.set_peer(PeerUpdate(key, allowed_ips=many))
        got = (await device.read()).peer(key)
        assert got is not None
        assert set(got.allowed_ips) == set(many)

    @pytest_twisted.ensureDeferred
    async def test_hundreds_of_peers_survive_a_split_dump(
        self, kernel_device: KernelDevice, tmp_path: Any
    ) -> None:
        # A hub with hundreds of clients: the kernel answers GET_DEVICE in several
        # messages (each a page or so, a few dozen peers), and read() must see all.
        count = 500
        keys = [new_key() for _ in range(count)]
        config = tmp_path / "peers.conf"
        lines = [
            f"[Peer]\nPublicKey = {key.base64}\nAllowedIPs = 10.{i // 256}.{i % 256}.1/32\n"
            f"Endpoint = 198.51.100.{1 + i % 250}:{20000 + i}\n"
            for i, key in enumerate(keys)
        ]
        config.write_text("\n".join(lines))
        kernel_device.wg("addconf", "wgk0", str(config))  # one wg call, not 500

        from pyroute2 import WireGuard

        wg = WireGuard(netns=kernel_device.netns)
        try:
            parts = len(wg.info("wgk0"))
        finally:
            wg.close()
        state = await kernel_device.device().read()

        print(f"{count} peers came in {parts} netlink messages")
        assert parts > 1, "the dump was not split: the test proves nothing"
        assert len(state.peers) == count
        assert {peer.public_key for peer in state.peers} == set(keys)
        for i, key in enumerate(keys):
            got = state.peer(key)
            assert got is not None
            assert got.allowed_ips == nets(f"10.{i // 256}.{i % 256}.1/32")
            assert got.endpoint == Endpoint.parse(f"198.51.100.{1 + i % 250}:{20000 + i}")

    @pytest_twisted.ensureDeferred
    async def test_missing_interface_is_device_not_found(self, kernel_device: KernelDevice) -> None:
        with pytest.raises(DeviceNotFound):
            await kernel_device.device("nosuch0").read()


# -- pyroute2 only for the kernel backend -----------------------------------------

ONLY_UAPI = r"""
import os, socket, sys, tempfile
from twisted.internet import reactor
import wgnat.cli.daemons, wgnat.cli.wgnat, wgnat.client.agent, wgnat.client.tap
from wgnat.client.lan import lan_addresses
from wgnat.device import interface_addresses, open_device

directory = tempfile.mkdtemp()
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(directory, "wgt0.sock"))  # as wireguard-go serves wgt0
device = open_device("wgt0", reactor, socket_dir=directory)
interface_addresses("lo")
lan_addresses("wgt0")
print(device.backend, [name for name in sys.modules if name.split(".")[0] == "pyroute2"])
"""


def test_a_userspace_client_never_imports_pyroute2() -> None:
    # Importing pyroute2 costs about 0.3 s of CPU at every client's start (more on a
    # small router): only the kernel backend needs it.  Everything a client does
    # before its first device read, in a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-c", ONLY_UAPI], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["uapi", "[]"], result.stdout
