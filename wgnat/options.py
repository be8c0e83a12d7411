"""Flags both daemons share, validated where they enter: each parsed once, into
the value the daemon uses."""

from __future__ import annotations

from twisted.python import usage

from wgnat.device import DeviceError, validate_ifname
from wgnat.logs import LOG_FORMATS


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:9587`) for --metrics-listen."""
    host, sep, port = text.rpartition(":")
    try:
        number = port_number(port) if sep else 0
    except ValueError:
        number = 0
    if not number:
        raise ValueError(
            f"invalid listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9587"
        )
    return host.strip("[]") or "127.0.0.1", number


def tcp_endpoint(listen: tuple[str, int]) -> str:
    """A parsed HOST:PORT as a Twisted server endpoint description."""
    host, port = listen
    escaped = host.replace(":", "\\:")
    return f"tcp:{port}:interface={escaped}"


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
            self["metrics-listen"] = parse_listen(self["metrics-listen"])
        except ValueError as exc:
            raise usage.UsageError(f"--metrics-listen: {exc}") from None
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
