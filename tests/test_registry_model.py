"""The registry's pure model: liveness, versions, deltas, caller identity."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import device, ep, ip, new_key, peer
from wgnat._types import Announcement
from wgnat.registry.model import RegistryModel

NOW = 1_000_000.0


def test_only_live_peers_are_served_and_a_full_answer_is_shared():
    a, b, stale, never = new_key(), new_key(), new_key(), new_key()
    model = RegistryModel()
    changed = model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW - 5),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW - 100),
            peer(stale, "203.0.113.23:51820", ("198.51.100.4/32",), NOW - 500),
            peer(never, None, ("198.51.100.5/32",)),
        ),
        NOW,
    )
    assert changed
    answer = model.answer(a, None, NOW)
    assert answer["full"] is True
    assert answer["you"]["endpoint"] == "203.0.113.21:51820"
    # Every live peer, the caller too: the same list for every caller.
    assert sorted(p["public_key"] for p in answer["peers"]) == sorted([a.base64, b.base64])
    [only] = [p for p in answer["peers"] if p["public_key"] == b.base64]
    assert only["endpoint"] == "203.0.113.22:51820"
    assert only["allowed_ips"] == ["198.51.100.3/32"]
    assert only["last_handshake_age"] == 100.0
    # Encoded once per version: b's answer shares a's peers, byte for byte.
    for_a = model.encoded_answer(a, None, NOW)
    for_b = model.encoded_answer(b, None, NOW + 30)
    assert json.loads(for_a)["peers"] == answer["peers"]
    assert json.loads(for_b)["you"]["public_key"] == b.base64
    assert for_a.split(b',"peers":')[1] == for_b.split(b',"peers":')[1]
    assert json.loads(for_a) == {**answer}  # the same document both ways


def test_version_moves_only_for_what_clients_act_on():
    a = new_key()
    model = RegistryModel()
    model.observe(device(peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW)), NOW)
    version = model.version
    # A fresher handshake or more bytes: nothing for clients to do.
    assert not model.observe(
        device(peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW + 9, rx=500)), NOW + 10
    )
    assert model.version == version
    # The NAT rebound: a new endpoint.
    assert model.observe(
        device(peer(a, "203.0.113.21:40001", ("198.51.100.2/32",), NOW + 20)), NOW + 20
    )
    assert model.version == version + 1
    assert model.endpoint_changes == 1


def test_delta_carries_only_changes_and_removals():
    a, b, c = new_key(), new_key(), new_key()
    model = RegistryModel()
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
            peer(c, "203.0.113.23:51820", ("198.51.100.4/32",), NOW),
        ),
        NOW,
    )
    since = model.version
    # b moves, c goes silent for longer than WireGuard keeps a session.
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW + 200),
            peer(b, "203.0.113.22:40000", ("198.51.100.3/32",), NOW + 200),
            peer(c, "203.0.113.23:51820", ("198.51.100.4/32",), NOW),
        ),
        NOW + 200,
    )
    answer = model.answer(a, since, NOW + 200, model.epoch)
    assert answer["full"] is False
    assert [p["public_key"] for p in answer["peers"]] == [b.base64]
    assert answer["removed"] == [c.base64]
    # Nothing changed since the current version: an empty delta.
    empty = model.answer(a, model.version, NOW + 200, model.epoch)
    assert empty["peers"] == [] and empty["removed"] == []


def test_observe_says_what_changed_for_the_log():
    a, b = new_key(), new_key()
    model = RegistryModel()
    came = model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
        ),
        NOW,
    )
    assert [(c.kind, c.public_key, str(c.endpoint)) for c in came] == [
        ("live", a, "203.0.113.21:51820"),
        ("live", b, "203.0.113.22:51820"),
    ]
    # Nothing clients act on: nothing to log.
    assert (
        model.observe(
            device(
                peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW + 5),
                peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW + 5),
            ),
            NOW + 5,
        )
        == []
    )
    later = model.observe(
        device(
            peer(a, "203.0.113.21:40000", ("198.51.100.2/32",), NOW + 9),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32", "198.51.100.33/32"), NOW + 9),
        ),
        NOW + 9,
    )
    assert [(c.kind, str(c.old_endpoint), str(c.endpoint)) for c in later] == [
        ("moved", "203.0.113.21:51820", "203.0.113.21:40000"),
        ("allowed_ips", "None", "203.0.113.22:51820"),
    ]
    gone = model.observe(device(peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW)), NOW + 9)
    assert [(c.kind, c.public_key) for c in gone] == [("gone", a), ("allowed_ips", b)]
    assert [str(n) for n in gone[0].allowed_ips] == ["198.51.100.2/32"]


def test_full_answer_for_other_epoch_or_forgotten_history():
    a, b = new_key(), new_key()
    model = RegistryModel(max_tombstones=1)
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
        ),
        NOW,
    )
    assert model.answer(a, model.version, NOW, "0123")["full"] is True
    assert model.answer(a, model.version + 5, NOW, model.epoch)["full"] is True
    old = model.version
    for _ in range(3):  # churn past the tombstone memory
        model.observe(device(peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW)), NOW)
        model.observe(
            device(
                peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
                peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
            ),
            NOW,
        )
        model.observe(
            device(
                peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
                peer(new_key(), "203.0.113.9:1", ("198.51.100.9/32",), NOW),
            ),
            NOW,
        )
    assert model.answer(a, old, NOW, model.epoch)["full"] is True
    shared = model.broadcast(old, NOW)  # a stream that far behind: every live peer
    assert shared["full"] is True
    assert {p["public_key"] for p in shared["peers"]} == {k.base64 for k in model.records}


def test_announcements_are_versioned_and_attached():
    a, b = new_key(), new_key()
    model = RegistryModel()
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.21:1024", ("198.51.100.3/32",), NOW),
        ),
        NOW,
    )
    version = model.version
    assert model.announce(b, Announcement("b0b", (ep("192.168.1.11:51820"),)))
    assert not model.announce(b, Announcement("b0b", (ep("192.168.1.11:51820"),)))
    delta = model.answer(a, version, NOW, model.epoch)
    assert delta["peers"][0]["lan_endpoints"] == ["192.168.1.11:51820"]
    assert delta["peers"][0]["session"] == "b0b"
    # A restarted client (new session) is news for the others, same LAN or not.
    version = model.version
    assert model.announce(b, Announcement("b1b", (ep("192.168.1.11:51820"),)))
    assert model.answer(a, version, NOW, model.epoch)["peers"][0]["session"] == "b1b"


def test_caller_is_found_by_most_specific_allowed_ip():
    a, routed = new_key(), new_key()
    model = RegistryModel()
    model.observe(
        device(peer(a, None, ("198.51.100.2/32",)), peer(routed, None, ("198.51.100.0/24",))), NOW
    )
    assert model.caller(ip("198.51.100.2")) == a
    assert model.caller(ip("198.51.100.77")) == routed
    assert model.caller(ip("192.0.2.1")) is None


def test_answers_never_carry_secrets():
    # The types cannot hold one; this checks the JSON has only the documented keys.
    a, b = new_key(), new_key()
    model = RegistryModel()
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
        ),
        NOW,
    )
    answer = model.answer(a, None, NOW)
    assert set(answer) == {"epoch", "version", "full", "you", "peers", "removed"}
    assert set(answer["peers"][0]) == {
        "public_key",
        "endpoint",
        "allowed_ips",
        "lan_endpoints",
        "session",
        "last_handshake_age",
    }


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["move", "leave", "announce", "return"]), st.integers(0, 5)),
        max_size=40,
    ),
    st.integers(0, 60),
)
def test_deltas_equal_a_brute_force_scan(operations, since):
    # The model finds a delta by walking its version-ordered records back from
    # the newest; this checks it against scanning everything.
    keys = [new_key() for _ in range(6)]
    ports = dict.fromkeys(range(6), 51820)
    present = set(range(6))
    model = RegistryModel(max_tombstones=1000)

    def state():
        return device(
            *[
                peer(keys[i], f"203.0.113.{20 + i}:{ports[i]}", (f"198.51.100.{2 + i}/32",), NOW)
                for i in sorted(present)
            ]
        )

    model.observe(state(), NOW)
    for kind, i in operations:
        if kind == "move":
            ports[i] += 1
        elif kind == "leave":
            present.discard(i)
        elif kind == "return":
            present.add(i)
        else:
            model.announce(keys[i], Announcement(f"{len(operations):x}{i}"))
        model.observe(state(), NOW)
    caller = keys[0]
    answer = model.answer(caller, since, NOW, model.epoch)
    if answer["full"]:
        return
    expected = {k.base64 for k, r in model.records.items() if r.version > since and k != caller}
    assert {p["public_key"] for p in answer["peers"]} == expected
    gone = {k.base64 for k, v in model.tombstones.items() if v > since and k != caller}
    assert set(answer["removed"]) == gone
    # The shared line for streams: the same changes, no caller left out, no "you".
    shared = model.broadcast(since, NOW)
    assert not shared["full"] and "you" not in shared
    assert {p["public_key"] for p in shared["peers"]} == {
        k.base64 for k, r in model.records.items() if r.version > since
    }
    assert set(shared["removed"]) == {k.base64 for k, v in model.tombstones.items() if v > since}
    for i in present:
        assert model.caller(ip(f"198.51.100.{2 + i}")) == keys[i]


def test_a_current_check_encodes_nothing_and_a_stale_one_gets_what_changed(monkeypatch):
    """The -t safety net costs O(1) when nothing changed: the caller's view digest
    is compared, nothing is encoded (a full answer at 10,000 peers was 1.8 MiB
    and 0.16 s of CPU, per client per minute)."""
    from wgnat import wire
    from wgnat.client.view import RegistryView
    from wgnat.registry import model as model_module

    a, b, c = new_key(), new_key(), new_key()
    model = RegistryModel()
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
        ),
        NOW,
    )
    model.announce(b, Announcement("b1", (ep("192.168.1.7:51820"),)))
    # a's view, as its client builds it from a full answer.
    first = wire.StreamDecoder()
    [answer] = list(first.feed(model.encoded_answer(a, None, NOW) + b"\n"))
    view = RegistryView()
    view.apply(answer)
    digest = wire.view_digest(view.peers.values(), view.my_endpoint)
    assert digest == model.view_digest(a)
    encoded = []
    real = model_module.encode_peer
    monkeypatch.setattr(model_module, "encode_peer", lambda *args: encoded.append(1) or real(*args))
    assert model.check(a, model.epoch, model.version, digest, NOW + 60) is None
    assert encoded == []
    # c joins: a's check (same digest, older version) gets the delta, just c.
    model.observe(
        device(
            peer(a, "203.0.113.21:51820", ("198.51.100.2/32",), NOW),
            peer(b, "203.0.113.22:51820", ("198.51.100.3/32",), NOW),
            peer(c, "203.0.113.23:51820", ("198.51.100.4/32",), NOW + 60),
        ),
        NOW + 60,
    )
    delta = json.loads(model.check(a, model.epoch, view.version, digest, NOW + 61))
    assert not delta["full"] and [p["public_key"] for p in delta["peers"]] == [c.base64]
    # A view that differs at the current version (it drifted): the whole view.
    drifted = json.loads(model.check(a, model.epoch, model.version, "0" * 16, NOW + 61))
    assert drifted["full"] is True
    # Another epoch (the registry restarted afresh): the whole view.
    assert json.loads(model.check(a, "0123", view.version, digest, NOW + 61))["full"] is True
