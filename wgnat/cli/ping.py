"""`wgnat ping PEER`: which path traffic to a peer takes right now, and round
trips over the tunnel, like `tailscale ping`.

The path comes from the running client's status document (client/status.py,
over its socket, as `wgnat status` asks): direct to which endpoint, or relayed
through the registry, and then why and when the next direct attempt is.  The
round trips come from the system's `ping` (iputils), run as a subprocess bound
to the WireGuard interface (`-I IFACE`): it is on every host wgnat runs on (the
image installs it), handles IPv4 and IPv6, and its timeouts and replies are
what users know.  An ICMP socket of our own would work as root too, but would
duplicate what iputils already does (sequence numbers, matching replies,
errors such as "Destination Host Unreachable") for no gain.

Finding the peer, describing its path and reading ping's lines are pure
functions; `ping_peer` does the I/O.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from wgnat.formatting import duration

DEFAULT_COUNT = 4
DEFAULT_INTERVAL = 1.0
DEFAULT_WAIT = 2.0
# iputils refuses shorter intervals, even for root.
MIN_INTERVAL = 0.002


class PingError(Exception):
    """Why `wgnat ping` cannot ping: one line for the user."""


@dataclass(frozen=True)
class Target:
    """The peer to ping, as the status document describes it."""

    name: str  # "198.51.100.3 (E8igTO14)"
    address: str  # the tunnel address pinged
    row: Mapping[str, Any]  # the peer's row of the status document
    is_registry: bool = False


def _name(address: str | None, key: str) -> str:
    return f"{address} ({key[:8]})" if address else key[:8]


def _registry_row(status: Mapping[str, Any]) -> dict[str, Any]:
    registry = status["registry"]
    return {
        "public_key": registry["public_key"],
        "address": registry.get("address"),
        "endpoint": registry.get("endpoint"),
        "path": "registry",
    }


def find_peer(status: Mapping[str, Any], query: str) -> Target:
    """The peer `query` names in a client's status document: its tunnel address,
    its public key or the start of it (as `wgnat status` shows it).  The registry
    itself can be named too.  PingError when none or several match."""
    interface = status.get("interface", "?")
    query = query.strip()
    rows: list[Mapping[str, Any]] = [*status.get("peers", ()), _registry_row(status)]
    try:
        wanted = ipaddress.ip_address(query)
    except ValueError:
        wanted = None
    if wanted is not None:
        matches = [
            row
            for row in rows
            if row.get("address") and ipaddress.ip_address(row["address"]) == wanted
        ]
    else:
        matches = [row for row in rows if query and str(row["public_key"]).startswith(query)]
    if not matches:
        raise PingError(
            f"no peer {query!r} on {interface}: give a tunnel address, a public key or "
            f"the start of one, as 'wgnat status -i {interface}' lists them"
        )
    if len(matches) > 1:
        names = ", ".join(_name(row.get("address"), row["public_key"]) for row in matches)
        raise PingError(
            f"{query!r} matches {len(matches)} peers on {interface} ({names}); "
            "give more of the key, or the tunnel address"
        )
    row = matches[0]
    name = _name(row.get("address"), row["public_key"])
    if not row.get("address"):
        raise PingError(
            f"{name} has no tunnel address known on {interface} (no allowed IPs), so "
            "there is nothing to ping"
        )
    return Target(name, str(row["address"]), row, is_registry=row["path"] == "registry")


def registry_name(status: Mapping[str, Any]) -> str:
    registry = status["registry"]
    return f"the registry {_name(registry.get('address'), registry['public_key'])}"


def via(status: Mapping[str, Any], target: Target) -> str:
    """Where the pongs come through: an endpoint, or the registry (the hub)."""
    path = target.row["path"]
    if target.is_registry or path in ("direct", "manual"):
        return target.row.get("endpoint") or "its endpoint"
    return registry_name(status)


def describe_path(status: Mapping[str, Any], target: Target) -> str:
    """Which path traffic to the peer takes right now, and why, in a sentence."""
    row, name = target.row, target.name
    now = float(status["now"])
    endpoint = row.get("endpoint") or "an unknown endpoint"
    if target.is_registry:
        return f"{name} is the registry (the hub): direct at {endpoint}"
    path = row["path"]
    if path == "direct":
        handshake = row.get("handshake_age")
        seen = "" if handshake is None else f", last handshake {duration(handshake)} ago"
        return f"{name} is direct at {endpoint}{seen}"
    if path == "manual":
        return (
            f"{name} is configured by hand on {status['interface']} (wgnat leaves it alone): "
            f"direct at {endpoint}"
        )
    hub = registry_name(status)
    registry_endpoint = status["registry"].get("endpoint")
    through = f"{hub} at {registry_endpoint}" if registry_endpoint else hub
    if path == "probing":
        deadline = row.get("deadline")
        left = "" if deadline is None else f" ({duration(max(0.0, deadline - now))} left)"
        if row.get("phase") == "switching":
            return (
                f"{name} is relayed through {through}; a handshake with {endpoint} "
                f"completed, so both ends switch to direct{left}"
            )
        return (
            f"{name} is relayed through {through} while {endpoint} is probed for a "
            f"direct path (attempt #{row.get('attempts') or 1}{left})"
        )
    line = f"{name} is relayed through {through}: {row.get('reason') or 'no direct path'}"
    retry_at = row.get("retry_at")
    if retry_at is not None and retry_at > now:
        line += f"; next direct attempt in {duration(retry_at - now)}"
    elif row.get("phase") == "relayed" and "retry_at" in row:
        line += "; next direct attempt when the registry gives a usable endpoint"
    else:
        line += "; no direct attempt until that changes"
    return line


# -- iputils ping's output ---------------------------------------------------

_REPLY = re.compile(r"^\d+ bytes from [^:]+: icmp_seq=(\d+) .*time=([\d.]+) ms")
_SUMMARY = re.compile(r"^(\d+) packets transmitted, (\d+) received")


@dataclass(frozen=True)
class Reply:
    seq: int
    rtt_ms: float


def parse_reply(line: str) -> Reply | None:
    """An echo reply line of iputils ping (`-n`), else None."""
    match = _REPLY.match(line.strip())
    return None if match is None else Reply(int(match.group(1)), float(match.group(2)))


def parse_transmitted(line: str) -> int | None:
    match = _SUMMARY.match(line.strip())
    return None if match is None else int(match.group(1))


def error_notes(errors: Sequence[str]) -> list[str]:
    """ping's error lines, each kind once; a hub's ICMP redirects (which ping
    counts as errors, though every pong came back) as the setting to change."""
    notes: list[str] = []
    for error in errors:
        if "Redirect" in error:
            error = (
                f"{error.split()[1].rstrip(':')} sent ICMP redirects (harmless; on the hub: "
                "sysctl -w net.ipv4.conf.all.send_redirects=0)"
            )
        else:
            error = re.sub(r"icmp_seq=\d+ ", "", error)
        if error not in notes:
            notes.append(error)
    return notes


def pong_line(target: Target, route: str, reply: Reply) -> str:
    return f"pong from {target.name} via {route} in {reply.rtt_ms:g} ms"


def summary(sent: int, replies: Sequence[Reply]) -> str:
    received = len({reply.seq for reply in replies})
    lost = max(0, sent - received)
    line = f"{sent} pings, {received} pongs, {lost} lost"
    if replies:
        rtts = [reply.rtt_ms for reply in replies]
        line += (
            f"; round trip min/avg/max {min(rtts):.3g}/{sum(rtts) / len(rtts):.3g}/"
            f"{max(rtts):.3g} ms"
        )
    return line


def ping_command(
    address: str, interface: str, count: int, interval: float, wait: float
) -> list[str]:
    return [
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        f"{interval:g}",
        "-W",
        f"{wait:g}",
        "-I",
        interface,
        address,
    ]


# -- the I/O -------------------------------------------------------------------


def run_ping(argv: list[str], timeout: float) -> Iterable[str]:
    """Run ping, yielding its output lines as they come."""
    try:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    except FileNotFoundError:
        raise PingError(
            "the ping command is not installed; install iputils-ping (apt-get install iputils-ping)"
        ) from None
    assert process.stdout is not None
    try:
        yield from process.stdout
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ping_peer(
    status: Mapping[str, Any],
    query: str,
    out: TextIO,
    *,
    count: int = DEFAULT_COUNT,
    interval: float = DEFAULT_INTERVAL,
    wait: float = DEFAULT_WAIT,
    again: Callable[[], Mapping[str, Any]] | None = None,
    run: Callable[[list[str], float], Iterable[str]] = run_ping,
) -> int:
    """Print the peer's path, ping it, print the pongs; 0 when any came back.
    `again` fetches the status once more, to report a path that changed while
    pinging."""
    target = find_peer(status, query)
    out.write(describe_path(status, target) + "\n")
    out.flush()
    route = via(status, target)
    argv = ping_command(target.address, status["interface"], count, interval, wait)
    replies: list[Reply] = []
    sent = count
    errors: list[str] = []
    try:
        for line in run(argv, count * interval + wait + 5):
            reply = parse_reply(line)
            if reply is not None:
                replies.append(reply)
                out.write(pong_line(target, route, reply) + "\n")
                out.flush()
                continue
            transmitted = parse_transmitted(line)
            if transmitted is not None:
                sent = transmitted
            elif line.startswith(("From ", "ping: ")):
                errors.append(line.strip())
    except KeyboardInterrupt:  # ^C: the summary so far, as ping itself does
        sent = max([len(replies), *(reply.seq for reply in replies)])
        again = None
    for error in error_notes(errors):
        out.write(f"  ({error})\n")
    out.write(summary(sent, replies) + "\n")
    if again is not None:
        now = again()
        try:
            later = find_peer(now, target.row["public_key"])
        except PingError:
            later = None
        if later is not None and later.row.get("path") != target.row.get("path"):
            out.write(f"the path changed meanwhile: {describe_path(now, later)}\n")
    return 0 if replies else 1
