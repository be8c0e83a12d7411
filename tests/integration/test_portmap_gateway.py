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
mapping, and s answers where it came from.  The second test runs that pair
with two hubs, which tell both ends they are behind symmetric NATs.  The third
has miniupnpd refuse (over UPnP IGD, which answers a denial at once) and a
lease lapse; the fourth speaks NAT-PMP to it.  A PCP refusal is tested against
constructed answers only (tests/test_portmap.py): miniupnpd 2.3.1 refuses a
PCP request its permission rules deny by trying every external port in turn (a
log line each, about 50 s here) before it answers NOT_AUTHORIZED, and answers
nothing else meanwhile, which would make a test a minute long and fragile.
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
        pairs = [("s", "a"), ("s", "p"), ("s", "y"), ("u", "a"), ("u", "p")]
        try:
            times = mesh.times_to_direct(pairs, started, 30)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- miniupnpd r3\n{r3.miniupnpd_output()[-2000:]}"
                f"\n--- miniupnpd r5\n{r5.miniupnpd_output()[-2000:]}"
            ) from None
        for (x, y), seconds in times.items():
            print(f"{x}-{y} direct {seconds:.2f} s after the clients started")
        to_direct = max(times[pair] for pair in pairs[:3])
        upnp_direct = max(times[pair] for pair in pairs[3:])
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
        # u's gateway answers no PCP: UPnP IGD, asked 0.25 s after PCP.
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


def peer_row(mesh: MeshLab, name: str, other: str) -> dict:
    """`name`'s status row for `other` ({} while it has none)."""
    document = status(mesh, name) or {}
    key = mesh.clients[other].wg.public_key
    return next((row for row in document.get("peers", []) if row.get("public_key") == key), {})


def test_a_refused_mapping_and_a_lapsed_lease_go_on_without_it_saying_why(lab):  # noqa: F811
    """Real refusals and expiries, each ending in a fallback with its reason:
    r5's miniupnpd refuses u (its permission rules allow another network; UPnP
    only, which answers a denial at once), so u goes on with its observed
    endpoint; r3's miniupnpd grants 6 s PCP leases, and once its PCP port is
    blocked s's lease runs out and s withdraws its mapped endpoint: p says so
    and names the candidate it falls back to, but keeps the direct path while
    it works (r3's connection tracking still forwards the flow)."""
    lab.stun_server()
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "upnp")
    r3.start_miniupnpd(lifetime=6)
    r5 = lab.router("r5", "203.0.113.25/24", "192.168.5.0/24", "upnp")
    r5.start_miniupnpd(allowed="10.99.0.0/16", pcp=False)
    mesh = MeshLab(lab)
    try:
        mesh.build_registry()
        hosts = {
            "p": lab.public_host("p", "203.0.113.30/24"),
            "s": lab.lan_host(r3, "s", "192.168.3.10/24"),
            "u": lab.lan_host(r5, "u", "192.168.5.10/24"),
        }
        for name, host in hosts.items():
            mesh.add_client(name, host)
        mesh.start_registry()
        for router in (r3, r5):
            wait_until(router.miniupnpd_ready, 30, interval=0.1, what="miniupnpd's STUN test")
        for name in hosts:
            mesh.start_client(name)
        wait_until(lambda: mesh.direct("p", "s") == MAPPED, 15, what="p direct with s, mapped")
        mapping = port_mapping(mesh, "s")
        check(mapping.get("lifetime") == 6, mesh, f"r3 grants 6 s leases: {mapping}")

        # The refusal: PCP unanswered (3.75 s), then UPnP IGD refused.
        wait_until(
            lambda: port_mapping(mesh, "u").get("state") == "failed",
            20,
            interval=0.2,
            what="u's mapping refused",
        )
        refused = port_mapping(mesh, "u")["error"]
        check("upnp" in refused, mesh, f"u says UPnP IGD refused it: {refused}")
        check("no port mapping: " in mesh.clients["u"].daemon.log(), mesh, "u logs the refusal")
        wait_until(lambda: mesh.direct("u", "p"), 15, what="u direct with p all the same")

        # The expiry: renewals (every 3 s) go unanswered from now on.
        blocked = time.monotonic()
        r3.run("iptables-legacy", "-w", "-I", "INPUT", "-p", "udp", "--dport", "5351", "-j", "DROP")
        wait_until(
            lambda: "expired without renewal" in (port_mapping(mesh, "s").get("error") or ""),
            15,
            interval=0.2,
            what="s's lease to expire",
        )
        expired = time.monotonic() - blocked
        # The flow r3's connection tracking holds outlives the lease: p keeps its
        # direct path, says why, and names the candidate it falls back to.
        gone = f"its mapped endpoint {MAPPED} is no longer announced"
        wait_until(lambda: gone in mesh.clients["p"].daemon.log(), 10, what="p to say why")
        check(
            "the direct path to it stays while its handshakes do (then: observed IPv4 endpoint"
            in mesh.clients["p"].daemon.log(),
            mesh,
            "p keeps the path and names its next candidate",
        )
        row = peer_row(mesh, "p", "s")
        check(
            row.get("path") == "direct" and [c["kind"] for c in row["candidates"]] == ["observed"],
            mesh,
            f"p direct with s, its mapped endpoint off the list: {row}",
        )
        check(
            mesh.clients["p"].host.ping(mesh.clients["s"].tunnel_ip, count=2),
            mesh,
            "p still reaches s",
        )
        print(
            f"refusal: u failed over PCP and UPnP, with the reason; expiry: s's lease ran out "
            f"{expired:.1f} s after r3's PCP port was blocked; p kept its working path"
        )
    finally:
        mesh.stop_all()


# NAT-PMP as our client speaks it once a gateway refuses PCP's version, run in
# a LAN host's namespace against the real miniupnpd: "map" asks for a mapping
# and leaves it, "delete" asks for its removal (NAT-PMP's lifetime 0).
NATPMP_SCRIPT = """
import ipaddress, sys
from twisted.internet import task
from wgnat.client.portmap import PcpOrNatPmp, PortMapping, UdpChannel
from wgnat._types import Endpoint

def main(reactor, what, gateway, external):
    method = PcpOrNatPmp(
        reactor, ipaddress.ip_address(gateway), lambda g, got: UdpChannel(reactor, g, got)
    )
    method.name = "nat-pmp"  # what a gateway answering "unsupported version" makes it
    if what == "map":
        asked = method.map(51820, 60)
        asked.addCallback(lambda m: print("MAPPED", m.protocol, m.external, m.lifetime))
    else:
        gone = PortMapping("nat-pmp", Endpoint.parse(external), 51820, 60, 0.0)
        asked = method.delete(gone).addCallback(lambda _: print("DELETED"))
    return asked.addBoth(lambda result: (method.close(), result)[1])

task.react(main, sys.argv[1:])
"""


def test_nat_pmp_maps_and_deletes_against_the_real_gateway(lab):  # noqa: F811
    """The NAT-PMP half of PcpOrNatPmp (a gateway that speaks only NAT-PMP is
    recognised by its answer to PCP: tests/test_portmap.py) against miniupnpd,
    which answers both."""
    lab.stun_server()
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "upnp")
    r3.start_miniupnpd()
    s = lab.lan_host(r3, "s", "192.168.3.10/24")
    wait_until(r3.miniupnpd_ready, 30, interval=0.1, what="miniupnpd's STUN test")
    python = os.path.join(BIN, "python")
    mapped = s.run(python, "-c", NATPMP_SCRIPT, "map", "192.168.3.1", MAPPED, timeout=30)
    assert f"MAPPED nat-pmp {MAPPED} 60" in mapped.stdout, mapped.stdout + mapped.stderr
    rules = r3.run("iptables-legacy", "-t", "nat", "-S", "MINIUPNPD").stdout
    assert "--dport 51820 -j DNAT" in rules, rules
    deleted = s.run(python, "-c", NATPMP_SCRIPT, "delete", "192.168.3.1", MAPPED, timeout=30)
    assert "DELETED" in deleted.stdout, deleted.stdout + deleted.stderr
    rules = r3.run("iptables-legacy", "-t", "nat", "-S", "MINIUPNPD").stdout
    assert "51820" not in rules, rules
    # miniupnpd logs which protocol it was asked in (not PCP).
    assert "NAT-PMP port mapping request : 51820->192.168.3.10:51820 udp" in r3.miniupnpd_output()
