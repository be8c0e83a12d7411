"""`wgnat`: ask a running wgnat daemon what it is doing.

`wgnat status` fetches the daemon's status document over its Unix socket
(status_socket.py: root only) with a plain HTTP request and prints it as a table
(tables.py) or, with --json, as it is, and exits with the daemon's health
(health.py: 0 healthy, 1 degraded, 2 down or no daemon answering).  `wgnat ping
PEER` fetches the client's and pings the peer over the tunnel (ping.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from typing import Any, TextIO

from wgnat import __version__
from wgnat.cli import ping
from wgnat.cli.health import DOWN, health
from wgnat.cli.tables import format_status
from wgnat.status_socket import STATUS_DIR, default_socket_path

DEFAULT_TIMEOUT = 5.0
EXIT_FAILURE = 1


class StatusError(Exception):
    """Why `wgnat status` got no status: one line for the user."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_status(
    path: str, *, who: str = "wgnat daemon", timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """GET the status document from the socket at `path`; StatusError on failure."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", "/status", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except FileNotFoundError:
        raise StatusError(f"no {who} is running (no {path})") from None
    except PermissionError:
        raise StatusError(
            f"permission denied on {path}: the status socket is only for the daemon's "
            "user (root); try: sudo wgnat status"
        ) from None
    except ConnectionRefusedError:
        raise StatusError(
            f"no {who} is running ({path} is left over: nothing answers on it)"
        ) from None
    except TimeoutError:
        raise StatusError(f"{who} did not answer on {path} within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise StatusError(f"cannot ask {who} on {path}: {reason}") from None
    finally:
        connection.close()
    if response.status != 200:
        text = body.decode("utf-8", "replace").strip()[:200]
        raise StatusError(f"{who} answered HTTP {response.status} on {path}: {text}")
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("role") not in ("client", "registry"):
        raise StatusError(f"unexpected answer on {path}: not a wgnat status document")
    return document


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgnat", description="Ask a running wgnat daemon what it is doing."
    )
    parser.add_argument("--version", action="version", version=f"wgnat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="peers, paths and why (like 'wg show')",
        description=(
            "Show the peers of a running wgnat-client (path, endpoint, handshake, "
            "traffic and why the path is what it is), or with --server every peer a "
            "wgnat-server sees.  Exits 0 when the daemon is healthy, 1 when degraded "
            "(a client without its registry for more than 30 s, a device operation on "
            "a peer failing, or a state file it cannot write), 2 when down (it cannot "
            "read its interface) or when no daemon answers."
        ),
    )
    status.add_argument(
        "-i", "--interface", default="wg0", help="the daemon's WireGuard interface (wg0)"
    )
    status.add_argument(
        "--server", action="store_true", help="ask the wgnat-server (registry) instead"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's status socket (default {STATUS_DIR}/client-IFACE.sock, "
        f"or {STATUS_DIR}/server-IFACE.sock with --server)",
    )
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=argparse.SUPPRESS)
    pinger = commands.add_parser(
        "ping",
        help="the path to a peer (direct or relayed, and why) and round trips over the tunnel",
        description=(
            "Ask the running wgnat-client which path traffic to PEER takes right now "
            "(direct to which endpoint, or relayed through the registry, why, and when "
            "the next direct attempt is), then ping PEER's tunnel address over the "
            "WireGuard interface.  Exits 0 when a pong came back."
        ),
    )
    pinger.add_argument(
        "peer",
        metavar="PEER",
        help="a tunnel address, a public key or the start of one (as 'wgnat status' shows it)",
    )
    pinger.add_argument(
        "-i", "--interface", default="wg0", help="the client's WireGuard interface (wg0)"
    )
    pinger.add_argument(
        "-c",
        "--count",
        type=int,
        default=ping.DEFAULT_COUNT,
        help=f"how many pings ({ping.DEFAULT_COUNT})",
    )
    pinger.add_argument(
        "--interval",
        type=float,
        default=ping.DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"between pings ({ping.DEFAULT_INTERVAL:g})",
    )
    pinger.add_argument(
        "-W",
        "--wait",
        type=float,
        default=ping.DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for each pong ({ping.DEFAULT_WAIT:g})",
    )
    pinger.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the client's status socket (default {STATUS_DIR}/client-IFACE.sock)",
    )
    pinger.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=argparse.SUPPRESS)
    return parser


def _ping(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.count < 1:
        print(f"wgnat ping: error: -c {args.count}: give at least one ping", file=err)
        return EXIT_FAILURE
    if not args.interval >= ping.MIN_INTERVAL:
        print(
            f"wgnat ping: error: --interval {args.interval:g}: at least "
            f"{ping.MIN_INTERVAL:g} s (ping refuses less)",
            file=err,
        )
        return EXIT_FAILURE
    if not args.wait > 0:
        print(f"wgnat ping: error: -W {args.wait:g}: give a number of seconds above 0", file=err)
        return EXIT_FAILURE
    path = args.socket or default_socket_path("client", args.interface)
    who = "wgnat-client" if args.socket else f"wgnat-client for {args.interface}"

    def again() -> dict[str, Any]:
        try:
            return fetch_status(path, who=who, timeout=args.timeout)
        except StatusError:
            return document  # the client went away meanwhile: nothing new to say

    try:
        document = fetch_status(path, who=who, timeout=args.timeout)
        if document.get("role") != "client":
            raise StatusError(f"{path} is a wgnat-server's socket; wgnat ping asks a wgnat-client")
        return ping.ping_peer(
            document,
            args.peer,
            out,
            count=args.count,
            interval=args.interval,
            wait=args.wait,
            again=again,
        )
    except (StatusError, ping.PingError) as exc:
        out.flush()
        print(f"wgnat ping: error: {exc}", file=err)
        return EXIT_FAILURE


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    ifname = args.interface
    if "/" in ifname or not ifname or len(ifname) > 15:
        print(f"wgnat {args.command}: error: {ifname!r} is not an interface name", file=err)
        return EXIT_FAILURE if args.command == "ping" else DOWN
    if args.command == "ping":
        return _ping(args, out, err)
    role = "server" if args.server else "client"
    program = f"wgnat-{role}"
    path = args.socket or default_socket_path(role, ifname)
    who = program if args.socket else f"{program} for {ifname}"
    try:
        document = fetch_status(path, who=who, timeout=args.timeout)
    except StatusError as exc:
        message = str(exc)
        other = default_socket_path("client" if args.server else "server", ifname)
        if not args.socket and "is running" in message and os.path.exists(other):
            flag = "without --server" if args.server else "--server"
            kind = "wgnat-client" if args.server else "wgnat-server"
            message += f"; a {kind} runs on {ifname}: try {flag}"
        print(f"wgnat status: error: {message}", file=err)
        return DOWN
    if args.json:
        out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        out.write(format_status(document))
    found = health(document)
    for reason in found.reasons:
        print(f"wgnat status: {found.name}: {reason}", file=err)
    return found.code


if __name__ == "__main__":
    sys.exit(main())
