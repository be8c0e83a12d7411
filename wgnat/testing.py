"""Fakes that ship with the product (as treq ships StubTreq): an in-memory
registry connection that runs the registry's real request logic (`Registry`)
without sockets, for tests, simulations and benchmarks of the client."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail

from wgnat._types import Announcement, InvalidValue, IPAddress
from wgnat.client.registry_client import RegistryError
from wgnat.client.view import Answer, parse_answer
from wgnat.registry.hub import Registry


class MemoryRegistryClient:
    """Same interface as client.registry_client.RegistryClient; the caller is
    identified by `address` exactly as the API identifies a source address."""

    def __init__(self, hub: Registry, address: IPAddress) -> None:
        self.hub = hub
        self.address = address
        self.down: str | None = None  # set to simulate an unreachable registry
        self.fetches = 0
        self.announced: list[Announcement] = []

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

    def announce(self, announcement: Announcement) -> Deferred[Any]:
        self.announced.append(announcement)
        return self._caller().addCallback(lambda caller: self.hub.announce(caller, announcement))

    def close(self) -> Deferred[None]:
        from twisted.internet.defer import succeed

        return succeed(None)
