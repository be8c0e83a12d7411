"""Structured logs to stdout: text lines for people, JSON lines for collectors."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.web import http, server
from zope.interface import implementer

LOG_FORMATS = ("text", "json")
# What Twisted's factories say at every connection (the HTTP client opens one per
# registry stream): noise that would drown the decisions.
_FACTORY_NOISE = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


@implementer(ILogFilterPredicate)
def quiet_factories(event: LogEvent) -> PredicateResult:
    if event.get("log_format") in _FACTORY_NOISE:
        return PredicateResult.no
    return PredicateResult.maybe


class QuietSite(server.Site):
    """A twisted.web Site without the access log: one line per request is noise
    that drowns the decisions (a scrape every few seconds, a long poll per client
    per change: 10,000 lines per change on a large registry).  What requests
    amount to is counted in the metrics; errors are logged where they happen."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def start_logging(log_format: str = "text", level: LogLevel = LogLevel.info) -> None:
    if log_format == "json":
        observer = jsonFileLogObserver(sys.stdout)
    else:
        observer = textFileLogObserver(sys.stdout)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate, quiet_factories])], redirectStandardIO=False
    )


class HeldLog:
    """Log lines held back until `release()`, then logged in order: a daemon's
    first line says what it runs on (its interface and backend), and what its
    start-up finds on the way (a state file, a low limit) comes after it."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.held: list[tuple[str, str, dict[str, object]]] = []

    def info(self, format: str, **fields: object) -> None:
        self.held.append(("info", format, fields))

    def warn(self, format: str, **fields: object) -> None:
        self.held.append(("warn", format, fields))

    def error(self, format: str, **fields: object) -> None:
        self.held.append(("error", format, fields))

    def release(self) -> None:
        held, self.held = self.held, []
        for level, format, fields in held:
            getattr(self.logger, level)(format, **fields)
