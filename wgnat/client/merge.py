"""Several registries' views as one: pure, no I/O (a client given several `-r`).

Each registry (hub) is followed on its own and keeps its own view
(`HubView`); the mesh plans from their merge (`merge_views`), as it plans from
one registry's view when there is one.  Per peer:

- the freshest record wins: the one whose registry saw the peer's newest
  handshake, placed on this client's clock when the record arrived (its
  `last_handshake_age` subtracted).  Records of registries that answer now beat
  those of registries we cannot reach (whose views are kept as they were);
- what the peer announced (its session, LAN, IPv6 and mapped endpoints, its
  flags: `ANNOUNCED_FIELDS`) comes, all of it, from the freshest record that
  has an announcement (the winning record's registry may have none: the peer
  could not reach it);
- a peer is in the merge while any registry lists it: removed only when none does;
- a peer two registries see at one public address with different ports is
  behind a symmetric NAT, whether or not it announced so itself; when it
  announced so, its record is the first followed registry's, not the freshest
  (which alternates with its keepalives to each hub).

A full answer is encoded once per version and shared, so its ages may be as old
as that version: such a record looks fresher than it is by at most that much,
until the registry next sends it.

With one registry the merge is that registry's view itself, the same object:
nothing changes for a client with one `-r`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wgnat._types import Endpoint, PublicKey
from wgnat.client.view import RegistryView
from wgnat.wire import Answer


@dataclass
class HubView(RegistryView):
    """One registry's view, and when its registry last saw each peer's
    handshake (this client's clock, as of the record's arrival)."""

    clock: Callable[[], float] = field(default=lambda: 0.0, compare=False)
    seen: dict[PublicKey, float] = field(default_factory=dict, compare=False)

    def apply(self, answer: Answer) -> bool:
        now = self.clock()
        changed = super().apply(answer)
        if answer.full:
            self.seen = {}
        for key in answer.removed:
            self.seen.pop(key, None)
        for peer in answer.peers:
            if peer.handshake_age is not None:
                self.seen[peer.public_key] = now - peer.handshake_age
            else:
                self.seen.pop(peer.public_key, None)
        return changed


# What a peer announced itself (all of it from one registry's record, that of
# the freshest record that has an announcement): a record from a registry the
# peer could not reach has none of it, and mixing two announcements could pair
# one client start's session with another's endpoints.
ANNOUNCED_FIELDS = (
    "session",
    "lan_endpoints",
    "ipv6_endpoints",
    "mapped_endpoint",
    "punch_first",
    "symmetric_nat",
)


def _rank(view: HubView, up: bool | None, key: PublicKey) -> tuple[bool, float]:
    seen = view.seen.get(key)
    return (up is True, float("-inf") if seen is None else seen)


def merge_views(views: Sequence[HubView], up: Sequence[bool | None]) -> RegistryView:
    """One view from the registries' (in `-r` order; `up`: whether each is
    followed now).  Ties go to the earlier registry."""
    if len(views) == 1:
        return views[0]
    answered = [view for view in views if view.version is not None]
    merged = RegistryView()
    if not answered:
        return merged
    merged.epoch = "+".join(view.epoch or "-" for view in views)
    merged.version = sum(view.version or 0 for view in views)
    merged.my_endpoint = own_endpoint(views, up)
    keys: dict[PublicKey, None] = {}
    for view in views:
        keys.update(dict.fromkeys(view.peers))
    for key in keys:
        ranked = sorted(
            (
                (_rank(view, up[index], key), -index, view.peers[key])
                for index, view in enumerate(views)
                if key in view.peers
            ),
            key=lambda item: (item[0], item[1]),
            reverse=True,
        )
        best = ranked[0][2]
        # Only registries that answer now: a view kept from one we cannot
        # reach holds the peer's endpoint as it was (a rebinding since is no
        # second port).
        followed = [peer.endpoint for rank, _, peer in ranked if rank[0]]
        symmetric = symmetric_nat(followed)
        announced = next((peer for _, _, peer in ranked if peer.session is not None), None)
        if announced is not None and announced.symmetric_nat:
            # It says it is behind a symmetric NAT: each registry sees it at a
            # port of its own, and the freshest record alternates with its
            # keepalives to each.  The first followed registry's, so that its
            # endpoint does not "move" every few seconds (each move re-probes
            # it, which a public peer's handshake with it, through yet another
            # port, never survives).  Two ports without that word may be a
            # rebinding one hub saw first: the freshest is right then.
            best = max(ranked, key=lambda item: (item[0][0], item[1]))[2]
        if announced is not None and announced is not best:
            best = dataclasses.replace(
                best, **{name: getattr(announced, name) for name in ANNOUNCED_FIELDS}
            )
        if not best.symmetric_nat and symmetric:
            best = dataclasses.replace(best, symmetric_nat=True)
        merged.peers[key] = best
    return merged


def own_endpoint(views: Sequence[RegistryView], up: Sequence[bool | None]) -> Endpoint | None:
    """Our public endpoint as the first registry we follow now sees it (else as
    the first that ever told us): one registry's, so that it does not alternate
    between two registries that see different ports (a symmetric NAT)."""
    for view, following in zip(views, up, strict=True):
        if following is True and view.my_endpoint is not None:
            return view.my_endpoint
    return next((view.my_endpoint for view in views if view.my_endpoint is not None), None)


def symmetric_nat(endpoints: Sequence[Endpoint | None]) -> bool:
    """Whether registries that saw this host at one public address saw it at
    different ports: its NAT maps each destination to a port of its own (a
    symmetric NAT, `MASQUERADE --random-fully`), which no hole punching gets
    through from a peer behind another such NAT."""
    ports: dict[object, set[int]] = {}
    for endpoint in endpoints:
        if endpoint is not None:
            ports.setdefault(endpoint.host, set()).add(endpoint.port)
    return any(len(found) > 1 for found in ports.values())


# How long two registries must agree on this host's port before a symmetric NAT
# they proved is taken back, and how long they must disagree, once the client
# runs, before it is set (see SymmetricVerdict).
SYMMETRIC_CLEAR_AFTER = 300.0
SYMMETRIC_SET_AFTER = 30.0


@dataclass
class SymmetricVerdict:
    """Whether this host is behind a symmetric NAT, as its registries prove it.

    At the start (before the first plan) the first proof sets it at once: the
    registries have just seen our first handshakes.  Later a disagreement must
    last `set_after` s (a keepalive and a margin): a NAT rebinding shows one
    hub the new port up to a keepalive before the other.  It is cleared only
    after `clear_after` s in which they agree: a hub that has just come back
    can report this host at a stale port (the endpoint its device was
    configured or left with) until our next handshake with it, and clearing
    the verdict on that one agreeing answer would probe, for a moment, every
    pair that cannot work."""

    clear_after: float = SYMMETRIC_CLEAR_AFTER
    set_after: float = SYMMETRIC_SET_AFTER
    symmetric: bool = False
    agreeing_since: float | None = None
    disagreeing_since: float | None = None

    def update(self, proven: bool, now: float, starting: bool = False) -> bool:
        """Take what the registries say now (`starting`: before the first
        plan); whether the verdict changed."""
        if proven:
            self.agreeing_since = None
            if self.symmetric:
                return False
            if self.disagreeing_since is None:
                self.disagreeing_since = now
            if starting or now - self.disagreeing_since >= self.set_after:
                self.symmetric, self.disagreeing_since = True, None
                return True
            return False
        self.disagreeing_since = None
        if not self.symmetric:
            return False
        if self.agreeing_since is None:
            self.agreeing_since = now
        if now - self.agreeing_since < self.clear_after:
            return False
        self.symmetric, self.agreeing_since = False, None
        return True
