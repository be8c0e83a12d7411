"""End to end with two hubs (issue 15): the registries and clients as a user runs
them, in namespaces behind NAT routers, every client given both hubs (`-r HUB1
-r HUB2`), hub 1 holding the tunnel network.

    hub 1  203.0.113.10  wg 198.51.100.1      hub 2  203.0.113.11  wg 198.51.100.254
    r1 (home)       a 192.168.1.10
    r2 (home)       c 192.168.2.10
    r3 (symmetric)  s 192.168.3.10            (two hubs see it at two ports)
    r4 (symmetric)  t 192.168.4.10            (s-t: hopeless, relayed from the start)
    r5 (home)       d 192.168.5.10            (started while hub 1 is down)

One scene in phases, each checked and timed: the mesh forms and s, t are told
symmetric; hub 1 is SIGKILLed with its interface (direct pairs lose nothing,
relayed ones resume through hub 2); d starts and joins through hub 2; hub 1
comes back and nothing moves.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time

import pytest
from meshlab import HUB2_TUNNEL, REGISTRY_TUNNEL, MeshLab, check, running, wait_until
from netns import leakcheck
from netns_fixtures import lab  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


@pytest.fixture
def mesh(lab):  # noqa: F811
    m = MeshLab(lab)
    m.build_registry()
    m.build_second_hub()
    routers = {
        "a": lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home"),
        "c": lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home"),
        "s": lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "symmetric"),
        "t": lab.router("r4", "203.0.113.24/24", "192.168.4.0/24", "symmetric"),
        "d": lab.router("r5", "203.0.113.25/24", "192.168.5.0/24", "home"),
    }
    for name, router in routers.items():
        m.add_client(name, lab.lan_host(router, name, f"{router.lan.network_address + 10}/24"))
    # Hub and spokes, twice: every spoke reaches both hubs before wgnat runs.
    for node in m.clients.values():
        assert node.host.ping(REGISTRY_TUNNEL, count=3, timeout=2), node.name
        assert node.host.ping(HUB2_TUNNEL, count=3, timeout=2), node.name
    with running(m, hub_reachable=False):
        yield m


def status(mesh: MeshLab, name: str) -> dict:
    """`wgnat status --json` of a client: its own code (wgnat.cli.wgnat.main),
    called here rather than in a new interpreter, which costs seconds on a busy
    machine (the status socket is a file under /run/wgnat, the same from every
    namespace)."""
    from wgnat.cli.wgnat import main as wgnat_main

    node = mesh.clients[name]
    out, err = io.StringIO(), io.StringIO()
    code = wgnat_main(["status", "-i", node.wg.ifname, "--json"], out=out, err=err)
    if leakcheck is not None:  # leak check hook, as for any output a test sees
        leakcheck.check_text(out.getvalue() + err.getvalue(), f"wgnat status of {name}")
    if code not in (0, 1):  # 1: degraded (hub 1 gone), the document all the same
        return {}
    return json.loads(out.getvalue())


def relay_hub(mesh: MeshLab, name: str) -> str | None:
    return status(mesh, name).get("relay_hub")


def probed(mesh: MeshLab, name: str, other: str) -> bool:
    """Whether `name`'s client ever logged a probe of `other`."""
    address = mesh.clients[other].tunnel_ip
    return any(
        f"{address} (" in line and "probing" in line
        for line in mesh.clients[name].daemon.log().splitlines()
    )


def start_ping(host, address: str, seconds: int) -> subprocess.Popen:
    return host.popen(
        ["ping", "-n", "-D", "-i", "0.1", "-W", "1", "-w", seconds, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ping_result(process: subprocess.Popen, cut: float) -> tuple[int, int, float]:
    """(sent, received, seconds from the last reply before `cut` (Unix time)
    to the first after it: the loss window; inf when none came after)."""
    output, _ = process.communicate(timeout=120)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    replies = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    before = [t for t in replies if t <= cut]
    after = [t for t in replies if t > cut]
    window = (after[0] - (before[-1] if before else cut)) if after else float("inf")
    return int(match.group(1)), int(match.group(2)), window


def test_two_hubs_fail_over_and_unmask_a_symmetric_nat(mesh):
    hub1, hub2 = mesh.registry, mesh.hub2
    assert hub1 is not None and hub2 is not None
    mesh.start_registry()
    mesh.start_registry(node=hub2)
    for name in ("a", "c", "s", "t"):
        mesh.start_client(name)

    # -- 1. the mesh forms; the two hubs' views unmask s and t -------------------
    try:
        wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
        wait_until(
            lambda: all(status(mesh, n).get("symmetric_nat") is True for n in ("s", "t")),
            15,
            what="s and t told symmetric",
        )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    for name in ("a", "c"):
        check(status(mesh, name).get("symmetric_nat") is False, mesh, f"{name} is not symmetric")
    for name in mesh.clients:
        if name != "d":
            check(relay_hub(mesh, name) == hub1.wg.public_key, mesh, f"{name} relays via hub 1")
    check("symmetric NAT" in mesh.clients["s"].daemon.log(), mesh, "s logs its symmetric NAT")
    metrics = mesh.clients["s"].host.python(
        "import urllib.request;print(urllib.request.urlopen("
        "'http://127.0.0.1:9588/metrics',timeout=5).read().decode())"
    )
    check("wgnat_client_symmetric_nat 1.0" in metrics.stdout, mesh, "s's metric says symmetric")
    check(mesh.clients["s"].host.ping(mesh.clients["t"].tunnel_ip, count=3), mesh, "s pings t")

    # -- 2. hub 1 dies: direct pairs lose nothing, relayed ones move to hub 2 --------
    direct_ping = start_ping(mesh.clients["a"].host, mesh.clients["c"].tunnel_ip, 30)
    relayed_ping = start_ping(mesh.clients["s"].host, mesh.clients["t"].tunnel_ip, 30)
    time.sleep(2)
    killed, killed_at = time.monotonic(), time.time()
    mesh.kill_hub(hub1)
    try:
        wait_until(
            lambda: all(relay_hub(mesh, n) == hub2.wg.public_key for n in ("a", "c", "s", "t")),
            25,
            interval=0.2,
            what="every client relaying through hub 2",
        )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    moved = time.monotonic() - killed
    sent, received, _ = ping_result(direct_ping, killed_at)
    check(received == sent, mesh, f"the direct pair a-c lost {sent - received} of {sent} pings")
    sent_relayed, received_relayed, window = ping_result(relayed_ping, killed_at)
    check(window < 20, mesh, f"the relayed pair s-t was cut for {window:.1f} s")
    check(mesh.direct("a", "c") is not None, mesh, "a-c still direct")
    text = status(mesh, "s")
    check(
        any(h["relays"] and h["public_key"] == hub2.wg.public_key for h in text["hubs"]),
        mesh,
        "s's status names hub 2 as the relay",
    )

    # -- 3. a client started while hub 1 is down joins through hub 2 -------------------
    started = time.monotonic()
    mesh.start_client("d")
    try:
        wait_until(lambda: mesh.direct("d", "c") and mesh.direct("c", "d"), 30, what="d-c direct")
        wait_until(
            lambda: relay_hub(mesh, "d") == hub2.wg.public_key, 15, what="d relaying via hub 2"
        )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    joined = time.monotonic() - started
    check(mesh.clients["d"].host.ping(mesh.clients["s"].tunnel_ip, count=3), mesh, "d pings s")

    # -- 4. hub 1 comes back: nothing moves ------------------------------------------
    endpoints = {key: peer["endpoint"] for key, peer in hub2.wg.peers().items()}
    revived = time.time()
    mesh.revive_hub(hub1, endpoints)
    mesh.start_registry()
    for node in mesh.clients.values():
        node.host.ping(REGISTRY_TUNNEL, count=1)  # a handshake now, not at the next keepalive
    try:
        wait_until(
            lambda: all(
                peer["latest_handshake"] >= int(revived) for peer in hub1.wg.peers().values()
            ),
            15,
            interval=0.2,
            what="every client handshaking with hub 1 again",
        )
    except AssertionError as exc:
        check(False, mesh, str(exc))
    moves = {
        name: node.daemon.log().count("relaying through") for name, node in mesh.clients.items()
    }
    time.sleep(8)
    for name, node in mesh.clients.items():
        check(
            node.daemon.log().count("relaying through") == moves[name],
            mesh,
            f"{name} moved its relay again when hub 1 came back",
        )
        check(relay_hub(mesh, name) == hub2.wg.public_key, mesh, f"{name} still via hub 2")
    check(mesh.direct("a", "c") and mesh.direct("d", "c"), mesh, "direct pairs still direct")

    # -- the hopeless pair was never probed, from either end -------------------------
    check(not probed(mesh, "s", "t") and not probed(mesh, "t", "s"), mesh, "s-t never probed")
    check(probed(mesh, "s", "a") or probed(mesh, "a", "s"), mesh, "s-a (one home NAT) was tried")
    print(
        f"two hubs: hub 1 killed -> every client relaying via hub 2 after {moved:.1f} s; "
        f"direct a-c lost {sent - received} of {sent} pings; relayed s-t lost "
        f"{sent_relayed - received_relayed} of {sent_relayed} (longest gap {window:.1f} s); "
        f"d started with hub 1 down, direct with c after {joined:.1f} s"
    )
