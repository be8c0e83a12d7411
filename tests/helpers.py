"""Small builders shared by the unit tests."""

from __future__ import annotations

import base64
import ipaddress
import os

from wgnat._types import DeviceState, Endpoint, PeerState, PublicKey, parse_network


def new_key() -> PublicKey:
    """A public key (not a secret: the leak check does not record it)."""
    return PublicKey(os.urandom(32))


def record_secret(key: str | bytes) -> None:
    """Tell the suite's leak check (tests/leakcheck.py) about a private or
    preshared key a test made itself, so that any appearance of it fails the run."""
    try:
        import leakcheck
    except ImportError:  # outside pytest (a benchmark reusing these builders)
        return
    leakcheck.record_secret(key)


def new_secret() -> bytes:
    """A private or preshared key for a test (32 random bytes), recorded."""
    raw = os.urandom(32)
    record_secret(raw)
    return raw


def secret_b64() -> str:
    """The same, as `wg genkey` prints it."""
    return base64.b64encode(new_secret()).decode("ascii")


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def nets(*texts: str) -> tuple:
    return tuple(parse_network(text) for text in texts)


def ip(text: str):
    return ipaddress.ip_address(text)


def peer(
    key: PublicKey,
    endpoint: str | None = None,
    allowed: tuple = (),
    handshake=None,
    rx: int = 0,
    tx: int = 0,
    keepalive: int = 0,
) -> PeerState:
    return PeerState(
        key, ep(endpoint) if endpoint else None, nets(*allowed), handshake, rx, tx, keepalive
    )


def device(*peers: PeerState, key: PublicKey | None = None, port: int = 51820) -> DeviceState:
    return DeviceState(key or new_key(), port, tuple(peers))
