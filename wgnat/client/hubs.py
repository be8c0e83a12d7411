"""Which hub relays: pure decisions, no I/O (a client given several `-r`).

Every hub is a peer of the client's interface with its own tunnel address as an
allowed IP.  The routes that relay through a hub (the tunnel network, and
whatever else the hubs' peers hold beyond their own address) sit on exactly one
hub peer at a time: WireGuard routes a destination to one peer only.  At the
start that is the hub configured with them (the first in `-r` order when
several are); a hub configured with none of them takes them only by the same
rule as any move.

The relay moves only when its hub is dead, to the first live hub in `-r` order,
and never back for being preferred: a hub that comes back takes the routes
again only when the one holding them dies in turn (no flapping).  Direct peers
are never touched: they route their own addresses, which are more specific.

A hub is dead when (`why_dead`):
- no handshake for 180 s (WireGuard's REJECT_AFTER_TIME; a client's keepalive
  re-handshakes every two minutes);
- nothing heard from it `start_grace` s after we began watching it (a live
  hub's registry answers our stream within milliseconds; a handshake from
  before our start proves nothing of a hub that died since);
- nothing received from it for `silent_after` s: its registry writes a line to
  our stream at least every 15 s (the registry's keep-alive), so a silent hub
  is gone (killed, its interface deleted, its path cut);
- data sent to it and nothing back for `unanswered_after` s: a WireGuard peer
  that receives data answers within 10 s (its passive keepalive), so traffic we
  relay notices a dead hub sooner than the silence does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from wgnat._types import DeviceState, IPAddress, IPNetwork, PeerState, PeerUpdate, PublicKey

# The registry writes to every stream at least every 15 s (registry.hub's
# KEEPALIVE_SECONDS), one second late at most (its tick): past this, silence.
SILENT_AFTER = 17.0
# WireGuard's passive keepalive (10 s) and a second of margin.
UNANSWERED_AFTER = 11.0
# Session keys die 180 s after the last handshake (REJECT_AFTER_TIME).
HANDSHAKE_DEAD_AFTER = 180.0
# A hub with no handshake yet is given one lost initiation (5 s) and a second.
START_GRACE = 6.0
# How often the device is read while a hub is quieter than usual or data to it
# goes unanswered, so that its death is noticed within a second of the proof.
QUIET_RECHECK = 1.0
QUIET_AFTER = 10.0
# A WireGuard keepalive (32 bytes) and a handshake (initiation 148 + keepalive):
# more than this much sent between two reads is data a live hub answers.
_KEEPALIVE_BYTES = 32
_HANDSHAKE_BYTES = 148 + 32


@dataclass(frozen=True)
class HubSettings:
    silent_after: float = SILENT_AFTER
    unanswered_after: float = UNANSWERED_AFTER
    handshake_dead_after: float = HANDSHAKE_DEAD_AFTER
    start_grace: float = START_GRACE
    quiet_after: float = QUIET_AFTER
    quiet_recheck: float = QUIET_RECHECK
    keepalive: int = 25  # the client's persistent keepalive to its hubs


@dataclass
class HubLink:
    """What the client has seen of one hub peer."""

    key: PublicKey
    address: IPAddress
    watched_since: float
    last_rx: int = -1
    rx_changed_at: float = 0.0
    last_tx: int = -1
    tx_read_at: float = 0.0
    unanswered_since: float | None = None
    handshake: float | None = None
    on_device: bool = True
    heard: bool = False  # anything received from it since we began watching

    @property
    def host_route(self) -> IPNetwork:
        return ipaddress.ip_network(self.address)


@dataclass(frozen=True)
class RelayMove:
    """Move the relay routes from one hub peer to another, and why."""

    to_key: PublicKey
    to_allowed_ips: tuple[IPNetwork, ...]
    from_key: PublicKey | None
    from_allowed_ips: tuple[IPNetwork, ...]
    reason: str

    def updates(self) -> tuple[PeerUpdate, ...]:
        """The new hub first: WireGuard moves an allowed IP that another peer
        holds, so the routes are never without a peer; the old hub then keeps
        its own address only."""
        moves = [
            PeerUpdate(
                self.to_key,
                allowed_ips=self.to_allowed_ips,
                replace_allowed_ips=True,
                update_only=True,
            )
        ]
        if self.from_key is not None:
            moves.append(
                PeerUpdate(
                    self.from_key,
                    allowed_ips=self.from_allowed_ips,
                    replace_allowed_ips=True,
                    update_only=True,
                )
            )
        return tuple(moves)


@dataclass
class HubChoice:
    """The hubs in `-r` order, which of them relays, and when that changes."""

    links: list[HubLink]
    settings: HubSettings = field(default_factory=HubSettings)
    relay: PublicKey | None = None
    routes: tuple[IPNetwork, ...] = ()
    moves: int = 0

    @classmethod
    def start(
        cls,
        hubs: Sequence[tuple[PublicKey, IPAddress]],
        device: DeviceState,
        now: float,
        settings: HubSettings | None = None,
    ) -> HubChoice:
        """Watch `hubs` from now; the relay routes are what their peers hold
        beyond their own address, the relay the first hub holding any."""
        choice = cls([HubLink(key, address, now, rx_changed_at=now) for key, address in hubs])
        if settings is not None:
            choice.settings = settings
        on_device = device.by_key()
        routes: list[IPNetwork] = []
        for link in choice.links:
            peer = on_device.get(link.key)
            extra = [net for net in (peer.allowed_ips if peer else ()) if net != link.host_route]
            if extra and choice.relay is None:
                choice.relay = link.key
            routes.extend(net for net in extra if net not in routes)
        choice.routes = tuple(routes)
        return choice

    def link(self, key: PublicKey) -> HubLink | None:
        for link in self.links:
            if link.key == key:
                return link
        return None

    def observe(
        self,
        device: DeviceState,
        now: float,
        heard: Mapping[PublicKey, float | None] | None = None,
    ) -> RelayMove | None:
        """Take a device read (and when each hub's registry last answered, on
        the same clock); return the move to make, if any."""
        on_device = device.by_key()
        for link in self.links:
            self._watch(link, on_device.get(link.key), now, (heard or {}).get(link.key))
        return self._decide(now)

    def _watch(
        self, link: HubLink, peer: PeerState | None, now: float, heard: float | None
    ) -> None:
        link.on_device = peer is not None
        if peer is None:
            return
        link.handshake = peer.latest_handshake
        keepalives = 1 + int((now - link.tx_read_at) // max(1, self.settings.keepalive))
        rekeyed = peer.latest_handshake is not None and peer.latest_handshake > link.tx_read_at
        data_sent = link.last_tx >= 0 and peer.tx_bytes - link.last_tx > (
            _KEEPALIVE_BYTES * keepalives + _HANDSHAKE_BYTES * (1 + rekeyed)
        )
        if peer.rx_bytes != link.last_rx:
            if link.last_rx >= 0:
                link.rx_changed_at, link.heard = now, True
            link.last_rx = peer.rx_bytes
            link.unanswered_since = None
        elif data_sent and link.unanswered_since is None:
            link.unanswered_since = now
        if heard is not None and heard >= link.watched_since and heard > link.rx_changed_at:
            link.rx_changed_at, link.heard = heard, True
            link.unanswered_since = None
        link.last_tx, link.tx_read_at = peer.tx_bytes, now

    def why_dead(self, link: HubLink, now: float) -> str | None:
        """Why this hub is taken for dead, or None when it is live."""
        settings = self.settings
        if not link.on_device:
            return "its peer is not on the device"
        if not link.heard:
            if now - link.watched_since < settings.start_grace:
                return None
            if link.handshake is None:
                return f"no handshake in {now - link.watched_since:.0f} s"
            return f"nothing received from it in {now - link.watched_since:.0f} s since the start"
        if link.handshake is None:
            return "no handshake"
        if now - link.handshake > settings.handshake_dead_after:
            return f"no handshake for {now - link.handshake:.0f} s"
        silent = now - link.rx_changed_at
        if silent > settings.silent_after:
            return f"nothing received from it for {silent:.0f} s"
        if link.unanswered_since is not None and silent > settings.unanswered_after:
            return f"data sent, nothing came back for {silent:.0f} s"
        return None

    def live(self, link: HubLink, now: float) -> bool:
        """Not dead, and proven: heard from since the start, with a handshake
        (a hub we have not yet heard from is not moved to)."""
        return link.heard and link.handshake is not None and self.why_dead(link, now) is None

    def _decide(self, now: float) -> RelayMove | None:
        if not self.routes:
            return None  # nothing relays through the hubs: nothing to move
        current = self.link(self.relay) if self.relay is not None else None
        why = None if current is None else self.why_dead(current, now)
        if current is not None and why is None:
            return None
        for link in self.links:
            if link is current or not self.live(link, now):
                continue
            reason = f"relaying through {link.key.short}: " + (
                f"{current.key.short} is dead ({why})"
                if current is not None
                else "no hub held the relay routes"
            )
            move = RelayMove(
                link.key,
                self._with_host(link, self.routes),
                current.key if current is not None and current.on_device else None,
                (current.host_route,) if current is not None else (),
                reason,
            )
            self.relay = link.key
            self.moves += 1
            return move
        return None

    @staticmethod
    def _with_host(link: HubLink, routes: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
        kept = [link.host_route]
        for net in routes:
            if net not in kept:
                kept.append(net)
        return tuple(kept)

    def next_check(self, now: float) -> float | None:
        """When the device should be read again to notice a hub's death in
        time: soon while a hub is quieter than usual or unanswered, or still
        owes its first handshake; None when nothing is pending."""
        for link in self.links:
            if not link.on_device:
                continue
            if not link.heard and now - link.watched_since < self.settings.start_grace:
                return now + self.settings.quiet_recheck
            if link.key == self.relay or self.relay is None:
                if (
                    now - link.rx_changed_at > self.settings.quiet_after
                    or link.unanswered_since is not None
                ):
                    return now + self.settings.quiet_recheck
        return None

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Each hub for `wgnat status`: key, address, relays, live, why not."""
        return [
            {
                "public_key": link.key.base64,
                "address": str(link.address),
                "relays": link.key == self.relay,
                "live": self.live(link, now),
                "dead_because": self.why_dead(link, now),
            }
            for link in self.links
        ]
