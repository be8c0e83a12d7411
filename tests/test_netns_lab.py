"""The namespace lab itself: NAT, stateful firewall, symmetric mapping, cleanup.

The daemons' end-to-end tests stand on this harness; these checks make sure a
failure there means the daemons, not the lab.
"""

# ruff: noqa: F811
from __future__ import annotations

import os

import pytest
from netns import Lab, cleanup_leftovers, netns_list

# The fixture; tests name it as a parameter, hence F811 below.
from netns_fixtures import lab  # noqa: F401

pytestmark = pytest.mark.integration

SERVER = "203.0.113.10"
SERVER2 = "203.0.113.11"
R1 = "203.0.113.21"


def _port(observed: str | None) -> int:
    assert observed is not None, "no answer from the echo server"
    return int(observed.rsplit(":", 1)[1])


def test_lan_host_reaches_public_host_through_nat(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    bob = lab.lan_host(r1, "bob", "192.168.1.11/24")
    server = lab.public_host("srv", f"{SERVER}/24")

    assert alice.ping(SERVER)
    assert alice.ping("192.168.1.11")  # LAN to LAN over the router's bridge
    assert bob.ping("192.168.1.1")  # the router answers on its LAN
    assert not server.ping("192.168.1.10", timeout=1)  # private space is not routed


def test_public_host_sees_the_router_public_address_and_port(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    server = lab.public_host("srv", f"{SERVER}/24")
    server.udp_echo(7000)

    answers = alice.udp_exchange([(SERVER, 7000)], source_port=51820)

    # MASQUERADE keeps a free source port: the registry sees <router>:51820.
    assert answers[f"{SERVER}:7000"] == f"{R1}:51820"
    assert "udp" in r1.conntrack()


def test_home_router_drops_unsolicited_inbound_and_passes_replies(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24", mode="home")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    server = lab.public_host("srv", f"{SERVER}/24")
    stranger = lab.public_host("x", f"{SERVER2}/24")

    # Nothing reaches the router itself from outside: no ping, no UDP to a listener.
    assert not server.ping(R1, timeout=1)
    r1.udp_echo(9000, bind=R1)
    assert server.udp_exchange([(R1, 9000)], timeout=0.6)[f"{R1}:9000"] is None

    # Alice opens a mapping towards the server only.
    echo = server.udp_echo(7000)
    assert _port(alice.udp_exchange([(SERVER, 7000)], source_port=5000)[f"{SERVER}:7000"]) == 5000
    echo.terminate()
    echo.wait()

    listener = alice.udp_listen(5000, duration=1.0)
    stranger.udp_send(R1, 5000, "unsolicited", source_port=7000, count=3)
    server.udp_send(R1, 5000, "reply", source_port=7000)
    received = listener.wait()

    assert received == [(f"{SERVER}:7000", "reply")]


def test_accept_all_router_accepts_inbound_to_itself(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24", mode="accept_all")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    server = lab.public_host("srv", f"{SERVER}/24")

    assert server.ping(R1)
    r1.udp_echo(9000, bind=R1)
    seen = server.udp_exchange([(R1, 9000)])[f"{R1}:9000"]
    assert seen is not None and seen.startswith(f"{SERVER}:")
    assert alice.ping(SERVER)


@pytest.mark.parametrize(("mode", "keeps_port"), [("home", True), ("accept_all", False)])
def test_the_conntrack_race(lab: Lab, mode: str, keeps_port: bool) -> None:
    """The remote's packet arrives before ours (FIELD-NOTES): a router whose INPUT
    accepts it confirms a conntrack entry, and our own mapping must take another port;
    a stateful firewall drops it unconfirmed, and our port is kept."""
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24", mode=mode)
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    server = lab.public_host("srv", f"{SERVER}/24")

    server.udp_send(R1, 51820, "early", source_port=7000)
    server.udp_echo(7000)
    seen = _port(alice.udp_exchange([(SERVER, 7000)], source_port=51820)[f"{SERVER}:7000"])

    assert (seen == 51820) is keeps_port


@pytest.mark.parametrize(("mode", "same_port"), [("home", True), ("symmetric", False)])
def test_symmetric_nat_changes_the_source_port_per_destination(
    lab: Lab, mode: str, same_port: bool
) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24", mode=mode)
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    for name, address in (("s1", SERVER), ("s2", SERVER2)):
        lab.public_host(name, f"{address}/24").udp_echo(7000)

    answers = alice.udp_exchange([(SERVER, 7000), (SERVER2, 7000)], source_port=51820)
    seen_by_1 = answers[f"{SERVER}:7000"]
    seen_by_2 = answers[f"{SERVER2}:7000"]

    assert seen_by_1 and seen_by_1.startswith(f"{R1}:")
    assert seen_by_2 and seen_by_2.startswith(f"{R1}:")
    if same_port:
        assert _port(seen_by_1) == _port(seen_by_2) == 51820
    else:
        assert _port(seen_by_1) != _port(seen_by_2)


def test_rebind_moves_every_mapping(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    lab.public_host("srv", f"{SERVER}/24").udp_echo(7000)

    before = _port(alice.udp_exchange([(SERVER, 7000)], source_port=51820)[f"{SERVER}:7000"])
    r1.rebind()
    after = _port(alice.udp_exchange([(SERVER, 7000)], source_port=51820)[f"{SERVER}:7000"])
    r1.rebind()
    again = _port(alice.udp_exchange([(SERVER, 7000)], source_port=51820)[f"{SERVER}:7000"])

    assert before == 51820
    assert 40000 <= after <= 49999
    assert 30000 <= again <= 39999


def test_wireguard_device_comes_up_in_its_namespace(lab: Lab) -> None:
    host = lab.public_host("srv", f"{SERVER}/24")
    wg = lab.wireguard(host, "198.51.100.1/24", listen_port=51820)

    assert os.path.exists(wg.socket_path)
    assert wg.address.ip.exploded == "198.51.100.1"
    assert "198.51.100.1/24" in host.run("ip", "-4", "addr", "show", wg.ifname).stdout
    assert wg.private_key not in wg.dump()
    assert wg.private_key not in repr(wg)
    assert wg.dump().split("\t")[1] == wg.public_key
    assert wg.peers() == {}


def _lab_traces(prefix: str) -> list[str]:
    traces = [name for name in netns_list() if name.startswith(prefix)]
    if os.path.isdir("/var/run/wireguard"):
        traces += [s for s in os.listdir("/var/run/wireguard") if s.startswith(prefix)]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if prefix.encode() in f.read():
                        traces.append(f"process {pid}")
            except OSError:
                pass
    return traces


def _build(lab: Lab) -> None:
    r1 = lab.router("r1", f"{R1}/24", "192.168.1.0/24")
    alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
    server = lab.public_host("srv", f"{SERVER}/24")
    server.udp_echo(7000)
    lab.wireguard(alice, "198.51.100.2/24")
    lab.wireguard(server, "198.51.100.1/24")


def test_cleanup_leaves_nothing_behind() -> None:
    with Lab() as built:
        _build(built)
        assert len(_lab_traces(built.prefix)) >= 4 + 2 + 2
    assert _lab_traces(built.prefix) == []
    assert not os.path.exists(built.tmpdir)


def test_cleanup_leftovers_removes_what_a_crashed_run_left() -> None:
    crashed = Lab()
    _build(crashed)
    processes = list(crashed._processes)
    # The run "crashes": nobody calls cleanup(); a later run sweeps by prefix.
    cleanup_leftovers(crashed.prefix)
    for proc in processes:
        proc.wait(timeout=5)
    assert _lab_traces(crashed.prefix) == []
    crashed.cleanup()  # still safe afterwards
