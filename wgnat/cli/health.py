"""What `wgnat status` exits with: the daemon's health, read from its status
document alone (pure: a document in, a code and the reasons out).

    0  healthy   the device reads, and a client hears from its registry (or has
                 been without it for at most REGISTRY_GRACE seconds: reconnecting)
    1  degraded  a client has been without its registry for longer than
                 REGISTRY_GRACE, or a device operation on one of its peers failed
                 last time it was tried, or it cannot write its state file (and
                 so holds back the changes it would record there); the mesh is
                 kept meanwhile
    2  down      the daemon cannot read its WireGuard device (`device_error`); the
                 command also exits 2 when it gets no status document at all (no
                 daemon running, nothing answers on the socket, no answer in time)
                 and, as argparse does, on a command line it cannot use

The Docker healthcheck (docker/healthcheck.sh) fails on anything but 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wgnat.client.follower import RECONNECT_MAXIMUM

HEALTHY = 0
DEGRADED = 1
DOWN = 2
NAMES = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}

# A client that lost its registry retries with a backoff capped at 30 s: until
# one full backoff has passed without an answer, it is reconnecting, not degraded.
REGISTRY_GRACE = RECONNECT_MAXIMUM


@dataclass(frozen=True)
class Health:
    code: int
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return NAMES[self.code]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def health(document: dict[str, Any], grace: float = REGISTRY_GRACE) -> Health:
    """The health a status document (either daemon's) shows.

    Fields read: `device_error` (both daemons); for a client, `now`,
    `registry.connected` (true, false, or null before the first answer or
    error), `registry.down_since` (null while connected; else since when the
    client has been without the registry: the first failure, or the start of
    following it), `registry.last_sync` and `registry.error`, `state_error`, and
    each peer's `device_operation_error`.  `state` ("starting" until the agent has read its
    device) needs no rule of its own: a client that cannot start either cannot
    read its device or cannot reach its registry."""
    interface = document.get("interface") or "the interface"
    if document.get("device_error"):
        return Health(DOWN, (f"cannot read {interface}: {document['device_error']}",))
    if document.get("role") != "client":
        return Health(HEALTHY)
    reasons = []
    registry = document.get("registry") or {}
    connected = registry.get("connected")
    if connected is not True:
        now = _number(document.get("now"))
        # down_since is the precise moment; a daemon that does not report it is
        # judged by its last answer; a client that never had one and has not
        # failed yet (connected null) is starting.
        since = _number(registry.get("down_since"))
        if since is None:
            since = _number(registry.get("last_sync"))
        without = None if now is None or since is None else max(0.0, now - since)
        unknown = without is None and connected is False
        if unknown or (without is not None and without > grace):
            error = registry.get("error")
            reason = "registry unreachable"
            if without is not None:
                reason += f" for {without:.0f} s (more than {grace:g} s)"
            if error:
                reason += f": {error}"
            reasons.append(reason)
    if document.get("state_error"):
        reasons.append(f"cannot write the state file: {document['state_error']}")
    failing = [
        f"{row.get('address') or row.get('public_key', '?')[:8]}: {row['device_operation_error']}"
        for row in document.get("peers") or []
        if row.get("device_operation_error")
    ]
    if failing:
        shown = "; ".join(failing[:3]) + (f"; {len(failing) - 3} more" if len(failing) > 3 else "")
        reasons.append(f"device operations failing for {len(failing)} peers ({shown})")
    return Health(DEGRADED if reasons else HEALTHY, tuple(reasons))
