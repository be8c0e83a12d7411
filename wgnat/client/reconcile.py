"""What the client should do next: pure decisions, no I/O.

`Mesh.plan(view, device, now)` compares the registry's view with the device and
returns the device operations to apply, each with the reason an operator reads in
the log.  A peer's path is a small state machine:

    (new) --probe--> PROBING --handshake--> SWITCHING --at switch time--> DIRECT
                        |                                                   |
                        +--no handshake in time--> RELAYED <--path died-----+
                                                     |
                                 retry (backoff) ----+--> PROBING

PROBING: the peer is on the device with its endpoint and a keepalive but **no
allowed IPs**, so traffic keeps flowing through the registry while the two NATs
are punched.  Allowed IPs are both the route out and the filter in, so the two
ends must give each other their addresses at the same moment: both switch at
"handshake time + switch_delay", a moment both ends derive from the same
handshake, which keeps the window in which one end routes directly and the other
still expects the relay to about a round trip.  The delay only has to cover the
time each end takes to see the handshake (its next probe poll and a device
read); an end that sees it later switches at once and says how late.  RELAYED:
the peer is not on the device at all, so the registry's broader allowed IPs
carry its traffic.

Which endpoint a probe aims at comes from `candidates.candidates` (LAN, IPv6,
a mapped port, the observed endpoint, in that order): a probe that gets no
handshake moves to the next candidate (the peer re-created, so that WireGuard
sends a fresh initiation at once) and falls back to RELAYED after the last.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from wgnat._types import (
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    PeerState,
    PeerUpdate,
    PublicKey,
)
from wgnat.client.candidates import (
    Candidate,
    Mine,
    candidates,
    describe_choice,
    through_symmetric_nats,
)
from wgnat.client.view import RegistryView
from wgnat.wire import RemotePeer


class Path(enum.Enum):
    PROBING = "probing"
    SWITCHING = "switching"
    DIRECT = "direct"
    RELAYED = "relayed"


@dataclass(frozen=True)
class Settings:
    keepalive: int = 25
    # One lost initiation costs WireGuard's 5 s rekey timeout; 6 s allows one retry.
    probe_timeout: float = 6.0
    # A candidate with others after it (LAN, IPv6, a mapped port: no NAT
    # mapping to punch) handshakes as soon as both ends have the peer, within
    # milliseconds of each other; this long without, the next one is tried.
    candidate_timeout: float = 2.0
    # Use peers' IPv6 endpoints (and announce ours): --no-ipv6 turns it off.
    ipv6: bool = True
    # This host's router accepts unsolicited packets on its INPUT chain (the
    # conntrack race, --punch-first): it announces so, and its peers let it
    # punch first.  A peer that announced it is probed this much later, so its
    # packet has left its router (and made the mapping ours will answer
    # through) before ours arrives there.  Its side must first take the
    # registry's push in, read its device, write its state file and set the
    # peer: 0.5 s was not always enough in the Compose testbed under load.
    punch_first: bool = False
    answer_delay: float = 1.0
    # While probing, the device is read this often: each end sees a handshake
    # at most one poll (and a read) after it completed.
    probe_poll: float = 0.05
    # Both ends switch at handshake + switch_delay.  It must be one figure
    # every client shares (each end computes the moment on its own), and it
    # must lie after both ends have seen the handshake: two poll periods.  The
    # lag each end measured is logged at the switch; bench/formation.py reports
    # it (p95 under load well inside this; a late end switches at once).
    switch_delay: float = 0.1
    health_interval: float = 15.0
    # While data flows on a direct path (more than keepalives went out lately),
    # its health is read this often: a path cut under traffic is then noticed
    # within seconds, and an idle mesh still costs one read per health_interval.
    active_health_interval: float = 5.0
    # Each step doubles the one before, so that the retry moments of a longer
    # step are also moments of every shorter one (see retry_moment).
    retry_backoff: tuple[float, ...] = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
    # Retry at moments both ends of a pair compute alike (wall clock), not at a
    # delay from when each end happened to give up: a direct path needs both
    # ends probing at once (each drops the other's handshakes otherwise).
    align_retries: bool = True
    # Session keys die 180 s after the last handshake (REJECT_AFTER_TIME).
    handshake_dead_after: float = 180.0
    # Both ends send a keepalive every `keepalive` s: silence this long means dead.
    rx_stall_after: float = 65.0
    # A WireGuard peer that receives data answers within 10 s (its passive
    # keepalive) and retries a handshake after 15 s (KEEPALIVE_TIMEOUT +
    # REKEY_TIMEOUT): data sent, and nothing back for this long, is a dead path.
    unanswered_after: float = 15.0
    # While data goes unanswered, the device is read this often (instead of every
    # health_interval), so a dead path is given up within seconds of the proof.
    suspect_recheck: float = 2.0
    removal_grace: float = 30.0


@dataclass
class PeerPath:
    path: Path
    since: float
    endpoint: Endpoint | None = None
    attempts: int = 0
    deadline: float = 0.0  # PROBING: give up then; SWITCHING: switch then
    retry_at: float = 0.0  # RELAYED
    reason: str = ""
    learned_at: float = 0.0  # when this peer was first seen, for time-to-direct
    last_rx: int = -1
    rx_changed_at: float = 0.0
    last_tx: int = -1
    tx_read_at: float = 0.0
    # The end of the first read window, since the last byte received, in which
    # data (more than our keepalives) went out: the path is suspect from then.
    unanswered_since: float | None = None
    data_sent_at: float | None = None  # the last read that saw data go out
    gone_since: float | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    session: str | None = None  # the remote client's, when we last probed
    probed_at: float | None = None  # the start of the last direct attempt
    # SWITCHING: how long after the handshake this end's poll saw it.
    seen_after: float = 0.0
    # The endpoints worth a direct attempt, best first, as the last plan saw
    # them, and the one probed (or direct) now: None for a path taken back
    # after a restart, until a plan finds its endpoint among them.
    candidates: tuple[Candidate, ...] = ()
    candidate: Candidate | None = None
    # What the candidates before this one gave (for the reason of a fallback).
    tried: tuple[str, ...] = ()
    # Waiting until then for the peer to punch first (Settings.answer_delay).
    answer_at: float | None = None


# A WireGuard keepalive on the wire: a transport header and the tag of an
# empty payload (16 + 16 bytes); anything more in a peer's tx_bytes is data
# (or a handshake), which the other end answers within seconds.
KEEPALIVE_PACKET_BYTES = 32
# A handshake initiation (148 bytes), and what one completed handshake adds to
# tx_bytes at most: our initiation and the keepalive that confirms the session.
# Every direct path re-handshakes every two minutes, so in a mesh of hundreds
# some peer always has just rekeyed, or has an initiation on the way whose
# answer has not yet come back: counted as data, that kept an idle client on
# the 5 s read (and suspecting paths) for good.
INITIATION_PACKET_BYTES = 148
HANDSHAKE_PACKET_BYTES = INITIATION_PACKET_BYTES + KEEPALIVE_PACKET_BYTES

# How often a plan waiting for our own announcement to reach the registry looks
# again (only while a peer that punches first waits for it).
ANNOUNCED_POLL = 0.1
# ...and for at most this long (the registry may refuse or never get it).
ANNOUNCED_WAIT = 5.0

# Every kind of device operation an Action can be (metrics label values).
ACTION_KINDS = ("probe", "promote", "endpoint", "kick", "remove")


@dataclass(frozen=True)
class Action:
    """One device operation and why."""

    kind: str  # one of ACTION_KINDS
    public_key: PublicKey
    reason: str
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    keepalive: int | None = None

    def updates(self) -> tuple[PeerUpdate, ...]:
        """The device updates that carry the action out, in order (none for a
        removal, which is `remove_peer`)."""
        key = self.public_key
        if self.kind == "probe":
            # No allowed IPs: traffic stays relayed until the handshake proves the path.
            return (
                PeerUpdate(
                    key,
                    endpoint=self.endpoint,
                    allowed_ips=(),
                    replace_allowed_ips=True,
                    persistent_keepalive=self.keepalive,
                ),
            )
        if self.kind == "promote":
            return (
                PeerUpdate(
                    key, allowed_ips=self.allowed_ips, replace_allowed_ips=True, update_only=True
                ),
            )
        if self.kind == "endpoint":
            return (PeerUpdate(key, endpoint=self.endpoint, update_only=True),)
        if self.kind == "kick":
            # Keepalive 0 -> N makes WireGuard send a packet at once; an endpoint
            # change alone sends nothing until the next keepalive.
            return (
                PeerUpdate(key, persistent_keepalive=0, update_only=True),
                PeerUpdate(key, persistent_keepalive=self.keepalive, update_only=True),
            )
        return ()


@dataclass(frozen=True)
class Event:
    """Something the agent counts or logs: "probe", "direct", "fallback",
    "rebinding", "removed", "rejected" (allowed IPs refused), "answer_later"
    (a probe held back for the peer to punch first), "own_endpoint"
    (our public endpoint moved), "recovered" / "left_alone" (a peer taken back,
    or not, after the state file was lost), "kept" (a direct path kept though
    its candidate is gone)."""

    kind: str
    public_key: PublicKey | None  # None: about this host itself
    detail: str = ""
    seconds: float = 0.0


class RouteIndex:
    """Which routes hold a more specific route of another peer.

    A route on a direct peer attracts every address inside it that no more
    specific allowed IP on the device claims.  A relayed peer is not on the
    device at all (its traffic rides the registry's broad allowed IPs), so a
    direct peer's broader route containing it would take its traffic, and a
    direct peer's would be taken the moment that peer falls back.  Installing
    the broader route only while the specific one is installed was the other
    way; refusing it is the one that cannot be wrong at any moment, whatever
    the other peer's path: the broader route's traffic stays on the relay,
    which the hub routes by the most specific allowed IP as well.

    Built once a plan from every route the registry lists for a peer and every
    route a hand-configured peer holds (not the registry's own, which direct
    peers refine by design).  Two prefixes either nest or do not meet, so
    "lies inside" is the whole of overlapping."""

    def __init__(
        self, routes: Iterable[tuple[PublicKey, IPNetwork]], widest: Iterable[IPNetwork] = ()
    ) -> None:
        # `widest`: every network nested_in() will be asked about.  A route is
        # filed under its supernet at each prefix length one of those has,
        # shorter than its own: usually one or two
        # lengths, none at all when every candidate is a host route.  Keys are
        # (version, prefix length, network as an integer): a plan at 10,000
        # peers builds this in milliseconds, where ipaddress objects took 0.3 s.
        lengths: dict[int, set[int]] = {}
        for network in widest:
            if network.prefixlen < network.max_prefixlen:
                lengths.setdefault(network.version, set()).add(network.prefixlen)
        ordered = {version: sorted(found) for version, found in lengths.items()}
        # -> up to two (owner, route inside it) of different owners: enough to
        # name one that is not the peer asking.
        self._inside: dict[tuple[int, int, int], list[tuple[PublicKey, IPNetwork]]] = {}
        for owner, route in routes:
            candidates = ordered.get(route.version)
            if not candidates:
                continue
            value, bits = int(route.network_address), route.max_prefixlen
            for prefix in candidates:
                if prefix >= route.prefixlen:
                    break
                mask = ((1 << prefix) - 1) << (bits - prefix)
                entry = self._inside.setdefault((route.version, prefix, value & mask), [])
                if len(entry) < 2 and all(known != owner for known, _ in entry):
                    entry.append((owner, route))

    def nested_in(
        self, networks: Iterable[IPNetwork], owner: PublicKey
    ) -> dict[IPNetwork, IPNetwork]:
        """For each of `owner`'s networks that holds another peer's route: one such route."""
        found: dict[IPNetwork, IPNetwork] = {}
        if not self._inside:
            return found
        for network in networks:
            place = (network.version, network.prefixlen, int(network.network_address))
            for other, route in self._inside.get(place, ()):
                if other != owner:
                    found[network] = route
                    break
        return found


@dataclass
class Policy:
    """Which allowed IPs from the registry may be put on the device."""

    tunnel_networks: tuple[IPNetwork, ...]
    registry_address: IPAddress
    own_addresses: tuple[IPAddress, ...] = ()
    accept_routes: tuple[IPNetwork, ...] = ()
    # The other registries' tunnel addresses (several -r), guarded like the first's.
    hub_addresses: tuple[IPAddress, ...] = ()

    def filter(
        self,
        networks: Iterable[IPNetwork],
        taken: set[IPNetwork],
        held: tuple[IPNetwork, ...] = (),
        nested: Mapping[IPNetwork, IPNetwork] | None = None,
    ) -> tuple[tuple[IPNetwork, ...], list[str]]:
        """`taken`: routes no other peer may get again; `held`: routes of peers
        configured by hand, inside which nothing more specific may be taken either
        (WireGuard routes the most specific allowed IP); `nested`: for a route
        that holds a more specific route of another peer, that route (see
        RouteIndex: such a route is never installed)."""
        accepted: list[IPNetwork] = []
        rejected: list[str] = []
        for network in networks:
            inside = any(
                network.version == outer.version and network.subnet_of(outer)  # type: ignore[arg-type]
                for outer in self.tunnel_networks + self.accept_routes
            )
            if not inside:
                rejected.append(f"{network} (outside the tunnel networks; see --accept-routes)")
            elif any(hub in network for hub in (self.registry_address, *self.hub_addresses)):
                rejected.append(f"{network} (holds the registry's address)")
            elif any(address in network for address in self.own_addresses):
                rejected.append(f"{network} (holds this host's own address)")
            elif nested and network in nested:
                rejected.append(
                    f"{network} (holds {nested[network]}, another peer's route: that peer's "
                    "traffic would go to this one whenever it is not direct)"
                )
            elif network in taken or any(
                network.version == route.version and network.subnet_of(route)  # type: ignore[arg-type]
                for route in held
            ):
                rejected.append(f"{network} (already routed to another peer)")
            else:
                accepted.append(network)
        return tuple(accepted), rejected


@dataclass
class Mesh:
    """Per-peer path state and the decisions that move it."""

    my_key: PublicKey | None
    registry_key: PublicKey
    policy: Policy
    settings: Settings = field(default_factory=Settings)
    lan_networks: tuple[IPNetwork, ...] = ()
    paths: dict[PublicKey, PeerPath] = field(default_factory=dict)
    # Keys this client created on the device, as written in the state file: the
    # only peers it may ever change or remove.  A key enters `unsaved` when
    # plan() decides to create its peer; the agent writes the file before it
    # touches the device and then moves it here (`saved`), or, when the write
    # fails, cancels the creation (`not_saved`).  A key leaves once its peer is
    # gone (`forget`).
    managed: set[PublicKey] = field(default_factory=set)
    unsaved: set[PublicKey] = field(default_factory=set)
    # The state file was lost (corrupt): the first plan takes back the peers
    # that look like ours (`_recover`), once it knows what the registry lists.
    recovering: bool = False
    events: list[Event] = field(default_factory=list)
    rejected_logged: dict[PublicKey, tuple[str, ...]] = field(default_factory=dict)
    # Why plan() left a peer the registry lists without a path (so it stays
    # relayed through the registry): what `wgnat status` shows for it.
    unplanned: dict[PublicKey, str] = field(default_factory=dict)
    # Our own public endpoint as the last plan saw it.
    my_endpoint: Endpoint | None = None
    # The other registries (several -r): hub peers like the registry's, never
    # managed, their routes refined by direct peers like the registry's.
    other_hubs: frozenset[PublicKey] = frozenset()
    # The registries see this host behind a symmetric NAT (client.merge): pairs
    # with a peer that announced one too are not probed (no hole punching gets
    # through two of them); they stay relayed from the start.
    symmetric_nat: bool = False
    # The global IPv6 endpoints this host announced (the agent sets them).
    my_ipv6_endpoints: tuple[Endpoint, ...] = ()
    # The port its gateway mapped for this host, as announced (the agent sets it).
    my_mapped_endpoint: Endpoint | None = None
    # Whether the registry holds our announcement (the agent sets it): a peer
    # that punches first learns of us only then, so answering it waits for it.
    announced: bool = True
    # The wall clock minus `now`, as the last plan was told (see plan()).
    _wall_offset: float = 0.0

    def is_hub(self, key: PublicKey) -> bool:
        return key == self.registry_key or key in self.other_hubs

    # -- helpers ----------------------------------------------------------
    def mine(self, my_endpoint: Endpoint | None) -> Mine:
        return Mine(
            my_endpoint,
            self.my_ipv6_endpoints,
            self.lan_networks,
            self.settings.ipv6,
            self.my_mapped_endpoint,
        )

    def candidates_for(self, remote: RemotePeer, my_endpoint: Endpoint | None) -> list[Candidate]:
        """Where to try `remote` directly, best first (candidates.candidates)."""
        return candidates(remote, self.mine(my_endpoint))

    def target_endpoint(self, remote: RemotePeer, my_endpoint: Endpoint | None) -> Endpoint | None:
        """The first candidate's endpoint (None: nothing to punch with)."""
        found = self.candidates_for(remote, my_endpoint)
        return found[0].endpoint if found else None

    def backoff(self, attempts: int) -> float:
        steps = self.settings.retry_backoff
        return steps[min(max(attempts, 1), len(steps)) - 1]

    def counts(self) -> dict[str, int]:
        result = {"direct": 0, "relayed": 0, "probing": 0}
        for peer_path in self.paths.values():
            name = "probing" if peer_path.path is Path.SWITCHING else peer_path.path.value
            result[name] += 1
        return result

    def adopt(
        self, device: DeviceState, now: float, remembered: set[PublicKey] | None = None
    ) -> bool:
        """After a restart: take back the managed peers the device still has.
        `remembered` is what the state file lists; a key whose peer the device
        no longer has is forgotten.  Returns whether the managed set changed
        (so that the state file is written again)."""
        changed = False
        if remembered is not None:
            on_device = device.by_key()
            kept = {key for key in remembered if key in on_device}
            changed = kept != remembered
            self.managed = kept
        for peer in device.peers:
            if peer.public_key in self.managed:
                self._take_back(peer, now, "kept from before the restart")
        return changed

    def _take_back(self, peer: PeerState, now: float, why: str) -> None:
        alive = (
            peer.latest_handshake is not None
            and now - peer.latest_handshake < self.settings.handshake_dead_after
        )
        if peer.allowed_ips and alive:
            self.paths[peer.public_key] = PeerPath(
                Path.DIRECT,
                now,
                peer.endpoint,
                allowed_ips=peer.allowed_ips,
                learned_at=now,
                last_rx=peer.rx_bytes,
                rx_changed_at=now,
                last_tx=peer.tx_bytes,
                tx_read_at=now,
                reason=why,
            )
        else:
            self.paths[peer.public_key] = PeerPath(
                Path.PROBING,
                now,
                peer.endpoint,
                attempts=1,
                deadline=now + self.settings.probe_timeout,
                learned_at=now,
                reason=f"{why}, probing again",
            )

    def _recover(self, view: RegistryView, device: DeviceState, now: float) -> None:
        """The state file was lost: take back the peers that look like ours.

        WireGuard keeps nothing per peer that we could set as a label without
        changing how the peer behaves (its fields are the key, a preshared key,
        the endpoint, the keepalive and the allowed IPs, each of which acts on
        traffic), so there is no marker to write.  What a peer this client made
        does carry is its shape: a key the registry lists (we create peers for
        nothing else), our own persistent keepalive (every probe sets it), and
        no allowed IPs (probing) or only ones the registry gives that key
        (direct).  A peer of that shape is taken back; anything else (the
        registry peer, other keepalives, routes the registry does not give that
        key) is left alone, as configured by hand.  The one peer this can take
        wrongly is a hand-made copy of what wgnat would have made itself; the
        other way, leaving every peer alone, would keep stale routes for good
        (issue 17, finding 5)."""
        self.recovering = False
        for peer in device.peers:
            key = peer.public_key
            if key == self.my_key or self.is_hub(key) or key in self.managed:
                continue
            remote = view.peers.get(key)
            if remote is None:
                why = "the registry does not list it"
            elif peer.persistent_keepalive != self.settings.keepalive:
                why = f"its keepalive is {peer.persistent_keepalive or 'off'}, not ours"
            elif not set(peer.allowed_ips) <= set(remote.allowed_ips):
                why = "it has allowed IPs the registry does not give it"
            else:
                self.managed.add(key)
                self._take_back(peer, now, "taken back after the state file was lost")
                self.events.append(Event("recovered", key))
                continue
            self.events.append(Event("left_alone", key, why))

    def next_wakeup(self, now: float) -> float:
        """When plan() or promote_due() next has something to decide without new
        input.  A moment already past is due now (a switch must not wait for the
        next health check), except a relayed peer's retry: that one waits for new
        input (the registry giving it a usable endpoint), so it must not spin."""
        times = [now + self.settings.health_interval]
        for peer_path in self.paths.values():
            if peer_path.gone_since is not None:
                times.append(peer_path.gone_since + self.settings.removal_grace)
            elif peer_path.path is Path.PROBING:
                times.append(min(peer_path.deadline, now + self.settings.probe_poll))
            elif peer_path.path is Path.SWITCHING:
                times.append(peer_path.deadline)
            elif peer_path.path is Path.RELAYED and peer_path.retry_at > now:
                times.append(peer_path.retry_at)
            elif peer_path.path is Path.DIRECT:
                if peer_path.unanswered_since is not None:
                    times.append(now + self.settings.suspect_recheck)
                elif (
                    peer_path.data_sent_at is not None
                    and now - peer_path.data_sent_at < self.settings.health_interval
                ):
                    times.append(now + self.settings.active_health_interval)
        return max(now, min(times))

    def promote_due(self, now: float) -> list[Action]:
        """Switch the paths whose switch moment has come, without reading the
        device first: the other end switches at the same moment, and a device
        read before the switch would only widen the gap between the two."""
        return [
            self._promote(key, peer_path, now)
            for key, peer_path in sorted(self.paths.items(), key=lambda item: item[0].raw)
            if peer_path.path is Path.SWITCHING and now >= peer_path.deadline
        ]

    def _promote(self, key: PublicKey, peer_path: PeerPath, now: float) -> Action:
        peer_path.path, peer_path.since = Path.DIRECT, now
        peer_path.last_rx, peer_path.rx_changed_at = -1, now  # the next read sets it
        peer_path.last_tx, peer_path.unanswered_since, peer_path.data_sent_at = -1, None, None
        self.events.append(Event("direct", key, seconds=now - peer_path.learned_at))
        chosen = peer_path.candidate
        at = (
            describe_choice(chosen)
            if chosen is not None and chosen.endpoint == peer_path.endpoint
            else str(peer_path.endpoint)
        )
        return Action(
            "promote",
            key,
            f"direct at {at}: handshake completed "
            f"(seen {peer_path.seen_after * 1000:.0f} ms after it{_lateness(peer_path, now)})",
            allowed_ips=peer_path.allowed_ips,
        )

    def take_events(self) -> list[Event]:
        """What happened since the last call, for the agent's metrics and logs."""
        events, self.events = self.events, []
        return events

    def take_unsaved(self) -> set[PublicKey]:
        """The keys whose peers this plan decided to create, none of them yet in
        the state file: the agent writes them before it applies their probes."""
        keys, self.unsaved = self.unsaved, set()
        return keys

    def saved(self, keys: set[PublicKey]) -> None:
        """These keys are in the state file now: ours, their probes may go ahead."""
        self.managed |= keys

    def not_saved(self, keys: set[PublicKey], now: float, error: str) -> None:
        """The state file could not be written, so these peers were not created:
        a peer the file does not list would be taken for one configured by hand
        after a restart, and kept, unmanaged, for good.  Each is relayed until
        the next plan, which tries again."""
        for key in keys:
            peer_path = self.paths.get(key)
            if peer_path is None:
                continue
            peer_path.path = Path.RELAYED
            peer_path.since = now
            peer_path.attempts = max(0, peer_path.attempts - 1)  # no attempt was made
            peer_path.retry_at = now
            peer_path.probed_at = None
            peer_path.reason = (
                f"not created yet: the state file could not be written ({error}); relayed, "
                "retried at the next plan"
            )
        self.events = [
            event
            for event in self.events
            if not (event.kind == "probe" and event.public_key in keys)
        ]

    def forget(self, keys: set[PublicKey]) -> None:
        """These peers are gone from the device (their removal was applied):
        they are no longer ours to manage."""
        self.managed -= keys

    # -- the decisions ----------------------------------------------------
    def plan(
        self, view: RegistryView, device: DeviceState, now: float, wall: float | None = None
    ) -> list[Action]:
        """`wall`: the wall clock now, when `now` is a steady clock (the daemons'):
        retry moments are wall-clock moments, which the other end computes too."""
        self._wall_offset = 0.0 if wall is None else wall - now
        if self.recovering:
            self._recover(view, device, now)
        kicks = self._follow_own_endpoint(view.my_endpoint, now)
        actions: list[Action] = []
        on_device = device.by_key()
        unmanaged = {key: peer for key, peer in on_device.items() if key not in self.managed}
        taken: set[IPNetwork] = {net for peer in unmanaged.values() for net in peer.allowed_ips}
        # Not the registry's routes: direct peers refine those by design.
        held = tuple(
            net
            for key, peer in unmanaged.items()
            if not self.is_hub(key)
            for net in peer.allowed_ips
        )
        listed = [
            (key, net)
            for key, remote in view.peers.items()
            if key != self.my_key and not self.is_hub(key)
            for net in remote.allowed_ips
        ]
        routes = RouteIndex(
            listed
            + [
                (key, net)
                for key, peer in unmanaged.items()
                if not self.is_hub(key)
                for net in peer.allowed_ips
            ],
            widest=(net for _, net in listed),  # every candidate
        )

        for key, remote in sorted(view.peers.items(), key=lambda item: item[0].raw):
            if key == self.my_key or self.is_hub(key) or key in unmanaged:
                continue
            allowed, rejected = self.policy.filter(
                remote.allowed_ips, taken, held, routes.nested_in(remote.allowed_ips, key)
            )
            taken.update(allowed)
            if rejected and self.rejected_logged.get(key) != tuple(rejected):
                self.rejected_logged[key] = tuple(rejected)
                self.events.append(Event("rejected", key, "; ".join(rejected)))
            found = self.candidates_for(remote, view.my_endpoint)
            if self.symmetric_nat and remote.symmetric_nat:
                found = through_symmetric_nats(found, remote, self.mine(view.my_endpoint))
            target = found[0].endpoint if found else None
            peer_path = self.paths.get(key)
            if peer_path is not None:
                peer_path.gone_since = None
                peer_path.allowed_ips = allowed
                device_peer = on_device.get(key)
                if (
                    peer_path.path is Path.DIRECT
                    and device_peer is not None
                    and set(device_peer.allowed_ips) - set(allowed)
                ):
                    # A route it may no longer hold (another peer's now lies
                    # inside it, say) goes at once, not at the next health check.
                    actions.append(
                        Action(
                            "promote",
                            key,
                            "allowed IPs withdrawn: "
                            + ", ".join(
                                str(n) for n in device_peer.allowed_ips if n not in allowed
                            ),
                            allowed_ips=allowed,
                        )
                    )
            # Only the observed endpoint, through two symmetric NATs: hopeless.
            hopeless = self.symmetric_nat and remote.symmetric_nat and not found
            skipped = _why_not_probed(
                remote, remote.endpoint if hopeless else target, allowed, rejected
            )
            if skipped is None and hopeless:
                skipped = (
                    "both ends are behind symmetric NATs (a port per destination), which no "
                    "hole punching gets through; relayed through the registry"
                )
            if skipped is not None or target is None:
                self.unplanned[key] = skipped or "no endpoint"
                continue  # nothing to punch with (yet): traffic stays relayed
            self.unplanned.pop(key, None)
            if peer_path is None:
                self.paths[key] = peer_path = PeerPath(
                    Path.RELAYED, now, None, learned_at=now, allowed_ips=allowed
                )
                actions.extend(self._start(key, peer_path, now, "new peer", found, remote))
            elif peer_path.path is Path.RELAYED:
                tried = {candidate.endpoint for candidate in peer_path.candidates}
                fresh = [c for c in found if c.endpoint not in tried]
                if remote.session != peer_path.session:
                    # Its client (re)started and probes us now: answer at once.
                    peer_path.attempts = 0
                    actions.extend(
                        self._start(key, peer_path, now, "its client started", found, remote)
                    )
                elif peer_path.endpoint is not None and (
                    fresh if peer_path.candidates else target != peer_path.endpoint
                ):
                    # A new mapping (a NAT rebinding, a restarted router) or a new
                    # kind of endpoint is a new chance: the old ones are what failed.
                    new = fresh[0] if fresh else found[0]
                    why = (
                        f"its endpoint moved to {new.endpoint}"
                        if new.kind in ("lan", "observed")
                        else f"a new candidate: {new}"
                    )
                    actions.extend(self._start(key, peer_path, now, why, found, remote))
                elif now >= peer_path.retry_at:
                    # No attempt yet: its first probe was held back (not_saved).
                    why = f"retry #{peer_path.attempts}" if peer_path.attempts else "new peer"
                    actions.extend(self._start(key, peer_path, now, why, found, remote))
            else:
                actions.extend(self._track(key, peer_path, found, remote, now, on_device.get(key)))
            peer_path.session = remote.session

        for key in [key for key in self.unplanned if key not in view.peers or key in unmanaged]:
            del self.unplanned[key]
        acted = {action.public_key for action in actions}
        for key, peer_path in list(self.paths.items()):
            if key in acted:
                continue  # the device snapshot predates this plan's own operation
            if key in unmanaged:
                # Someone else configured this peer by hand: it is theirs now.
                del self.paths[key]
                continue
            if key not in view.peers:
                actions.extend(self._maybe_remove(key, peer_path, on_device, now))
                continue
            device_peer = on_device.get(key)
            if peer_path.path is Path.PROBING:
                actions.extend(self._watch_probe(key, peer_path, device_peer, now))
                if actions and actions[-1].public_key == key:
                    continue
            if peer_path.path is Path.SWITCHING:
                if device_peer is None:
                    actions.append(
                        self._probe(
                            key,
                            peer_path,
                            peer_path.endpoint,
                            now,
                            "its entry vanished from the device",
                        )
                    )
                elif now >= peer_path.deadline:
                    actions.append(self._promote(key, peer_path, now))
            elif peer_path.path is Path.DIRECT:
                actions.extend(self._watch_direct(key, peer_path, device_peer, now))
        return kicks + actions

    def _follow_own_endpoint(self, endpoint: Endpoint | None, now: float) -> list[Action]:
        """Our own public endpoint moved (our NAT rebound): every path through
        the old mapping is refreshed at once, and whatever failed through it may
        work through the new one (a peer we gave up on while the mapping moved
        under us may still hold us as direct), so every relayed peer is retried
        at this plan instead of at its backoff moment."""
        old, self.my_endpoint = self.my_endpoint, endpoint
        if old is None or endpoint is None or old == endpoint:
            return []
        self.events.append(Event("own_endpoint", None, f"{old} -> {endpoint}"))
        for peer_path in self.paths.values():
            if peer_path.path is Path.RELAYED:
                peer_path.retry_at = min(peer_path.retry_at, now)
        return [
            self._kick(key, "our own NAT mapping changed")
            for key, peer_path in sorted(self.paths.items(), key=lambda item: item[0].raw)
            if peer_path.path in (Path.PROBING, Path.SWITCHING, Path.DIRECT)
        ]

    def _probe(
        self,
        key: PublicKey,
        peer_path: PeerPath,
        target: Endpoint | None,
        now: float,
        why: str,
        found: list[Candidate] | None = None,
        next_candidate: bool = False,
    ) -> Action:
        """A direct attempt at `target`.  `found`: a new attempt down this list of
        candidates, from its first (`target`); None: the same endpoint again.
        `next_candidate`: the attempt goes on at the next candidate (not a new
        attempt: the retry backoff counts attempts)."""
        if found is not None:
            peer_path.candidates = tuple(found)
            peer_path.candidate = found[0] if found else None
            peer_path.tried = ()
        peer_path.path = Path.PROBING
        peer_path.since = now
        peer_path.endpoint = target
        if not next_candidate:
            peer_path.attempts += 1
            peer_path.probed_at = now
        peer_path.deadline = now + (
            self.settings.candidate_timeout
            if self._next_candidate(peer_path) is not None
            else self.settings.probe_timeout
        )
        peer_path.reason = why
        if key not in self.managed:
            self.unsaved.add(key)  # ours once the agent has written it down
        self.events.append(Event("probe", key))
        chosen = peer_path.candidate
        aim = (
            describe_choice(chosen) if chosen is not None and chosen.endpoint == target else target
        )
        return Action(
            "probe",
            key,
            f"probing {aim} ({why}); traffic stays relayed until a handshake",
            endpoint=target,
            keepalive=self.settings.keepalive,
        )

    def _start(
        self,
        key: PublicKey,
        peer_path: PeerPath,
        now: float,
        why: str,
        found: list[Candidate],
        remote: RemotePeer,
    ) -> list[Action]:
        """A direct attempt down `found`, at once, or after answer_delay when
        the peer punches first (its router accepts unsolicited packets: ours
        arriving there before its own left would make its router move its
        mapping for us, and the punch would fail until that entry expired)."""
        # A public host waits too: its packet arriving first would not stop
        # its own path (WireGuard roams to the new port) but would leave the
        # peer's router a second mapping for the peer's port, which it then
        # gives the peer's packets to everyone else (seen in the testbed: x's
        # pairs with a and c failed once p had answered x at once).
        late = remote.punch_first and not self.settings.punch_first
        if late and not self.announced and now - peer_path.since < ANNOUNCED_WAIT:
            # It cannot punch before it knows of us: the registry pushes our
            # announcement to it once the registry has it.
            peer_path.retry_at = now + ANNOUNCED_POLL
            peer_path.reason = (
                f"{why}: it punches first (its router accepts unsolicited packets), once "
                "the registry has told it of this host"
            )
            return []
        if late and peer_path.answer_at is None:
            peer_path.answer_at = peer_path.retry_at = now + self.settings.answer_delay
            peer_path.reason = (
                f"{why}: it punches first (its router accepts unsolicited packets), "
                f"answered {self.settings.answer_delay:g} s later"
            )
            self.events.append(Event("answer_later", key, peer_path.reason))
            return []
        peer_path.answer_at = None
        return [self._probe(key, peer_path, found[0].endpoint, now, why, found)]

    def _next_candidate(self, peer_path: PeerPath) -> Candidate | None:
        """The candidate after the one probed now, if any."""
        current = peer_path.candidate
        if current is None or current not in peer_path.candidates:
            return None
        index = peer_path.candidates.index(current)
        return peer_path.candidates[index + 1] if index + 1 < len(peer_path.candidates) else None

    def _reprobe(
        self,
        key: PublicKey,
        peer_path: PeerPath,
        candidate: Candidate,
        now: float,
        why: str,
        found: list[Candidate] | None = None,
        new_attempt: bool = True,
    ) -> list[Action]:
        """Probe `candidate` on a fresh peer entry: removed and added again, so
        that WireGuard forgets the old session and its 5 s wait between
        initiations, sends an initiation at once, and only a handshake on the
        new endpoint counts."""
        if found is not None:
            peer_path.candidates = tuple(found)
            peer_path.tried = ()
        peer_path.candidate = candidate
        return [
            Action("remove", key, f"{why}; trying {candidate} next"),
            self._probe(
                key,
                peer_path,
                candidate.endpoint,
                now,
                why,
                next_candidate=found is None or not new_attempt,
            ),
        ]

    def _track(
        self,
        key: PublicKey,
        peer_path: PeerPath,
        found: list[Candidate],
        remote: RemotePeer,
        now: float,
        device_peer: PeerState | None = None,
    ) -> list[Action]:
        """A probing, switching or direct path whose candidates may have changed:
        an endpoint of its kind that moved is followed (a NAT rebinding); a kind
        no longer on the list (an IPv6 address gone, public addresses no longer
        the same) is left for the best candidate there is now."""
        current = peer_path.candidate
        if current is None:
            # Taken back after a restart: its kind is the one at its endpoint.
            current = next((c for c in found if c.endpoint == peer_path.endpoint), None)
            if current is None:
                peer_path.candidates, peer_path.candidate = tuple(found), found[0]
                return self._follow(
                    key, peer_path, found[0].endpoint, now, remake=not remote.symmetric_nat
                )
        same = next((c for c in found if c.kind == current.kind), None)
        before = {c.endpoint for c in peer_path.candidates}
        peer_path.candidates = tuple(found)
        roamed = device_peer.endpoint if device_peer is not None else None
        if peer_path.path is not Path.PROBING and _credit_where_it_runs(peer_path, roamed):
            return []  # at a candidate learnt of after its handshake: followed from there
        if (
            peer_path.path is Path.PROBING
            and found[0].kind != current.kind
            and found[0].endpoint not in before
        ):
            # A better candidate appeared while probing (a port mapping or an
            # IPv6 address announced just after): tried at once, the same attempt.
            return self._reprobe(
                key, peer_path, found[0], now, f"a new candidate: {found[0]}", found, False
            )
        if same is None:
            gone = _why_gone(current, remote, self.mine(self.my_endpoint))
            if current.kind == "mapped" and peer_path.path is Path.DIRECT:
                # A lease that lapsed (a gateway that stopped answering renewals)
                # removes no flow its connection tracking holds: the path goes on
                # working, so it is kept while the health check finds it alive,
                # and falls back to the candidates there are now when it dies.
                if current.endpoint in before:
                    self.events.append(
                        Event(
                            "kept",
                            key,
                            f"{gone}; the direct path to it stays while its handshakes do "
                            f"(then: {found[0]})",
                        )
                    )
                peer_path.candidate = Candidate(
                    current.endpoint, current.kind, f"{gone}; kept while it works"
                )
                return []
            return self._reprobe(key, peer_path, found[0], now, gone, found)
        peer_path.candidate = same
        if same.endpoint != peer_path.endpoint:
            if (
                remote.symmetric_nat
                and same.kind == "observed"
                and peer_path.path is not Path.PROBING
                and roamed is not None
                and roamed != peer_path.endpoint
            ):
                # Behind a symmetric NAT its observed endpoint is the port its
                # NAT gave a hub; the path runs at the one WireGuard took from
                # its packets to us.  Aiming ours at the hub's port (the hubs'
                # records differ) would have them dropped until its next
                # keepalive (the Compose testbed's p-g, cut for 27 s).  A path
                # still at the endpoint we set is followed: two hubs also see
                # two ports while a rebinding reaches one first.
                peer_path.endpoint = same.endpoint
                return []
            return self._follow(key, peer_path, same.endpoint, now, remake=not remote.symmetric_nat)
        return []

    def _follow(
        self,
        key: PublicKey,
        peer_path: PeerPath,
        target: Endpoint,
        now: float,
        remake: bool = True,
    ) -> list[Action]:
        """Its endpoint moved.  `remake`: a probing peer is made anew (see
        below); not for a peer behind a symmetric NAT, whose handshakes come
        from a port no registry sees and whose "moves" are the hubs' records
        taking turns: made anew, it would lose a handshake it may already have
        completed with us (the Compose testbed's s-p, with two hubs)."""
        old = peer_path.endpoint
        peer_path.endpoint = target
        if peer_path.path is Path.PROBING:
            peer_path.deadline = now + (
                self.settings.candidate_timeout
                if self._next_candidate(peer_path) is not None
                else self.settings.probe_timeout
            )
        self.events.append(Event("rebinding", key, f"{old} -> {target}"))
        if peer_path.path is Path.PROBING and remake:
            # Its first initiation went to the old endpoint and is still pending:
            # WireGuard sends no other for 5 s (REKEY_TIMEOUT), whatever we set,
            # so the peer is made anew, which initiates at once (a port mapping
            # announced just after the peer was first probed, say).
            return [
                Action("remove", key, f"endpoint moved from {old} to {target} while probing"),
                Action(
                    "probe",
                    key,
                    f"probing {target} (its endpoint moved); traffic stays relayed until a "
                    "handshake",
                    endpoint=target,
                    keepalive=self.settings.keepalive,
                ),
            ]
        return [
            Action("endpoint", key, f"endpoint moved from {old} to {target}", endpoint=target),
            self._kick(key, "to open the new NAT mapping at once"),
        ]

    def _kick(self, key: PublicKey, why: str) -> Action:
        return Action("kick", key, why, keepalive=self.settings.keepalive)

    def _fall_back(
        self, key: PublicKey, peer_path: PeerPath, now: float, why: str, kind: str
    ) -> Action:
        step = self.backoff(peer_path.attempts)
        peer_path.path = Path.RELAYED
        peer_path.since = now
        if self.settings.align_retries and self.my_key is not None:
            # The moments both ends compute alike are wall-clock moments; `now`
            # is the daemon's steady clock, which keeps a wall-clock step made
            # after it started out of its timers.
            wall = now + self._wall_offset
            peer_path.retry_at = retry_moment(self.my_key, key, wall, step) - self._wall_offset
        else:
            peer_path.retry_at = now + step
        if kind == "path_died" and peer_path.candidate is not None:
            why = f"{why} (on {peer_path.candidate})"
        peer_path.reason = why
        self.events.append(Event("fallback", key, kind))
        return Action("remove", key, f"relayed: {why}, retry in {peer_path.retry_at - now:.0f} s")

    def _watch_probe(
        self, key: PublicKey, peer_path: PeerPath, device_peer: PeerState | None, now: float
    ) -> list[Action]:
        if device_peer is None:
            return [
                self._probe(
                    key, peer_path, peer_path.endpoint, now, "its entry vanished from the device"
                )
            ]
        handshake = device_peer.latest_handshake
        if handshake is not None and now - handshake < self.settings.handshake_dead_after:
            _credit_where_it_runs(peer_path, device_peer.endpoint)
            peer_path.path = Path.SWITCHING
            # Both ends see (almost) the same handshake time and switch together.
            peer_path.seen_after = max(0.0, now - handshake)
            peer_path.deadline = handshake + self.settings.switch_delay
            return []
        if now >= peer_path.deadline:
            following = self._next_candidate(peer_path)
            current = peer_path.candidate
            if following is not None and current is not None:
                waited = self.settings.candidate_timeout
                peer_path.tried += (f"{current} gave none within {waited:g} s",)
                return self._reprobe(
                    key,
                    peer_path,
                    following,
                    now,
                    f"no direct handshake with {current} within {waited:g} s",
                )
            before = f"; before it {', '.join(peer_path.tried)}" if peer_path.tried else ""
            return [
                self._fall_back(
                    key,
                    peer_path,
                    now,
                    f"no direct handshake with {peer_path.endpoint} within "
                    f"{self.settings.probe_timeout:g} s (symmetric NAT or firewall?){before}",
                    "no_handshake",
                )
            ]
        return []

    def _watch_direct(
        self, key: PublicKey, peer_path: PeerPath, device_peer: PeerState | None, now: float
    ) -> list[Action]:
        if device_peer is None:
            return [
                self._probe(
                    key, peer_path, peer_path.endpoint, now, "its entry vanished from the device"
                )
            ]
        # Our own persistent keepalives are not answered (the other end sends its
        # own on its own schedule), nor is a rekey, completed or on its way: only
        # more than they could be is data.
        keepalives = 1 + int((now - peer_path.tx_read_at) // max(1, self.settings.keepalive))
        rekeyed = (
            device_peer.latest_handshake is not None
            and device_peer.latest_handshake > peer_path.tx_read_at
        )
        data_sent = peer_path.last_tx >= 0 and device_peer.tx_bytes - peer_path.last_tx > (
            KEEPALIVE_PACKET_BYTES * keepalives
            + HANDSHAKE_PACKET_BYTES * rekeyed
            + INITIATION_PACKET_BYTES
        )
        if data_sent:
            peer_path.data_sent_at = now
        if device_peer.rx_bytes != peer_path.last_rx:
            peer_path.last_rx, peer_path.rx_changed_at = device_peer.rx_bytes, now
            peer_path.unanswered_since = None
        elif data_sent and peer_path.unanswered_since is None:
            peer_path.unanswered_since = now
        peer_path.last_tx, peer_path.tx_read_at = device_peer.tx_bytes, now
        handshake = device_peer.latest_handshake
        if handshake is None or now - handshake > self.settings.handshake_dead_after:
            return [
                self._fall_back(
                    key,
                    peer_path,
                    now,
                    f"direct path died: no handshake for {self.settings.handshake_dead_after:g} s",
                    "path_died",
                )
            ]
        unanswered = peer_path.unanswered_since
        if (
            unanswered is not None
            and now - peer_path.rx_changed_at >= self.settings.unanswered_after
            and now - unanswered >= self.settings.suspect_recheck
        ):
            return [
                self._fall_back(
                    key,
                    peer_path,
                    now,
                    "direct path died: data sent, nothing came back for "
                    f"{now - peer_path.rx_changed_at:.0f} s",
                    "path_died",
                )
            ]
        if now - peer_path.rx_changed_at > self.settings.rx_stall_after:
            return [
                self._fall_back(
                    key,
                    peer_path,
                    now,
                    f"direct path died: nothing received for {now - peer_path.rx_changed_at:.0f} s",
                    "path_died",
                )
            ]
        if set(device_peer.allowed_ips) != set(peer_path.allowed_ips):
            return [
                Action(
                    "promote",
                    key,
                    "allowed IPs changed at the registry",
                    allowed_ips=peer_path.allowed_ips,
                )
            ]
        return []

    def _maybe_remove(
        self, key: PublicKey, peer_path: PeerPath, on_device: dict[PublicKey, PeerState], now: float
    ) -> list[Action]:
        if peer_path.gone_since is None:
            peer_path.gone_since = now
        if now - peer_path.gone_since < self.settings.removal_grace:
            return []
        del self.paths[key]
        self.events.append(Event("removed", key))
        if key in on_device:
            return [
                Action(
                    "remove", key, f"gone from the registry for {self.settings.removal_grace:g} s"
                )
            ]
        return []


def _lateness(peer_path: PeerPath, now: float) -> str:
    """How much later than the shared moment this end switches, when it is
    late enough to cost the other end packets (the handshake was seen late, or
    the timer fired late)."""
    late = now - peer_path.deadline
    return f"; switched {late * 1000:.0f} ms after the shared moment" if late >= 0.005 else ""


def _why_not_probed(
    remote: RemotePeer,
    target: Endpoint | None,
    allowed: tuple[IPNetwork, ...],
    rejected: list[str],
) -> str | None:
    """Why a peer the registry lists is not probed (and so stays relayed), or
    None when it can be."""
    if remote.session is None:
        return (
            "no wgnat client has announced itself there, so nothing would punch back; "
            "relayed through the registry"
        )
    if target is None:
        return "the registry knows no endpoint for it; relayed through the registry"
    if not allowed and rejected:
        return f"none of its allowed IPs is accepted ({'; '.join(rejected)}); relayed"
    if not allowed:
        return "it has no allowed IPs at the registry; relayed"
    return None


def _credit_where_it_runs(peer_path: PeerPath, device_endpoint: Endpoint | None) -> bool:
    """Credit a path to the candidate at the device's endpoint, which WireGuard
    took from the peer's packets: the one that reached us (its initiation from
    its mapped port while we probed the next candidate, or a mapped port
    announced after the handshake), not the one we probed.  A port no one
    announced (a symmetric NAT's) leaves the credit as it is.  Whether it
    changed."""
    if device_endpoint is None or (
        peer_path.candidate is not None and peer_path.candidate.endpoint == device_endpoint
    ):
        return False
    running = next((c for c in peer_path.candidates if c.endpoint == device_endpoint), None)
    if running is None:
        return False
    peer_path.candidate, peer_path.endpoint = running, device_endpoint
    return True


def _why_gone(candidate: Candidate, remote: RemotePeer, mine: Mine) -> str:
    """Why a candidate a path used is no longer on the list."""
    if candidate.kind == "ipv6":
        if candidate.endpoint not in remote.ipv6_endpoints:
            return f"its IPv6 endpoint {candidate.endpoint} is no longer announced"
        if not mine.use_ipv6:
            return "IPv6 is turned off here"
        return "this host has no global IPv6 address any more"
    if candidate.kind == "lan":
        return "its public address is no longer ours, so its LAN endpoint is out of reach"
    if candidate.kind == "mapped":
        return f"its mapped endpoint {candidate.endpoint} is no longer announced"
    return f"{candidate} is no longer a candidate"


def retry_moment(mine: PublicKey, theirs: PublicKey, now: float, step: float) -> float:
    """The next moment, at least 1 s away, at which both ends of the pair retry a
    direct path, given the backoff `step` each uses.

    The moments are the wall-clock multiples of `step`, shifted by a phase both
    ends derive from their two keys (spreading pairs over time).  They do not
    depend on when an end gave up, which differs between the two ends by up to
    the detection time: ends with the same step meet at the next moment, and
    as every step doubles the one before, the moments of a longer step are
    moments of every shorter one, so ends whose steps differ meet at the longer
    one's next moment (each probe lasts `probe_timeout`, which also absorbs
    clocks a few seconds apart)."""
    first, second = sorted((mine.raw, theirs.raw))
    digest = hashlib.sha256(first + second).digest()
    phase = int.from_bytes(digest[:4], "big") / 2**32 * min(step, 10.0)
    earliest = now + 1.0
    cycles = math.ceil((earliest - phase) / step)
    return cycles * step + phase


def first_host(network: IPNetwork) -> IPAddress:
    if network.num_addresses == 1:
        return network.network_address
    if network.prefixlen < network.max_prefixlen - 1:
        host: IPAddress = next(iter(network.hosts()))  # type: ignore[assignment]
        return host
    return network.network_address


def registry_address_of(peer: PeerState) -> IPAddress:
    """The registry's tunnel address: its allowed IP when that is a single host,
    else the first host of its first allowed network (wg-nat's convention).

    A default route (`AllowedIPs = 0.0.0.0/0`, a client sending everything
    through the hub) says nothing of where the registry is: its "first host"
    would be 0.0.0.1.  Such networks are passed over."""
    if not peer.allowed_ips:
        raise ValueError(
            "the registry peer has no allowed IPs, so its tunnel address is "
            "unknown; pass --registry-address"
        )
    for network in peer.allowed_ips:
        if network.num_addresses == 1:
            return network.network_address
    networks = [network for network in peer.allowed_ips if network.prefixlen > 0]
    if not networks:
        routes = ", ".join(str(network) for network in peer.allowed_ips)
        raise ValueError(
            f"the registry peer's allowed IPs ({routes}) route everything to it, so "
            "they do not tell its tunnel address; pass --registry-address (e.g. the "
            "hub's Address in its wg-quick file)"
        )
    return first_host(networks[0])
