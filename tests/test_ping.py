"""`wgnat ping`: finding the peer in a client's status document, describing its
path, reading iputils ping's lines, and the command's exit codes (the ping
itself replaced by its recorded output; tests/integration/test_wgnat_ping.py runs the
real one in a namespace lab)."""

from __future__ import annotations

import copy
import io

import pytest

from tests.helpers import new_key, peer
from wgnat.cli import ping
from wgnat.cli.wgnat import main
from wgnat.client.reconcile import Path
from wgnat.client.status import client_info, client_status
from wgnat.testing import SimulatedNetwork

START = 1_700_000_000.0

IPUTILS_OUTPUT = """\
PING 198.51.100.3 (198.51.100.3) from 198.51.100.2 wg0: 56(84) bytes of data.
64 bytes from 198.51.100.3: icmp_seq=1 ttl=64 time=0.512 ms
64 bytes from 198.51.100.3: icmp_seq=2 ttl=64 time=1.25 ms
64 bytes from 198.51.100.3: icmp_seq=4 ttl=64 time=0.75 ms

--- 198.51.100.3 ping statistics ---
4 packets transmitted, 3 received, 25% packet loss, time 3004ms
rtt min/avg/max/mdev = 0.512/0.837/1.250/0.301 ms
"""

UNREACHABLE_OUTPUT = """\
PING 198.51.100.9 (198.51.100.9) from 198.51.100.2 wg0: 56(84) bytes of data.
From 198.51.100.2 icmp_seq=1 Destination Host Unreachable
From 198.51.100.2 icmp_seq=2 Destination Host Unreachable

--- 198.51.100.9 ping statistics ---
2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 1001ms
"""


@pytest.fixture(scope="module")
def status():
    """a's status: direct with b, relayed to c (no handshake), d runs no wgnat
    client, e probing, and a peer configured by hand."""
    net = SimulatedNetwork(start=START)
    for name, tunnel, public in [
        ("a", "198.51.100.2", "203.0.113.21:51820"),
        ("b", "198.51.100.3", "203.0.113.22:51820"),
        ("c", "198.51.100.4", "203.0.113.23:61207"),
        ("d", "198.51.100.5", "203.0.113.24:51820"),
    ]:
        net.add_host(name, tunnel, public)
    a = net.agent("a")
    net.agent("b"), net.agent("c")
    net.hub.refresh()
    net.handshake("a", "b")
    net.clock.advance(6.5)
    assert a.paths() == {net.key("b"): Path.DIRECT, net.key("c"): Path.RELAYED}
    net.add_host("e", "198.51.100.6", "203.0.113.25:51820")
    net.agent("e")
    assert a.paths()[net.key("e")] is Path.PROBING
    device = net.hosts["a"].device
    device.add_peer(peer(new_key(), "192.0.2.9:51820", ("10.99.0.9/32",), START))
    document = client_status(client_info(a), a.mesh, a.view, device.snapshot(), net.clock.seconds())
    document["_keys"] = {name: net.key(name).base64 for name in "bcde"}
    document["_registry"] = net.registry_key.base64
    net.stop()
    return document


def test_a_peer_is_found_by_address_key_or_key_prefix(status):
    b = status["_keys"]["b"]
    for query in ("198.51.100.3", b, b[:8], f" {b[:8]} "):
        target = ping.find_peer(status, query)
        assert target.address == "198.51.100.3" and target.name == f"198.51.100.3 ({b[:8]})"
    registry = ping.find_peer(status, "198.51.100.1")
    assert registry.is_registry and registry.row["public_key"] == status["_registry"]


def test_a_missing_peer_is_one_line_that_says_what_to_give():
    document = {"interface": "wg0", "peers": [], "registry": _REGISTRY}
    with pytest.raises(ping.PingError) as raised:
        ping.find_peer(document, "198.51.100.99")
    message = str(raised.value)
    assert "no peer '198.51.100.99' on wg0" in message
    assert "wgnat status -i wg0" in message and "\n" not in message


_REGISTRY = {
    "public_key": "govehK+1" + "A" * 35 + "=",
    "address": "198.51.100.1",
    "endpoint": "203.0.113.10:51820",
}


def test_an_ambiguous_prefix_names_the_candidates(status):
    document = copy.deepcopy(status)
    rows = document["peers"]
    rows[0]["public_key"] = "Zq" + rows[0]["public_key"][2:]
    rows[1]["public_key"] = "Zq" + rows[1]["public_key"][2:]
    with pytest.raises(ping.PingError) as raised:
        ping.find_peer(document, "Zq")
    message = str(raised.value)
    assert "'Zq' matches 2 peers on wg0" in message
    assert rows[0]["address"] in message and "give more of the key" in message


def test_the_path_in_a_sentence(status):
    keys = status["_keys"]
    b = ping.find_peer(status, keys["b"])
    line = ping.describe_path(status, b)
    assert line.startswith(f"198.51.100.3 ({keys['b'][:8]}) is direct at 203.0.113.22:51820")
    assert ping.via(status, b) == "203.0.113.22:51820"

    c = ping.find_peer(status, keys["c"])
    line = ping.describe_path(status, c)
    hub = f"the registry 198.51.100.1 ({status['_registry'][:8]})"
    assert line.startswith(f"198.51.100.4 ({keys['c'][:8]}) is relayed through {hub} at ")
    assert "no direct handshake with 203.0.113.23:61207 within 6 s" in line
    assert "; next direct attempt in " in line
    assert ping.via(status, c) == hub

    d = ping.describe_path(status, ping.find_peer(status, keys["d"]))
    assert "no wgnat client has announced itself there" in d
    assert d.endswith("no direct attempt until that changes")

    e = ping.describe_path(status, ping.find_peer(status, keys["e"]))
    assert "is relayed through the registry" in e and "203.0.113.25:51820 is probed" in e

    manual = ping.describe_path(status, ping.find_peer(status, "10.99.0.9"))
    assert "configured by hand on wg0" in manual and "direct at 192.0.2.9:51820" in manual


def test_iputils_lines_are_read():
    lines = IPUTILS_OUTPUT.splitlines()
    assert ping.parse_reply(lines[1]) == ping.Reply(1, 0.512)
    assert ping.parse_reply(lines[0]) is None
    assert ping.parse_transmitted(lines[6]) == 4
    replies = [r for r in map(ping.parse_reply, lines) if r]
    assert ping.summary(4, replies) == (
        "4 pings, 3 pongs, 1 lost; round trip min/avg/max 0.512/0.837/1.25 ms"
    )
    assert ping.summary(2, []) == "2 pings, 0 pongs, 2 lost"


def test_ping_peer_prints_pongs_and_exits_0(status):
    out = io.StringIO()
    commands = []

    def run(argv, timeout):
        commands.append((argv, timeout))
        return iter(IPUTILS_OUTPUT.splitlines(keepends=True))

    code = ping.ping_peer(status, "198.51.100.3", out, count=4, interval=0.5, run=run)
    assert code == 0
    argv, timeout = commands[0]
    assert argv == [
        "ping", "-n", "-c", "4", "-i", "0.5", "-W", "2", "-I", "wg0", "198.51.100.3"
    ]  # fmt: skip
    assert timeout == 4 * 0.5 + 2 + 5
    text = out.getvalue().splitlines()
    key = status["_keys"]["b"][:8]
    assert text[0].startswith(f"198.51.100.3 ({key}) is direct at 203.0.113.22:51820")
    assert text[1] == f"pong from 198.51.100.3 ({key}) via 203.0.113.22:51820 in 0.512 ms"
    assert len([line for line in text if line.startswith("pong from")]) == 3
    assert text[-1].startswith("4 pings, 3 pongs, 1 lost")


def test_no_pong_exits_1_and_says_why(status):
    out = io.StringIO()
    code = ping.ping_peer(
        status, "198.51.100.4", out, count=2, run=lambda argv, timeout: iter(
            UNREACHABLE_OUTPUT.splitlines(keepends=True)
        )
    )  # fmt: skip
    assert code == 1
    text = out.getvalue()
    assert "  (From 198.51.100.2 Destination Host Unreachable)\n2 pings" in text
    assert text.rstrip().endswith("2 pings, 0 pongs, 2 lost")


def test_a_path_that_changed_while_pinging_is_reported(status):
    later = copy.deepcopy(status)
    for row in later["peers"]:
        if row["address"] == "198.51.100.6":
            row.update(path="direct", phase="direct", handshake_age=0.2)
    out = io.StringIO()
    ping.ping_peer(
        status,
        "198.51.100.6",
        out,
        again=lambda: later,
        run=lambda argv, timeout: iter(IPUTILS_OUTPUT.splitlines(keepends=True)),
    )
    assert "the path changed meanwhile: 198.51.100.6 (" in out.getvalue()
    assert "is direct at 203.0.113.25:51820" in out.getvalue()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_the_command_without_a_client_is_one_line(tmp_path):
    code, out, err = run_cli("ping", "--socket", str(tmp_path / "none.sock"), "198.51.100.3")
    assert code == 1 and out == ""
    assert err == f"wgnat ping: error: no wgnat-client is running (no {tmp_path}/none.sock)\n"


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (("-c", "0"), "-c 0: give at least one ping"),
        (("--interval", "0.001"), "--interval 0.001: at least 0.002 s"),
        (("-W", "0"), "-W 0: give a number of seconds above 0"),
        (("-i", "a/b"), "'a/b' is not an interface name"),
    ],
)
def test_bad_flags_are_one_line(flags, complaint):
    code, _, err = run_cli("ping", *flags, "198.51.100.3")
    assert code == 1 and complaint in err and err.count("\n") == 1


def test_a_hubs_redirects_become_one_hint():
    errors = [
        f"From 198.51.100.1: icmp_seq={n} Redirect Host(New nexthop: 198.51.100.4)"
        for n in (1, 2, 3)
    ]
    assert ping.error_notes(errors) == [
        "198.51.100.1 sent ICMP redirects (harmless; on the hub: "
        "sysctl -w net.ipv4.conf.all.send_redirects=0)"
    ]


def test_an_interrupted_ping_prints_its_summary_not_a_traceback(status):
    def run(argv, timeout):
        yield IPUTILS_OUTPUT.splitlines(keepends=True)[1]
        raise KeyboardInterrupt

    out = io.StringIO()
    assert ping.ping_peer(status, "198.51.100.3", out, run=run) == 0
    assert out.getvalue().splitlines()[-1].startswith("1 pings, 1 pongs, 0 lost")
