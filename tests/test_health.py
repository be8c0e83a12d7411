"""`wgnat status` exit codes (wgnat/cli/health.py): the pure rule from a status
document to 0 healthy / 1 degraded / 2 down, what the daemons put in their
documents for it, and the command's exit status."""

from __future__ import annotations

import io

import pytest
from twisted.internet.defer import fail

from wgnat.cli import wgnat as cli
from wgnat.cli.health import DEGRADED, DOWN, HEALTHY, REGISTRY_GRACE, health
from wgnat.client.status import status_provider as client_status_provider
from wgnat.device import DeviceError
from wgnat.testing import SimulatedNetwork

NOW = 1_700_000_100.0


def client(**registry) -> dict:
    return {
        "role": "client",
        "interface": "wg0",
        "state": "running",
        "now": NOW,
        "device_error": None,
        "registry": {"connected": True, "last_sync": NOW - 1, "down_since": None, **registry},
        "peers": [],
    }


def test_grace_is_the_reconnect_backoff_cap():
    from wgnat.client.follower import RECONNECT_MAXIMUM

    assert REGISTRY_GRACE == RECONNECT_MAXIMUM == 30


def test_a_connected_client_is_healthy_however_old_its_last_answer():
    assert health(client()).code == HEALTHY
    # Connected with a quiet stream: the last answer may be older than the grace.
    assert health(client(last_sync=NOW - 3600)).code == HEALTHY


def test_a_reconnecting_client_is_healthy_for_one_backoff_then_degraded():
    reconnecting = client(connected=False, down_since=NOW - 29.9, error="connection refused")
    assert health(reconnecting) == health(client())
    gone = client(connected=False, down_since=NOW - 31, error="connection refused")
    found = health(gone)
    assert found.code == DEGRADED and found.name == "degraded"
    assert found.reasons == ("registry unreachable for 31 s (more than 30 s): connection refused",)
    # down_since rules, not the last answer (a quiet stream's could be old).
    assert health(client(connected=False, down_since=NOW - 5, last_sync=NOW - 300)).code == 0


def test_a_client_still_waiting_for_its_first_answer():
    # Following for 10 s, no answer nor failure yet: starting.
    assert health(client(connected=None, last_sync=None, down_since=NOW - 10)).code == HEALTHY
    # No answer in more than a backoff (a connection attempt hanging): degraded.
    stuck = health(client(connected=None, last_sync=None, down_since=NOW - 45))
    assert stuck.code == DEGRADED and stuck.reasons[0].startswith("registry unreachable for 45 s")
    # The agent still reading its device (no follower yet): nothing to judge.
    starting = client(connected=None, last_sync=None, down_since=None)
    assert health({**starting, "state": "starting"}).code == HEALTHY


def test_a_daemon_without_down_since_is_judged_by_its_last_answer():
    old = client(connected=False, last_sync=NOW - 40)
    del old["registry"]["down_since"]
    assert health(old).code == DEGRADED
    old["registry"]["last_sync"] = NOW - 10
    assert health(old).code == HEALTHY
    old["registry"]["last_sync"] = None  # failed, and never answered: no way to wait
    assert health(old).reasons == ("registry unreachable",)


def test_a_device_error_is_down_for_either_daemon():
    found = health({**client(), "device_error": "wg0 vanished"})
    assert found.code == DOWN and found.reasons == ("cannot read wg0: wg0 vanished",)
    registry = {"role": "registry", "interface": "wg1", "device_error": "no such device"}
    assert health(registry).code == DOWN
    assert health({**registry, "device_error": None}).code == HEALTHY
    # Down outranks degraded.
    both = {**client(connected=False, down_since=NOW - 100), "device_error": "gone"}
    assert health(both).code == DOWN


def test_failing_peer_operations_are_degraded():
    document = client()
    document["peers"] = [
        {"public_key": "A" * 44, "address": "10.0.0.2", "device_operation_error": None},
        {"public_key": "B" * 44, "address": "10.0.0.3", "device_operation_error": "probe: EIO"},
        {"public_key": "C" * 44, "address": None, "device_operation_error": "remove: EIO"},
    ]
    found = health(document)
    assert found.code == DEGRADED
    assert found.reasons == (
        "device operations failing for 2 peers (10.0.0.3: probe: EIO; CCCCCCCC: remove: EIO)",
    )


# -- what the client's document says -------------------------------------------


@pytest.fixture
def lab():
    built = SimulatedNetwork(start=NOW)
    yield built
    built.stop()


def document_of(agent) -> dict:
    results: list[dict] = []
    client_status_provider(agent).addCallback(results.append)
    [document] = results
    return document


def test_the_client_document_carries_down_since(lab):
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    agent = lab.agent("a")
    lab.clock.advance(1)
    registry = document_of(agent)["registry"]
    assert registry["connected"] is True and registry["down_since"] is None
    assert health(document_of(agent)).code == HEALTHY
    lab.hosts["a"].client.down = "connection refused"
    lost = lab.clock.seconds()
    for _ in range(40):  # the follower retries with its backoff meanwhile
        lab.clock.advance(1)
        document = document_of(agent)
        assert document["registry"]["connected"] is False
        assert document["registry"]["down_since"] == pytest.approx(lost)
        expected = HEALTHY if lab.clock.seconds() - lost <= REGISTRY_GRACE else DEGRADED
        assert health(document).code == expected, lab.clock.seconds() - lost
    lab.hosts["a"].client.down = None
    lab.clock.advance(31)  # the longest backoff, then an answer
    document = document_of(agent)
    assert document["registry"]["connected"] is True
    assert document["registry"]["down_since"] is None
    assert health(document).code == HEALTHY


def test_the_client_document_carries_failing_peer_operations(lab):
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    lab.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    kb = lab.key("b").base64
    # a's device refuses every change (it still reads): probing b fails.
    device = lab.hosts["a"].device
    original = device.set_peer

    def refuse(update):
        return fail(DeviceError("Input/output error"))

    device.set_peer = refuse
    agent = lab.agent("a")
    lab.agent("b")
    lab.clock.advance(1)
    rows = {row["public_key"]: row for row in document_of(agent)["peers"]}
    failed = rows[kb]["device_operation_error"]
    assert failed is not None and failed.endswith(": Input/output error")
    assert rows[kb]["why"].startswith("device operation failed (")
    found = health(document_of(agent))
    assert found.code == DEGRADED and "device operations failing for 1 peers" in found.reasons[0]
    device.set_peer = original
    lab.clock.advance(60)
    rows = {row["public_key"]: row for row in document_of(agent)["peers"]}
    assert rows[kb]["device_operation_error"] is None
    assert health(document_of(agent)).code == HEALTHY


# -- the command's exit status -------------------------------------------------


def run_status(monkeypatch, document: dict, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "fetch_status", lambda path, **kwargs: document)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["status", "--json", *argv], out, err)
    return code, out.getvalue(), err.getvalue()


def test_the_command_exits_with_the_health_and_says_why(monkeypatch):
    code, out, err = run_status(monkeypatch, client())
    assert (code, err) == (0, "") and '"role": "client"' in out
    code, out, err = run_status(monkeypatch, client(connected=False, down_since=NOW - 60))
    assert code == 1 and out  # the document is printed all the same
    assert err == "wgnat status: degraded: registry unreachable for 60 s (more than 30 s)\n"
    code, _, err = run_status(monkeypatch, {**client(), "device_error": "wg0 vanished"})
    assert code == 2 and err == "wgnat status: down: cannot read wg0: wg0 vanished\n"
    code, _, _ = run_status(monkeypatch, {"role": "registry", "device_error": None}, "--server")
    assert code == 0


def test_no_daemon_is_down(tmp_path, monkeypatch):
    monkeypatch.setattr("wgnat.status_socket.STATUS_DIR", str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["status"], out, err) == DOWN
    assert err.getvalue().startswith("wgnat status: error: no wgnat-client for wg0 is running")


def test_a_state_file_that_cannot_be_written_is_degraded(lab):
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    lab.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    store = lab.hosts["a"].store
    saved = store.save

    def full(managed):
        raise OSError(28, "No space left on device")

    store.save = full
    agent = lab.agent("a")
    lab.agent("b")
    lab.clock.advance(1)
    document = document_of(agent)
    assert document["state_error"] == "No space left on device"
    found = health(document)
    assert found.code == DEGRADED
    assert "cannot write the state file: No space left on device" in found.reasons
    store.save = saved
    lab.clock.advance(60)
    document = document_of(agent)
    assert document["state_error"] is None and health(document).code == HEALTHY
