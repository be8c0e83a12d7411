"""End to end on kernel WireGuard: both daemons on `ip link add NAME type wireguard`
devices in namespaces behind NAT routers, as tests/integration/test_mesh.py runs
them on wireguard-go, and one mixed mesh of kernel and wireguard-go devices.

They need a kernel with the WireGuard module.  This machine's kernel has none, so
`make test-kernel` (scripts/kernel-vm.sh) boots a Debian kernel in a VM and runs
this module there with tests/test_netlink.py; elsewhere it skips, saying so.

The VM emulates its CPU (TCG, about ten times slower than the host): a daemon takes
seconds to start and a `wg show` tens of milliseconds.  So the deadlines below are
for outcomes, not figures: each scenario prints how long it took (the stage's log
shows it), and `make bench` gives the figures.  To save the VM's time, one lab
serves the kernel scenarios in order: the hard NATs (IPv6, a mapped port), the
paths form, a NAT rebinding, a removal.

    r1 (home)       a 192.168.1.10, b 192.168.1.11     (same NAT: LAN endpoints)
    r2 (home)       c 192.168.2.10   2001:db8:2::10    (dual-stack)
    r3 (symmetric)  s 192.168.3.10   2001:db8:3::10    (dual-stack: direct with c over
                                                        IPv6, relayed with a and b)
    r5 (upnp)       u 192.168.5.10                     (symmetric NAT, miniupnpd: direct
                                                        at its mapped port)

As tests/integration/test_ipv6.py and test_portmap_gateway.py run them on
wireguard-go: IPv6 behind routers that forward it statefully (out and answers
only), and a gateway running Debian's miniupnpd made "public" by a STUN test
against coturn on the simulated internet (both from the host's filesystem, which
the VM sees; `make test-kernel` installs them with the other system packages).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator

import pytest
from meshlab import MeshLab, check, wait_until
from netns import Lab, LabError, cleanup_leftovers, kernel_wireguard_unavailable, leakcheck
from netns_fixtures import lab  # noqa: F401 - the fixture

KERNEL_UNAVAILABLE = kernel_wireguard_unavailable()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kernel,
    pytest.mark.skipif(KERNEL_UNAVAILABLE is not None, reason=KERNEL_UNAVAILABLE or ""),
]

# Deadlines under an emulated CPU.  The protocol's own timers (6 s probe, 25 s
# keepalive, 30 s removal grace) run on the wall clock and do not stretch; what
# stretches is Python: start-up, each read of a device, each decision.
OUTCOME = 90.0
POLL = 0.5  # a `wg show` per poll: polling faster would steal the daemons' CPU
# The dual-stack clients' global IPv6 addresses, and u's mapped endpoint (its
# gateway r5's public address, the listen port kept: miniupnpd maps it as asked).
C_V6, S_V6 = "2001:db8:2::10", "2001:db8:3::10"
U_MAPPED = "203.0.113.25:51820"
GATEWAY_TOOLS = ("miniupnpd", "turnserver", "iptables-legacy")


def timed_wait(mesh: MeshLab, predicate, what: str, timeout: float = OUTCOME) -> float:
    """Wait for `predicate`; the seconds it took.  A timeout fails with the report."""
    started = time.monotonic()
    try:
        wait_until(predicate, timeout, interval=POLL, what=what)
    except AssertionError as exc:
        check(False, mesh, str(exc))
    return time.monotonic() - started


def both_direct(mesh: MeshLab, x: str, y: str) -> bool:
    return bool(mesh.direct(x, y) and mesh.direct(y, x))


def first_line(mesh: MeshLab, name: str) -> str:
    """The daemon's first line of its own (logger namespace `wgnat.*`); only
    Twisted's "Site starting on ..." lines for its listening ports come before."""
    node = mesh.registry if name == "reg" else mesh.clients[name]
    assert node is not None and node.daemon is not None
    ours = [line for line in node.daemon.log().splitlines() if " [wgnat." in line]
    return ours[0] if ours else ""


def status(mesh: MeshLab, name: str, *flags: str) -> str:
    """What `wgnat status [--server] FLAGS` prints for a daemon.  Its own code
    (wgnat.cli.wgnat.main), called here rather than in a new interpreter: under the
    VM's emulated CPU each Python start costs seconds.  The status socket is a
    file under /run/wgnat, the same from every namespace."""
    from wgnat.cli.wgnat import main as wgnat_status

    node = mesh.registry if name == "reg" else mesh.clients[name]
    assert node is not None
    argv = ["status", "-i", node.wg.ifname, *flags] + (["--server"] if name == "reg" else [])
    out, err = io.StringIO(), io.StringIO()
    code = wgnat_status(argv, out=out, err=err)
    text = out.getvalue()
    if leakcheck is not None:  # leak check hook, as for any output a test sees
        leakcheck.check_text(text + err.getvalue(), f"wgnat status of {name}")
    check(code == 0, mesh, f"wgnat status {' '.join(argv)} failed: {err.getvalue()}")
    return text


def assert_backends(mesh: MeshLab, names: list[str]) -> None:
    """Each daemon chose its device's backend without a flag, and says so in its
    first log line and in `wgnat status`."""
    for name in names:
        node = mesh.registry if name == "reg" else mesh.clients[name]
        assert node is not None
        expected = node.wg.backend
        program = "wgnat-server" if name == "reg" else "wgnat-client"
        timed_wait(mesh, lambda name=name: first_line(mesh, name), f"{name}'s first log line")
        line = first_line(mesh, name)
        check(
            f"{program} on {node.wg.ifname} ({expected})" in line,
            mesh,
            f"{name}'s first log line names the {expected} backend: {line!r}",
        )
        timed_wait(mesh, lambda name=name: status_socket_ready(mesh, name), f"{name}'s status")
        header = status(mesh, name).splitlines()[0]
        check(
            header.startswith(f"{program} on {node.wg.ifname} ({expected}): "),
            mesh,
            f"`wgnat status` of {name} names the {expected} backend: {header!r}",
        )
        check(
            json.loads(status(mesh, name, "--json")).get("backend") == expected,
            mesh,
            f"`wgnat status --json` of {name} says {expected}",
        )


def status_socket_ready(mesh: MeshLab, name: str) -> bool:
    """Whether the daemon's status socket exists (the same path from every
    namespace: checked from here, without a process)."""
    node = mesh.registry if name == "reg" else mesh.clients[name]
    assert node is not None
    role = "server" if name == "reg" else "client"
    try:
        mode = os.stat(f"/run/wgnat/{role}-{node.wg.ifname}.sock").st_mode
    except FileNotFoundError:
        return False
    return stat.S_ISSOCK(mode)


def peer_row(mesh: MeshLab, name: str, other: str) -> dict | None:
    """`other`'s row in `wgnat status --json` of `name`."""
    key = mesh.clients[other].wg.public_key
    rows = json.loads(status(mesh, name, "--json"))["peers"]
    return next((row for row in rows if row["public_key"] == key), None)


def timed_race(
    mesh: MeshLab, conditions: dict[tuple[str, str], Callable[[], object]]
) -> dict[tuple[str, str], str]:
    """Wait for every pair's condition at once, so that each is timed as it
    happens (not after another wait); for each pair, how long it took: from both
    its clients' processes being started, and from both daemons' first log lines
    (their start-up under emulation is not the path's doing), as polled.  A
    timeout fails with the pairs left and the report."""
    up: dict[tuple[str, str], float] = {}
    took: dict[tuple[str, str], str] = {}
    deadline = time.monotonic() + OUTCOME
    while True:
        for pair, condition in conditions.items():
            if pair in took:
                continue
            if pair not in up and all(first_line(mesh, name) for name in pair):
                up[pair] = time.monotonic()
            if pair in up and condition():
                now = time.monotonic()
                spawned = max(mesh.clients[name].daemon.started for name in pair)  # type: ignore[union-attr]
                took[pair] = (
                    f"{now - spawned:.1f} s after both clients were started, "
                    f"{now - up[pair]:.1f} s after both daemons' first log lines"
                )
        left = [f"{x}-{y}" for x, y in conditions if (x, y) not in took]
        if not left:
            return took
        check(time.monotonic() < deadline, mesh, f"{', '.join(left)} not direct in {OUTCOME} s")
        time.sleep(POLL)


def path_lines(mesh: MeshLab, name: str, other: str) -> list[str]:
    """`name`'s log lines on its path to `other` (its attempts and switches, with
    their second-resolution times): how a slow path formed, in the stage's log."""
    node = mesh.clients[name]
    assert node.daemon is not None
    tag = f"{mesh.clients[other].tunnel_ip} ("
    return [line for line in node.daemon.log().splitlines() if tag in line]


def build(where: Lab, kinds: dict[str, str], ipv6: bool = False) -> MeshLab:
    """The hub (`kinds["reg"]`) and the clients a, b (r1), c (r2), s (r3), u (r5,
    the mapping gateway) present in `kinds`, every spoke reaching the hub before
    any daemon runs.  `ipv6`: c and s dual-stack, each reaching the other's
    router over IPv6 before any daemon runs."""
    mesh = MeshLab(where, start_timeout=OUTCOME)
    gateway = None
    if "u" in kinds:
        missing = [tool for tool in GATEWAY_TOOLS if shutil.which(tool) is None]
        if missing:  # make test-kernel installs them first (scripts/install-system-deps.sh)
            raise LabError(f"the mapping gateway needs {', '.join(missing)}: run make system-deps")
        # The gateway first: it maps nothing before its STUN test ends, which
        # runs while the rest is built.
        where.stun_server()
        gateway = where.router("r5", "203.0.113.25/24", "192.168.5.0/24", "upnp")
        gateway.start_miniupnpd()
    mesh.build_registry(kind=kinds["reg"])
    r1 = where.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
    r2 = where.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    hosts = {
        "a": lambda: where.lan_host(r1, "a", "192.168.1.10/24"),
        "b": lambda: where.lan_host(r1, "b", "192.168.1.11/24"),
        "c": lambda: where.lan_host(r2, "c", "192.168.2.10/24"),
    }
    if "s" in kinds:
        r3 = where.router("r3", "203.0.113.23/24", "192.168.3.0/24", "symmetric")
        hosts["s"] = lambda: where.lan_host(r3, "s", "192.168.3.10/24")
    if gateway is not None:
        hosts["u"] = lambda: where.lan_host(gateway, "u", "192.168.5.10/24")
    for name, make in hosts.items():
        mesh.add_client(name, make(), kind=kinds[name])
    if ipv6:
        for name, wan, lan, address in (
            ("c", "2001:db8::22/64", "2001:db8:2::/64", C_V6),
            ("s", "2001:db8::23/64", "2001:db8:3::/64", S_V6),
        ):
            host = mesh.clients[name].host
            assert host.router is not None
            where.ipv6_router(host.router, wan, lan)
            where.ipv6_lan_host(host, f"{address}/64")
    for node in mesh.clients.values():
        assert node.host.ping("198.51.100.1", count=3, timeout=3), f"{node.name} reaches the hub"
    waited = []  # what the waits below cost, once the rest is built (the stage's time)
    if ipv6:
        begun = time.monotonic()
        # Neighbour discovery on the new links works about 2 s after they came
        # up (their link-local addresses' duplicate detection): each reaches the
        # other's router before wgnat runs, so no first initiation is lost to it.
        for name, far in (("c", "2001:db8::23"), ("s", "2001:db8::22")):
            host = mesh.clients[name].host
            wait_until(
                lambda host=host, far=far: (
                    host.run("ping", "-6", "-c", "1", "-W", "1", far, check=False).returncode == 0
                ),
                30,
                interval=0.2,
                what=f"{name} to reach {far} over IPv6",
            )
        waited.append(f"IPv6 neighbour discovery {time.monotonic() - begun:.1f} s")
    if gateway is not None:
        begun = time.monotonic()
        wait_until(gateway.miniupnpd_ready, 60, interval=0.2, what="miniupnpd's STUN test")
        waited.append(f"miniupnpd's STUN test {time.monotonic() - begun:.1f} s")
    if waited:
        print(f"\nlab built, then waited for: {', '.join(waited)}")
    return mesh


def start(mesh: MeshLab) -> float:
    """Start the registry, then every client; the time this took."""
    started = time.monotonic()
    mesh.start_registry()
    for name in mesh.clients:
        mesh.start_client(name)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def kernel_mesh() -> Iterator[MeshLab]:
    cleanup_leftovers()
    own = Lab()  # module-scoped: the `lab` fixture is one per test
    mesh: MeshLab | None = None
    try:
        begun = time.monotonic()
        mesh = build(own, dict.fromkeys(("reg", "a", "b", "c", "s", "u"), "kernel"), ipv6=True)
        built = time.monotonic() - begun
        took = start(mesh)
        print(
            f"kernel mesh: lab built in {built:.1f} s, registry and {len(mesh.clients)} "
            f"clients started in {took:.1f} s"
        )
        yield mesh
    finally:
        if mesh is not None:
            mesh.stop_all()
        own.cleanup()


def test_kernel_mesh_goes_direct_through_hard_nats_over_ipv6_and_a_mapped_port(
    kernel_mesh: MeshLab,
) -> None:
    """Issue 16's mechanisms on kernel devices.  s, behind a symmetric IPv4 NAT,
    and c are dual-stack: direct over IPv6 (their endpoints IPv6 addresses in the
    devices, through both routers' stateful IPv6 firewalls).  u is behind a
    symmetric NAT whose gateway maps its port (PCP, miniupnpd): a reaches it at
    the mapped endpoint.  Both are waited for together, first in the module, so
    that each time is measured live."""
    mesh = kernel_mesh
    took = timed_race(
        mesh,
        {
            ("s", "c"): lambda: both_direct(mesh, "s", "c"),
            ("u", "a"): lambda: both_direct(mesh, "u", "a"),
        },
    )
    # IPv6: the devices hold IPv6 endpoints, chosen as the "ipv6" candidate.
    check(mesh.direct("s", "c") == f"[{C_V6}]:51820", mesh, "s reaches c over IPv6")
    check(mesh.direct("c", "s") == f"[{S_V6}]:51820", mesh, "c reaches s over IPv6")
    for name, other, address in (("s", "c", C_V6), ("c", "s", S_V6)):
        row = peer_row(mesh, name, other)
        chosen = (row or {}).get("candidate") or {}
        check(
            chosen.get("kind") == "ipv6" and chosen.get("endpoint") == f"[{address}]:51820",
            mesh,
            f"{name}'s status: {other} direct over its IPv6 candidate: {row}",
        )
    check(
        f"direct at IPv6 [{C_V6}]:51820 (both ends have global IPv6"
        in mesh.clients["s"].daemon.log(),  # type: ignore[union-attr]
        mesh,
        "s logs the candidate and why",
    )
    check(
        mesh.clients["s"].host.ping(mesh.clients["c"].tunnel_ip, count=2, timeout=3),
        mesh,
        "s pings c over IPv6",
    )
    # The mapped port: u holds a PCP mapping, announces it, and a uses it.
    check(mesh.direct("a", "u") == U_MAPPED, mesh, "a reaches u at its mapped endpoint")
    mapping = json.loads(status(mesh, "u", "--json"))["port_mapping"]
    check(
        mapping.get("state") == "held"
        and mapping.get("protocol") == "pcp"
        and mapping.get("external_endpoint") == U_MAPPED
        and mapping.get("announced") is True,
        mesh,
        f"u's status shows its mapping: {mapping}",
    )
    chosen = (peer_row(mesh, "a", "u") or {}).get("candidate") or {}
    check(chosen.get("kind") == "mapped", mesh, f"a chose u's mapped candidate: {chosen}")
    check(
        mesh.clients["u"].host.ping(mesh.clients["a"].tunnel_ip, count=2, timeout=3),
        mesh,
        "u pings a over the direct path",
    )
    for name, other in (("s", "c"), ("c", "s"), ("u", "a"), ("a", "u")):
        print("\n".join(path_lines(mesh, name, other)))
    u_log = mesh.clients["u"].daemon.log().splitlines()  # type: ignore[union-attr]
    print("\n".join(line for line in u_log if "[wgnat.client.portmap" in line))
    print(
        f"kernel mesh (polled every {POLL} s): s (symmetric IPv4 NAT) - c direct over IPv6 "
        f"{took['s', 'c']}; u (symmetric NAT, PCP gateway) - a direct at {U_MAPPED} "
        f"{took['u', 'a']}"
    )


def test_kernel_devices_use_the_netlink_backend(kernel_mesh: MeshLab) -> None:
    assert_backends(kernel_mesh, ["reg", "a", "s"])


def test_kernel_mesh_forms_with_the_right_paths(kernel_mesh: MeshLab) -> None:
    mesh = kernel_mesh
    took = {}
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        took[x, y] = timed_wait(mesh, lambda x=x, y=y: both_direct(mesh, x, y), f"{x}-{y} direct")
    # Same NAT: LAN endpoints (Linux does not hairpin).
    check(mesh.direct("a", "b") == "192.168.1.11:51820", mesh, "a reaches b on its LAN")
    check(mesh.direct("b", "a") == "192.168.1.10:51820", mesh, "b reaches a on its LAN")
    # Different NATs: each other's public mapping (port-preserving home NAT).
    check(mesh.direct("a", "c") == "203.0.113.22:51820", mesh, "a reaches c via r2")
    check((mesh.direct("c", "a") or "").startswith("203.0.113.21:"), mesh, "c reaches a via r1")
    # The symmetric NAT: given up on after the probe, relayed, and the reason logged
    # (with the IPv4-only peers: c and s share IPv6, the first test's pair).
    for other in ("a", "b"):
        timed_wait(
            mesh,
            lambda other=other: (
                "relayed: no direct handshake" in mesh.clients[other].daemon.log()  # type: ignore[union-attr]
                and not mesh.has_entry(other, "s")
                and not mesh.has_entry("s", other)
            ),
            f"s-{other} relayed",
        )
    why = [line for line in status(mesh, "a").splitlines() if " relayed " in line]
    check(why, mesh, "a's `wgnat status` lists s as relayed")
    print(f"a's status of s: {why}")
    for x in mesh.clients:
        for y in mesh.clients:
            if x != y:
                check(
                    mesh.clients[x].host.ping(mesh.clients[y].tunnel_ip, count=2, timeout=3),
                    mesh,
                    f"{x} pings {y}",
                )
    pairs = ", ".join(f"{x}-{y} after {t:.1f} s" for (x, y), t in took.items())
    print(f"kernel mesh: direct {pairs} (each from the previous)")


def test_kernel_mesh_follows_a_nat_rebinding(kernel_mesh: MeshLab) -> None:
    mesh = kernel_mesh
    a, c = mesh.clients["a"], mesh.clients["c"]

    def from_c() -> int:  # bytes a has had from c
        return a.wg.peers()[c.wg.public_key]["rx"]

    c.host.router.rebind()  # type: ignore[union-attr]
    before = from_c()  # after the flush: what comes later came through a new mapping
    took = timed_wait(
        mesh,
        lambda: (mesh.direct("a", "c") or "").startswith("203.0.113.22:4"),
        "a to follow c's new mapping",
    )
    # a has c's new public endpoint from the registry, but r2 lets a's packets
    # in only once c has sent to a through its new mapping: c re-opens its
    # direct paths when it sees its own mapping move (the registry tells it
    # too).  Under the VM's emulated, shared CPU c's daemon can be seconds
    # behind a's, so the ping waits for c's packets to have reached a.
    reopened = took + timed_wait(
        mesh, lambda: from_c() > before, "c's packets to reach a through its new mapping"
    )
    check(
        a.host.ping(c.tunnel_ip, count=3, timeout=3),
        mesh,
        "a pings c after the rebinding",
    )
    print(
        f"kernel mesh: rebinding followed in {took:.1f} s, c's packets through its new "
        f"mapping at a {reopened:.1f} s after the rebinding"
    )


def test_kernel_mesh_removes_a_removed_peer(kernel_mesh: MeshLab) -> None:
    mesh = kernel_mesh
    b = mesh.clients["b"]
    assert b.daemon is not None and mesh.registry is not None
    b.daemon.stop()
    mesh.registry.wg.remove_peer(b.wg.public_key)
    # 30 s of grace in the client, then the removal.
    took = timed_wait(
        mesh,
        lambda: not mesh.has_entry("a", "b") and not mesh.has_entry("c", "b"),
        "b's entry to go from a and c",
        timeout=30 + OUTCOME,
    )
    check(both_direct(mesh, "a", "c"), mesh, "a and c stay direct")
    check(
        mesh.clients["a"].host.ping(mesh.clients["c"].tunnel_ip, count=2, timeout=3),
        mesh,
        "a still pings c",
    )
    print(f"kernel mesh: removed peer gone from a and c {took:.1f} s after its removal")


def test_mixed_mesh_of_kernel_and_wireguard_go(lab: Lab) -> None:  # noqa: F811
    """A kernel hub with wireguard-go clients, and a kernel client (b) among them:
    each daemon picks its own backend, and the paths are the same."""
    kinds = {"reg": "kernel", "a": "go", "b": "kernel", "c": "go"}
    mesh = build(lab, kinds)
    try:
        start(mesh)
        assert_backends(mesh, ["reg", "a", "b"])
        for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
            took = timed_wait(mesh, lambda x=x, y=y: both_direct(mesh, x, y), f"{x}-{y} direct")
            print(f"mixed mesh: {x} ({kinds[x]}) - {y} ({kinds[y]}) direct after {took:.1f} s")
        check(mesh.direct("b", "a") == "192.168.1.10:51820", mesh, "kernel b reaches a on its LAN")
        check(mesh.direct("a", "b") == "192.168.1.11:51820", mesh, "a reaches kernel b on its LAN")
        check(mesh.direct("a", "c") == "203.0.113.22:51820", mesh, "a reaches c via r2")
        check(mesh.direct("b", "c") == "203.0.113.22:51820", mesh, "kernel b reaches c via r2")
        for x in mesh.clients:
            for y in mesh.clients:
                if x != y:
                    check(
                        mesh.clients[x].host.ping(mesh.clients[y].tunnel_ip, count=2, timeout=3),
                        mesh,
                        f"{x} pings {y}",
                    )
    finally:
        mesh.stop_all()


def test_wg_quick_client_routing_everything_to_the_hub(lab: Lab) -> None:  # noqa: F811
    """A kernel client brought up by `wg-quick up` with `AllowedIPs = 0.0.0.0/0`
    towards the hub and the default `Table = auto`: wg-quick marks the interface's
    own packets (fwmark 51820) and sends everything else through table 51820 into
    the tunnel.  The hole punching must still leave by the real default route, and
    a direct peer's /32 must win over the hub's /0."""
    mesh = MeshLab(lab, start_timeout=OUTCOME)
    mesh.build_registry(kind="kernel")
    r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
    r2 = lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    mesh.add_client("a", lab.lan_host(r1, "a", "192.168.1.10/24"), kind="kernel")
    w = mesh.add_wg_quick_client("w", lab.lan_host(r2, "w", "192.168.2.10/24"))
    try:
        rules = w.host.run("ip", "rule", "show").stdout
        check("not from all fwmark 0xca6c lookup 51820" in rules, mesh, f"wg-quick's rule: {rules}")
        # Anything but the tunnel goes into it (the simulated internet's other hosts).
        route = w.host.run("ip", "route", "get", "192.0.2.77").stdout
        check(f"dev {w.wg.ifname}" in route, mesh, f"0.0.0.0/0 is routed to the hub: {route}")
        mesh.start_registry()
        mesh.start_client("a")
        # What a user must set: 0.0.0.0/0 does not tell where the registry is.
        mesh.start_client("w", extra=("--registry-address", "198.51.100.1"))
        # Timed from both daemons' first lines: their start-up, seconds under
        # emulation, is not the path's doing.
        for name in ("a", "w"):
            timed_wait(mesh, lambda name=name: first_line(mesh, name), f"{name}'s first log line")
        line = first_line(mesh, "w")
        check("at 198.51.100.1:51820" in line, mesh, f"w follows the registry it was given: {line}")
        took = timed_wait(mesh, lambda: both_direct(mesh, "a", "w"), "a-w direct")
        check(mesh.direct("a", "w") == "203.0.113.22:51820", mesh, "a reaches w via r2")
        check((mesh.direct("w", "a") or "").startswith("203.0.113.21:"), mesh, "w reaches a via r1")
        for x, y in (("w", "a"), ("a", "w")):
            check(
                mesh.clients[x].host.ping(mesh.clients[y].tunnel_ip, count=2, timeout=3),
                mesh,
                f"{x} pings {y}",
            )
        # The ping went direct: the hub relayed nothing between them.
        # The pings go direct: 5 of 1,200 bytes through the hub would be 6 kB more.
        hub = mesh.registry.wg  # type: ignore[union-attr]
        before = hub.peers()[w.wg.public_key]["rx"]
        a_ip = mesh.clients["a"].tunnel_ip
        w.host.run("ping", "-n", "-q", "-c", 5, "-s", 1200, "-i", 0.2, "-W", 3, a_ip)
        crossed = hub.peers()[w.wg.public_key]["rx"] - before
        check(crossed < 3000, mesh, f"w's pings to a crossed the hub ({crossed} bytes)")
        print(
            f"wg-quick client (Table = auto, AllowedIPs = 0.0.0.0/0): direct {took:.1f} s "
            "after both daemons' first lines"
        )
    finally:
        mesh.stop_all()
