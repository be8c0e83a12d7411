"""The registry's view of the mesh: device snapshots and announcements in, a
versioned per-caller answer out.  Pure: no I/O, `now` is always an argument.

Every change a client would act on (a peer becoming live or going away, its
observed endpoint, its allowed IPs, its announced LAN endpoints) bumps one global
version and stamps the changed peer with it.  A client that says "I have version
V" is answered with just the peers stamped after V plus the keys removed after V,
so one endpoint change costs each client O(1) bytes however large the mesh is.
For streams the delta is caller-independent (`broadcast`): one document per change,
whatever the number of clients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from wgnat._types import (
    Announcement,
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    PeerState,
    PublicKey,
)
from wgnat.wire import (
    MAX_IPV6_ENDPOINTS,
    MAX_LAN_ENDPOINTS,
    encode_answer,
    encode_body,
    encode_full_answer,
    encode_peer,
    encode_you,
    format_digest,
    own_endpoint_digest,
    peer_digest,
)

# WireGuard drops a session 180 s after its last handshake (REJECT_AFTER_TIME);
# a peer with keepalives re-handshakes every ~2 minutes, so past this it is gone.
LIVE_WINDOW = 180.0
# Removals are remembered so that a delta can say "gone"; a client older than the
# oldest remembered removal gets a full answer instead.
MAX_TOMBSTONES = 4096
# More versions than a registry hands out between two saves of its state.
RESTART_VERSION_GAP = 1_000_000


@dataclass(frozen=True)
class PeerRecord:
    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    announcement: Announcement | None
    latest_handshake: float | None
    version: int  # when anything a client acts on last changed

    def digest(self) -> int:
        announcement = self.announcement
        return peer_digest(
            self.public_key,
            self.endpoint,
            self.allowed_ips,
            announcement.lan_endpoints if announcement else (),
            announcement.session if announcement else None,
            symmetric_nat=announcement.symmetric_nat if announcement else False,
            mapped_endpoint=announcement.mapped_endpoint if announcement else None,
            ipv6_endpoints=announcement.ipv6_endpoints if announcement else (),
            punch_first=announcement.punch_first if announcement else False,
        )

    def same_for_clients(self, other: PeerRecord) -> bool:
        return (
            self.endpoint == other.endpoint
            and self.allowed_ips == other.allowed_ips
            and self.announcement == other.announcement
        )


@dataclass(frozen=True)
class Change:
    """One thing `observe` saw change, for the registry's log: a peer that became
    live ("live"), whose observed endpoint moved ("moved", `old_endpoint` set),
    whose allowed IPs changed ("allowed_ips"), or that went away ("gone": no
    handshake in the live window, or removed from the interface)."""

    kind: str
    public_key: PublicKey
    endpoint: Endpoint | None = None
    old_endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()


def is_live(peer: PeerState, now: float, live_window: float = LIVE_WINDOW) -> bool:
    return (
        peer.endpoint is not None
        and peer.latest_handshake is not None
        and now - peer.latest_handshake <= live_window
    )


def served(announcement: Announcement | None, seen: Endpoint | None) -> Announcement | None:
    """What the other clients are told of an announcement, given where this
    registry sees its peer: a mapped endpoint only at the address the peer's
    packets come from.  A gateway maps a port of its own external address, so
    any other host would aim every peer's probes at someone else (the client
    withholds such a mapping itself; this holds a client to it).  The model
    keeps the announcement whole: the mapping is served again once the peer
    is seen there."""
    if announcement is None or announcement.mapped_endpoint is None:
        return announcement
    if seen is not None and seen.host == announcement.mapped_endpoint.host:
        return announcement
    return replace(announcement, mapped_endpoint=None)


@dataclass
class RegistryModel:
    """What the registry knows; `announce` returns whether it changed, `observe`
    what changed (an empty list: nothing clients act on)."""

    # Versions count from this registry's start: a client holding a version of
    # another epoch (the registry restarted) gets a full answer.
    epoch: str = field(default_factory=lambda: os.urandom(8).hex())
    live_window: float = LIVE_WINDOW
    max_tombstones: int = MAX_TOMBSTONES
    version: int = 0
    # Deltas are possible for clients at or above this version.
    horizon: int = 0
    # Both kept in version order (a changed entry moves to the end), so a delta
    # walks back from the newest and costs O(changes), not O(peers).
    records: dict[PublicKey, PeerRecord] = field(default_factory=dict)
    tombstones: dict[PublicKey, int] = field(default_factory=dict)
    announcements: dict[PublicKey, Announcement] = field(default_factory=dict)
    # Every peer on the device (live or not): callers are identified among them.
    known: dict[PublicKey, PeerState] = field(default_factory=dict)
    endpoint_changes: int = 0
    # Versions skipped at a restart (resume_after_restart): (after, up to].
    gap: tuple[int, int] = (0, 0)
    # The XOR of every record's digest (wire.peer_digest), kept up to date.
    digest: int = 0
    # The encoded peers of the last full answer, and its version.
    _full_peers: tuple[int, bytes] | None = None
    # Caller lookup, rebuilt with `known`: single addresses by dict, the rare
    # routed networks (most specific first) by scan.
    _hosts: dict[IPAddress, PublicKey] = field(default_factory=dict)
    _routes: list[tuple[IPNetwork, PublicKey]] = field(default_factory=list)

    # -- inputs -----------------------------------------------------------
    def observe(self, state: DeviceState, now: float) -> list[Change]:
        self.known = state.by_key()
        self._index_callers()
        live = {
            key: peer for key, peer in self.known.items() if is_live(peer, now, self.live_window)
        }
        changes: list[Change] = []
        for key in [key for key in self.records if key not in live]:
            gone = self.records[key]
            self._remove(key)
            changes.append(Change("gone", key, gone.endpoint, allowed_ips=gone.allowed_ips))
        for peer in live.values():
            change = self._upsert(peer)
            if change is not None:
                changes.append(change)
        # Announcements of peers no longer on the device are forgotten.
        for key in [key for key in self.announcements if key not in self.known]:
            del self.announcements[key]
        return changes

    def announce(self, key: PublicKey, announcement: Announcement) -> bool:
        announcement = Announcement(
            announcement.session,
            tuple(announcement.lan_endpoints[:MAX_LAN_ENDPOINTS]),
            symmetric_nat=announcement.symmetric_nat,
            mapped_endpoint=announcement.mapped_endpoint,
            ipv6_endpoints=tuple(announcement.ipv6_endpoints[:MAX_IPV6_ENDPOINTS]),
            punch_first=announcement.punch_first,
        )
        if self.announcements.get(key) == announcement:
            return False
        self.announcements[key] = announcement
        record = self.records.get(key)
        if record is None:
            return False
        self._bump()
        self._stamp(
            PeerRecord(
                key,
                record.endpoint,
                record.allowed_ips,
                served(announcement, record.endpoint),
                record.latest_handshake,
                self.version,
            )
        )
        return True

    def restore(self, record: PeerRecord) -> None:
        """Put back a record read from the state file (given in version order)."""
        self._stamp(record)

    def _stamp(self, record: PeerRecord) -> None:
        """Store a record with a new version at the end of the version order."""
        old = self.records.pop(record.public_key, None)
        if old is not None:
            self.digest ^= old.digest()
        self.records[record.public_key] = record
        self.digest ^= record.digest()

    def _index_callers(self) -> None:
        hosts: dict[IPAddress, PublicKey] = {}
        routes: list[tuple[IPNetwork, PublicKey]] = []
        for key, peer in self.known.items():
            for network in peer.allowed_ips:
                if network.num_addresses == 1:
                    hosts[network.network_address] = key
                else:
                    routes.append((network, key))
        routes.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._hosts, self._routes = hosts, routes

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _upsert(self, peer: PeerState) -> Change | None:
        key = peer.public_key
        old = self.records.get(key)
        candidate = PeerRecord(
            key,
            peer.endpoint,
            tuple(sorted(peer.allowed_ips, key=str)),
            served(self.announcements.get(key), peer.endpoint),
            peer.latest_handshake,
            old.version if old else 0,
        )
        if old is not None and old.same_for_clients(candidate):
            if old.latest_handshake != candidate.latest_handshake:
                self.records[key] = candidate  # fresher "last seen", no new version
            return None
        if old is None:
            change = Change("live", key, candidate.endpoint, allowed_ips=candidate.allowed_ips)
        elif old.endpoint != candidate.endpoint:
            self.endpoint_changes += 1
            change = Change(
                "moved", key, candidate.endpoint, old.endpoint, allowed_ips=candidate.allowed_ips
            )
        else:
            change = Change(
                "allowed_ips", key, candidate.endpoint, allowed_ips=candidate.allowed_ips
            )
        self._bump()
        self.tombstones.pop(key, None)
        self._stamp(
            PeerRecord(
                key,
                candidate.endpoint,
                candidate.allowed_ips,
                candidate.announcement,
                candidate.latest_handshake,
                self.version,
            )
        )
        return change

    def _remove(self, key: PublicKey) -> None:
        self.digest ^= self.records.pop(key).digest()
        self.tombstones[key] = self._bump()
        while len(self.tombstones) > self.max_tombstones:
            oldest = next(iter(self.tombstones))  # version order: the first is the oldest
            self.horizon = max(self.horizon, self.tombstones.pop(oldest))

    # -- queries ----------------------------------------------------------
    def caller(self, address: IPAddress) -> PublicKey | None:
        """The peer whose allowed IPs hold `address` (WireGuard's cryptokey routing
        guarantees only that peer can send from it); the most specific wins."""
        key = self._hosts.get(address)
        if key is not None:
            return key
        for network, owner in self._routes:
            if address in network:
                return owner
        return None

    def changed_since(self, since: int | None, epoch: str | None = None) -> bool:
        return since is None or since != self.version or epoch != self.epoch

    def answer(
        self, caller: PublicKey, since: int | None, now: float, epoch: str | None = None
    ) -> dict[str, Any]:
        """The JSON answer for `caller`: full when `since` is None, too old or of
        another epoch.  A full answer lists every live peer, the caller too (as
        a stream's shared lines do; a client drops its own record), so that its
        encoding can be shared (`encoded_answer`); a delta leaves the caller
        out, its own endpoint being in "you"."""
        full = self._needs_full(since, epoch)
        peers, removed = self._changes(
            None if full else since, now, leave_out=None if full else caller
        )
        me = self.known.get(caller)
        you = encode_you(caller, me.endpoint if me else None, me.allowed_ips if me else ())
        return encode_answer(self.epoch, self.version, full, peers, removed, you)

    def encoded_answer(
        self, caller: PublicKey, since: int | None, now: float, epoch: str | None = None
    ) -> bytes:
        return b"".join(self.encoded_answer_parts(caller, since, now, epoch))

    def encoded_answer_parts(
        self, caller: PublicKey, since: int | None, now: float, epoch: str | None = None
    ) -> list[bytes]:
        """`answer`, encoded (compact JSON, no newline).  A full answer's peers
        are encoded once per version and shared by every caller (their
        last_handshake_age is then as of that encoding): at 10,000 peers that
        encoding is most of a full answer's cost (1.8 MiB, 0.2-0.4 s)."""
        if not self._needs_full(since, epoch):
            return [encode_body(self.answer(caller, since, now, epoch))]
        cached = self._full_peers
        if cached is None or cached[0] != self.version:
            peers = [_peer_json(record, now) for record in self.records.values()]
            cached = self._full_peers = (self.version, encode_body(peers))
        me = self.known.get(caller)
        you = encode_you(caller, me.endpoint if me else None, me.allowed_ips if me else ())
        return encode_full_answer(self.epoch, self.version, cached[1], you)

    def view_digest(self, caller: PublicKey) -> str:
        """The digest of the view `caller` should hold (wire.view_digest): every
        record but its own, and its own endpoint.  O(1)."""
        total = self.digest
        own = self.records.get(caller)
        if own is not None:
            total ^= own.digest()
        me = self.known.get(caller)
        total ^= own_endpoint_digest(me.endpoint if me else None)
        return format_digest(total)

    def check(
        self, caller: PublicKey, epoch: str, version: int, digest: str, now: float
    ) -> bytes | None:
        """The -t safety net: None when the caller holds the current view (no
        encoding at all), else what it needs: the delta since its version when
        the registry still has it, a full answer otherwise (another epoch, a
        version too old, or a view that differs at the current version)."""
        if epoch == self.epoch and version == self.version:
            if digest == self.view_digest(caller):
                return None
            return self.encoded_answer(caller, None, now, epoch)
        return self.encoded_answer(caller, version, now, epoch)

    def broadcast(self, since: int, now: float) -> dict[str, Any]:
        """What changed after `since`, the same document for every caller: no
        "you", and no caller is left out (each client drops its own record, whose
        endpoint is its own public endpoint).  Encoded once per change and written
        to every open stream.  Full when `since` is too old (or ahead)."""
        full = self._needs_full(since, self.epoch)
        peers, removed = self._changes(None if full else since, now, leave_out=None)
        return encode_answer(self.epoch, self.version, full, peers, removed)

    def _needs_full(self, since: int | None, epoch: str | None) -> bool:
        return (
            since is None
            or epoch != self.epoch
            or since < self.horizon
            or since > self.version
            or self.gap[0] < since <= self.gap[1]
        )

    def resume_after_restart(self) -> None:
        """The state file may be behind what clients were told (a change in the
        second before a crash, or saves that failed): the versions after the
        file's are skipped, and a client holding one of them (a view this
        registry no longer knows) gets a full answer, not a wrong delta."""
        self.gap = (self.version, self.version + RESTART_VERSION_GAP)
        self.version += RESTART_VERSION_GAP

    def _changes(
        self, since: int | None, now: float, leave_out: PublicKey | None
    ) -> tuple[list[dict[str, Any]], list[PublicKey]]:
        """The peers stamped after `since` and the keys removed after it (every
        live peer and no removal when `since` is None), without `leave_out`."""
        if since is None:
            records: Any = self.records.values()
            gone: list[tuple[PublicKey, int]] = []
        else:
            records = _newer_than(self.records.values(), since, lambda r: r.version)
            gone = _newer_than(self.tombstones.items(), since, lambda t: t[1])
        peers = [_peer_json(record, now) for record in records if record.public_key != leave_out]
        removed = [key for key, _ in gone if key != leave_out]
        return peers, removed

    def live_count(self) -> int:
        return len(self.records)


def _newer_than(items: Any, version: int, stamp: Any) -> list[Any]:
    """The items stamped after `version`, from a collection in version order,
    found by walking back from the newest: O(changes), not O(peers)."""
    newer = []
    for item in reversed(items):
        if stamp(item) <= version:
            break
        newer.append(item)
    newer.reverse()
    return newer


def _peer_json(record: PeerRecord, now: float) -> dict[str, Any]:
    age = None if record.latest_handshake is None else max(0.0, now - record.latest_handshake)
    return encode_peer(
        record.public_key, record.endpoint, record.allowed_ips, record.announcement, age
    )
