"""The registry's wire format, the one place both ends take it from.

The registry encodes (`encode_peer`, `encode_answer`, `encode_line`) and decodes
announcements (`parse_announcement`); the client encodes its announcement
(`encode_announcement`) and decodes answers (`parse_answer`, `StreamDecoder`).
Every limit and content type of the API is defined here once, so the two ends
cannot drift apart.  Decoding validates a document whole before any of it is
used: one malformed field and the whole document is refused with InvalidValue,
saying what was wrong.

An answer:

    {"epoch": "5f0c…", "version": 7, "full": true,
     "you": {"public_key": "…", "endpoint": "203.0.113.21:51820", "allowed_ips": [...]},
     "peers": [{"public_key", "endpoint", "allowed_ips", "lan_endpoints", "session",
                "last_handshake_age"[, "symmetric_nat"][, "mapped_endpoint"]
                [, "ipv6_endpoints"][, "punch_first"]}, ...],
     "removed": ["<public key>", ...]}

"mapped_endpoint" ("IP:PORT", the public endpoint the peer's gateway maps to its
listen port: NAT-PMP, PCP or UPnP IGD) is there only for a peer that announced
one, and an announcement carries it only when the client holds a mapping: a
registry or client that predates it never sees it (nor its bytes), and ignores
it where it does (a client ignores unknown fields of an answer; a client whose
announcement an older registry refuses for it announces again without it).

A stream (GET /v1/peers?stream=1) is newline-delimited JSON: the caller's own
answer first, then one shared line per change (the same document for every
caller, without "you"), and an empty line as a keep-alive.

Compatibility: "ipv6_endpoints" (global IPv6 addresses with the listen port)
and "mapped_endpoint" (a port its gateway mapped for it) came later.  Both are
optional in an announcement and written in a peer's record only when it has
them, and a peer's digest covers them only then: a client or registry from
before them sees the same documents and digests as before for every peer that
has neither (older clients ignore fields they do not know; an older registry
refuses an announcement carrying them, which the client then repeats without).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from wgnat._types import (
    Announcement,
    Endpoint,
    InvalidValue,
    IPNetwork,
    PublicKey,
    parse_network,
)

# -- limits and content types ---------------------------------------------------

MAX_PEERS = 100_000
MAX_ALLOWED_IPS = 256
MAX_LAN_ENDPOINTS = 8
MAX_IPV6_ENDPOINTS = 4
# The announcement fields an older registry does not know (it refuses them).
ANNOUNCEMENT_EXTENSIONS = ("symmetric_nat", "mapped_endpoint", "ipv6_endpoints", "punch_first")
ANNOUNCEMENT_FIELDS = frozenset({"session", "lan_endpoints", *ANNOUNCEMENT_EXTENSIONS})
# A request body (an announcement is well under 1 KiB).
MAX_BODY_BYTES = 16 * 1024
# An answer or one line of a stream, as the client reads it (~200 B a peer).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
MAX_EPOCH_CHARS = 32
MAX_SESSION_CHARS = 32
JSON_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/x-ndjson"
KEEPALIVE_LINE = b"\n"

# -- what a client reads --------------------------------------------------------


@dataclass(frozen=True)
class RemotePeer:
    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    lan_endpoints: tuple[Endpoint, ...] = ()
    # None until a wgnat client runs there (it announces itself): such a peer
    # would not punch back, so probing it is pointless.
    session: str | None = None
    # How long before the registry encoded this record it last saw a handshake
    # from the peer ("last_handshake_age"): a client following several
    # registries takes the freshest record (client.merge).  Not compared: it
    # ages by itself, and a view must not "change" because of it.
    handshake_age: float | None = dataclasses.field(default=None, compare=False)
    # It announced that its NAT maps each destination to a port of its own
    # (two registries saw it so): no direct path with another such peer.
    symmetric_nat: bool = False
    # The public endpoint its gateway maps to its listen port (port mapping).
    mapped_endpoint: Endpoint | None = None
    ipv6_endpoints: tuple[Endpoint, ...] = ()
    punch_first: bool = False


@dataclass(frozen=True)
class Answer:
    epoch: str
    version: int
    full: bool
    my_endpoint: Endpoint | None
    peers: tuple[RemotePeer, ...]
    removed: tuple[PublicKey, ...]


def reachable_from_elsewhere(endpoint: Endpoint) -> bool:
    """Whether another host could send to `endpoint`: not loopback, link-local,
    multicast or unspecified, also when written as IPv4-mapped IPv6
    (`[::ffff:127.0.0.1]`, which Python's `is_loopback` does not see through)."""
    host = endpoint.host
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return not (host.is_loopback or host.is_link_local or host.is_multicast or host.is_unspecified)


# Unique local (fc00::/7) and the deprecated site-local (fec0::/10) addresses
# route only inside one site: a peer elsewhere cannot reach them.
_SITE_ONLY = (ipaddress.IPv6Network("fc00::/7"), ipaddress.IPv6Network("fec0::/10"))


def global_ipv6(endpoint: Endpoint) -> bool:
    """Whether `endpoint` is an IPv6 address a peer on another site could reach
    with no NAT between: IPv6 proper (not IPv4-mapped or -compatible), reachable
    from another host, not unique-local or site-local.  Not `is_global`, which
    refuses the documentation range 2001:db8::/32 that tests and testbeds use
    as their IPv6 internet (as they use 198.51.100.0/24 for IPv4)."""
    host = endpoint.host
    return (
        isinstance(host, ipaddress.IPv6Address)
        and host.ipv4_mapped is None
        and int(host) >> 32 != 0  # ::a.b.c.d (IPv4-compatible) and ::1
        and reachable_from_elsewhere(endpoint)
        and not any(host in network for network in _SITE_ONLY)
    )


# -- the digest of a view (GET /v1/check) ------------------------------------------


def peer_digest(
    public_key: PublicKey,
    endpoint: Endpoint | None,
    allowed_ips: Iterable[IPNetwork],
    lan_endpoints: Iterable[Endpoint],
    session: str | None,
    symmetric_nat: bool = False,
    mapped_endpoint: Endpoint | None = None,
    ipv6_endpoints: Iterable[Endpoint] = (),
    punch_first: bool = False,
) -> int:
    """64 bits that change with anything of a peer a client acts on.  Views
    combine their peers' digests with XOR, which the registry keeps up to date
    in O(1) per change and adjusts per caller in O(1).  The later fields count
    only when present, so a peer without them digests as it did before them."""
    text = "|".join(
        (
            public_key.base64,
            str(endpoint) if endpoint is not None else "",
            ",".join(sorted(str(network) for network in allowed_ips)),
            ",".join(str(lan) for lan in lan_endpoints),
            session or "",
        )
    )
    if symmetric_nat:  # only then: digests of peers without it stay as they were
        text += "|symmetric"
    if mapped_endpoint is not None:
        text += f"|mapped {mapped_endpoint}"
    ipv6 = ",".join(str(ep) for ep in ipv6_endpoints)
    if ipv6:
        text += "|ipv6=" + ipv6
    if punch_first:
        text += "|punch_first"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def own_endpoint_digest(endpoint: Endpoint | None) -> int:
    text = "you|" + (str(endpoint) if endpoint is not None else "")
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def format_digest(value: int) -> str:
    return f"{value:016x}"


def view_digest(peers: Iterable[RemotePeer], my_endpoint: Endpoint | None) -> str:
    """The digest of a client's view: what it holds of every other peer, and
    its own public endpoint."""
    total = own_endpoint_digest(my_endpoint)
    for peer in peers:
        total ^= peer_digest(
            peer.public_key,
            peer.endpoint,
            peer.allowed_ips,
            peer.lan_endpoints,
            peer.session,
            symmetric_nat=peer.symmetric_nat,
            mapped_endpoint=peer.mapped_endpoint,
            ipv6_endpoints=peer.ipv6_endpoints,
            punch_first=peer.punch_first,
        )
    return format_digest(total)


DIGEST_CHARS = 16


# -- encoding -------------------------------------------------------------------


def encode_peer(
    public_key: PublicKey,
    endpoint: Endpoint | None,
    allowed_ips: Iterable[IPNetwork],
    announcement: Announcement | None,
    handshake_age: float | None,
) -> dict[str, Any]:
    document = {
        "public_key": public_key.base64,
        "endpoint": str(endpoint) if endpoint else None,
        "allowed_ips": [str(net) for net in allowed_ips],
        "lan_endpoints": ([str(ep) for ep in announcement.lan_endpoints] if announcement else []),
        "session": announcement.session if announcement else None,
        "last_handshake_age": None if handshake_age is None else round(handshake_age, 3),
    }
    if announcement is not None and announcement.symmetric_nat:
        document["symmetric_nat"] = True  # only then: older clients never see it
    if announcement is not None and announcement.ipv6_endpoints:
        document["ipv6_endpoints"] = [str(ep) for ep in announcement.ipv6_endpoints]
    if announcement is not None and announcement.mapped_endpoint is not None:
        document["mapped_endpoint"] = str(announcement.mapped_endpoint)
    if announcement is not None and announcement.punch_first:
        document["punch_first"] = True
    return document


def encode_you(
    public_key: PublicKey, endpoint: Endpoint | None, allowed_ips: Iterable[IPNetwork]
) -> dict[str, Any]:
    return {
        "public_key": public_key.base64,
        "endpoint": str(endpoint) if endpoint else None,
        "allowed_ips": [str(net) for net in allowed_ips],
    }


def encode_answer(
    epoch: str,
    version: int,
    full: bool,
    peers: list[dict[str, Any]],
    removed: Iterable[PublicKey],
    you: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A caller's answer (`you` given) or a stream's shared line (no `you`)."""
    document: dict[str, Any] = {"epoch": epoch, "version": version, "full": full}
    if you is not None:
        document["you"] = you
    document["peers"] = peers
    document["removed"] = [key.base64 for key in removed]
    return document


def encode_full_answer(
    epoch: str, version: int, peers_json: bytes, you: dict[str, Any] | None = None
) -> list[bytes]:
    """A full answer (no newline), in three parts around `peers_json`, the JSON
    array of every peer already encoded: the same bytes for every caller at one
    version, so the registry encodes them once per version however many callers
    ask, and writes them without copying."""
    head: dict[str, Any] = {"epoch": epoch, "version": version, "full": True}
    if you is not None:
        head["you"] = you
    opening = json.dumps(head, separators=(",", ":")).encode("utf-8")[:-1]
    return [opening + b',"peers":', peers_json, b',"removed":[]}']


def encode_line(document: Mapping[str, Any]) -> bytes:
    """One line of a stream: compact JSON (never a newline inside) and a newline."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n"


def encode_body(document: Mapping[str, Any] | list[Any]) -> bytes:
    """A whole JSON answer or request body (or a full answer's list of peers)."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def encode_announcement(announcement: Announcement) -> dict[str, Any]:
    """The body of POST /v1/announce; the later fields only when set, so that
    an older registry (which refuses fields it does not know) accepts it."""
    document: dict[str, Any] = {
        "session": announcement.session,
        "lan_endpoints": [str(endpoint) for endpoint in announcement.lan_endpoints],
    }
    if announcement.symmetric_nat:
        document["symmetric_nat"] = True
    if announcement.ipv6_endpoints:
        document["ipv6_endpoints"] = [str(endpoint) for endpoint in announcement.ipv6_endpoints]
    if announcement.mapped_endpoint is not None:
        document["mapped_endpoint"] = str(announcement.mapped_endpoint)
    if announcement.punch_first:
        document["punch_first"] = True
    return document


def without_extensions(announcement: Announcement) -> Announcement:
    """What a registry older than every optional field accepts of
    `announcement`: its session and LAN endpoints."""
    return Announcement(announcement.session, announcement.lan_endpoints)


# -- decoding -------------------------------------------------------------------


def decode_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: deeply nested arrays ("[[[[..."), which json refuses so.
        raise InvalidValue(f"{what} is not JSON") from None


def parse_announcement(document: Any) -> Announcement:
    """POST /v1/announce's body, decoded: at most MAX_LAN_ENDPOINTS LAN
    endpoints, each reachable from another host, duplicates dropped; at most
    MAX_IPV6_ENDPOINTS global IPv6 endpoints (`global_ipv6`); an optional
    mapped endpoint reachable from another host; two optional flags."""
    known = {"lan_endpoints", "session", *ANNOUNCEMENT_EXTENSIONS}
    if not isinstance(document, dict) or set(document) - known:
        raise InvalidValue(
            'expected {"session": "HEX", "lan_endpoints": ["IP:PORT", ...], '
            '"symmetric_nat": false, "ipv6_endpoints": ["[IPV6]:PORT", ...], '
            '"mapped_endpoint": "IP:PORT", "punch_first": false} (all but the first two '
            "optional)"
        )
    symmetric = document.get("symmetric_nat", False)
    if not isinstance(symmetric, bool):
        raise InvalidValue("symmetric_nat must be true or false")
    items = document.get("lan_endpoints", [])
    if not isinstance(items, list) or len(items) > MAX_LAN_ENDPOINTS:
        raise InvalidValue(f"lan_endpoints must be a list of at most {MAX_LAN_ENDPOINTS} 'IP:PORT'")
    endpoints: list[Endpoint] = []
    for item in items:
        try:
            endpoint = Endpoint.parse(item)
        except InvalidValue as exc:
            raise InvalidValue(f"lan_endpoints: {exc}") from None
        if not reachable_from_elsewhere(endpoint):
            raise InvalidValue(f"lan_endpoints: {endpoint} is not reachable from another host")
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    ipv6 = ipv6_endpoints_of(document.get("ipv6_endpoints", []), "ipv6_endpoints")
    mapped = _optional_endpoint(document.get("mapped_endpoint"), "mapped_endpoint")
    if mapped is not None and not reachable_from_elsewhere(mapped):
        raise InvalidValue(f"mapped_endpoint: {mapped} is not reachable from another host")
    punch_first = _flag(document, "punch_first", "announcement")
    try:
        return Announcement(
            document.get("session"),  # type: ignore[arg-type]
            tuple(endpoints),
            symmetric_nat=symmetric,
            mapped_endpoint=mapped,
            ipv6_endpoints=ipv6,
            punch_first=punch_first,
        )
    except InvalidValue as exc:
        raise InvalidValue(f"session: {exc}") from None


def _flag(document: Mapping[str, Any], name: str, where: str) -> bool:
    value = document.get(name, False)
    if not isinstance(value, bool):
        raise InvalidValue(f"{where}: {name!r} is not true or false")
    return value


def ipv6_endpoints_of(items: Any, where: str, strict: bool = True) -> tuple[Endpoint, ...]:
    """A list of at most MAX_IPV6_ENDPOINTS global IPv6 endpoints, duplicates
    dropped.  Not `strict` (a registry's answer, its state file): entries that
    are not such an endpoint, and those past the limit, are left out, so that
    one odd candidate (a later registry's rules, a hand-edited file) never
    costs the whole answer."""
    if not isinstance(items, list) or (strict and len(items) > MAX_IPV6_ENDPOINTS):
        raise InvalidValue(f"{where} must be a list of at most {MAX_IPV6_ENDPOINTS} '[IPV6]:PORT'")
    endpoints: list[Endpoint] = []
    for item in items:
        try:
            endpoint = _optional_endpoint(item, where)
        except InvalidValue:
            if strict:
                raise
            continue
        if endpoint is None or not global_ipv6(endpoint):
            if not strict:
                continue
            raise InvalidValue(
                f"{where}: {item if endpoint is None else endpoint} is not a global IPv6 "
                "endpoint (IPv6 reachable from another site: not link-local, unique-local, "
                "loopback or IPv4-mapped)"
            )
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    return tuple(endpoints[:MAX_IPV6_ENDPOINTS])


def _list(document: Mapping[str, Any], name: str, limit: int, where: str) -> list[Any]:
    value = document.get(name, [])
    if not isinstance(value, list):
        raise InvalidValue(f"{where}: {name!r} is not a list")
    if len(value) > limit:
        raise InvalidValue(f"{where}: {name!r} has {len(value)} entries, more than {limit}")
    return value


def _optional_endpoint(value: Any, where: str) -> Endpoint | None:
    if value is None:
        return None
    try:
        return Endpoint.parse(value)
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None


def _peer(document: Any, index: int) -> RemotePeer:
    where = f"peers[{index}]"
    if not isinstance(document, dict):
        raise InvalidValue(f"{where} is not an object")
    try:
        key = PublicKey.from_base64(document.get("public_key"))
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None
    allowed = []
    for item in _list(document, "allowed_ips", MAX_ALLOWED_IPS, where):
        try:
            allowed.append(parse_network(item))
        except InvalidValue as exc:
            raise InvalidValue(f"{where}: {exc}") from None
    lan = tuple(
        endpoint
        for item in _list(document, "lan_endpoints", MAX_LAN_ENDPOINTS, where)
        if (endpoint := _optional_endpoint(item, where)) is not None
    )
    session = document.get("session")
    if session is not None and (
        not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_CHARS
    ):
        raise InvalidValue(f"{where}: 'session' is not a short string")
    age = document.get("last_handshake_age")
    if age is not None and (
        not isinstance(age, int | float) or isinstance(age, bool) or not 0 <= age < 1e10
    ):
        raise InvalidValue(f"{where}: 'last_handshake_age' is not a number of seconds")
    symmetric = document.get("symmetric_nat", False)
    if not isinstance(symmetric, bool):
        raise InvalidValue(f"{where}: 'symmetric_nat' is not true or false")
    ipv6 = ipv6_endpoints_of(
        document.get("ipv6_endpoints", []), f"{where}: ipv6_endpoints", strict=False
    )
    return RemotePeer(
        key,
        _optional_endpoint(document.get("endpoint"), where),
        tuple(allowed),
        lan,
        session,
        handshake_age=None if age is None else float(age),
        symmetric_nat=symmetric,
        mapped_endpoint=_optional_endpoint(
            document.get("mapped_endpoint"), f"{where}: mapped_endpoint"
        ),
        ipv6_endpoints=ipv6,
        punch_first=_flag(document, "punch_first", where),
    )


def parse_answer(document: Any) -> Answer:
    if not isinstance(document, dict):
        raise InvalidValue("the registry's answer is not a JSON object")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidValue("the registry's answer has no valid 'version'")
    epoch = document.get("epoch")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_CHARS:
        raise InvalidValue("the registry's answer has no valid 'epoch'")
    full = document.get("full")
    if not isinstance(full, bool):
        raise InvalidValue("the registry's answer has no valid 'full'")
    you = document.get("you") or {}
    if not isinstance(you, dict):
        raise InvalidValue("the registry's answer: 'you' is not an object")
    my_endpoint = _optional_endpoint(you.get("endpoint"), "you")
    peers = tuple(
        _peer(item, index)
        for index, item in enumerate(_list(document, "peers", MAX_PEERS, "answer"))
    )
    removed = []
    for item in _list(document, "removed", MAX_PEERS, "answer"):
        try:
            removed.append(PublicKey.from_base64(item))
        except InvalidValue as exc:
            raise InvalidValue(f"removed: {exc}") from None
    keys = [peer.public_key for peer in peers]
    if len(set(keys)) != len(keys):
        raise InvalidValue("the registry's answer lists a peer twice")
    return Answer(epoch, version, full, my_endpoint, peers, tuple(removed))


def parse_own_answer(document: Any) -> Answer | None:
    """A single answer to this peer (GET /v1/check): None for {"current": true};
    otherwise the answer with this peer's own record taken out (a full answer
    lists the caller too), as a stream's decoder does."""
    if isinstance(document, dict) and document.get("current") is True:
        return None
    decoder = StreamDecoder()
    answer = decoder.decode(json.dumps(document).encode("utf-8"))
    if answer is None:
        raise InvalidValue("the registry's answer is empty")
    return answer


class StreamDecoder:
    """The lines of a stream (GET /v1/peers?stream=1) as answers.

    The first line is the caller's own answer, naming it in "you".  Every later
    line is shared by all callers at that version, so it has no "you" and may list
    the caller itself: that record is taken out here, and its endpoint is our own
    public endpoint (unchanged when the line does not list us).  An empty line is
    a keep-alive (None).  A stream never changes epoch nor goes back in version.
    """

    def __init__(self, max_line_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.me: PublicKey | None = None
        self.epoch: str | None = None
        self.version: int | None = None
        self.my_endpoint: Endpoint | None = None
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def partial(self) -> bool:
        """A line has begun and not ended."""
        return self._size > 0

    def feed(self, data: bytes) -> Iterator[Answer | None]:
        """The lines `data` completes, decoded one by one: the answers before a
        bad line are given before its InvalidValue."""
        while data:
            cut = data.find(b"\n")
            piece = data if cut < 0 else data[:cut]
            self._size += len(piece)
            if self._size > self.max_line_bytes:
                raise InvalidValue(
                    f"a line of the registry's stream is over {self.max_line_bytes} bytes"
                )
            if cut < 0:
                self._parts.append(piece)
                break
            line = b"".join(self._parts) + piece if self._parts else piece
            self._parts, self._size = [], 0
            data = data[cut + 1 :]
            yield self.decode(line)

    def decode(self, line: bytes) -> Answer | None:
        if not line.strip():
            return None
        document = decode_json(line, "a line of the registry's stream")
        answer = parse_answer(document)
        if self.me is None:
            you = document.get("you")
            try:
                self.me = PublicKey.from_base64(
                    you.get("public_key") if isinstance(you, dict) else None
                )
            except InvalidValue:
                raise InvalidValue(
                    "the first answer of the registry's stream does not name this peer in 'you'"
                ) from None
        else:
            if answer.epoch != self.epoch:
                raise InvalidValue(
                    f"the registry's stream changed epoch from {self.epoch} to {answer.epoch}"
                )
            if self.version is not None and answer.version < self.version:
                raise InvalidValue(
                    f"the registry's stream went back from version {self.version} to "
                    f"{answer.version}"
                )
        answer = self._without_me(answer, "you" in document)
        self.epoch, self.version, self.my_endpoint = (
            answer.epoch,
            answer.version,
            answer.my_endpoint,
        )
        return answer

    def _without_me(self, answer: Answer, names_me: bool) -> Answer:
        """Our own record taken out of any line (a shared one lists us; no other
        should); a line without "you" gives our endpoint through that record."""
        mine = [peer for peer in answer.peers if peer.public_key == self.me]
        if names_me:
            my_endpoint = answer.my_endpoint
        else:
            my_endpoint = mine[0].endpoint if mine else self.my_endpoint
        return dataclasses.replace(
            answer,
            my_endpoint=my_endpoint,
            peers=tuple(peer for peer in answer.peers if peer.public_key != self.me),
            removed=tuple(key for key in answer.removed if key != self.me),
        )
