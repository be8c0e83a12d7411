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
from twisted.python.failure import Failure

from wgnat._types import Announcement
from wgnat.client.metrics import ClientMetrics
from wgnat.client.registry_client import RegistryError, RegistryStream, StreamEnded
from wgnat.client.view import RegistryView
from wgnat.timing import full_jitter, repeat, stop
from wgnat.wire import Answer, view_digest, without_extensions

log = Logger(namespace="wgnat.client")

# Reconnect delays: full jitter below a cap doubling from 1 s to 30 s, so that
# clients that lost the registry together (it restarted) come back spread out.
RECONNECT_INITIAL = 1.0
RECONNECT_MAXIMUM = 30.0
# An announcement made before the registry's first answer named its epoch.
_NEXT_ANSWER = "(the next answer's)"


class RegistryConnection(Protocol):
    """What the follower needs of a registry connection (client.registry_client's
    RegistryClient over HTTP; wgnat.testing's MemoryRegistryClient in memory)."""

    def follow(self, since: int | None, epoch: str | None) -> RegistryStream: ...

    def check(self, epoch: str, version: int, digest: str) -> Deferred[Answer | None]: ...

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
        # Since when this client has been without the registry: the start of
        # following it, then the first failure after an answer; None while it
        # answers.  `wgnat status` calls a client degraded when this is older
        # than one full backoff (RECONNECT_MAXIMUM).
        self.down_since: float | None = None
        self.announced: Announcement | None = None
        # A registry older than the optional announcement fields (symmetric_nat,
        # ipv6_endpoints, mapped_endpoint, punch_first) refuses them (HTTP 400):
        # announced without them until its epoch changes (restarted, perhaps upgraded).
        self.plain_announcements = False
        self._plain_epoch: str | None = None  # the epoch of the registry that refused
        self._running = False
        self._stream: RegistryStream | None = None
        self._inflight: Deferred[Any] | None = None
        self._force_full = True
        self._checking: Deferred[Answer | None] | None = None
        self._announced_epoch: str | None = None
        self._announcing: Deferred[None] | None = None
        # What we announce changed while an announcement was on its way (or
        # before the first answer): announce again once it is done.
        self._reannounce = False
        self._resync: LoopingCall | None = None
        self.done: Deferred[None] | None = None

    def start(self) -> None:
        self._running = True
        self.down_since = self.clock.seconds()
        self._resync = repeat(
            self.clock, self.resync_interval, self.resync, "the -t resynchronisation"
        )
        self.done = self._run()
        self.done.addErrback(lambda failure: log.failure("stopped following the registry", failure))

    def stop(self) -> Deferred[None]:
        self._running = False
        stop(self._resync)
        if self._checking is not None:
            self._checking.cancel()
        if self._inflight is not None:
            self._inflight.cancel()
        self._close_stream()
        return self.connection.close()

    def resync(self) -> None:
        """The -t safety net: check that the view is the registry's (a few bytes
        when it is: the registry compares digests, encodes nothing), take the
        delta (or full answer) it sends when not, and re-announce this host when
        its LAN endpoints changed."""
        if not self._running or self._checking is not None:
            return
        epoch, version = self.view.epoch, self.view.version
        if epoch is None or version is None or self.up is not True:
            return  # not following now: reconnecting brings the view up to date
        digest = view_digest(self.view.peers.values(), self.view.my_endpoint)
        checking = self.connection.check(epoch, version, digest)
        self._checking = checking

        def done(result: object) -> None:
            self._checking = None

        checking.addCallbacks(self._checked, self._check_failed).addBoth(done)
        self._announce_if_changed()

    def _checked(self, answer: Answer | None) -> None:
        self._heard_from()
        if answer is None:
            return
        log.info(
            "the -t check found this client's view (version {mine}) behind the registry's "
            "({theirs}{full}); updating it",
            mine=self.view.version,
            theirs=answer.version,
            full=", a full answer" if answer.full else "",
        )
        self._apply(answer, answer.full)
        # The stream may be behind that answer: follow it again from the view's version.
        self._restart_stream()

    def _check_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self.up is not True or self._stream is None:
            return  # the stream failed too (or was stopped): its backoff decides
        # Most often the registry just went away (its stream fails too, and is
        # reopened with backoff).  Either way the stream is followed again from
        # this view's version: the registry sends what changed (a full answer
        # only when it no longer can), not a view the client already has.
        log.info(
            "the -t check failed ({error}); following the registry's stream again from "
            "version {version}",
            error=failure.getErrorMessage(),
            version=self.view.version,
        )
        self._restart_stream()

    def _restart_stream(self) -> None:
        """Follow the stream again from the view's version: closing it fails
        the loop's wait with CancelledError, and the loop opens a new one (a
        loop in its backoff, with no stream, is left to it)."""
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @inlineCallbacks
    def _run(self) -> Generator[Deferred[Any], Any, None]:
        """Follow the registry's stream: its first answer (full at the start,
        after announcing ourselves; from our version after that), then one per
        change, applied as they come; a failure keeps the view and retries from
        the view's version after a backoff (a registry that kept its state
        answers with a delta; one that restarted afresh, with a full answer)."""
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
                # We cancelled it (a check's answer, a restart, a stop): follow
                # again from the view's version; never read a failed stream twice.
                self._close_stream()
                continue
            except StreamEnded:
                self._stream = None  # ended cleanly: ask again, from our version
                continue
            except Exception as exc:  # the loop must outlive any failure
                self._close_stream()
                if not isinstance(exc, RegistryError):
                    log.failure("unexpected error following the registry; retrying")
                self._down(str(exc))
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
            self._apply(answer, answer.full)
            if self._announced_epoch is _NEXT_ANSWER:
                self._announced_epoch = self.view.epoch
            elif self.view.epoch != self._announced_epoch and self._announcing is None:
                # The registry restarted without what we announced: again.
                self._announce_in_background()
            if self._reannounce and self._announcing is None:
                self._reannounce = False
                self._announce_if_changed()

    def _apply(self, answer: Answer, full: bool) -> None:
        changed = self.view.apply(answer)
        try:
            self.on_change(changed, full)
        except Exception:
            log.failure("unexpected error handling the registry's answer")

    @inlineCallbacks
    def _announce(self) -> Generator[Deferred[Any], Any, None]:
        epoch = self.view.epoch
        if self.plain_announcements and epoch != self._plain_epoch:
            # Another epoch: the registry restarted, perhaps upgraded.
            self.plain_announcements = False
        announcement = self._as_accepted((yield self.announcement()))
        try:
            yield self.connection.announce(announcement)
        except RegistryError as exc:
            if exc.status != 400 or announcement == without_extensions(announcement):
                raise
            log.info(
                "the registry refuses the optional announcement fields ({error}): an older "
                "registry; announcing the session and LAN endpoints only (peers then reach "
                "this host over IPv4, and do not know it is behind a symmetric NAT)",
                error=str(exc),
            )
            self.plain_announcements, self._plain_epoch = True, epoch
            announcement = self._as_accepted(announcement)
            yield self.connection.announce(announcement)
        self.announced = announcement
        # Before the first answer the epoch is not known: it is that answer's.
        self._announced_epoch = epoch if epoch is not None else _NEXT_ANSWER

    def _announce_in_background(self) -> None:
        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.warn(
                    "cannot announce this host to the registry ({error}); the next -t "
                    "check tries again",
                    error=failure.getErrorMessage(),
                )

        def done(result: object) -> None:
            self._announcing = None
            if self._reannounce and self._running:
                self._reannounce = False
                self._announce_if_changed()

        announcing = self._announce()
        self._announcing = announcing
        announcing.addErrback(failed).addBoth(done)

    def announcement_changed(self) -> None:
        """What this client announces changed (its port mapping): tell the
        registry now rather than at the next -t check."""
        if not self._running:
            return
        if self._announcing is not None or self.view.epoch is None:
            self._reannounce = True
            return
        self._announce_if_changed()

    def _announce_if_changed(self) -> None:
        if self._announcing is not None:
            return

        def compare(announcement: Announcement) -> None:
            announcement = self._as_accepted(announcement)
            if announcement != self.announced or self.view.epoch != self._announced_epoch:
                self._announce_in_background()

        self.announcement().addCallback(compare).addErrback(
            lambda failure: log.failure("cannot find this host's LAN endpoints", failure)
        )

    def _as_accepted(self, announcement: Announcement) -> Announcement:
        if self.plain_announcements:
            return without_extensions(announcement)
        return announcement

    def _down(self, error: str) -> None:
        self.metrics.registry_errors.inc()
        self.metrics.registry_connected.set(0)
        self.error = error
        if self.down_since is None:
            self.down_since = self.clock.seconds()
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
        self.metrics.last_sync.set_to_current_time()  # Unix time, for alerts
        self.last_sync, self.error, self.down_since = now, None, None
        if self.up is False:
            log.info("registry reachable again; resynchronising")
        self.up = True
