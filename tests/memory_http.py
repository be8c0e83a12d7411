"""HTTP between Twisted's real client (Agent) and a real twisted.web Site, in
memory and on one MemoryReactorClock: no socket, no sleeping.

Every connection the client side makes (reactor.connectTCP, recorded by the
MemoryReactor) is joined to a protocol of the site by twisted.test.iosim's
in-memory transports, the client's bind address as the source address the
server sees.  `pump()` moves bytes both ways until nothing moves; `advance(s)`
moves the clock (timeouts, keep-alives) and pumps again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers


class _CountingTransport(iosim.FakeTransport):  # type: ignore[misc]
    """An in-memory transport that adds what its end writes to a tally: the
    bytes a request and its answer cost on the wire."""

    def __init__(self, tally: dict[str, int], side: str, *args: Any) -> None:
        super().__init__(*args)
        self.tally, self.side = tally, side

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            self.tally[self.side] += len(data)
        super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))


class MemoryHTTP:
    def __init__(self, reactor: MemoryReactorClock | None = None) -> None:
        self.reactor = reactor or MemoryReactorClock()
        self.sites: dict[tuple[str, int], Any] = {}
        self._joined = 0
        self._pumps: list[iosim.IOPump] = []
        self._next_port = 40000
        self.refused = 0
        # Bytes written by every client end and every server end so far.
        self.wire = {"client": 0, "server": 0}

    def serve(self, site: Any, host: str = "127.0.0.1", port: int = 51820) -> None:
        self.sites[(host, port)] = site

    def _join_new_connections(self) -> None:
        while self._joined < len(self.reactor.tcpClients):
            host, port, factory, _timeout, bind = self.reactor.tcpClients[self._joined]
            self._joined += 1
            self._next_port += 1
            source = IPv4Address("TCP", bind[0] if bind else "127.0.0.1", self._next_port)
            target = IPv4Address("TCP", host, port)
            site = self.sites.get((host, port))
            client = factory.buildProtocol(target)
            client_transport = _CountingTransport(
                self.wire, "client", client, False, source, target
            )
            if site is None:
                from twisted.internet.error import ConnectionRefusedError

                factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
                continue
            server = site.buildProtocol(source)
            if server is None:  # the listener closed it unread (over a limit)
                from twisted.internet.error import ConnectionDone

                self.refused += 1
                client.makeConnection(client_transport)
                client.connectionLost(Failure(ConnectionDone()))
                continue
            server_transport = _CountingTransport(self.wire, "server", server, True, target, source)
            self._pumps.append(
                iosim.connect(server, server_transport, client, client_transport, greet=False)
            )

    def pump(self) -> None:
        for _ in range(1000):
            self.reactor.advance(0)  # calls due now (a body producer's steps)
            self._join_new_connections()
            moved = False
            for pump in list(self._pumps):
                moved = pump.pump() or moved
            now = self.reactor.seconds()
            due = any(call.getTime() <= now for call in self.reactor.getDelayedCalls())
            if not moved and not due and self._joined == len(self.reactor.tcpClients):
                return
        raise AssertionError("the connections never went quiet")

    def advance(self, seconds: float) -> None:
        self.pump()
        self.reactor.advance(seconds)
        self.pump()

    def result(self, deferred: Deferred[Any], within: float = 0.0) -> Any:
        """Pump until `deferred` fires, letting at most `within` seconds pass
        on the clock (in 0.1 s steps); its result (a Failure is raised)."""
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        self.pump()
        waited = 0.0
        while not outcome and waited < within:
            self.advance(0.1)
            waited += 0.1
        assert outcome, "no answer after the connections went quiet"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def request(
        self,
        method: bytes,
        url: str,
        body: bytes | None = None,
        source: str = "127.0.0.2",
    ) -> Deferred[tuple[int, bytes]]:
        """One plain request (a new connection from `source`): (code, body)."""
        from io import BytesIO

        from twisted.internet.task import Cooperator
        from twisted.web.client import FileBodyProducer

        agent = Agent(self.reactor, bindAddress=(source, 0))
        cooperator = Cooperator(scheduler=lambda step: self.reactor.callLater(0, step))
        producer = FileBodyProducer(BytesIO(body), cooperator=cooperator) if body else None
        answer = agent.request(method, url.encode(), Headers(), producer)

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            return readBody(response).addCallback(lambda text: (response.code, text))

        return answer.addCallback(read)


class TwoPeerRegistry:
    """A registry (Registry over a MemoryDevice) with two live peers, a at
    127.0.0.2 and b at 127.0.0.3, its API served in memory at 127.0.0.1:51820,
    behind the daemon's connection limits when `limits` is given."""

    def __init__(self, limits: Any = None) -> None:
        from tests.helpers import new_key, peer
        from wgnat.device.memory import MemoryDevice
        from wgnat.limits import LimitedFactory
        from wgnat.registry.api import build_site
        from wgnat.registry.hub import Registry

        self.http = MemoryHTTP()
        self.http.reactor.advance(1_700_000_000)
        self.a, self.b = new_key(), new_key()
        self.device = MemoryDevice(public_key=new_key())
        now = self.http.reactor.seconds()
        self.device.add_peer(peer(self.a, "203.0.113.21:51820", ("127.0.0.2/32",), now))
        self.device.add_peer(peer(self.b, "203.0.113.22:51820", ("127.0.0.3/32",), now))
        self.hub = Registry(self.device, self.http.reactor)
        site = build_site(self.hub)
        self.site = (
            site
            if limits is None
            else LimitedFactory(site, limits, "the api", self.http.reactor.seconds)
        )
        self.http.serve(self.site)
