"""Which peers this client created, kept across restarts so that it never touches
a peer it did not create and leaves no orphans.  Public keys only: nothing secret.

The key is written *before* the peer is added to the device, so a crash between
the two leaves at most a key with no peer (dropped at the next start), never a
peer nobody owns.
"""

from __future__ import annotations

import json
import os
import tempfile

from twisted.logger import Logger

from wgnat._types import InvalidValue, PublicKey

log = Logger(namespace="wgnat.client")

FORMAT = 1


def default_state_path(state_dir: str, ifname: str) -> str:
    return os.path.join(state_dir, f"client-{ifname}.json")


def load_managed(path: str) -> set[PublicKey]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        log.warn(
            "ignoring unreadable state file {path}: {error}; peers it listed are left alone",
            path=path,
            error=str(exc),
        )
        return set()
    keys = document.get("managed_peers", []) if isinstance(document, dict) else []
    managed = set()
    for text in keys if isinstance(keys, list) else []:
        try:
            managed.add(PublicKey.from_base64(text))
        except InvalidValue:
            log.warn("ignoring a malformed key in {path}", path=path)
    return managed


def save_managed(path: str, managed: set[PublicKey]) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    document = {"format": FORMAT, "managed_peers": sorted(key.base64 for key in managed)}
    handle, temporary = tempfile.mkstemp(prefix=".client-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class StateStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> set[PublicKey]:
        return load_managed(self.path)

    def save(self, managed: set[PublicKey]) -> None:
        save_managed(self.path, managed)
