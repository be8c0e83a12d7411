"""The registry's state across restarts (registry/state.py): a registry that
restarts with its state keeps its epoch, so reconnecting clients resume with
deltas, not full answers; a missing, corrupt or foreign file is a fresh start,
said once; the file is written atomically, at most once a second."""

from __future__ import annotations

import json
import os

from tests.helpers import ep, new_key, peer
from wgnat._types import Announcement
from wgnat.client.registry_client import RegistryError
from wgnat.device.memory import MemoryDevice
from wgnat.files import write_atomically
from wgnat.registry.hub import Registry
from wgnat.registry.model import LIVE_WINDOW, RegistryModel
from wgnat.registry.state import (
    SAVE_DELAY,
    StateKeeper,
    decode_state,
    encode_state,
    load_state,
)
from wgnat.testing import SimulatedNetwork

NOW = 1_700_000_000.0


def populated_model() -> tuple[RegistryModel, MemoryDevice]:
    device = MemoryDevice("wg0", public_key=new_key())
    keys = [new_key() for _ in range(5)]
    for n, key in enumerate(keys):
        device.add_peer(peer(key, f"203.0.113.{20 + n}:51820", (f"198.51.100.{2 + n}/32",), NOW))
    model = RegistryModel()
    model.observe(device.snapshot(), NOW)
    model.announce(keys[0], Announcement("ab", (ep("192.168.1.7:51820"),)))
    del device.peers[keys[4]]
    model.observe(device.snapshot(), NOW + 1)  # a tombstone
    return model, device


def test_the_state_round_trips():
    model, device = populated_model()
    document = json.loads(json.dumps(encode_state(model, "wg0", device.public_key)))
    restored = decode_state(document, "wg0", device.public_key, LIVE_WINDOW)
    assert (restored.epoch, restored.version, restored.horizon) == (
        model.epoch,
        model.version,
        model.horizon,
    )
    assert list(restored.records.values()) == list(model.records.values())  # version order
    assert restored.tombstones == model.tombstones
    assert restored.announcements == model.announcements
    assert restored.digest == model.digest
    # Observing the same device changes nothing: no new version for anyone.
    assert restored.observe(device.snapshot(), NOW + 2) == []
    assert restored.version == model.version


def test_a_restarted_registry_with_its_state_sends_deltas_not_full_answers(tmp_path):
    net = SimulatedNetwork()
    for n in range(4):
        net.add_host(f"h{n}", f"198.51.100.{10 + n}", f"203.0.113.{10 + n}:51820")
        net.agent(f"h{n}")
    net.clock.advance(1.0)
    clients = [host.client for host in net.hosts.values()]
    full_before = sum(client.full_answers for client in clients if client is not None)
    path = str(tmp_path / "server-wg0.json")
    write_atomically(path, encode_state(net.hub.model, "wg0", net.registry_key))
    # The registry process restarts: every stream cut, a new hub from the file.
    old_epoch = net.hub.model.epoch
    restarted = Registry(net.registry_device, net.clock)
    restored = load_state(path, "wg0", net.registry_key, LIVE_WINDOW)
    assert restored is not None
    restored.resume_after_restart()  # as the daemon does
    restarted.model = restored
    for client in clients:
        assert client is not None
        client.hub = restarted
        for stream in list(client.streams):
            stream.fail(RegistryError("the registry's stream was cut off"))
    net.hub = restarted
    net.clock.advance(1.0)  # every client back within its first backoff window
    for host in net.hosts.values():
        assert host.agent is not None and host.agent.registry_up is True
        assert host.agent.view.epoch == old_epoch
    full_after = sum(client.full_answers for client in clients if client is not None)
    assert full_after == full_before  # no client fetched a view it already had
    assert restarted.streams() == 4
    net.stop()


def test_a_missing_corrupt_or_foreign_state_is_a_fresh_start_said_once(tmp_path, logged):
    model, device = populated_model()
    path = str(tmp_path / "server-wg0.json")
    assert load_state(path, "wg0", device.public_key, LIVE_WINDOW) is None
    assert any("no registry state" in line for line in logged)
    with open(path, "w") as handle:
        handle.write('{"format": 1, "epoch": ')  # cut short by a crash of a writer
    del logged[:]
    assert load_state(path, "wg0", device.public_key, LIVE_WINDOW) is None
    [line] = [line for line in logged if "ignoring the registry state" in line]
    assert "kept as" in line and "new epoch" in line
    assert not os.path.exists(path)  # set aside, for the operator
    assert [name for name in os.listdir(tmp_path) if ".corrupt-" in name]
    # Another hub's state, or another interface's: not ours to resume.
    write_atomically(path, encode_state(model, "wg0", new_key()))
    assert load_state(path, "wg0", device.public_key, LIVE_WINDOW) is None
    write_atomically(path, encode_state(model, "wg1", device.public_key))
    assert load_state(path, "wg0", device.public_key, LIVE_WINDOW) is None
    assert any("interface 'wg1'" in line for line in logged)


def test_the_state_is_saved_at_most_once_a_second_and_a_failure_is_logged_once(logged):
    from twisted.internet.task import Clock

    clock = Clock()
    written = []
    failing = {"on": False}

    def write(path, document):
        if failing["on"]:
            raise OSError(28, "No space left on device")
        written.append(document)

    keeper = StateKeeper("/x/server-wg0.json", clock, lambda: {"n": len(written)}, write)
    for _ in range(50):
        keeper.changed()
        clock.advance(0.01)
    clock.advance(SAVE_DELAY)
    assert len(written) == 1
    failing["on"] = True
    for _ in range(3):
        keeper.changed()
        clock.advance(SAVE_DELAY)
    assert len([line for line in logged if "cannot save the registry state" in line]) == 1
    failing["on"] = False
    keeper.changed()
    keeper.stop()  # at stop: saved now, not a second later
    assert len(written) == 2
    assert any("saved again" in line for line in logged)


def test_a_client_told_more_than_the_file_holds_gets_a_full_answer_not_a_wrong_delta():
    """Found in review: the file is saved up to a second after a change; a
    registry killed in that second resumed its epoch and stamped the next
    changes with versions its clients had already seen for others."""
    model, device = populated_model()
    saved = json.loads(json.dumps(encode_state(model, "wg0", device.public_key)))
    told = model.version
    # A change after the last save, which clients hear of; then the crash.
    key = next(iter(model.records))
    device.handshake(key, NOW + 2, endpoint=ep("203.0.113.99:40000"))
    model.observe(device.snapshot(), NOW + 2)
    seen_by_clients = model.version
    assert seen_by_clients == told + 1
    restored = decode_state(saved, "wg0", device.public_key, LIVE_WINDOW)
    restored.resume_after_restart()
    restored.observe(device.snapshot(), NOW + 3)  # the change again, at a new version
    client = next(k for k in restored.records if k != key)
    assert json.loads(restored.encoded_answer(client, seen_by_clients, NOW + 3, model.epoch))[
        "full"
    ]
    # A client at the file's version resumes with a delta holding that change.
    delta = json.loads(restored.encoded_answer(client, told, NOW + 3, model.epoch))
    assert not delta["full"] and [p["public_key"] for p in delta["peers"]] == [key.base64]
    # And the gap survives the next save and restart.
    again = decode_state(
        json.loads(json.dumps(encode_state(restored, "wg0", device.public_key))),
        "wg0",
        device.public_key,
        LIVE_WINDOW,
    )
    assert again.gap == restored.gap


def test_ipv6_and_mapped_endpoints_are_kept_across_a_restart_and_old_files_still_load():
    model, device = populated_model()
    key = next(iter(model.records))
    model.announce(
        key,
        Announcement(
            "cd",
            ipv6_endpoints=(ep("[2001:db8::7]:51820"),),
            mapped_endpoint=ep("198.51.100.23:40000"),
            punch_first=True,
        ),
    )
    document = json.loads(json.dumps(encode_state(model, "wg0", device.public_key)))
    restored = decode_state(document, "wg0", device.public_key, LIVE_WINDOW)
    assert restored.announcements[key] == model.announcements[key]
    assert restored.digest == model.digest
    # A file written before these fields: announcements without "ipv6"/"mapped".
    for _, announcement in document["announcements"]:
        if announcement is not None:
            announcement.pop("ipv6", None)
            announcement.pop("mapped", None)
            announcement.pop("punch_first", None)
    for item in document["records"]:
        if item["announcement"] is not None:
            item["announcement"].pop("ipv6", None)
            item["announcement"].pop("mapped", None)
            item["announcement"].pop("punch_first", None)
    older = decode_state(document, "wg0", device.public_key, LIVE_WINDOW)
    assert older.announcements[key] == Announcement("cd")
