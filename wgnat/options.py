"""Flags both daemons share, validated where they enter."""

from __future__ import annotations

from twisted.python import usage

from wgnat.device import DeviceError, validate_ifname
from wgnat.logs import LOG_FORMATS
from wgnat.metrics import parse_listen


class CommonOptions(usage.Options):
    optParameters: list[list[object]] = []

    def opt_version(self) -> None:
        from wgnat import __version__

        print(f"wgnat {__version__}")
        raise SystemExit(0)

    def check_common(self) -> None:
        try:
            validate_ifname(self["interface"])
        except DeviceError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            parse_listen(self["metrics-listen"])
        except ValueError as exc:
            raise usage.UsageError(f"--metrics-listen: {exc}") from None
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{text!r} is not a port number (1-65535)")
    return int(text)
