"""Structured logs to stdout: text lines for people, JSON lines for collectors."""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.web import server

LOG_FORMATS = ("text", "json")


class QuietSite(server.Site):
    """A twisted.web Site without the access log: one line per request is noise
    that drowns the decisions (a scrape every few seconds, a long poll per client
    per change: 10,000 lines per change on a large registry).  What requests
    amount to is counted in the metrics; errors are logged where they happen."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def start_logging(log_format: str = "text", level: LogLevel = LogLevel.info) -> None:
    if log_format == "json":
        observer = jsonFileLogObserver(sys.stdout)
    else:
        observer = textFileLogObserver(sys.stdout)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])], redirectStandardIO=False
    )
