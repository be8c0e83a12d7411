"""`wgnat status`: the pure status documents and tables, the status socket both
daemons serve, and the `wgnat status` command end to end on a real reactor."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tomllib
from pathlib import Path as FilePath

import pytest
import pytest_twisted
from twisted.internet import reactor as real_reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.helpers import ep, ip, nets, new_key, peer
from wgnat._types import Announcement
from wgnat.cli.tables import format_status
from wgnat.cli.wgnat import main
from wgnat.client import tap as client_tap
from wgnat.client.reconcile import Mesh, Path, PeerPath, Policy, retry_moment
from wgnat.client.status import ClientInfo, client_info, client_status
from wgnat.client.status import status_provider as client_status_provider
from wgnat.client.view import RegistryView
from wgnat.device.memory import MemoryDevice
from wgnat.formatting import duration, size
from wgnat.registry import tap as registry_tap
from wgnat.registry.model import RegistryModel
from wgnat.registry.status import registry_status
from wgnat.registry.status import status_provider as registry_status_provider
from wgnat.status_socket import StatusSocket, default_socket_path, prepare_socket_path
from wgnat.testing import SimulatedNetwork
from wgnat.wire import RemotePeer

START = 1_700_000_000.0
ROOT = FilePath(__file__).resolve().parent.parent


@pytest.fixture
def lab():
    built = SimulatedNetwork(start=START)
    yield built
    built.stop()


def by_key(status: dict) -> dict:
    return {row["public_key"]: row for row in status["peers"]}


def assert_no_secrets(document: dict) -> None:
    text = json.dumps(document).lower()
    assert "private" not in text and "preshared" not in text


# -- the pure documents and tables -------------------------------------------


def test_client_status_tells_each_path_and_why(lab):
    """a: direct with b, relayed to c (no handshake), d has no wgnat client, and a
    peer configured by hand; built from the agent's mesh and a device snapshot."""
    for name, tunnel, public in [
        ("a", "198.51.100.2", "203.0.113.21:51820"),
        ("b", "198.51.100.3", "203.0.113.22:51820"),
        ("c", "198.51.100.4", "203.0.113.23:61207"),
        ("d", "198.51.100.5", "203.0.113.24:51820"),
    ]:
        lab.add_host(name, tunnel, public)
    a = lab.agent("a")
    lab.agent("b")
    lab.agent("c")
    ka, kb, kc, kd = (lab.hosts[n].key for n in "abcd")
    manual = new_key()
    da = lab.hosts["a"].device
    da.add_peer(peer(manual, "192.0.2.9:51820", ("10.99.0.9/32",), START - 5, rx=10, tx=20))
    lab.hub.refresh()  # d is live at the registry, but no client runs there
    lab.handshake("a", "b")
    lab.clock.advance(0.3)
    assert a.paths()[kb] is Path.DIRECT
    lab.clock.advance(6.0)  # c never answered: relayed
    assert a.paths()[kc] is Path.RELAYED
    da.traffic(kb, rx=1234, tx=5678)
    now = lab.clock.seconds()

    status = client_status(client_info(a), a.mesh, a.view, da.snapshot(), now)
    json.dumps(status)  # JSON-ready as it is
    assert_no_secrets(status)
    assert status["role"] == "client" and status["state"] == "running"
    assert status["interface"] == "wg0" and status["public_key"] == ka.base64
    assert status["public_endpoint"] == "203.0.113.21:51820"
    assert status["lan_endpoints"] == ["192.168.1.10:51820"]
    registry = status["registry"]
    assert registry["connected"] is True and registry["error"] is None
    assert registry["address"] == "198.51.100.1" and registry["port"] == 51820
    assert registry["endpoint"] == "203.0.113.10:51820"
    assert registry["last_sync"] is not None
    assert status["counts"] == {"direct": 1, "relayed": 2, "probing": 0, "manual": 1}

    rows = by_key(status)
    assert ka.base64 not in rows and lab.registry_key.base64 not in rows
    b = rows[kb.base64]
    assert (b["path"], b["phase"], b["address"]) == ("direct", "direct", "198.51.100.3")
    assert b["endpoint"] == "203.0.113.22:51820" and b["allowed_ips"] == ["198.51.100.3/32"]
    assert (b["rx_bytes"], b["tx_bytes"]) == (1234, 5678)
    assert b["handshake_age"] == pytest.approx(6.3)
    assert b["why"].startswith("handshake completed; direct for")

    c = rows[kc.base64]
    assert c["path"] == "relayed" and c["on_device"] is False
    assert c["endpoint"] == "203.0.113.23:61207"
    assert "no direct handshake with 203.0.113.23:61207 within 6 s" in c["reason"]
    assert c["since"] == pytest.approx(now) and c["attempts"] == 1
    assert c["last_attempt"] == pytest.approx(START)
    # The retry comes at the pair's next common moment (reconcile.retry_moment).
    retry_at = retry_moment(ka, kc, now, 10.0)
    assert now + 1 <= retry_at <= now + 11
    assert c["retry_at"] == pytest.approx(retry_at)
    retry_in = f"retry in {round(retry_at - now)}s"
    assert f"relayed for 0s, last direct attempt (#1) 6s ago, {retry_in}" in c["why"]

    d = rows[kd.base64]
    assert d["path"] == "relayed" and d["wgnat_client"] is False
    assert "no wgnat client has announced itself there" in d["why"]

    m = rows[manual.base64]
    assert m["path"] == "manual" and m["managed"] is False
    assert "wgnat never changes it" in m["why"]

    table = format_status(status)
    lines = table.splitlines()
    assert lines[0] == (
        f"wgnat-client on wg0 (memory): public key {ka.base64}, listening on port 51820"
    )
    assert "registry 198.51.100.1:51820" in lines[2] and "connected, last answer" in lines[2]
    assert "peers: 1 direct, 2 relayed, 0 probing, 1 configured by hand" in table
    header = next(line for line in lines if line.startswith("PEER"))
    assert header.split() == ["PEER", "PATH", "ENDPOINT", "HANDSHAKE", "RECEIVED", "SENT", "WHY"]
    [row_b] = [line for line in lines if line.startswith(f"198.51.100.3 ({kb.short})")]
    assert row_b.split()[2:6] == ["direct", "203.0.113.22:51820", "6s", "ago"]
    assert "1.21 KiB" in row_b and "5.54 KiB" in row_b
    [row_c] = [line for line in lines if line.startswith("198.51.100.4")]
    assert "relayed" in row_c and retry_in in row_c


def test_client_status_probing_switching_leaving_and_unreachable():
    my_key, registry_key, kp, ks, kg = (new_key() for _ in range(5))
    policy = Policy(tunnel_networks=nets("10.0.0.0/24"), registry_address=ip("10.0.0.1"))
    mesh = Mesh(my_key, registry_key, policy)
    now = START + 100
    mesh.paths = {
        kp: PeerPath(
            Path.PROBING,
            now - 2,
            ep("192.0.2.2:4000"),
            attempts=3,
            deadline=now + 4,
            reason="retry #2",
        ),
        ks: PeerPath(Path.SWITCHING, now - 1, ep("192.0.2.3:4000"), deadline=now + 0.2),
        kg: PeerPath(
            Path.RELAYED, now - 50, ep("192.0.2.4:4000"), retry_at=now - 1, gone_since=now - 10
        ),
    }
    mesh.managed = {kp, ks}
    view = RegistryView(
        epoch="e",
        version=3,
        peers={
            kp: RemotePeer(kp, ep("192.0.2.2:4000"), nets("10.0.0.2/32"), (), "aa"),
            ks: RemotePeer(ks, ep("192.0.2.3:4000"), nets("10.0.0.3/32"), (), "bb"),
        },
    )
    device = MemoryDevice(public_key=my_key)
    device.add_peer(peer(kp, "192.0.2.2:4000", keepalive=25))
    device.add_peer(peer(ks, "192.0.2.3:4000", (), now - 1, keepalive=25))
    info = ClientInfo(
        "wg1",
        "uapi",
        registry_key,
        "10.0.0.1",
        51820,
        registry_up=False,
        registry_error="connection refused",
        last_sync=now - 75,
    )
    status = client_status(info, mesh, view, device.snapshot(), now)
    rows = by_key(status)
    probing = rows[kp.base64]
    assert (probing["path"], probing["phase"]) == ("probing", "probing")
    assert probing["handshake_age"] is None and probing["deadline"] == pytest.approx(now + 4)
    assert probing["why"] == (
        "probing 192.0.2.2:4000 (retry #2), attempt #3: traffic stays relayed until a "
        "handshake; gives up in 4s"
    )
    switching = rows[ks.base64]
    assert (switching["path"], switching["phase"]) == ("probing", "switching")
    assert "both ends switch to direct in 0s" in switching["why"]
    gone = rows[kg.base64]
    assert gone["in_registry"] is False and gone["gone_since"] == pytest.approx(now - 10)
    assert gone["why"].startswith("gone from the registry, removed in 20s; ")
    assert status["counts"] == {"direct": 0, "relayed": 1, "probing": 2, "manual": 0}
    table = format_status(status)
    assert "UNREACHABLE (connection refused), last answer 1m15s ago" in table
    assert "never" in table  # the probing peer's handshake


def test_client_status_while_starting_and_device_unreadable():
    info = ClientInfo("wg0", "uapi", new_key())
    status = client_status(info, None, RegistryView(), None, START, device_error="no such device")
    assert status["state"] == "starting" and status["peers"] == []
    table = format_status(status)
    assert "no answer yet" in table and "cannot read wg0: no such device" in table
    assert "(starting: the mesh is not set up yet)" in table


def test_registry_status_lists_every_peer_live_or_not():
    live, stale, never = new_key(), new_key(), new_key()
    hub_key = new_key()
    device = MemoryDevice(public_key=hub_key, listen_port=51820)
    now = START
    device.add_peer(peer(live, "203.0.113.21:4000", ("10.0.0.2/32",), now - 5, rx=2048, tx=100))
    device.add_peer(peer(stale, "203.0.113.22:4000", ("10.0.0.3/32",), now - 600))
    device.add_peer(peer(never, None, ("10.0.0.10/32",)))
    model = RegistryModel()
    model.observe(device.snapshot(), now)
    model.announce(live, Announcement("ab12", (ep("192.168.1.7:51820"),)))
    status = registry_status(
        model, ifname="wg0", backend="memory", device=device.snapshot(), now=now, waiting=2
    )
    json.dumps(status)
    assert_no_secrets(status)
    assert status["role"] == "registry" and status["public_key"] == hub_key.base64
    assert (status["peers_known"], status["peers_live"], status["waiting_clients"]) == (3, 1, 2)
    assert [row["address"] for row in status["peers"]] == ["10.0.0.2", "10.0.0.3", "10.0.0.10"]
    rows = by_key(status)
    assert rows[live.base64]["live"] is True
    assert rows[live.base64]["lan_endpoints"] == ["192.168.1.7:51820"]
    assert rows[live.base64]["wgnat_client"] is True
    assert rows[stale.base64]["live"] is False
    assert rows[stale.base64]["why"] == "no handshake for 10m00s (live means within 180 s)"
    assert rows[never.base64]["endpoint"] is None and rows[never.base64]["handshake_age"] is None
    table = format_status(status)
    assert f"wgnat-server on wg0 (memory): public key {hub_key.base64}" in table
    assert "1 of 3 peers live, 2 clients waiting" in table
    [row] = [line for line in table.splitlines() if line.startswith("10.0.0.2 ")]
    assert row.split()[2:] == [
        "yes", "203.0.113.21:4000", "5s", "ago", "2.00", "KiB", "100", "B", "yes",
        "192.168.1.7:51820",
    ]  # fmt: skip


def test_units():
    assert [duration(s) for s in (0, 4.4, 59.6, 61, 3600 * 3 + 420, 86400 * 2 + 3600 * 4)] == [
        "0s", "4s", "1m00s", "1m01s", "3h07m", "2d04h",
    ]  # fmt: skip
    assert [size(n) for n in (None, 0, 1023, 1024, 5 * 1024**3)] == [
        "-", "0 B", "1023 B", "1.00 KiB", "5.00 GiB",
    ]  # fmt: skip


# -- options and packaging ----------------------------------------------------


def test_status_socket_flags_default_per_interface():
    client = client_tap.Options()
    client.parseOptions(["-i", "wg7", "-r", new_key().base64])
    assert client["status-socket"] == "/run/wgnat/client-wg7.sock"
    client = client_tap.Options()
    client.parseOptions(["-r", new_key().base64, "--status-socket", "/tmp/x.sock"])
    assert client["status-socket"] == "/tmp/x.sock"
    server = registry_tap.Options()
    server.parseOptions(["-i", "wg3"])
    assert server["status-socket"] == "/run/wgnat/server-wg3.sock"
    assert default_socket_path("server", "wg3") == "/run/wgnat/server-wg3.sock"


def test_wgnat_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["wgnat"] == "wgnat.cli.wgnat:main"


# -- the command's errors -------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_no_daemon_running_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("wgnat.status_socket.STATUS_DIR", str(tmp_path))
    code, out, err = run_cli("status")
    assert code == 2 and out == ""
    assert err == (
        f"wgnat status: error: no wgnat-client for wg0 is running (no {tmp_path}/client-wg0.sock)\n"
    )
    code, _, err = run_cli("status", "-i", "wg2", "--server")
    assert err == (
        f"wgnat status: error: no wgnat-server for wg2 is running (no {tmp_path}/server-wg2.sock)\n"
    )
    (tmp_path / "server-wg0.sock").touch()  # a registry runs on wg0, not a client
    code, _, err = run_cli("status")
    assert err.rstrip().endswith("; a wgnat-server runs on wg0: try --server")
    code, _, err = run_cli("status", "--socket", str(tmp_path / "nope.sock"))
    assert err == f"wgnat status: error: no wgnat-client is running (no {tmp_path}/nope.sock)\n"


def test_left_over_socket_and_permission_denied(tmp_path, monkeypatch):
    path = str(tmp_path / "client-wg0.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nothing listens: what a killed daemon leaves
    code, _, err = run_cli("status", "--socket", path)
    assert code == 2
    assert err == (
        f"wgnat status: error: no wgnat-client is running ({path} is left over: "
        "nothing answers on it)\n"
    )

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("wgnat.cli.wgnat._UnixHTTPConnection.connect", denied)
    code, _, err = run_cli("status", "--socket", path)
    assert code == 2
    assert err == (
        f"wgnat status: error: permission denied on {path}: the status socket is only for "
        "the daemon's user (root); try: sudo wgnat status\n"
    )


def test_bad_interface_name(tmp_path):
    code, _, err = run_cli("status", "-i", "../etc")
    assert code == 2 and "is not an interface name" in err


# -- the socket --------------------------------------------------------------


def test_prepare_removes_only_a_stale_socket(tmp_path):
    directory = tmp_path / "run" / "wgnat"
    path = str(directory / "client-wg0.sock")
    prepare_socket_path(path, "wgnat-client")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    prepare_socket_path(path, "wgnat-client")
    assert not os.path.exists(path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(Exception, match="another wgnat-client already answers on"):
            prepare_socket_path(path, "wgnat-client")
        assert os.path.exists(path)
    finally:
        live.close()
    os.unlink(path)
    FilePath(path).write_text("not a socket")
    with pytest.raises(Exception, match="exists and is not a socket"):
        prepare_socket_path(path, "wgnat-client")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest_twisted.inlineCallbacks
def test_client_daemon_serves_wgnat_status_end_to_end(tmp_path):
    """A ClientDaemon (agent on a MemoryDevice, MemoryRegistryClient) on the real
    reactor: its socket answers `wgnat status`, and goes away at stop."""
    lab = SimulatedNetwork(real_reactor)
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    lab.add_host("b", "198.51.100.3", "203.0.113.22:51820")
    path = str(tmp_path / "run" / "client-wg0.sock")
    # What a daemon killed with SIGKILL leaves: removed at start.
    os.makedirs(os.path.dirname(path), mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    daemon = client_tap.ClientDaemon(
        lab.agent("a", start=False), real_reactor, f"127.0.0.1:{free_port()}", status_socket=path
    )
    daemon.startService()
    b = lab.agent("b")
    try:
        yield daemon.agent.ready
        yield b.ready
        yield deferLater(real_reactor, 0.05, lambda: None)  # b's announcement is pushed
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        kb = lab.hosts["b"].key

        code, out, err = yield deferToThread(run_cli, "status", "--json", "--socket", path)
        assert (code, err) == (0, "")
        document = json.loads(out)
        assert document["role"] == "client" and document["interface"] == "wg0"
        assert by_key(document)[kb.base64]["path"] == "probing"
        assert_no_secrets(document)

        lab.handshake("a", "b")
        yield deferLater(real_reactor, 0.6, lambda: None)  # handshake + 0.25 s: direct
        code, out, err = yield deferToThread(run_cli, "status", "--socket", path)
        assert (code, err) == (0, "")
        assert out.startswith("wgnat-client on wg0 (memory): public key ")
        assert "peers: 1 direct, 0 relayed, 0 probing" in out
        [row] = [line for line in out.splitlines() if line.startswith("198.51.100.3 ")]
        assert row.split()[2:4] == ["direct", "203.0.113.22:51820"]
    finally:
        b.stopService()
        yield daemon.stopService()
    assert not os.path.exists(path)
    code, _, err = yield deferToThread(run_cli, "status", "--socket", path)
    assert code == 2 and f"no wgnat-client is running (no {path})" in err


@pytest_twisted.inlineCallbacks
def test_registry_status_socket_end_to_end(tmp_path):
    lab = SimulatedNetwork(real_reactor)
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    yield lab.hub.refresh()
    path = str(tmp_path / "server-wg0.sock")
    status = StatusSocket(
        real_reactor,
        path,
        lambda: registry_status_provider(lab.registry_device, lab.hub, real_reactor),
        "wgnat-server",
    )
    yield status.start()
    try:
        code, out, err = yield deferToThread(run_cli, "status", "--server", "--socket", path)
        assert (code, err) == (0, "")
        assert "wgnat-server on wg0 (memory)" in out and "1 of 1 peers live" in out
        [row] = [line for line in out.splitlines() if line.startswith("198.51.100.2 ")]
        assert row.split()[2:4] == ["yes", "203.0.113.21:51820"]
        # A second daemon on the same socket leaves the first one's alone.
        second = StatusSocket(real_reactor, path, lambda: {}, "wgnat-server")
        yield second.start()
        assert second.port is None and os.path.exists(path)
    finally:
        yield status.stop()
    assert not os.path.exists(path)


@pytest_twisted.inlineCallbacks
def test_a_failing_provider_answers_500_and_the_command_says_so(tmp_path):
    path = str(tmp_path / "s.sock")

    def broken():
        raise RuntimeError("boom")

    status = StatusSocket(real_reactor, path, broken, "wgnat-client")
    yield status.start()
    try:
        code, _, err = yield deferToThread(run_cli, "status", "--socket", path)
        assert code == 2
        assert err.startswith(f"wgnat status: error: wgnat-client answered HTTP 500 on {path}")
    finally:
        yield status.stop()


def test_client_status_provider_reports_a_device_error(lab):
    lab.add_host("a", "198.51.100.2", "203.0.113.21:51820")
    agent = lab.agent("a")
    from wgnat.device import DeviceError

    lab.hosts["a"].device.failure = DeviceError("wg0 vanished")
    results = []
    client_status_provider(agent).addCallback(results.append)
    [status] = results
    assert status["device_error"] == "wg0 vanished" and status["listen_port"] is None
