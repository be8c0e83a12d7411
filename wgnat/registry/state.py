"""The registry's state across restarts: its epoch, version and records (what
every client was told of every peer, and when), tombstones and announcements,
in one file under --state-dir.

A registry that restarts with its state keeps its epoch, so a reconnecting
client that holds version V gets only what changed after V (usually nothing)
instead of a full answer: 10,000 clients reconnecting after a restart cost a
few bytes each, not 1.8 MiB each.  The file is written atomically (a temporary
file, fsync, rename, fsync of the directory), at most once a second while the
view changes and at stop.  A missing, unreadable, corrupt or foreign file (of
another interface or hub key) means a fresh start with a new epoch: said once,
in the log, with the reason; a corrupt one is kept aside for the operator.

Public keys, endpoints and allowed IPs only: nothing secret.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wgnat._types import Announcement, Endpoint, InvalidValue, PublicKey, parse_network
from wgnat.files import write_atomically
from wgnat.logs import HeldLog
from wgnat.registry.model import PeerRecord, RegistryModel
from wgnat.wire import encode_announcement, ipv6_endpoints_of

log = Logger(namespace="wgnat.registry")

FORMAT = 1
SAVE_DELAY = 1.0


def default_state_path(state_dir: str, ifname: str) -> str:
    return os.path.join(state_dir, f"server-{ifname}.json")


def _announcement(value: Any) -> Announcement | None:
    if value is None:
        return None
    # "symmetric_nat", "mapped", "ipv6" and "punch_first" came later: a file
    # from before has none of them.
    mapped = value.get("mapped")
    return Announcement(
        value["session"],
        tuple(Endpoint.parse(e) for e in value["lan"]),
        symmetric_nat=bool(value.get("symmetric_nat", False)),
        mapped_endpoint=Endpoint.parse(mapped) if mapped else None,
        ipv6_endpoints=ipv6_endpoints_of(value.get("ipv6", []), "ipv6", strict=False),
        punch_first=value.get("punch_first") is True,
    )


# The state file's names for three of the announcement's fields (it named them
# before the wire did; files already written keep them).
STATE_NAMES = {"lan_endpoints": "lan", "ipv6_endpoints": "ipv6", "mapped_endpoint": "mapped"}


def _encode_announcement(announcement: Announcement | None) -> dict[str, Any] | None:
    """The wire's encoding (optional fields only when set), under the state
    file's names."""
    if announcement is None:
        return None
    return {
        STATE_NAMES.get(name, name): value
        for name, value in encode_announcement(announcement).items()
    }


def encode_state(model: RegistryModel, ifname: str, hub_key: PublicKey | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "interface": ifname,
        "hub": hub_key.base64 if hub_key is not None else None,
        "epoch": model.epoch,
        "version": model.version,
        "horizon": model.horizon,
        "gap": list(model.gap),
        "records": [
            {
                "key": record.public_key.base64,
                "endpoint": str(record.endpoint) if record.endpoint else None,
                "allowed_ips": [str(network) for network in record.allowed_ips],
                "announcement": _encode_announcement(record.announcement),
                "handshake": record.latest_handshake,
                "version": record.version,
            }
            for record in model.records.values()  # version order, kept
        ],
        "tombstones": [[key.base64, version] for key, version in model.tombstones.items()],
        "announcements": [
            [key.base64, _encode_announcement(announcement)]
            for key, announcement in model.announcements.items()
        ],
    }


def decode_state(
    document: Any, ifname: str, hub_key: PublicKey | None, live_window: float
) -> RegistryModel:
    """The model a state file holds; InvalidValue saying why it cannot be used."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidValue(f"not a wgnat registry state of format {FORMAT}")
    if document.get("interface") != ifname:
        raise InvalidValue(f"it is the state of interface {document.get('interface')!r}")
    if hub_key is not None and document.get("hub") != hub_key.base64:
        raise InvalidValue("it is the state of another hub (another public key)")
    try:
        model = RegistryModel(
            epoch=str(document["epoch"]),
            live_window=live_window,
            version=int(document["version"]),
            horizon=int(document["horizon"]),
        )
        gap = document.get("gap", [0, 0])
        model.gap = (int(gap[0]), int(gap[1]))
        for item in document["records"]:
            record = PeerRecord(
                PublicKey.from_base64(item["key"]),
                Endpoint.parse(item["endpoint"]) if item["endpoint"] else None,
                tuple(parse_network(network) for network in item["allowed_ips"]),
                _announcement(item["announcement"]),
                None if item["handshake"] is None else float(item["handshake"]),
                int(item["version"]),
            )
            model.restore(record)
        for key, version in document["tombstones"]:
            model.tombstones[PublicKey.from_base64(key)] = int(version)
        for key, announcement in document["announcements"]:
            restored = _announcement(announcement)
            if restored is not None:
                model.announcements[PublicKey.from_base64(key)] = restored
    except (KeyError, TypeError, ValueError) as exc:  # InvalidValue is a ValueError
        raise InvalidValue(f"it is corrupt ({exc})") from None
    if (
        not 0 < len(model.epoch) <= 32
        or model.version < 0
        or model.horizon > model.version
        or not 0 <= model.gap[0] <= model.gap[1] <= model.version
    ):
        raise InvalidValue("it is corrupt (epoch or versions out of range)")
    return model


def load_state(
    path: str,
    ifname: str,
    hub_key: PublicKey | None,
    live_window: float,
    say: Logger | HeldLog = log,
) -> RegistryModel | None:
    """The saved model, or None (said once, with why) for a fresh start."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        say.info("no registry state at {path}: starting with a new epoch", path=path)
        return None
    except (OSError, ValueError) as exc:
        _set_aside(path, f"unreadable ({exc})", say)
        return None
    try:
        model = decode_state(document, ifname, hub_key, live_window)
    except InvalidValue as exc:
        _set_aside(path, str(exc), say)
        return None
    say.info(
        "registry state read from {path}: epoch {epoch}, version {version}, {count} live "
        "peers; clients resume from their versions",
        path=path,
        epoch=model.epoch,
        version=model.version,
        count=len(model.records),
    )
    return model


def _set_aside(path: str, why: str, say: Logger | HeldLog) -> None:
    kept = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.replace(path, kept)
        where = f"kept as {kept}"
    except OSError as exc:
        where = f"cannot move it aside: {exc.strerror or exc}"
    say.warn(
        "ignoring the registry state at {path}: {why} ({where}); starting with a new epoch, "
        "so every client gets a full answer once",
        path=path,
        why=why,
        where=where,
    )


class StateKeeper:
    """Saves the model at most once per SAVE_DELAY while it changes, and at
    stop; a failed save is logged once (until one works) and tried again at
    the next change."""

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        snapshot: Callable[[], dict[str, Any]],
        write: Callable[[str, dict[str, Any]], None] = write_atomically,
    ) -> None:
        self.path = path
        self.clock = clock
        self.snapshot = snapshot
        self.write = write
        self.saves = 0
        self.error: str | None = None
        self._timer: IDelayedCall | None = None

    def changed(self) -> None:
        if self._timer is None:
            self._timer = self.clock.callLater(SAVE_DELAY, self.save)

    def save(self) -> None:
        self._timer = None
        try:
            self.write(self.path, self.snapshot())
        except OSError as exc:
            message = exc.strerror or str(exc)
            if message != self.error:
                log.error(
                    "cannot save the registry state to {path}: {error}; a restart would "
                    "send every client a full answer (retrying at the next change)",
                    path=self.path,
                    error=message,
                )
            self.error = message
            return
        if self.error is not None:
            log.info("the registry state is saved again to {path}", path=self.path)
        self.error = None
        self.saves += 1

    def stop(self) -> None:
        """Save now (at stop) if a save was pending."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
            self.save()
