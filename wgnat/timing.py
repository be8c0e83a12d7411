"""Timers both daemons share: a periodic call that survives its own failures, and
the reconnect backoff.

A LoopingCall whose function raises stops for good (so does a TimerService);
`repeat` wraps each tick so that a failure is logged and the loop goes on.
Reconnects use "full jitter" (a uniformly random delay below an exponentially
growing cap): after a registry restart, thousands of clients that lost it at the
same moment then come back spread over the whole window instead of in lock-step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="wgnat")


def repeat(
    clock: IReactorTime,
    interval: float,
    tick: Callable[[], object],
    what: str,
    now: bool = False,
) -> LoopingCall:
    """Call `tick` every `interval` seconds from now on (at once too when `now`);
    a tick that fails (raises, or returns a Deferred that fails) is logged and
    the next one comes on time.  A tick returning a Deferred delays the next
    one until it fires, so ticks never overlap.  Stop it with `.stop()`."""

    def guarded() -> Deferred[None]:
        def failed(failure: Failure) -> None:
            log.failure(
                "{what} failed; trying again in {interval:g} s",
                failure,
                what=what,
                interval=interval,
            )

        return maybeDeferred(tick).addCallbacks(lambda _: None, failed)

    loop = LoopingCall(guarded)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop


def stop(loop: LoopingCall | None) -> None:
    if loop is not None and loop.running:
        loop.stop()


def full_jitter(
    initial: float, maximum: float, factor: float = 2.0, rng: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """A backoff policy (the shape of Twisted's `backoffPolicy`: failed attempts
    so far -> seconds to wait): uniform in [0, min(maximum, initial * factor**n)]."""
    uniform = rng or random.random

    def policy(attempt: int) -> float:
        cap = min(maximum, initial * factor ** max(0, attempt))
        return uniform() * cap

    return policy


def cancel(call: Any) -> None:
    """Cancel a pending `callLater` (an IDelayedCall), if any."""
    if call is not None and call.active():
        call.cancel()


class SteadyClock:
    """Unix-like seconds that never step: the wall clock read once at start,
    then moved by the monotonic clock.  Timers, intervals and deadlines run on
    it, so a wall-clock step (NTP, a hand-set date, a VM resumed) neither
    freezes a timer nor fires every one at once; it still reads like Unix time
    (for the moments both ends of a pair compute alike, and for people) as long
    as the wall clock does not step."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monotonic = monotonic
        self.origin = wall() - monotonic()

    def __call__(self) -> float:
        return self.origin + self.monotonic()


def use_steady_time(reactor: object) -> bool:
    """Make a real reactor's timers run on a SteadyClock (Twisted's run on the
    wall clock).  Done before any timer is scheduled (a daemon's makeService);
    a reactor that already has timers, or a test's Clock, is left alone."""
    pending = getattr(reactor, "getDelayedCalls", None)
    if not hasattr(reactor, "run") or pending is None or pending():
        return False
    reactor.seconds = SteadyClock()  # type: ignore[attr-defined]
    return True
