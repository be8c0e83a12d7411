"""Structured logs to stdout: text lines for people, JSON lines for collectors."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

LOG_FORMATS = ("text", "json")


def start_logging(log_format: str = "text", level: LogLevel = LogLevel.info) -> None:
    if log_format == "json":
        observer = jsonFileLogObserver(sys.stdout)
    else:
        observer = textFileLogObserver(sys.stdout)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])], redirectStandardIO=False
    )
