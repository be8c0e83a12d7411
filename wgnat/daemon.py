"""What both daemons do alike when they cannot start: one line saying why for a
user's mistake (a missing interface, a wrong key), a traceback only for a bug,
and the process ends with a failure status."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from wgnat.device import DeviceError

log = Logger(namespace="wgnat")


class StartupError(Exception):
    """A daemon cannot start; the message says why and what to do."""


# What a user can fix: logged as one line, without a traceback.
USER_ERRORS = (StartupError, DeviceError, OSError, ValueError)


def report_startup_failure(program: str, failure: Failure, reactor: object) -> None:
    """Log why `program` cannot start and stop the reactor when it runs (the
    daemon's process then ends; a test's Clock, or a reactor that is not
    running, is left alone)."""
    if failure.check(*USER_ERRORS):
        log.critical(
            "{program} cannot start: {error}", program=program, error=failure.getErrorMessage()
        )
    else:
        log.failure("{program} cannot start", failure, program=program)
    stop = getattr(reactor, "stop", None)
    if getattr(reactor, "running", False) and callable(stop):
        stop()
