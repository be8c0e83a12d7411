"""Following the registry: one stream of answers kept open, the view kept current.

The follower announces this client (its session and LAN endpoints), opens the
registry's stream from the version it holds, and applies every answer to the
view, telling the agent whether anything changed.  A failure keeps the view
(and so the mesh) as it is and reopens the stream after a jittered backoff; the
`-t` safety net asks for a full answer periodically whatever the pushes said.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from wgnat._types import Announcement
from wgnat.client.metrics import ClientMetrics
from wgnat.client.registry_client import RegistryError, RegistryStream, StreamEnded
from wgnat.client.view import RegistryView
from wgnat.timing import full_jitter, repeat, stop
from wgnat.wire import Answer

log = Logger(namespace="wgnat.client")

# Reconnect delays: full jitter below a cap doubling from 1 s to 30 s, so that
# clients that lost the registry together (it restarted) come back spread out.
RECONNECT_INITIAL = 1.0
RECONNECT_MAXIMUM = 30.0


class RegistryConnection(Protocol):
    """What the follower needs of a registry connection (client.registry_client's
    RegistryClient over HTTP; wgnat.testing's MemoryRegistryClient in memory)."""

    def follow(self, since: int | None, epoch: str | None) -> RegistryStream: ...

    def announce(self, announcement: Announcement) -> Deferred[object]: ...

    def close(self) -> Deferred[None]: ...


class RegistryFollower:
    def __init__(
        self,
        connection: RegistryConnection,
        clock: IReactorTime,
        view: RegistryView,
        announcement: Callable[[], Deferred[Announcement]],
        on_change: Callable[[bool, bool], None],
        metrics: ClientMetrics,
        resync_interval: float,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        """`on_change(changed, full)` is called after every answer applied."""
        self.connection = connection
        self.clock = clock
        self.view = view
        self.announcement = announcement
        self.on_change = on_change
        self.metrics = metrics
        self.resync_interval = resync_interval
        self.backoff = backoff or full_jitter(RECONNECT_INITIAL, RECONNECT_MAXIMUM)
        # For `wgnat status` and metrics.
        self.up: bool | None = None  # None: no answer or error yet
        self.error: str | None = None
        self.last_sync: float | None = None
        self.announced: Announcement | None = None
        self._running = False
        self._stream: RegistryStream | None = None
        self._inflight: Deferred[Any] | None = None
        self._force_full = True
        self._resync: LoopingCall | None = None
        self.done: Deferred[None] | None = None

    def start(self) -> None:
        self._running = True
        self._resync = repeat(
            self.clock, self.resync_interval, self.resync, "the -t resynchronisation"
        )
        self.done = self._run()
        self.done.addErrback(lambda failure: log.failure("stopped following the registry", failure))

    def stop(self) -> Deferred[None]:
        self._running = False
        stop(self._resync)
        if self._inflight is not None:
            self._inflight.cancel()
        self._close_stream()
        return self.connection.close()

    def resync(self) -> None:
        """The safety net: a full answer now, whatever the pushes said."""
        self._force_full = True
        if self._inflight is not None:
            self._inflight.cancel()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @inlineCallbacks
    def _run(self) -> Generator[Deferred[Any], Any, None]:
        """Follow the registry's stream: its first answer (full when asked, after
        announcing ourselves), then one per change, applied as they come; a
        failure keeps the view and retries after a backoff."""
        failures = 0
        while self._running:
            full = self._force_full or self.view.version is None
            try:
                if full or self._stream is None:
                    self._close_stream()
                    if full:
                        yield self._announce()
                    self._stream = self.connection.follow(
                        None if full else self.view.version, self.view.epoch
                    )
                self._inflight = self._stream.next()
                answer = yield self._inflight
            except CancelledError:
                continue
            except StreamEnded:
                self._stream = None  # ended cleanly: ask again, from our version
                continue
            except Exception as exc:  # the loop must outlive any failure
                self._close_stream()
                if not isinstance(exc, RegistryError):
                    log.failure("unexpected error following the registry; retrying")
                self._down(str(exc))
                self._force_full = True
                delay = self.backoff(failures)
                failures += 1
                try:
                    self._inflight = deferLater(self.clock, delay, lambda: None)
                    yield self._inflight
                except CancelledError:
                    pass
                continue
            finally:
                self._inflight = None
            failures = 0
            self._heard_from()
            if answer is None:
                continue  # a keep-alive: the registry is there, nothing changed
            if not answer.full and answer.epoch != self.view.epoch:
                self._force_full = True  # a delta from another epoch: ask again, whole
                continue
            if full:
                self._force_full = False
            self._apply(answer, full)

    def _apply(self, answer: Answer, full: bool) -> None:
        changed = self.view.apply(answer)
        try:
            self.on_change(changed, full)
        except Exception:
            log.failure("unexpected error handling the registry's answer")

    @inlineCallbacks
    def _announce(self) -> Generator[Deferred[Any], Any, None]:
        announcement = yield self.announcement()
        yield self.connection.announce(announcement)
        self.announced = announcement

    def _down(self, error: str) -> None:
        self.metrics.registry_errors.inc()
        self.metrics.registry_connected.set(0)
        self.error = error
        if self.up is not False:
            log.warn(
                "registry unreachable ({error}); keeping the mesh as it is and retrying "
                "with backoff",
                error=error,
            )
        self.up = False

    def _heard_from(self) -> None:
        now = self.clock.seconds()
        self.metrics.registry_connected.set(1)
        self.metrics.last_sync.set(now)
        self.last_sync, self.error = now, None
        if self.up is False:
            log.info("registry reachable again; resynchronising")
        self.up = True
