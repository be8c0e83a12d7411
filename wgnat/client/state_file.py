"""Which peers this client created, kept across restarts so that it never touches
a peer it did not create and leaves no orphans.  Public keys only: nothing secret.

The key is written *before* the peer is added to the device (the agent does not
change the device when the write fails), so a crash between the two leaves at
most a key with no peer (dropped at the next start), never a peer nobody owns.
A write is durable before it returns: the file is fsynced, renamed over the old
one, and the directory fsynced (the rename lives in the directory).

A file that cannot be understood is not read as "no peers" (that would turn
every peer it listed into one configured by hand, for good): it is set aside
(`client-wg0.json.corrupt-<UTC time>`, kept for the operator), and `load` raises
CorruptStateFile so that the agent takes back from the device what it
recognises as its own.
"""

from __future__ import annotations

import json
import os
import time

from wgnat._types import InvalidValue, PublicKey
from wgnat.files import write_atomically

FORMAT = 1


class CorruptStateFile(Exception):
    """The state file was unreadable or malformed; a copy was set aside
    (`moved_to`, None when even that failed).  The message says what to do."""

    def __init__(self, message: str, moved_to: str | None) -> None:
        super().__init__(message)
        self.moved_to = moved_to


def default_state_path(state_dir: str, ifname: str) -> str:
    return os.path.join(state_dir, f"client-{ifname}.json")


def parse_managed(document: object) -> set[PublicKey]:
    """The keys of a state document; ValueError (saying what is wrong) otherwise."""
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    if document.get("format") != FORMAT:
        raise ValueError(
            f"format {document.get('format')!r}, expected {FORMAT} (written by another wgnat?)"
        )
    keys = document.get("managed_peers")
    if not isinstance(keys, list):
        raise ValueError("'managed_peers' is not a list")
    managed = set()
    for text in keys:
        try:
            managed.add(PublicKey.from_base64(text))
        except InvalidValue as exc:
            raise ValueError(f"'managed_peers': {exc}") from None
    return managed


def load_managed(path: str) -> set[PublicKey]:
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise _set_aside(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        return parse_managed(json.loads(content.decode("utf-8")))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _set_aside(path, f"is corrupt: {exc}") from None


def _set_aside(path: str, problem: str) -> CorruptStateFile:
    """Keep the bad file for the operator under another name.  A hard link, not a
    rename: it costs no space (the disk may be full), and the bad file stays
    where it is until a good one replaces it, so a restart before that write
    recovers again instead of finding no file and leaving every peer alone."""
    aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    try:
        os.link(path, aside)
    except FileExistsError:
        pass  # the same file, set aside by a start within the same second
    except OSError as exc:
        return CorruptStateFile(
            f"the state file {path} {problem}, and keeping a copy failed too "
            f"({exc.strerror or exc}); check --state-dir. wgnat takes back from the "
            "device the peers it recognises as its own (see SECURITY.md)",
            None,
        )
    return CorruptStateFile(
        f"the state file {path} {problem}; kept as {aside} for you to inspect. "
        "wgnat takes back from the device the peers it recognises as its own "
        "(see SECURITY.md) and writes a new file",
        aside,
    )


def save_managed(path: str, managed: set[PublicKey]) -> None:
    document = {"format": FORMAT, "managed_peers": sorted(key.base64 for key in managed)}
    write_atomically(path, document, indent=1)


class StateStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> set[PublicKey]:
        return load_managed(self.path)

    def save(self, managed: set[PublicKey]) -> None:
        save_managed(self.path, managed)
