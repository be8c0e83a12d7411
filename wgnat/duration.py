"""Go's duration syntax (`1m0s`, `30s`, `1h2m3s`, `1.5s`, `300ms`): wg-nat's `-t` flag
is part of our compatibility contract, so it is parsed the way Go parses it."""

from __future__ import annotations

import datetime

import durationpy

from wgnat._types import InvalidValue


def parse_go_duration(text: str, minimum: float = 0.0) -> float:
    """Return the duration in seconds, or raise InvalidValue saying what is accepted."""
    try:
        seconds = durationpy.from_str(text.strip()).total_seconds()
    except Exception:
        raise InvalidValue(
            f"invalid duration {text!r}: use Go's syntax, such as 30s, 1m0s or 1h2m3s"
        ) from None
    if seconds <= minimum:
        raise InvalidValue(f"invalid duration {text!r}: must be more than {minimum:g}s")
    return seconds


def format_go_duration(seconds: float) -> str:
    return durationpy.to_str(datetime.timedelta(seconds=seconds))
