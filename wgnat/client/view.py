"""The client's copy of the registry's view, and validation of every answer.

An answer is checked whole before any of it is used: one malformed field and the
answer is refused (the mesh stays as it is) with a message saying what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from wgnat._types import Endpoint, InvalidValue, IPNetwork, PublicKey, parse_network

MAX_PEERS = 100_000
MAX_ALLOWED_IPS = 256
MAX_LAN_ENDPOINTS = 8


@dataclass(frozen=True)
class RemotePeer:
    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    lan_endpoints: tuple[Endpoint, ...] = ()
    # None until a wgnat client runs there (it announces itself): such a peer
    # would not punch back, so probing it is pointless.
    session: str | None = None


@dataclass(frozen=True)
class Answer:
    epoch: str
    version: int
    full: bool
    my_endpoint: Endpoint | None
    peers: tuple[RemotePeer, ...]
    removed: tuple[PublicKey, ...]


def _list(document: dict[str, Any], name: str, limit: int, where: str) -> list[Any]:
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
    if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 32):
        raise InvalidValue(f"{where}: 'session' is not a short string")
    return RemotePeer(
        key, _optional_endpoint(document.get("endpoint"), where), tuple(allowed), lan, session
    )


def parse_answer(document: Any) -> Answer:
    if not isinstance(document, dict):
        raise InvalidValue("the registry's answer is not a JSON object")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidValue("the registry's answer has no valid 'version'")
    epoch = document.get("epoch")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 32:
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


class StreamDecoder:
    """The lines of a stream (GET /v1/peers?stream=1) as answers.

    The first line is the caller's own answer, naming it in "you".  Every later
    line is shared by all callers at that version, so it has no "you" and may list
    the caller itself: that record is taken out here, and its endpoint is our own
    public endpoint (unchanged when the line does not list us).  An empty line is
    a keep-alive (None).  A stream never changes epoch nor goes back in version.
    """

    def __init__(self, max_line_bytes: int) -> None:
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
        try:
            document = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise InvalidValue("a line of the registry's stream is not JSON") from None
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


@dataclass
class RegistryView:
    """The mesh as the registry last described it, built from full answers and deltas."""

    epoch: str | None = None
    version: int | None = None
    my_endpoint: Endpoint | None = None
    peers: dict[PublicKey, RemotePeer] = field(default_factory=dict)

    def apply(self, answer: Answer) -> bool:
        """Merge an answer; return whether anything the mesh depends on changed."""
        before = (self.my_endpoint, dict(self.peers))
        if answer.full:
            self.peers = {peer.public_key: peer for peer in answer.peers}
        else:
            for key in answer.removed:
                self.peers.pop(key, None)
            for peer in answer.peers:
                self.peers[peer.public_key] = peer
        self.epoch = answer.epoch
        self.version = answer.version
        self.my_endpoint = answer.my_endpoint
        return before != (self.my_endpoint, self.peers)
