"""End to end: the conntrack race.  x sits behind a router whose INPUT chain
accepts everything: a home peer's first packet arriving there before x's own
went out creates a confirmed conntrack entry, x's packet then gets another
port, and the punch fails for as long as that entry lives.  With
`--punch-first` x announces so, and its peers answer 1 s after it punched:
x's packet has left its router by then, so theirs arrive as replies.

    r1 (home)        a 192.168.1.10
    r2 (home)        c 192.168.2.10
    r4 (accept_all)  x 192.168.4.10   (--punch-first)
    r5 (home)        d 192.168.5.10   (started after x)
"""

from __future__ import annotations

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
    r4 = lab.router("r4", "203.0.113.24/24", "192.168.4.0/24", "accept_all")
    r5 = lab.router("r5", "203.0.113.25/24", "192.168.5.0/24", "home")
    m.add_client("a", lab.lan_host(r1, "a", "192.168.1.10/24"))
    m.add_client("c", lab.lan_host(r2, "c", "192.168.2.10/24"))
    m.add_client("x", lab.lan_host(r4, "x", "192.168.4.10/24"))
    m.add_client("d", lab.lan_host(r5, "d", "192.168.5.10/24"))
    with running(m):  # every spoke reaches the hub first
        yield m


def test_a_peer_behind_an_input_accept_router_that_punches_first_goes_direct(mesh):
    mesh.start_registry()
    mesh.start_client("a")
    mesh.start_client("c")
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 20, what="a-c direct")
    # x starts last, as a host boots: a and c learn of it by the registry's
    # push at the moment x learns of them, the moment the race is run.
    mesh.start_client("x", extra=("--punch-first",))
    started = time.monotonic()
    try:
        for other in ("a", "c"):
            wait_until(
                lambda other=other: mesh.direct("x", other) and mesh.direct(other, "x"),
                20,
                what=f"x-{other} direct",
            )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    elapsed = time.monotonic() - started
    print(
        f"x (INPUT-accept router, --punch-first) direct with a and c {elapsed:.2f} s "
        "after it started"
    )
    check(mesh.direct("a", "x") == "203.0.113.24:51820", mesh, "a reaches x at its own port")
    check(elapsed <= 8.0, mesh, f"took {elapsed:.2f} s")
    check(
        "it punches first (its router accepts unsolicited packets)"
        in mesh.clients["a"].daemon.log(),
        mesh,
        "a says why it answered later",
    )
    check(mesh.clients["x"].host.ping("198.51.100.2", count=2), mesh, "x pings a")

    # The other order: a home peer that starts after x.  It learns of x from
    # its first answer, perhaps before the registry has its announcement (and
    # so before x learns of it): it answers 1 s after the registry has it.
    mesh.start_client("d")
    started = time.monotonic()
    try:
        wait_until(lambda: mesh.direct("x", "d") and mesh.direct("d", "x"), 20, what="x-d direct")
    except AssertionError as exc:
        check(False, mesh, str(exc))
    elapsed = time.monotonic() - started
    print(f"d (home NAT) direct with x {elapsed:.2f} s after d started")
    check(mesh.direct("d", "x") == "203.0.113.24:51820", mesh, "d reaches x at its own port")
