"""Traffic by path, from the device's per-peer byte counters (pure: device
snapshots in, monotonic totals out).

WireGuard counts bytes per peer (rx/tx, over UAPI and netlink alike) and no
packets, so bytes are all there is.  A peer's bytes are "relayed" when the peer
is the registry (the hub carries everything relayed, and also the registry API
and any traffic to the hub itself or beyond it) and "direct" for every other
peer on the device (mesh peers, probes included, and peers configured by hand):
a relayed mesh peer is not on the device at all, so its traffic shows up only in
the registry peer's counters.  The two together are every byte the device
counted.

Device counters start again at zero when a peer is re-created (a relayed peer
retried, a restarted wireguard-go); the totals here never go down: a peer seen
for the first time, or with counters below the last read's, counts its whole
counters as new.  Bytes a peer moved between the last read and its removal are
lost with it (WireGuard drops its counters): the totals may undercount by that
much, never overcount.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wgnat._types import DeviceState, PublicKey

PATHS = ("direct", "relayed")


@dataclass
class Bytes:
    """Received and sent bytes."""

    received: int = 0
    sent: int = 0

    def add(self, received: int, sent: int) -> None:
        self.received += received
        self.sent += sent


@dataclass
class TrafficLedger:
    """Monotonic byte totals by path and by peer, from successive device reads."""

    registry_key: PublicKey
    # The other registries (several -r): what goes through any hub is relayed.
    other_hubs: frozenset[PublicKey] = frozenset()
    by_path: dict[str, Bytes] = field(default_factory=lambda: {path: Bytes() for path in PATHS})
    # Every peer ever seen on the device, kept when it leaves (so that a peer
    # removed and re-created continues its total, not restarts it).
    by_peer: dict[PublicKey, Bytes] = field(default_factory=dict)
    # The counters of the last read, for the peers on the device then.
    _last: dict[PublicKey, tuple[int, int]] = field(default_factory=dict)

    def path_of(self, key: PublicKey) -> str:
        return "relayed" if key == self.registry_key or key in self.other_hubs else "direct"

    def observe(self, device: DeviceState) -> None:
        """Count what the device's counters moved since the last read.  Reads
        must be given in the order they were made."""
        current: dict[PublicKey, tuple[int, int]] = {}
        for peer in device.peers:
            key, received, sent = peer.public_key, peer.rx_bytes, peer.tx_bytes
            current[key] = (received, sent)
            last = self._last.get(key)
            if last is not None and received >= last[0] and sent >= last[1]:
                received, sent = received - last[0], sent - last[1]
            # else: new on the device, or re-created since (its counters restarted)
            self.by_path[self.path_of(key)].add(received, sent)
            self.by_peer.setdefault(key, Bytes()).add(received, sent)
        # A peer gone from the device starts again from zero.  The agent reads
        # the device before every plan, and only a plan re-creates a peer, so a
        # peer it removed is always seen gone before it comes back.
        self._last = current
