"""wgnat's device layer against real wireguard-go devices, over their UAPI sockets.

The test process stays in the root namespace: the UAPI sockets live in the shared
/var/run/wireguard, so `open_device(ifname)` reaches a device running in any lab
namespace.  Only `addresses()`, which reads the links of the caller's namespace,
runs in a subprocess inside the device's namespace.
"""

# ruff: noqa: F811
from __future__ import annotations

import base64
import errno
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from netns import Lab, WireGuard

# The fixture; tests name it as a parameter, hence F811 below.
from netns_fixtures import lab  # noqa: F401
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from wgnat._types import Endpoint, PeerUpdate, PublicKey, parse_network
from wgnat.device import DeviceError, DeviceNotFound, open_device
from wgnat.device.uapi import UAPIDevice, UAPIError

pytestmark = pytest.mark.realdevice

A_PUBLIC = "203.0.113.10"
B_PUBLIC = "203.0.113.11"
ROUTER = "203.0.113.21"


def new_key() -> PublicKey:
    return PublicKey(X25519PrivateKey.generate().public_key().public_bytes_raw())


def nets(*texts: str) -> tuple:
    return tuple(parse_network(t) for t in texts)


@pytest.fixture
def wg(lab: Lab) -> WireGuard:
    return lab.wireguard(lab.host("h"), "198.51.100.1/24", listen_port=51820)


@pytest.fixture
def device(wg: WireGuard) -> UAPIDevice:
    dev = open_device(wg.ifname)
    assert isinstance(dev, UAPIDevice)
    assert dev.backend == "uapi"
    return dev


# -- read ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_read_reports_the_devices_own_key_and_port(wg: WireGuard, device: UAPIDevice):
    state = yield device.read()

    derived = subprocess.run(
        ["wg", "pubkey"], input=wg.private_key + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    assert state.public_key == PublicKey.from_base64(derived)
    assert state.public_key.base64 == wg.public_key
    assert state.listen_port == 51820
    assert state.peers == ()


@pytest_twisted.inlineCallbacks
def test_read_reports_peers_set_with_wg(wg: WireGuard, device: UAPIDevice):
    key, bare = new_key(), new_key()
    wg.set_peer(
        key.base64,
        endpoint="203.0.113.50:51821",
        allowed_ips=["198.51.100.7/32", "198.51.100.128/25"],
        keepalive=25,
    )
    wg.set_peer(bare.base64)

    state = yield device.read()

    peer = state.peer(key)
    assert peer is not None
    assert peer.endpoint == Endpoint.parse("203.0.113.50:51821")
    assert set(peer.allowed_ips) == set(nets("198.51.100.7/32", "198.51.100.128/25"))
    assert peer.persistent_keepalive == 25
    assert peer.latest_handshake is None
    assert peer.rx_bytes == peer.tx_bytes == 0
    other = state.by_key()[bare]
    assert (other.endpoint, other.allowed_ips, other.persistent_keepalive) == (None, (), 0)
    assert len(state.peers) == 2


@pytest_twisted.inlineCallbacks
def test_read_many_peers_in_one_large_answer(wg: WireGuard, device: UAPIDevice):
    # ~400 peers: an answer of well over 64 KiB, read in many chunks.
    keys = [new_key() for _ in range(400)]
    lines = ["set=1"]
    for i, key in enumerate(keys):
        lines += [
            f"public_key={key.hex}",
            f"endpoint=203.0.113.{i % 200 + 50}:{20000 + i}",
            f"allowed_ip=198.51.100.{i % 250}/32" if i < 250 else "persistent_keepalive_interval=7",
        ]
    yield device._set(("\n".join(lines) + "\n\n").encode(), "bulk set")

    state = yield device.read()

    assert {p.public_key for p in state.peers} == set(keys)
    assert state.peer(keys[399]).endpoint == Endpoint.parse("203.0.113.249:20399")
    assert state.peer(keys[399]).persistent_keepalive == 7


# -- set_peer / remove_peer --------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_set_peer_creates_then_updates_one_field_at_a_time(wg: WireGuard, device: UAPIDevice):
    key = new_key()
    yield device.set_peer(
        PeerUpdate(
            key,
            endpoint=Endpoint.parse("203.0.113.50:51820"),
            allowed_ips=nets("198.51.100.2/32"),
            persistent_keepalive=25,
        )
    )
    seen = wg.peers()[key.base64]
    assert seen["endpoint"] == "203.0.113.50:51820"
    assert seen["allowed_ips"] == ["198.51.100.2/32"]
    assert seen["keepalive"] == 25

    # Only the endpoint moves; allowed IPs and keepalive stay.
    yield device.set_peer(PeerUpdate(key, endpoint=Endpoint.parse("203.0.113.60:40001")))
    peer = (yield device.read()).peer(key)
    assert peer.endpoint == Endpoint.parse("203.0.113.60:40001")
    assert peer.allowed_ips == nets("198.51.100.2/32")
    assert peer.persistent_keepalive == 25

    yield device.set_peer(PeerUpdate(key, persistent_keepalive=0))
    assert (yield device.read()).peer(key).persistent_keepalive == 0
    assert wg.peers()[key.base64]["keepalive"] == 0


@pytest_twisted.inlineCallbacks
def test_allowed_ips_append_or_replace(wg: WireGuard, device: UAPIDevice):
    key = new_key()

    def allowed():
        return device.read().addCallback(lambda s: set(s.peer(key).allowed_ips))

    yield device.set_peer(PeerUpdate(key, allowed_ips=nets("198.51.100.2/32")))
    yield device.set_peer(PeerUpdate(key, allowed_ips=nets("198.51.100.3/32")))
    assert (yield allowed()) == set(nets("198.51.100.2/32", "198.51.100.3/32"))

    yield device.set_peer(
        PeerUpdate(
            key, allowed_ips=nets("198.51.100.4/32", "198.51.100.64/26"), replace_allowed_ips=True
        )
    )
    assert (yield allowed()) == set(nets("198.51.100.4/32", "198.51.100.64/26"))
    assert set(wg.peers()[key.base64]["allowed_ips"]) == {"198.51.100.4/32", "198.51.100.64/26"}

    # allowed_ips=None leaves the list alone even with replace_allowed_ips.
    yield device.set_peer(
        PeerUpdate(key, replace_allowed_ips=True, endpoint=Endpoint.parse("203.0.113.5:1"))
    )
    assert (yield allowed()) == set(nets("198.51.100.4/32", "198.51.100.64/26"))

    yield device.set_peer(PeerUpdate(key, allowed_ips=(), replace_allowed_ips=True))
    assert (yield allowed()) == set()


@pytest_twisted.inlineCallbacks
def test_an_allowed_ip_moves_between_peers(wg: WireGuard, device: UAPIDevice):
    first, second = new_key(), new_key()
    yield device.set_peer(PeerUpdate(first, allowed_ips=nets("198.51.100.9/32")))
    yield device.set_peer(PeerUpdate(second, allowed_ips=nets("198.51.100.9/32")))

    state = yield device.read()

    assert state.peer(first).allowed_ips == ()
    assert state.peer(second).allowed_ips == nets("198.51.100.9/32")


@pytest_twisted.inlineCallbacks
def test_update_only_changes_a_peer_but_never_recreates_a_removed_one(
    wg: WireGuard, device: UAPIDevice
):
    key, stranger = new_key(), new_key()
    yield device.set_peer(PeerUpdate(key, allowed_ips=nets("198.51.100.2/32")))

    yield device.set_peer(
        PeerUpdate(key, endpoint=Endpoint.parse("203.0.113.50:51820"), update_only=True)
    )
    assert (yield device.read()).peer(key).endpoint == Endpoint.parse("203.0.113.50:51820")

    yield device.remove_peer(key)
    update = PeerUpdate(
        key,
        endpoint=Endpoint.parse("203.0.113.51:51820"),
        allowed_ips=nets("198.51.100.2/32"),
        persistent_keepalive=25,
        update_only=True,
    )
    yield device.set_peer(update)
    yield device.set_peer(PeerUpdate(stranger, persistent_keepalive=5, update_only=True))

    state = yield device.read()
    assert state.peers == ()
    assert wg.peers() == {}


@pytest_twisted.inlineCallbacks
def test_remove_peer(wg: WireGuard, device: UAPIDevice):
    keep, drop = new_key(), new_key()
    yield device.set_peer(PeerUpdate(keep, allowed_ips=nets("198.51.100.2/32")))
    yield device.set_peer(PeerUpdate(drop, allowed_ips=nets("198.51.100.3/32")))

    yield device.remove_peer(drop)
    yield device.remove_peer(new_key())  # removing an unknown peer is not an error

    state = yield device.read()
    assert [p.public_key for p in state.peers] == [keep]
    assert list(wg.peers()) == [keep.base64]


@pytest_twisted.inlineCallbacks
def test_concurrent_operations_each_use_their_own_connection(wg: WireGuard, device: UAPIDevice):
    keys = [new_key() for _ in range(30)]
    ops = [
        device.set_peer(PeerUpdate(k, allowed_ips=nets(f"198.51.100.{i + 10}/32")))
        for i, k in enumerate(keys)
    ]
    ops += [device.read() for _ in range(5)]

    yield defer.gatherResults(ops, consumeErrors=True)

    state = yield device.read()
    assert {p.public_key for p in state.peers} == set(keys)


# -- a real handshake ------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_handshake_through_nat_shows_in_read(lab: Lab):
    router = lab.router("r1", f"{ROUTER}/24", "192.168.1.0/24", mode="home")
    alice_host = lab.lan_host(router, "alice", "192.168.1.10/24")
    bob_host = lab.public_host("bob", f"{B_PUBLIC}/24")
    alice = lab.wireguard(alice_host, "198.51.100.1/24")
    bob = lab.wireguard(bob_host, "198.51.100.2/24")
    alice_dev, bob_dev = open_device(alice.ifname), open_device(bob.ifname)
    alice_key, bob_key = (
        PublicKey.from_base64(alice.public_key),
        PublicKey.from_base64(bob.public_key),
    )
    psk = subprocess.run(
        ["wg", "genpsk"], capture_output=True, text=True, check=True
    ).stdout.strip()

    # Bob knows no endpoint for Alice: he learns it (the router's mapping) from her packets.
    yield bob_dev.set_peer(PeerUpdate(alice_key, allowed_ips=nets("198.51.100.1/32")))
    yield alice_dev.set_peer(
        PeerUpdate(
            bob_key,
            endpoint=Endpoint.parse(f"{B_PUBLIC}:51820"),
            allowed_ips=nets("198.51.100.2/32"),
        )
    )
    # A matching preshared key on both sides (set with wg, from a file, never by wgnat).
    alice.set_peer(bob.public_key, preshared_key=psk)
    bob.set_peer(alice.public_key, preshared_key=psk)

    assert alice_host.ping("198.51.100.2", count=3, timeout=2)

    alice_state, bob_state = yield defer.gatherResults([alice_dev.read(), bob_dev.read()])
    to_bob = alice_state.peer(bob_key)
    to_alice = bob_state.peer(alice_key)
    for peer in (to_bob, to_alice):
        assert peer.latest_handshake is not None and peer.latest_handshake > 1_700_000_000
        assert peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert to_alice.endpoint == Endpoint.parse(f"{ROUTER}:51820")  # port-preserving NAT
    assert to_bob.endpoint == Endpoint.parse(f"{B_PUBLIC}:51820")
    assert abs(to_bob.latest_handshake - alice.peers()[bob.public_key]["latest_handshake"]) < 2

    # No secret survives into what the device layer returns.
    secrets = _secret_forms(alice.private_key) + _secret_forms(bob.private_key) + _secret_forms(psk)
    _assert_no_secret(
        [
            repr(alice_state),
            str(alice_state),
            repr(bob_state),
            str(bob_state),
            repr(to_bob),
            repr(alice_dev),
        ],
        secrets,
    )


def _assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    # Fails without quoting the secret, so a leak is not printed a second time.
    for i, text in enumerate(texts):
        if any(secret in text for secret in secrets):
            raise AssertionError(f"a private or preshared key appears in text #{i}")


def _secret_forms(key_base64: str) -> list[str]:
    raw = base64.b64decode(key_base64)
    return [key_base64, raw.hex(), raw.hex().upper(), key_base64[:20], raw.hex()[:24]]


# -- secrets in errors -----------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_no_key_in_state_or_error_messages(wg: WireGuard, device: UAPIDevice):
    key = new_key()
    psk = subprocess.run(
        ["wg", "genpsk"], capture_output=True, text=True, check=True
    ).stdout.strip()
    wg.set_peer(key.base64, allowed_ips=["198.51.100.2/32"], preshared_key=psk)
    assert wg.dump().splitlines()[1].split("\t")[1] == "(hidden)"  # a preshared key is set
    secrets = _secret_forms(wg.private_key) + _secret_forms(psk)

    state = yield device.read()
    assert state.peer(key) is not None
    texts = [repr(state), str(state), repr(state.peers), str(state.by_key())]

    with pytest.raises(UAPIError) as refused:
        yield device._set(f"set=1\npublic_key={key.hex}\nendpoint=nope\n\n".encode(), "raw set")
    texts.append(str(refused.value))

    # wireguard-go accepts an endpoint with port 0, which our types cannot hold: the
    # peer reads as having no endpoint, and the rest of the device is still read.
    yield device._set(f"set=1\npublic_key={key.hex}\nendpoint=203.0.113.5:0\n\n".encode(), "raw")
    assert wg.peers()[key.base64]["endpoint"] == "203.0.113.5:0"
    odd = (yield device.read()).peer(key)
    assert odd.endpoint is None
    assert odd.allowed_ips == nets("198.51.100.2/32")
    texts.append(repr(odd))

    # A device gone away: the error names the device and its socket, never a key.
    wg.stop()
    with pytest.raises(DeviceError) as gone:
        yield device.read()
    texts.append(str(gone.value))

    _assert_no_secret(texts, secrets)


# -- errors ------------------------------------------------------------------------


def test_open_device_on_a_missing_interface():
    with pytest.raises(DeviceNotFound) as caught:
        open_device("wnlmissing0")
    message = str(caught.value)
    assert "interface wnlmissing0 not found" in message
    assert "/var/run/wireguard/wnlmissing0.sock" in message
    assert "wireguard-go wnlmissing0" in message


@pytest.fixture
def socket_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="wnl-sock-") as path:
        yield path


@pytest_twisted.inlineCallbacks
def test_a_stale_socket_is_device_not_found(socket_dir: str):
    path = os.path.join(socket_dir, "wgstale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)  # the file stays; nobody listens: what a killed wireguard-go leaves
    device = open_device("wgstale", socket_dir=socket_dir)

    with pytest.raises(DeviceNotFound) as caught:
        yield device.read()
    assert "nothing answers on " + path in str(caught.value)
    assert "stale socket" in str(caught.value)
    with pytest.raises(DeviceNotFound):
        yield device.set_peer(PeerUpdate(new_key(), persistent_keepalive=1))


@pytest_twisted.inlineCallbacks
def test_a_device_that_went_away_is_device_not_found(wg: WireGuard, device: UAPIDevice):
    yield device.read()
    wg.stop()  # wireguard-go removes its socket on the way out

    with pytest.raises(DeviceNotFound) as caught:
        yield device.read()
    assert f"interface {wg.ifname} not found" in str(caught.value)
    assert "is gone" in str(caught.value)


@pytest_twisted.inlineCallbacks
def test_a_refused_set_is_uapi_error_with_the_errno(wg: WireGuard, device: UAPIDevice):
    key = new_key()
    with pytest.raises(UAPIError) as bad_endpoint:
        yield device._set(
            f"set=1\npublic_key={key.hex}\nendpoint=not-an-endpoint\n\n".encode(),
            f"setting peer {key.short}",
        )
    assert bad_endpoint.value.code == errno.EINVAL
    assert str(bad_endpoint.value) == (
        f"{wg.ifname}: the WireGuard device refused setting peer {key.short}: errno 22 (EINVAL)"
    )

    with pytest.raises(UAPIError) as bad_prefix:
        yield device._set(
            f"set=1\npublic_key={key.hex}\nallowed_ip=198.51.100.1/33\n\n".encode(), "raw set"
        )
    assert bad_prefix.value.code == errno.EINVAL

    # The raw exchange itself hands back the device's errno line.
    answer = yield device._exchange(b"set=1\nno_such_key=1\n\n", "raw set")
    assert answer == "errno=-22\n"
    # The device still works afterwards.
    yield device.set_peer(PeerUpdate(key, persistent_keepalive=3))
    assert (yield device.read()).peer(key).persistent_keepalive == 3


@pytest_twisted.inlineCallbacks
def test_a_device_closing_without_answer_is_device_error(wg: WireGuard, device: UAPIDevice):
    # wireguard-go hangs up on an unknown operation without any errno line.
    with pytest.raises(DeviceError) as caught:
        yield device._exchange(b"frobnicate=1\n\n", "raw")
    assert str(caught.value) == (
        f"{wg.ifname}: the WireGuard device closed its socket before answering"
    )


class _Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_a_device_that_never_answers_times_out(socket_dir: str):
    path = os.path.join(socket_dir, "wgmute.sock")
    port = reactor.listenUNIX(path, Factory.forProtocol(_Silent))
    try:
        device = open_device("wgmute", socket_dir=socket_dir)
        device.timeout = 0.3
        with pytest.raises(DeviceError) as caught:
            yield device.read()
    finally:
        yield port.stopListening()
    assert (
        str(caught.value) == f"wgmute: no answer from the WireGuard device on {path} within 0.3 s"
    )


# -- addresses -------------------------------------------------------------------

_ADDRESSES = """
import sys
from twisted.internet import task
from wgnat.device import DeviceError, open_device

def main(reactor, ifname):
    d = open_device(ifname, reactor).addresses()
    d.addCallback(lambda found: print(" ".join(sorted(str(a) for a in found))))
    d.addErrback(lambda f: print("ERROR", f.type.__name__, f.value))
    return d

task.react(main, sys.argv[1:])
"""


@pytest_twisted.inlineCallbacks
def test_addresses_in_the_devices_namespace(wg: WireGuard, device: UAPIDevice):
    wg.host.run("ip", "addr", "add", "198.51.100.201/32", "dev", wg.ifname)

    found = wg.host.run(sys.executable, "-c", _ADDRESSES, wg.ifname).stdout.split()

    v4 = [a for a in found if ":" not in a]
    assert v4 == ["198.51.100.1/24", "198.51.100.201/32"]
    # From the root namespace the link is not there: a clear DeviceNotFound.
    with pytest.raises(DeviceNotFound) as caught:
        yield device.addresses()
    assert str(caught.value) == (f"interface {wg.ifname} has no link in this network namespace")
