"""Go's duration syntax (`1m0s`, `30s`, `1h2m3s`, `1.5s`, `300ms`): wg-nat's `-t` flag
is part of our compatibility contract, so it is parsed the way Go parses it."""

from __future__ import annotations

import datetime
import re

import durationpy

from wgnat._types import InvalidValue, _short

# time.ParseDuration's grammar: [-+]?([0-9]*(\.[0-9]*)?[a-z]+)+ with Go's units only,
# at least one digit per component, or a bare "0".  durationpy alone is laxer (it
# takes days, weeks and years, and skips junk between components: "1m xx 5s").
_GO_DURATION = re.compile(
    r"[-+]?(?:0|(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)"
)


def parse_go_duration(text: str, minimum: float = 0.0) -> float:
    """Return the duration in seconds, or raise InvalidValue saying what is accepted.

    The result must be positive and at least `minimum`."""
    try:
        if not isinstance(text, str) or not _GO_DURATION.fullmatch(text.strip()):
            raise ValueError(text)
        seconds = durationpy.from_str(text.strip()).total_seconds()
    except Exception:
        raise InvalidValue(
            f"invalid duration {_short(text)}: use Go's syntax, such as 30s, 1m0s or 1h2m3s"
        ) from None
    if seconds <= 0 or seconds < minimum:
        raise InvalidValue(
            f"invalid duration {_short(text)}: must be positive and at least {minimum:g}s"
        )
    return seconds


def format_go_duration(seconds: float) -> str:
    return durationpy.to_str(datetime.timedelta(seconds=seconds))
