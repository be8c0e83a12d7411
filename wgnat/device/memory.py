"""An in-memory WireGuard device: the test double every other layer (and the
benchmarks) use through the same interface as the real backends.

It applies updates with the same semantics as WireGuard (create or update one
peer, replace or append allowed IPs, update_only, remove) and lets a test play
the network: `handshake()` and `traffic()` stand for what the peer did.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from wgnat._types import (
    DeviceState,
    Endpoint,
    IPInterface,
    IPNetwork,
    PeerState,
    PeerUpdate,
    PublicKey,
)
from wgnat.device import DeviceError


class MemoryDevice:
    backend = "memory"

    def __init__(
        self,
        ifname: str = "wg0",
        public_key: PublicKey | None = None,
        listen_port: int = 51820,
        addresses: list[IPInterface] | None = None,
    ) -> None:
        self.ifname = ifname
        self.public_key = public_key
        self.listen_port = listen_port
        self.peers: dict[PublicKey, PeerState] = {}
        self._addresses = list(addresses or [])
        self.operations: list[tuple[str, Any]] = []
        self.reads = 0
        self.failure: DeviceError | None = None  # set to make every operation fail

    # -- the Device interface ------------------------------------------------
    def read(self) -> Deferred[DeviceState]:
        self.reads += 1
        if self.failure is not None:
            return fail(self.failure)
        return succeed(self.snapshot())

    def set_peer(self, update: PeerUpdate) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        self.operations.append(("set", update))
        self.apply(update)
        return succeed(None)

    def remove_peer(self, public_key: PublicKey) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        self.operations.append(("remove", public_key))
        self.peers.pop(public_key, None)
        return succeed(None)

    def addresses(self) -> Deferred[list[IPInterface]]:
        return succeed(list(self._addresses))

    # -- helpers for tests ---------------------------------------------------
    def snapshot(self) -> DeviceState:
        return DeviceState(self.public_key, self.listen_port, tuple(self.peers.values()))

    def apply(self, update: PeerUpdate) -> None:
        current = self.peers.get(update.public_key)
        if current is None:
            if update.update_only:
                return
            current = PeerState(update.public_key)
        changes: dict[str, Any] = {}
        if update.endpoint is not None:
            changes["endpoint"] = update.endpoint
        if update.persistent_keepalive is not None:
            changes["persistent_keepalive"] = update.persistent_keepalive
        if update.allowed_ips is not None:
            base: tuple[IPNetwork, ...] = () if update.replace_allowed_ips else current.allowed_ips
            # An allowed IP belongs to one peer only: WireGuard moves it.
            for other_key, other in list(self.peers.items()):
                if other_key != update.public_key and set(other.allowed_ips) & set(
                    update.allowed_ips
                ):
                    self.peers[other_key] = dataclasses.replace(
                        other,
                        allowed_ips=tuple(
                            net for net in other.allowed_ips if net not in update.allowed_ips
                        ),
                    )
            merged = list(base)
            merged.extend(net for net in update.allowed_ips if net not in merged)
            changes["allowed_ips"] = tuple(merged)
        self.peers[update.public_key] = dataclasses.replace(current, **changes)

    def add_peer(self, peer: PeerState) -> None:
        self.peers[peer.public_key] = peer

    def handshake(self, key: PublicKey, when: float, endpoint: Endpoint | None = None) -> None:
        """The peer completed a handshake at `when` (from `endpoint`, if it roamed)."""
        peer = self.peers[key]
        changes: dict[str, Any] = {"latest_handshake": when}
        if endpoint is not None:
            changes["endpoint"] = endpoint
        self.peers[key] = dataclasses.replace(peer, **changes)

    def traffic(self, key: PublicKey, rx: int = 0, tx: int = 0) -> None:
        peer = self.peers[key]
        self.peers[key] = dataclasses.replace(
            peer, rx_bytes=peer.rx_bytes + rx, tx_bytes=peer.tx_bytes + tx
        )
