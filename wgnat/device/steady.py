"""Handshake times a wall-clock step cannot corrupt.

WireGuard reports each peer's last handshake as wall-clock time.  Compared with
"now", a step of the wall clock makes every handshake look hours old (a forward
step: the registry takes every peer for gone, clients give up working direct
paths) or in the future (a backward one).  `SteadyDevice` wraps a device and
turns each handshake into the daemons' steady time base (timing.SteadyClock):
a handshake seen for the first time is placed at "now minus its wall-clock
age"; one seen again unchanged keeps the place it was given, whatever the wall
clock did since; a handshake that changed is placed afresh, its age measured
against the wall clock of the moment.  Only a step between a handshake and the
read that first sees it (within one read interval) is not undone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from twisted.internet.defer import Deferred

from wgnat._types import DeviceState, IPInterface, PeerUpdate, PublicKey
from wgnat.device import Device


class HandshakeClock:
    """Pure: the steady-time place of each peer's last handshake."""

    def __init__(self) -> None:
        # Peer -> (its handshake as the device reported it, its steady place).
        self._placed: dict[PublicKey, tuple[float, float]] = {}

    def place(
        self, key: PublicKey, reported: float | None, wall_now: float, steady_now: float
    ) -> float | None:
        if reported is None:
            self._placed.pop(key, None)
            return None
        known = self._placed.get(key)
        if known is not None and known[0] == reported:
            return known[1]
        # Never in the future: a handshake cannot have happened after now.
        placed = steady_now - max(0.0, wall_now - reported)
        self._placed[key] = (reported, placed)
        return placed

    def steady_state(self, state: DeviceState, wall_now: float, steady_now: float) -> DeviceState:
        peers = tuple(
            dataclasses.replace(
                peer,
                latest_handshake=self.place(
                    peer.public_key, peer.latest_handshake, wall_now, steady_now
                ),
            )
            for peer in state.peers
        )
        present = {peer.public_key for peer in state.peers}
        for key in [key for key in self._placed if key not in present]:
            del self._placed[key]
        return dataclasses.replace(state, peers=peers)


class SteadyDevice:
    """A Device whose reads carry handshakes in steady time (`now`: the
    reactor's seconds, a SteadyClock in the daemons)."""

    def __init__(
        self,
        device: Device,
        now: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self.now = now
        self.wall = wall
        self.handshakes = HandshakeClock()

    @property
    def ifname(self) -> str:
        return self.device.ifname

    @property
    def backend(self) -> str:
        return self.device.backend

    def read(self) -> Deferred[DeviceState]:
        return self.device.read().addCallback(
            lambda state: self.handshakes.steady_state(state, self.wall(), self.now())
        )

    def set_peer(self, update: PeerUpdate) -> Deferred[None]:
        return self.device.set_peer(update)

    def remove_peer(self, public_key: PublicKey) -> Deferred[None]:
        return self.device.remove_peer(public_key)

    def addresses(self) -> Deferred[list[IPInterface]]:
        return self.device.addresses()
