"""The registry's moving parts around the pure model: reading the device (on a
short interval and whenever a client needs a fresh view) and telling the clients
that wait for a change (the push): long polls are woken and answered one by one;
open streams get each change as one line, encoded once and written to all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgnat._types import Announcement, DeviceState, IPAddress, PublicKey, peer_label
from wgnat.device import Device
from wgnat.registry.metrics import RegistryMetrics
from wgnat.registry.model import LIVE_WINDOW, Change, RegistryModel
from wgnat.timing import cancel as cancel_call
from wgnat.timing import repeat, stop
from wgnat.wire import KEEPALIVE_LINE, encode_line

log = Logger(namespace="wgnat.registry")

# Every open stream is written to at least this often (a keep-alive line when
# nothing changed), so both ends can tell a live stream from a dead one.
KEEPALIVE_SECONDS = 15.0
# Streams are looked at this often: a keep-alive goes out after 14 to 15 s of
# silence (a coarser tick would send them sooner, so more of them).
KEEPALIVE_TICK = 1.0
# A request from an address no peer holds reads the device at most this often
# (the periodic poll reads it anyway); other such requests get their 403 from
# the last read.
UNKNOWN_READ_INTERVAL = 1.0


@dataclass(eq=False)
class Stream:
    """One client's open stream: who it is, the version it holds, how to write to it."""

    caller: PublicKey
    send: Callable[[bytes], object]
    version: int
    last_sent: float


# One read can change every peer (the hub's own network came back, say): past
# this many, the rest of a read's changes are counted in one line.
MAX_CHANGES_LOGGED = 20


class Registry:
    def __init__(
        self,
        device: Device,
        clock: IReactorTime,
        model: RegistryModel | None = None,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.device = device
        self.clock = clock
        self.model = model or RegistryModel()
        self.metrics = metrics
        self._reading: Deferred[DeviceState] | None = None
        # Callers that need a read started after they asked (it must see, say, the
        # handshake the caller just made); served by the next read, shared by all.
        self._next_readers: list[Deferred[None]] = []
        self._waiters: set[Deferred[None]] = set()
        self._streams: dict[Stream, None] = {}  # insertion-ordered set
        self._keepalive: LoopingCall | None = None
        self.last_read_error: str | None = None
        # Called whenever the view changed (the state keeper saves it).
        self.on_change: Callable[[], None] | None = None
        self._unknown_read_at: float | None = None
        self._unknown_waiters: list[Deferred[None]] | None = None
        self._unknown_timer: IDelayedCall | None = None

    # -- reading the device -------------------------------------------------
    def refresh(self) -> Deferred[None]:
        """Fire after a device read that started after this call (coalesced)."""
        waiter: Deferred[None] = Deferred()
        self._next_readers.append(waiter)
        if self._reading is None:
            self._start_read()
        return waiter

    def _start_read(self) -> None:
        readers, self._next_readers = self._next_readers, []
        started = self.clock.seconds()
        reading = self.device.read()
        self._reading = reading

        def done(result: DeviceState | Failure) -> None:
            self._reading = None
            try:
                if self.metrics is not None:
                    self.metrics.device_read_seconds.observe(self.clock.seconds() - started)
                if isinstance(result, Failure):
                    self._read_failed(result.getErrorMessage())
                else:
                    self._read(result)
            except Exception:
                # A bug in observing must not leave the readers waiting for good.
                log.failure("unexpected error handling a device read")
            finally:
                for reader in readers:
                    reader.callback(None)
                if self._next_readers:
                    self._start_read()

        reading.addBoth(done)

    def _read(self, state: DeviceState) -> None:
        if self.last_read_error is not None:
            log.info("reading the WireGuard device works again")
        self.last_read_error = None
        changes = self.model.observe(state, self.clock.seconds())
        if changes:
            log_changes(changes)
            self.notify()

    def _read_failed(self, message: str) -> None:
        if message != self.last_read_error:
            log.error(
                "cannot read the WireGuard device: {error}; keeping the last known view",
                error=message,
            )
        self.last_read_error = message
        if self.metrics is not None:
            self.metrics.device_errors.inc()

    # -- the push -----------------------------------------------------------
    def wait_for_change(self, since: int, timeout: float) -> Deferred[None]:
        """Fire when the version moves past `since`, or after `timeout` seconds."""
        if self.model.version != since:
            return succeed(None)

        def cancel(waiter: Deferred[None]) -> None:
            self._waiters.discard(waiter)
            if timer.active():
                timer.cancel()

        waiter: Deferred[None] = Deferred(cancel)

        def expire() -> None:
            self._waiters.discard(waiter)
            waiter.callback(None)

        def settled(result: Failure | None) -> Failure | None:
            cancel_call(timer)
            return result

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)

        timer = self.clock.callLater(timeout, expire)
        waiter.addBoth(settled)
        waiter.addErrback(cancelled)
        self._waiters.add(waiter)
        return waiter

    def waiting(self) -> int:
        """Clients a change would reach now: long polls waiting and open streams."""
        return len(self._waiters) + len(self._streams)

    def notify(self) -> None:
        if self.on_change is not None:
            self.on_change()
        waiters, self._waiters = self._waiters, set()
        if waiters or self._streams:
            log.debug(
                "version {version}: pushing to {count} waiting clients and {streams} streams",
                version=self.model.version,
                count=len(waiters),
                streams=len(self._streams),
            )
        pushed = 0
        try:
            pushed = self._broadcast()
        finally:
            # Whatever a broadcast met, the long polls are answered.
            for waiter in waiters:
                waiter.callback(None)
            if self.metrics is not None:
                self.metrics.pushes.inc(len(waiters) + pushed)

    # -- streams --------------------------------------------------------------
    def open_stream(
        self,
        caller: PublicKey,
        since: int | None,
        epoch: str | None,
        send: Callable[[bytes], object],
        send_first: Callable[[list[bytes]], object] | None = None,
    ) -> Deferred[Stream]:
        """Start a stream: `send` gets the caller's own answer at once (full when
        `since` is None, after a device read as for any full answer), then one
        shared line per change and keep-alive lines; `close_stream` ends it.
        `send_first`, when given, gets that first answer in parts instead (a
        full answer's peers are the encoding every caller shares: not copied)."""
        ready: Deferred[None] = self.refresh() if since is None else succeed(None)

        def start(_: None) -> Stream:
            now = self.clock.seconds()
            first = [*self.model.encoded_answer_parts(caller, since, now, epoch), b"\n"]
            stream = Stream(caller, send, self.model.version, now)
            self._streams[stream] = None
            self._schedule_keepalive()
            if send_first is None:
                self._send(stream, b"".join(first))
            else:
                self._send_first(stream, send_first, first)
            return stream

        return ready.addCallback(start)

    def close_stream(self, stream: Stream) -> None:
        self._streams.pop(stream, None)
        if not self._streams:
            stop(self._keepalive)
            self._keepalive = None

    def streams(self) -> int:
        return len(self._streams)

    def stop(self) -> None:
        """Forget every stream (their connections end with the process)."""
        cancel_call(self._unknown_timer)
        for stream in list(self._streams):
            self.close_stream(stream)

    def _broadcast(self) -> int:
        """Write what changed to every open stream; each distinct starting version
        (normally one: every stream got the previous change) is encoded once."""
        if not self._streams:
            return 0
        now = self.clock.seconds()
        version = self.model.version
        lines: dict[int, bytes] = {}
        pushed = 0
        for stream in list(self._streams):
            if stream.version == version:
                continue
            line = lines.get(stream.version)
            if line is None:
                line = lines[stream.version] = encode_line(
                    self.model.broadcast(stream.version, now)
                )
            stream.version = version
            self._send(stream, line)
            pushed += 1
        return pushed

    def _send_first(
        self, stream: Stream, send_first: Callable[[list[bytes]], object], parts: list[bytes]
    ) -> None:
        stream.last_sent = self.clock.seconds()
        try:
            send_first(parts)
        except Exception:
            log.failure(
                "cannot write to the stream of {peer}; closing it", peer=stream.caller.short
            )
            self.close_stream(stream)

    def _send(self, stream: Stream, line: bytes) -> None:
        stream.last_sent = self.clock.seconds()
        try:
            stream.send(line)
        except Exception:
            log.failure(
                "cannot write to the stream of {peer}; closing it", peer=stream.caller.short
            )
            self.close_stream(stream)

    def _schedule_keepalive(self) -> None:
        if self._keepalive is None and self._streams:
            self._keepalive = repeat(
                self.clock, KEEPALIVE_TICK, self._keep_alive, "the streams' keep-alive"
            )

    def _keep_alive(self) -> None:
        """Every KEEPALIVE_TICK: a keep-alive line to the streams that would
        otherwise go KEEPALIVE_SECONDS without one."""
        due = self.clock.seconds() - (KEEPALIVE_SECONDS - KEEPALIVE_TICK)
        for stream in list(self._streams):
            if stream.last_sent <= due:
                self._send(stream, KEEPALIVE_LINE)

    # -- what a caller asks (the API and the in-memory registry share these) --
    def identify(self, address: IPAddress) -> Deferred[PublicKey | None]:
        """The peer sending from `address`.  An address no peer holds may be a
        peer added to the interface since the last read, so the device is read
        first, but at most once per UNKNOWN_READ_INTERVAL: past that, unknown
        sources are answered from the last read (a loop of them would otherwise
        keep the registry reading its device)."""
        caller = self.model.caller(address)
        if caller is not None:
            return succeed(caller)
        return self._read_for_unknown().addCallback(lambda _: self.model.caller(address))

    def _read_for_unknown(self) -> Deferred[None]:
        """A device read started after this call, but at most one per
        UNKNOWN_READ_INTERVAL for unknown sources: a caller inside the interval
        waits for the read at its end, which serves every such caller at once."""
        now = self.clock.seconds()
        last = self._unknown_read_at
        if last is None or not 0 <= now - last < UNKNOWN_READ_INTERVAL:
            self._unknown_read_at = now
            return self.refresh()
        waiter: Deferred[None] = Deferred()
        if self._unknown_waiters is None:
            waiters: list[Deferred[None]] = []
            self._unknown_waiters = waiters

            def read() -> None:
                self._unknown_waiters = None
                self._unknown_read_at = self.clock.seconds()

                def done(_: None) -> None:
                    for each in waiters:
                        each.callback(None)

                self.refresh().addCallback(done)

            self._unknown_timer = self.clock.callLater(last + UNKNOWN_READ_INTERVAL - now, read)
        self._unknown_waiters.append(waiter)
        return waiter

    def answer(
        self,
        caller: PublicKey,
        since: int | None,
        epoch: str | None,
        wait: float,
        on_wait: Callable[[Deferred[None]], object] | None = None,
    ) -> Deferred[bytes]:
        """The caller's view, encoded, once there is something new for it (or
        `wait` ends).

        A full answer (`since` None) reads the device first: the caller may have
        just completed its first handshake, which the others must hear of.
        `on_wait` sees the waiter, so a disconnecting caller can cancel it.
        """
        ready: Deferred[None] = self.refresh() if since is None else succeed(None)

        def wait_for_change(_: None) -> Deferred[None] | None:
            if not wait or self.model.changed_since(since, epoch):
                return None
            waiter = self.wait_for_change(since, wait)  # type: ignore[arg-type]
            if on_wait is not None:
                on_wait(waiter)
            return waiter

        ready.addCallback(wait_for_change)
        return ready.addCallback(
            lambda _: self.model.encoded_answer(caller, since, self.clock.seconds(), epoch)
        )

    def check(self, caller: PublicKey, epoch: str, version: int, digest: str) -> bytes | None:
        """The -t safety net (RegistryModel.check): None when the caller's view
        is current; counted in the metrics."""
        payload = self.model.check(caller, epoch, version, digest, self.clock.seconds())
        if self.metrics is not None:
            self.metrics.checks.labels(outcome="current" if payload is None else "changed").inc()
        return payload

    def announce(self, caller: PublicKey, announcement: Announcement) -> Deferred[bool]:
        """Keep a caller's LAN endpoints (read first, so a peer that just came up
        is live) and push them to the others."""

        def keep(_: None) -> bool:
            before = self.model.announcements.get(caller)
            changed = self.model.announce(caller, announcement)
            if not changed and self.model.announcements.get(caller) != before:
                # Kept for a peer not live yet: no new version, but the state
                # file must hold it (clients do not announce twice to an epoch).
                if self.on_change is not None:
                    self.on_change()
            if changed:
                log.info(
                    "{peer} announced LAN endpoints {endpoints}{more}",
                    peer=caller.short,
                    endpoints=", ".join(map(str, announcement.lan_endpoints)) or "(none)",
                    more=_more_endpoints(announcement),
                )
                record = self.model.records.get(caller)
                mapped = announcement.mapped_endpoint
                if mapped is not None and record is not None and record.announcement is not None:
                    if record.announcement.mapped_endpoint is None:
                        log.warn(
                            "{peer}: its mapped endpoint {mapped} is not passed on: its "
                            "packets come from {seen}, and a gateway maps a port of its own "
                            "address (served once it is seen there)",
                            peer=caller.short,
                            mapped=mapped,
                            seen=record.endpoint,
                        )
                self.notify()
            return changed

        return self.refresh().addCallback(keep)

    def poll(self) -> Deferred[None]:
        """One periodic tick (run by wgnat.timing.repeat, which logs a failure
        and keeps the loop going)."""
        return self.refresh()


def describe(change: Change) -> str:
    return peer_label(change.public_key, change.allowed_ips)


def log_changes(changes: list[Change]) -> None:
    """A line for each peer that came, moved or went (what clients are pushed);
    the read time is the moment the registry learned it."""
    for change in changes[:MAX_CHANGES_LOGGED]:
        if change.kind == "live":
            log.info(
                "{peer} live at {endpoint}", peer=describe(change), endpoint=str(change.endpoint)
            )
        elif change.kind == "moved":
            log.info(
                "{peer} endpoint moved from {old} to {endpoint}",
                peer=describe(change),
                old=str(change.old_endpoint),
                endpoint=str(change.endpoint),
            )
        elif change.kind == "gone":
            log.info(
                "{peer} gone: no handshake for {window:g} s, or removed from the interface",
                peer=describe(change),
                window=LIVE_WINDOW,
            )
        else:
            log.info(
                "{peer} allowed IPs now {ips}",
                peer=describe(change),
                ips=", ".join(map(str, change.allowed_ips)),
            )
    if len(changes) > MAX_CHANGES_LOGGED:
        log.info(
            "and {count} more peers changed in the same device read",
            count=len(changes) - MAX_CHANGES_LOGGED,
        )


def _more_endpoints(announcement: Announcement) -> str:
    """The IPv6 and mapped endpoints of an announcement, for its log line."""
    more = ""
    if announcement.ipv6_endpoints:
        more += ", IPv6 " + ", ".join(map(str, announcement.ipv6_endpoints))
    if announcement.mapped_endpoint is not None:
        more += f", mapped {announcement.mapped_endpoint}"
    if announcement.punch_first:
        more += ", punches first"
    return more
