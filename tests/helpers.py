"""Small builders shared by the unit tests."""

from __future__ import annotations

import ipaddress
import os

from wgnat._types import DeviceState, Endpoint, PeerState, PublicKey, parse_network


def new_key() -> PublicKey:
    return PublicKey(os.urandom(32))


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
