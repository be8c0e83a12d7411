"""Where to reach a peer directly, in the order to try: pure, no I/O.

`candidates(remote, mine)` lists a peer's endpoints worth a direct attempt,
best first, each with its kind and the reason it is on the list:

1. "lan": its LAN endpoint, when our public IPv4 addresses are the same (one
   NAT in front of both; Linux NATs do not hairpin, so its public endpoint
   would not work);
2. "ipv6": its global IPv6 endpoint, when both ends have one (no NAT between;
   a stateful IPv6 firewall still needs both ends to send at once, which the
   probe does);
3. "mapped": the port its gateway mapped for it (NAT-PMP, PCP, UPnP IGD), when
   it announced one;
4. "observed": its public endpoint as the registry sees it (the NAT mapping its
   keepalives to the hub hold open, hole-punched by both ends probing at once).

Both ends of a pair compute their lists from the same facts (the registry's
view and their own announcements), so they try the same kind at the same
moment: the reconciliation (reconcile.py) probes the first, and moves to the
next when no handshake comes within the probe timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

from wgnat._types import Endpoint, IPNetwork
from wgnat.wire import RemotePeer, global_ipv6, reachable_from_elsewhere

# Every kind of candidate, best first (the order of the list).
KINDS = ("lan", "ipv6", "mapped", "observed")
KIND_NAMES = {
    "lan": "LAN",
    "ipv6": "IPv6",
    "mapped": "mapped port",
    "observed": "observed IPv4 endpoint",
}


@dataclass(frozen=True)
class Candidate:
    endpoint: Endpoint
    kind: str  # one of KINDS
    reason: str

    def __str__(self) -> str:
        return f"{KIND_NAMES.get(self.kind, self.kind)} {self.endpoint}"


@dataclass(frozen=True)
class Mine:
    """What this end knows of itself: its public endpoint as the registry sees
    it, the global IPv6 endpoints it announced, its LAN networks, whether
    IPv6 candidates are used at all (`--no-ipv6`), and the port its gateway
    mapped for it, as announced."""

    public_endpoint: Endpoint | None = None
    ipv6_endpoints: tuple[Endpoint, ...] = ()
    lan_networks: tuple[IPNetwork, ...] = ()
    use_ipv6: bool = True
    mapped_endpoint: Endpoint | None = None


def candidates(remote: RemotePeer, mine: Mine) -> list[Candidate]:
    """The endpoints to try for `remote`, best first, without duplicates."""
    found: list[Candidate] = []

    def add(endpoint: Endpoint | None, kind: str, reason: str) -> None:
        if endpoint is not None and all(c.endpoint != endpoint for c in found):
            found.append(Candidate(endpoint, kind, reason))

    # Only endpoints the registry itself would accept: a registry that serves
    # ::ffff:127.0.0.1 must not aim our handshakes at this host's own services.
    lan = [ep for ep in remote.lan_endpoints if reachable_from_elsewhere(ep)]
    public = remote.endpoint
    if (
        lan
        and public is not None
        and mine.public_endpoint is not None
        and public.host == mine.public_endpoint.host
    ):
        ours = [ep for ep in lan if any(ep.host in network for network in mine.lan_networks)]
        add(
            (ours or lan)[0],
            "lan",
            f"same public address {public.host} as ours: one NAT in front of both, "
            "which does not hairpin",
        )
    if mine.use_ipv6 and mine.ipv6_endpoints:
        theirs = [ep for ep in remote.ipv6_endpoints if global_ipv6(ep)]
        if theirs:
            add(theirs[0], "ipv6", "both ends have global IPv6, no NAT between")
    mapped = remote.mapped_endpoint
    if mapped is not None and reachable_from_elsewhere(mapped):
        add(mapped, "mapped", "its gateway mapped a port for it")
    add(public, "observed", "its public endpoint as the registry sees it, hole-punched")
    return found


def through_symmetric_nats(
    found: list[Candidate], remote: RemotePeer, mine: Mine
) -> list[Candidate]:
    """The candidates worth trying when both ends are behind symmetric NATs.

    No hole punching gets through two of them, so the observed endpoints are
    dropped; a LAN, IPv6 or a mapped port goes through no NAT mapping at all.
    One case is asymmetric: when only this end holds a mapped port, the peer
    has a candidate for us (that port) while we have none for it.  Its
    handshake reaches us through our gateway, and WireGuard takes the address
    it came from as the endpoint; we still have to take part (add it, probe),
    so its observed endpoint stays, with why.  Our probes there are dropped by
    its NAT, harmlessly."""
    usable = [c for c in found if c.kind != "observed"]
    if usable or mine.mapped_endpoint is None or remote.endpoint is None:
        return usable
    return [
        Candidate(
            remote.endpoint,
            "observed",
            f"its NAT is symmetric too, but it reaches our mapped port {mine.mapped_endpoint}: "
            "its handshake sets where it is",
        )
    ]


def describe_choice(candidate: Candidate) -> str:
    """`IPv6 [2001:db8::5]:51820 (both ends have global IPv6, no NAT between)`."""
    return f"{candidate} ({candidate.reason})"
