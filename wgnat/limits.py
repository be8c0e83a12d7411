"""Bounds on what one source of connections can hold, for every listener the
daemons open (the registry's API, the metrics endpoints, the status sockets).

A connection past a listener's limits (per source address, and in total) is
closed before any byte of it is read, so it costs no device read, no body
buffer and no timer: one peer, or one local user, cannot exhaust the daemon's
file descriptors and starve everyone else.  On top of the idle timeout, an HTTP
request must arrive whole (head and body) within a deadline from its first
byte, so a sender that trickles a byte at a time cannot hold a connection.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http

from wgnat.logs import HeldLog

log = Logger(namespace="wgnat.limits")

# A request's head and body must arrive within this from its first byte.
REQUEST_DEADLINE_SECONDS = 10.0
# A refusal is logged at most this often per listener (each is counted).
REFUSAL_LOG_INTERVAL = 60.0
# Descriptors a daemon needs beside its connections: the device, its sockets,
# the state file, a thread pool's, logs.
RESERVED_DESCRIPTORS = 64


@dataclass(frozen=True)
class Limits:
    per_source: int
    total: int


# The listeners only people and Prometheus use: small, fixed bounds.
METRICS_LIMITS = Limits(per_source=4, total=64)
STATUS_LIMITS = Limits(per_source=8, total=16)  # a Unix socket: one "source"


class LimitedFactory(WrappingFactory):
    """Wraps a listener's factory: at most `limits.per_source` connections from
    one address and `limits.total` in all; past either, a new connection is
    closed at once (and counted in `refused`)."""

    def __init__(
        self,
        wrapped: Factory[Any],
        limits: Limits,
        what: str,
        clock_seconds: Callable[[], float],
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.what = what
        self.seconds = clock_seconds
        self.on_refused = on_refused
        self.by_source: dict[str, int] = {}
        self._sources: dict[ProtocolWrapper, str] = {}
        self.refused = 0
        self._logged_at: float | None = None
        self._unlogged = 0

    @property
    def open(self) -> int:
        return len(self._sources)

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper | None:  # type: ignore[override]
        source = str(getattr(addr, "host", None) or "local")
        held = self.by_source.get(source, 0)
        if held >= self.limits.per_source:
            self._refuse(source, f"{held} connections from {source} already (the limit per source)")
            return None
        if len(self._sources) >= self.limits.total:
            self._refuse(source, f"{len(self._sources)} connections open (the limit in total)")
            return None
        wrapper = super().buildProtocol(addr)
        self.by_source[source] = held + 1
        self._sources[wrapper] = source
        return wrapper

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        self.protocols.pop(p, None)  # registered only once it connected
        source = self._sources.pop(p, None)
        if source is None:
            return
        left = self.by_source.get(source, 1) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)

    def _refuse(self, source: str, why: str) -> None:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused()
        now = self.seconds()
        if self._logged_at is not None and now - self._logged_at < REFUSAL_LOG_INTERVAL:
            self._unlogged += 1
            return
        log.warn(
            "{what}: refused a connection from {source}: {why}{more}",
            what=self.what,
            source=source,
            why=why,
            more=(
                f" ({self._unlogged} more refused since the last such line)"
                if self._unlogged
                else ""
            ),
        )
        self._logged_at, self._unlogged = now, 0


class DeadlineChannel(http.HTTPChannel):
    """An HTTP connection whose requests must each arrive whole within
    REQUEST_DEADLINE_SECONDS of their first byte: the idle timeout alone is
    reset by every byte, so a trickle would hold the connection for good."""

    request_deadline = REQUEST_DEADLINE_SECONDS
    _deadline: IDelayedCall | None = None
    # A request is being answered: bytes that come meanwhile (a pipelined
    # request) are held by Twisted and handed on when it is done, which is
    # when their deadline starts (a long poll may take a minute).
    _answering = False

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and data and not self._answering:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self._answering = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "closing a connection from {peer}: its request did not arrive whole within {s:g} s",
            peer=getattr(peer, "host", "?"),
            s=self.request_deadline,
        )
        transport = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()


def raise_descriptor_limit(connections: int, program: str, say: Logger | HeldLog = log) -> int:
    """Raise this process's soft limit on open files towards what `connections`
    need (up to the hard limit); warn when that is not enough.  Returns the
    soft limit now in force."""
    needed = connections + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft < needed:
        say.warn(
            "{program} may open {connections} connections, but this process may open only "
            "{soft} files (hard limit {hard}): raise it (LimitNOFILE= in the systemd unit, "
            "ulimit -n, or --ulimit nofile= for Docker) or lower --max-connections",
            program=program,
            connections=connections,
            soft=soft,
            hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
        )
    return soft
