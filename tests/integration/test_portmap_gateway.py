"""End to end against a real port-mapping gateway: Debian's miniupnpd on a
symmetric NAT router ("upnp" mode of tests/netns.py: its rules in the legacy
iptables tables, which miniupnpd changes through libiptc), its external address
made "public" for it by a STUN test against coturn on the simulated internet.

    r3 (upnp: symmetric NAT + miniupnpd)  s 192.168.3.10   (PCP)
    r5 (the same, UPnP IGD only)          u 192.168.5.10   (UPnP: no PCP answer)
    r4 (symmetric NAT, no mapping)        y 192.168.4.10
    r1 (home)                             a 192.168.1.10
    public                                p 203.0.113.30

Without a mapping, s and u are relayed with a (test_mesh.py shows it); with
one, they are direct with a and p at their mapped endpoints, and even with y,
behind a symmetric NAT of its own: y's initiation reaches s through the
mapping, and s answers where it came from; the second test runs that pair
with two hubs, which tell both ends they are behind symmetric NATs.  A refusal is tested against
constructed answers only (tests/test_portmap.py): miniupnpd 2.3.1 refuses a PCP
request its permission rules deny by trying every external port in turn (a log
line each, about 50 s here) before it answers NOT_AUTHORIZED, and answers
nothing else meanwhile, which would make this test a minute long and fragile.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from meshlab import BIN, MeshLab, check, wait_until
from netns_fixtures import lab  # noqa: F401 - the fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("miniupnpd") is None or shutil.which("turnserver") is None,
        reason="needs miniupnpd and turnserver (make test installs miniupnpd-iptables, coturn)",
    ),
]

WGNAT = os.path.join(BIN, "wgnat")
MAPPED = "203.0.113.23:51820"
UPNP_MAPPED = "203.0.113.25:51820"


def status(mesh: MeshLab, name: str) -> dict | None:
    """`wgnat status --json` of a client; None while it does not answer yet."""
    node = mesh.clients[name]
    answer = node.host.run(WGNAT, "status", "-i", node.wg.ifname, "--json", check=False)
    if answer.returncode not in (0, 1):  # 1: degraded, with its document all the same
        return None
    return json.loads(answer.stdout)


def port_mapping(mesh: MeshLab, name: str) -> dict:
    document = status(mesh, name)
    return document["port_mapping"] if document else {}


def test_a_client_behind_a_symmetric_nat_with_a_mapping_gateway_goes_direct(lab):  # noqa: F811
    begun = time.monotonic()
    # The gateway first: it maps nothing before its STUN test ends (1 s here, 10 s
    # on other machines), so the rest is built meanwhile.
    lab.stun_server()
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "upnp")
    r3.start_miniupnpd()
    r5 = lab.router("r5", "203.0.113.25/24", "192.168.5.0/24", "upnp")
    r5.start_miniupnpd(pcp=False)
    mesh = MeshLab(lab)
    try:
        mesh.build_registry()
        r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
        r4 = lab.router("r4", "203.0.113.24/24", "192.168.4.0/24", "symmetric")
        hosts = {
            "a": lab.lan_host(r1, "a", "192.168.1.10/24"),
            "p": lab.public_host("p", "203.0.113.30/24"),
            "s": lab.lan_host(r3, "s", "192.168.3.10/24"),
            "u": lab.lan_host(r5, "u", "192.168.5.10/24"),
            "y": lab.lan_host(r4, "y", "192.168.4.10/24"),
        }
        for name, host in hosts.items():
            mesh.add_client(name, host)
        mesh.start_registry()
        built = time.monotonic() - begun
        for router in (r3, r5):
            wait_until(router.miniupnpd_ready, 30, interval=0.1, what="miniupnpd's STUN test")
        ready = time.monotonic() - begun
        started = time.monotonic()
        for name in hosts:
            mesh.start_client(name)
        for other in ("a", "p", "y"):
            try:
                wait_until(
                    lambda other=other: mesh.direct("s", other) and mesh.direct(other, "s"),
                    15,
                    interval=0.01,
                    what=f"s-{other} direct",
                )
            except AssertionError as exc:
                check(False, mesh, f"{exc}\n--- miniupnpd\n{r3.miniupnpd_output()[-3000:]}")
            print(f"s-{other} direct {time.monotonic() - started:.2f} s after the clients started")
        to_direct = time.monotonic() - started
        # The others reach s at its mapped endpoint: its gateway forwards it.
        check(mesh.direct("a", "s") == MAPPED, mesh, "a reaches s at its mapped endpoint")
        check(mesh.direct("p", "s") == MAPPED, mesh, "p reaches s at its mapped endpoint")
        check(
            mesh.clients["s"].host.ping(mesh.clients["a"].tunnel_ip, count=2),
            mesh,
            "s pings a over the direct path",
        )
        mapping = port_mapping(mesh, "s")
        check(
            mapping["state"] == "held"
            and mapping["protocol"] == "pcp"
            and mapping["external_endpoint"] == MAPPED
            and mapping["announced"] is True,
            mesh,
            f"s's status shows its mapping: {mapping}",
        )
        check(mesh.direct("y", "s") == MAPPED, mesh, "y reaches s at its mapped endpoint")
        # u's gateway answers no PCP: UPnP IGD after PCP's 3.75 s of retries.
        for other in ("a", "p"):
            wait_until(
                lambda other=other: mesh.direct("u", other) and mesh.direct(other, "u"),
                20,
                interval=0.02,
                what=f"u-{other} direct",
            )
        upnp_direct = time.monotonic() - started
        check(mesh.direct("a", "u") == UPNP_MAPPED, mesh, "a reaches u at its UPnP mapping")
        mapping = port_mapping(mesh, "u")
        check(mapping.get("protocol") == "upnp", mesh, f"u holds a UPnP mapping: {mapping}")
        # A clean stop deletes the mapping on the gateway.
        for name, router in (("s", r3), ("u", r5)):
            mesh.clients[name].daemon.stop()
            rules = router.run("iptables-legacy", "-t", "nat", "-S", "MINIUPNPD").stdout
            check("51820" not in rules, mesh, f"{name}'s mapping deleted on stop: {rules}")
            check("deleted" in mesh.clients[name].daemon.log(), mesh, f"{name} logs it")
        print(
            f"gateway: lab built {built:.1f} s, miniupnpd mapping from {ready:.1f} s "
            f"(its STUN test); s direct with a, p and y {to_direct:.2f} s after the clients "
            f"started (mapped endpoint {MAPPED}, PCP); u (UPnP IGD) {upnp_direct:.2f} s"
        )
    finally:
        mesh.stop_all()


def test_two_symmetric_nats_with_two_hubs_go_direct_through_one_mapping(lab):  # noqa: F811
    """Two hubs tell both s and y that they sit behind symmetric NATs, so the
    pair is hopeless for hole punching; but s's gateway maps a port: y probes
    it, s probes y's observed endpoint (dropped by y's NAT) to take part, and
    y's handshake, through a port of y's NAT no registry sees, completes."""
    lab.stun_server()
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "upnp")
    r3.start_miniupnpd()
    mesh = MeshLab(lab)
    try:
        mesh.build_registry()
        mesh.build_second_hub()
        r4 = lab.router("r4", "203.0.113.24/24", "192.168.4.0/24", "symmetric")
        hosts = {
            "s": lab.lan_host(r3, "s", "192.168.3.10/24"),
            "y": lab.lan_host(r4, "y", "192.168.4.10/24"),
        }
        for name, host in hosts.items():
            mesh.add_client(name, host)
        mesh.start_registry()
        assert mesh.hub2 is not None
        mesh.start_registry(node=mesh.hub2)
        wait_until(r3.miniupnpd_ready, 30, interval=0.1, what="miniupnpd's STUN test")
        started = time.monotonic()
        for name in hosts:
            mesh.start_client(name)
        try:
            wait_until(
                lambda: mesh.direct("s", "y") and mesh.direct("y", "s"),
                15,
                interval=0.01,
                what="s-y direct",
            )
        except AssertionError as exc:
            check(False, mesh, f"{exc}\n--- miniupnpd\n{r3.miniupnpd_output()[-3000:]}")
        to_direct = time.monotonic() - started
        check(mesh.direct("y", "s") == MAPPED, mesh, "y reaches s at its mapped endpoint")
        for name in hosts:
            document = status(mesh, name)
            check(
                document is not None and document.get("symmetric_nat") is True,
                mesh,
                f"{name} knows it is behind a symmetric NAT: {document}",
            )
        check(
            mesh.clients["y"].host.ping(mesh.clients["s"].tunnel_ip, count=2),
            mesh,
            "y pings s over the direct path",
        )
        print(f"two hubs: s-y (both symmetric, s mapped) direct {to_direct:.2f} s after start")
    finally:
        mesh.stop_all()
