"""Fakes that ship with the product (as treq ships StubTreq): an in-memory
registry connection that runs the registry's real request logic (`Registry`)
without sockets, for tests, simulations and benchmarks of the client."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail

from wgnat._types import Announcement, InvalidValue, IPAddress
from wgnat.client.registry_client import MAX_ANSWER_BYTES, RegistryError, RegistryStream
from wgnat.client.view import Answer, StreamDecoder, parse_answer
from wgnat.registry.hub import Registry


class MemoryRegistryClient:
    """Same interface as client.registry_client.RegistryClient; the caller is
    identified by `address` exactly as the API identifies a source address."""

    def __init__(self, hub: Registry, address: IPAddress, streams: bool = True) -> None:
        self.hub = hub
        self.address = address
        self.streams_supported = streams  # False: a registry of before streams (long polls)
        self._down: str | None = None
        self.fetches = 0
        self.announced: list[Announcement] = []
        self.streams: list[RegistryStream] = []  # open ones

    @property
    def down(self) -> str | None:
        """Set to a message to simulate an unreachable registry: every request
        fails with it, and open streams are cut."""
        return self._down

    @down.setter
    def down(self, message: str | None) -> None:
        self._down = message
        if message is not None:
            for stream in list(self.streams):
                stream.fail(RegistryError(message))
                stream.close()

    def _caller(self) -> Deferred[Any]:
        if self.down is not None:
            return fail(RegistryError(self.down))

        def known(caller: Any) -> Any:
            if caller is None:
                raise RegistryError(
                    f"the registry refused the request: HTTP 403: {self.address} "
                    "is not the tunnel address of any peer"
                )
            return caller

        return self.hub.identify(self.address).addCallback(known)

    def fetch(self, since: int | None, epoch: str | None, wait: float) -> Deferred[Answer]:
        self.fetches += 1
        if since is None or epoch is None:
            since, epoch, wait = None, None, 0.0

        def ask(caller: Any) -> Deferred[Any]:
            return self.hub.answer(caller, since, epoch, wait)

        def decode(document: dict[str, Any]) -> Answer:
            if self.down is not None:
                raise RegistryError(self.down)
            try:  # the same JSON round trip the wire makes
                return parse_answer(json.loads(json.dumps(document)))
            except InvalidValue as exc:
                raise RegistryError(f"refused the registry's answer: {exc}") from None

        return self._caller().addCallback(ask).addCallback(decode)

    def follow(self, since: int | None, epoch: str | None, wait: float) -> RegistryStream:
        """A stream from the hub: its lines go through the same decoding as the
        wire's (StreamDecoder), keep-alives included.  From a registry without
        streams: one answer (a long poll of `wait`), then the stream ends."""
        if not self.streams_supported:
            single = RegistryStream()
            asking = self.fetch(since, epoch, wait)
            asking.addCallbacks(
                lambda answer: (single.put(answer), single.end()),
                lambda failure: single.fail(failure.value),
            )
            single.on_close = asking.cancel
            return single
        self.fetches += 1
        if since is None or epoch is None:
            since, epoch = None, None
        stream = RegistryStream()
        decoder = StreamDecoder(MAX_ANSWER_BYTES)
        subscription: list[Any] = []

        def receive(line: bytes) -> None:
            try:
                for answer in decoder.feed(line):
                    stream.put(answer)
            except InvalidValue as exc:
                stream.fail(RegistryError(f"refused the registry's answer: {exc}"))
                stream.close()

        def opened(hub_stream: Any) -> None:
            if stream in self.streams:
                subscription.append(hub_stream)
            else:  # closed while opening
                self.hub.close_stream(hub_stream)

        def closed() -> None:
            if stream in self.streams:
                self.streams.remove(stream)
            for hub_stream in subscription:
                self.hub.close_stream(hub_stream)

        stream.on_close = closed
        self.streams.append(stream)
        opening = self._caller().addCallback(
            lambda caller: self.hub.open_stream(caller, since, epoch, receive)
        )
        opening.addCallback(opened)
        opening.addErrback(lambda failure: (stream.fail(failure.value), stream.close()))
        return stream

    def announce(self, announcement: Announcement) -> Deferred[Any]:
        self.announced.append(announcement)
        return self._caller().addCallback(lambda caller: self.hub.announce(caller, announcement))

    def close(self) -> Deferred[None]:
        from twisted.internet.defer import succeed

        return succeed(None)
