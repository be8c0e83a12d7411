"""End to end: the registry and clients as a user runs them, in namespaces behind
NAT routers (home: port-preserving with a stateful firewall; symmetric:
--random-fully), two clients behind one NAT, and one client with a public address.

    r1 (home)       a 192.168.1.10, b 192.168.1.11      (same NAT: LAN endpoints)
    r2 (home)       c 192.168.2.10
    r3 (symmetric)  s 192.168.3.10                      (only relaying works...)
    public          p 203.0.113.30                      (...except towards p)
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from meshlab import MeshLab, check, running, wait_until
from netns_fixtures import lab  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


@pytest.fixture
def mesh(lab):  # noqa: F811
    m = MeshLab(lab)
    m.build_registry()
    r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
    r2 = lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "symmetric")
    hosts = {
        "a": lab.lan_host(r1, "a", "192.168.1.10/24"),
        "b": lab.lan_host(r1, "b", "192.168.1.11/24"),
        "c": lab.lan_host(r2, "c", "192.168.2.10/24"),
        "s": lab.lan_host(r3, "s", "192.168.3.10/24"),
        "p": lab.public_host("p", "203.0.113.30/24"),
    }
    for name, host in hosts.items():
        m.add_client(name, host)
    with running(m):  # every spoke reaches the hub first
        yield m


def start_ping(host, address: str, count: int, interval: float) -> subprocess.Popen:
    return host.popen(
        ["ping", "-n", "-q", "-c", count, "-i", interval, "-W", 2, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_ping(process: subprocess.Popen) -> tuple[int, int]:
    output, _ = process.communicate(timeout=120)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def test_full_mesh_forms_with_the_right_paths(mesh):
    mesh.start_registry(twistd=True)  # the twistd plugin, as a user may run it
    started = time.monotonic()
    for name in mesh.clients:
        mesh.start_client(name)
    reachable = [("a", "b"), ("a", "c"), ("a", "p"), ("b", "c"), ("b", "p"), ("c", "p"), ("s", "p")]
    try:
        for x, y in reachable:
            wait_until(
                lambda x=x, y=y: mesh.direct(x, y) and mesh.direct(y, x), 30, what=f"{x}-{y} direct"
            )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    formed = time.monotonic() - started
    # Same NAT: LAN endpoints (Linux does not hairpin).
    check(mesh.direct("a", "b") == "192.168.1.11:51820", mesh, "a reaches b on its LAN")
    check(mesh.direct("b", "a") == "192.168.1.10:51820", mesh, "b reaches a on its LAN")
    # Different NATs: each other's public mapping (port-preserving home NAT).
    check(mesh.direct("a", "c") == "203.0.113.22:51820", mesh, "a reaches c via r2")
    check(mesh.direct("c", "a").startswith("203.0.113.21:"), mesh, "c reaches a via r1")
    check(mesh.direct("a", "p") == "203.0.113.30:51820", mesh, "a reaches p directly")
    # The symmetric NAT: given up on after the probe timeout, traffic relayed.
    for other in ("a", "b", "c"):
        wait_until(
            lambda other=other: not mesh.has_entry(other, "s") and not mesh.has_entry("s", other),
            30,
            what=f"s-{other} relayed",
        )
        check(
            mesh.clients["s"].host.ping(mesh.clients[other].tunnel_ip, count=3),
            mesh,
            f"s still reaches {other} through the registry",
        )
    log = mesh.clients["a"].daemon.log()
    check("relayed: no direct handshake" in log, mesh, "the relay decision is logged")
    # Everyone pings everyone.
    for x in mesh.clients:
        for y in mesh.clients:
            if x != y:
                check(
                    mesh.clients[x].host.ping(mesh.clients[y].tunnel_ip, count=2),
                    mesh,
                    f"{x} pings {y}",
                )
    print(
        f"full mesh of {len(reachable)} direct pairs formed {formed:.2f} s after the clients "
        "started"
    )


def test_new_client_is_direct_within_a_second(mesh):
    mesh.start_registry()
    for name in ("a", "c", "b"):
        mesh.start_client(name)
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
    started = time.monotonic()
    mesh.start_client("p")
    wait_until(
        lambda: all(mesh.direct("p", x) and mesh.direct(x, "p") for x in "abc"),
        30,
        what="p direct with a, b and c",
    )
    elapsed = time.monotonic() - started
    print(f"new client direct with 3 peers {elapsed:.3f} s after its process started")
    # The target is 1 s (make bench measures it); Python's start-up alone takes
    # one to two seconds on a loaded 2-core machine, so the test allows more: it
    # checks that no probe is lost (that costs 6 s and a backoff), not the figure.
    check(elapsed <= 8.0, mesh, f"took {elapsed:.2f} s")


def test_no_packet_lost_while_the_path_moves_to_direct(mesh):
    mesh.start_registry()
    a, c, s = mesh.clients["a"], mesh.clients["c"], mesh.clients["s"]
    # Traffic flows through the registry before wgnat runs on the spokes...
    ping_ac = start_ping(a.host, c.tunnel_ip, 150, 0.05)
    ping_sa = start_ping(s.host, a.tunnel_ip, 150, 0.05)
    time.sleep(0.5)
    for name in ("a", "c", "s"):
        mesh.start_client(name)
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
    sent, received = finish_ping(ping_ac)
    check(sent == received == 150, mesh, f"a->c: {sent - received} of {sent} lost")
    sent, received = finish_ping(ping_sa)
    check(sent == received == 150, mesh, f"s->a: {sent - received} of {sent} lost")


def test_nat_rebinding_is_followed(mesh):
    mesh.start_registry()
    for name in ("a", "c"):
        mesh.start_client(name)
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
    router = mesh.clients["c"].host.router
    router.rebind()  # every mapping of r2 moves to a new port range and conntrack is flushed
    started = time.monotonic()
    wait_until(
        lambda: (mesh.direct("a", "c") or "").startswith("203.0.113.22:4"),
        30,
        interval=0.1,
        what="a to follow c's new mapping",
    )
    handshake_before = mesh.clients["a"].wg.peers()[mesh.clients["c"].wg.public_key][
        "latest_handshake"
    ]
    check(
        mesh.clients["a"].host.ping(mesh.clients["c"].tunnel_ip, count=3),
        mesh,
        "a pings c after the rebinding",
    )
    elapsed = time.monotonic() - started
    print(f"rebinding followed in {elapsed:.2f} s")
    check(elapsed <= 25 + 2 + 1, mesh, f"rebinding took {elapsed:.1f} s")
    assert handshake_before


def test_registry_restart_and_client_restart_are_survived(mesh):
    registry = mesh.start_registry()
    for name in ("a", "c"):
        mesh.start_client(name)
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
    check(registry.stop() == 0, mesh, "the registry stops cleanly on SIGTERM")
    pinging = start_ping(mesh.clients["a"].host, mesh.clients["c"].tunnel_ip, 60, 0.1)
    time.sleep(3)
    check(mesh.direct("a", "c") is not None, mesh, "the mesh stays while the registry is down")
    mesh.start_registry()
    wait_until(
        lambda: "registry reachable again" in mesh.clients["a"].daemon.log(),
        40,
        interval=0.2,
        what="a to reconnect",
    )
    sent, received = finish_ping(pinging)
    check(sent == received, mesh, f"{sent - received} of {sent} lost across the restart")
    # A client killed hard and restarted: no duplicate, no orphan.
    before = mesh.clients["a"].wg.peers()
    mesh.clients["a"].daemon.stop(signal.SIGKILL)
    mesh.start_client("a")
    time.sleep(2)
    after = mesh.clients["a"].wg.peers()
    check(set(after) == set(before), mesh, "same peers after a restart")
    check(mesh.direct("a", "c") is not None, mesh, "still direct after the restart")


def test_no_secret_crosses_the_api_or_the_logs(mesh):
    psk = mesh.registry.host.run("wg", "genpsk", hide_stdout=True).stdout.strip()
    a = mesh.clients["a"]
    mesh.registry.wg.set_peer(a.wg.public_key, preshared_key=psk)
    a.wg.set_peer(mesh.registry.wg.public_key, preshared_key=psk)
    mesh.start_registry()
    for name in ("a", "c"):
        mesh.start_client(name)
    wait_until(lambda: mesh.direct("a", "c"), 30, what="a-c direct")
    answer = a.host.python(
        "import urllib.request,sys;"
        "print(urllib.request.urlopen('http://198.51.100.1:51820/v1/peers',timeout=5).read()"
        ".decode())"
    ).stdout
    assert '"peers"' in answer
    secrets = [
        psk,
        a.wg.private_key,
        mesh.registry.wg.private_key,
        mesh.clients["c"].wg.private_key,
    ]
    texts = {"api": answer, "registry log": mesh.registry.daemon.log()}
    for name in ("a", "c"):
        texts[f"{name} log"] = mesh.clients[name].daemon.log()
        texts[f"{name} metrics"] = (
            mesh.clients[name]
            .host.python(
                "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:9588/metrics',timeout=5).read().decode())"
            )
            .stdout
        )
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a key leaked into the {where}"
    # A caller that is no peer of the registry is refused (here: the registry's own
    # address as source, which maps to no peer).
    refused = mesh.registry.host.python(
        "import urllib.request,urllib.error\n"
        "try:\n urllib.request.urlopen('http://198.51.100.1:51820/v1/peers',timeout=5)\n"
        "except urllib.error.HTTPError as e: print(e.code)"
    ).stdout.strip()
    assert refused == "403"
