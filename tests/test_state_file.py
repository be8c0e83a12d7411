"""The client's state file (wgnat.client.state_file): which peers it created.
A write reaches the disk before the device is changed (file and directory
fsynced); a corrupt file is kept for the operator, never silently dropped."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.helpers import new_key
from wgnat.client.state_file import StateStore, default_state_path


def test_a_save_survives_a_crash_the_rename_included(tmp_path, monkeypatch):
    """os.replace is only durable once the directory holding the new entry is
    fsynced too (a power cut could otherwise bring the old file back)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = default_state_path(str(tmp_path / "state"), "wg0")
    key = new_key()
    StateStore(path).save({key})
    assert synced == ["file", "directory"]
    assert StateStore(path).load() == {key}


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = default_state_path(str(tmp_path), "wg0")
    old = new_key()
    StateStore(path).save({old})

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        StateStore(path).save({old, new_key()})
    monkeypatch.undo()
    assert StateStore(path).load() == {old}
    assert os.listdir(tmp_path) == ["client-wg0.json"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": 1, "managed_peers": ["AAAA',  # cut short (a full disk, a crash)
        b"\x00" * 64,
        b"[]",
        b'{"format": 1, "managed_peers": "x"}',
        b'{"format": 1, "managed_peers": ["not a key"]}',
        b'{"format": 99, "managed_peers": []}',
    ],
)
def test_a_corrupt_file_is_set_aside_and_reported(tmp_path, content):
    from wgnat.client.state_file import CorruptStateFile

    path = default_state_path(str(tmp_path), "wg0")
    with open(path, "wb") as handle:
        handle.write(content)
    with pytest.raises(CorruptStateFile) as raised:
        StateStore(path).load()
    [aside] = [name for name in os.listdir(tmp_path) if name != "client-wg0.json"]
    assert aside.startswith("client-wg0.json.corrupt-")
    assert (tmp_path / aside).read_bytes() == content  # kept for the operator
    message = str(raised.value)
    assert path in message and aside in message and "takes back" in message
    # Until a good file is written, a restart still sees the loss (and does
    # not take the missing file for "no peers").
    with pytest.raises(CorruptStateFile):
        StateStore(path).load()
    key = new_key()
    StateStore(path).save({key})
    assert StateStore(path).load() == {key}
    assert (tmp_path / aside).read_bytes() == content


def test_a_missing_file_is_an_empty_set_and_a_good_one_loads(tmp_path):
    path = default_state_path(str(tmp_path), "wg0")
    assert StateStore(path).load() == set()
    keys = {new_key(), new_key()}
    StateStore(path).save(keys)
    assert StateStore(path).load() == keys
    assert json.loads(open(path).read())["format"] == 1
