"""Writing a daemon's file so that a crash or a power cut leaves the old one or
the new one, whole: both state files (the client's managed keys, the registry's
view) go through here."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_atomically(path: str, document: Any, indent: int | None = None) -> None:
    """Temporary file, fsync, rename, fsync of the directory (the rename is an
    entry in the directory: until the directory reaches the disk, a power cut
    can bring the old file back)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".wgnat-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=indent, separators=None if indent else (",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
