"""End to end over IPv6: a dual-stack client behind a symmetric IPv4 NAT (where
IPv4 hole punching fails) and a dual-stack peer behind a home router go direct
over IPv6, through both routers' stateful IPv6 firewalls; when one's IPv6
address is removed, the other leaves IPv6 and says why.

    internet  203.0.113.0/24 and 2001:db8::/64 (the inet namespace routes 2001:db8::/32)
    registry  203.0.113.10                          (IPv4 only: the hub's family does not matter)
    r2 (home)       c 192.168.2.10  2001:db8:2::10  (IPv6 firewall: out and answers only)
    r3 (symmetric)  s 192.168.3.10  2001:db8:3::10  (the same)
"""

from __future__ import annotations

import json
import os
import time

import pytest
from meshlab import BIN, MeshLab, check, running, wait_until
from netns_fixtures import lab  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

C_V6, S_V6 = "2001:db8:2::10", "2001:db8:3::10"


@pytest.fixture
def mesh(lab):  # noqa: F811
    m = MeshLab(lab)
    m.build_registry()
    r2 = lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "symmetric")
    lab.ipv6_router(r2, "2001:db8::22/64", "2001:db8:2::/64")
    lab.ipv6_router(r3, "2001:db8::23/64", "2001:db8:3::/64")
    c = lab.lan_host(r2, "c", "192.168.2.10/24")
    s = lab.lan_host(r3, "s", "192.168.3.10/24")
    lab.ipv6_lan_host(c, f"{C_V6}/64")
    lab.ipv6_lan_host(s, f"{S_V6}/64")
    m.add_client("c", c)
    m.add_client("s", s)
    # The IPv6 internet works before wgnat runs: each reaches the other's router
    # (neighbour discovery on fresh links takes about 2 s here).
    for host, far in ((c, "2001:db8::23"), (s, "2001:db8::22")):
        wait_until(
            lambda host=host, far=far: (
                host.run("ping", "-6", "-c", "1", "-W", "0.3", far, check=False).returncode == 0
            ),
            15,
            interval=0.1,
            what=f"{host.short} to reach {far}",
        )
    with running(m):  # and every spoke reaches the hub
        yield m


def status_row(mesh: MeshLab, name: str, other: str) -> dict | None:
    node = mesh.clients[name]
    answer = node.host.run(
        os.path.join(BIN, "wgnat"), "status", "-i", node.wg.ifname, "--json", check=False
    )
    if answer.returncode not in (0, 1):
        return None
    key = mesh.clients[other].wg.public_key
    return next((r for r in json.loads(answer.stdout)["peers"] if r["public_key"] == key), None)


def test_a_client_behind_a_symmetric_nat_goes_direct_over_ipv6_and_leaves_it_when_it_goes(mesh):
    # Without IPv6 this pair stays relayed: s's NAT gives every destination a new port.
    mesh.start_registry()
    mesh.start_client("c", extra=("-t", "1s"))
    mesh.start_client("s")
    started = time.monotonic()  # both clients' processes running
    try:
        wait_until(lambda: mesh.direct("s", "c") and mesh.direct("c", "s"), 20, what="s-c direct")
    except AssertionError as exc:
        check(False, mesh, str(exc))
    elapsed = time.monotonic() - started
    print(f"s (symmetric IPv4 NAT) and c direct over IPv6 {elapsed:.2f} s after both started")
    check(mesh.direct("s", "c") == f"[{C_V6}]:51820", mesh, "s reaches c over IPv6")
    check(mesh.direct("c", "s") == f"[{S_V6}]:51820", mesh, "c reaches s over IPv6")
    # No lost probe: a lost first initiation alone would cost WireGuard 5 s.
    check(elapsed <= 5.0, mesh, f"took {elapsed:.2f} s")
    row = status_row(mesh, "s", "c")
    check(row is not None and row["candidate"]["kind"] == "ipv6", mesh, f"status: {row}")
    check("over IPv6 [2001:db8:2::10]:51820" in row["why"], mesh, row["why"])
    check(
        "direct at IPv6 [2001:db8:2::10]:51820 (both ends have global IPv6"
        in mesh.clients["s"].daemon.log(),
        mesh,
        "s logs the candidate and why",
    )
    check(mesh.clients["s"].host.ping("198.51.100.3", count=2), mesh, "s pings c")

    # c's IPv6 address goes away: c sees it at its next -t check (1 s here),
    # announces without it, and s leaves IPv6 for the observed IPv4 endpoint.
    mesh.clients["c"].host.run("ip", "-6", "addr", "del", f"{C_V6}/64", "dev", "eth0")
    removed = time.monotonic()
    reason = f"its IPv6 endpoint [{C_V6}]:51820 is no longer announced"
    wait_until(
        lambda: reason in mesh.clients["s"].daemon.log(), 10, what="s to leave IPv6, saying why"
    )
    left = time.monotonic() - removed
    print(f"IPv6 address removed -> the peer left IPv6 {left:.2f} s later ({reason})")
    check(not mesh.direct("s", "c"), mesh, "not direct over the address that went")
    # Through the symmetric NAT IPv4 fails, so the pair is relayed, and still connected.
    check(mesh.clients["s"].host.ping("198.51.100.3", count=3, timeout=3), mesh, "relayed ping")
