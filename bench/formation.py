"""How fast a new client gets direct paths to every other client, split into the
parts that make it up, whether a packet is lost on the way, and how fast a NAT
rebinding is followed: real wireguard-go devices in network namespaces behind
NAT routers, the daemons run as installed.  Needs root and tcpdump.

    python bench/formation.py [--clients 8] [--runs 5] [--json results.json]

Topology per run: a registry (public); clients a and b behind one home NAT
(their pair uses LAN endpoints), every further client behind a home NAT of its
own.  All clients but the last are started and meshed; then the new client n
(behind its own NAT) is brought up as a host boots: its registry peer is
configured on its device and, at once, `wgnat-client` is started ("process
start": the moment before both, about 1 ms apart).  Reported, medians and p95
over every (run, peer) pair:

  to handshake / to direct   n's process start -> the pair's first direct
                             handshake (from the devices' handshake times) /
                             -> both ends switched to the direct path (their logs)
  from registry knows n      the moment the registry has n live *and* announced
                             (the later of its two log lines) -> the same

and the parts, each from the first source that sees it:

  start -> daemon ready      n's log ("wgnat-client on ...")
  registry learns endpoint   n's first handshake with the hub (the hub device's
                             handshake time) -> the registry's log "... live at"
  push delivery              registry knows n -> the first line of the registry's
                             stream (or answer) reaching each peer, keep-alives
                             aside (tcpdump on its tunnel)
  device update              that answer -> the peer's wireguard-go sending its
                             first handshake initiation to n (tcpdump on its LAN
                             link; the probe's log line lies between)
  handshake                  the later of the two ends' first initiations -> the
                             first handshake on either device
  coordinated switch         that handshake -> the later end's "direct at" log
                             line (switch_delay, 0.1 s, by design: both ends derive
                             the moment); with how late the later end's poll saw
                             the handshake, how far apart the two ends' lines are,
                             and how many ends switched after the shared moment

A ping c -> n every 20 ms runs through the formation (loss counted).  Then the
NAT of a client alone behind its router rebinds every mapping, at a moment
unrelated to that client's keepalives (0-25 s later, spread evenly over the
runs); per other client:
rebinding -> the registry's log "endpoint moved" (bounded by the moved client's
next keepalive to the hub, up to 25 s), -> the peer's log "endpoint moved", ->
the peer's device using the new endpoint (polled every 10 ms over UAPI once
the registry has seen the move).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from labtools import (  # noqa: E402
    Capture,
    about,
    close_kernel_sockets,
    device_get,
    first_time,
    kernel_set_peer,
    key_of,
    load_average,
    log_lines,
    stat,
    uapi_set,
)
from meshlab import REGISTRY_PUBLIC, TUNNEL, MeshLab, Node, wait_until  # noqa: E402
from netns import LAB_WIREGUARD_ENV, Lab, cleanup_leftovers  # noqa: E402

from wgnat._types import Endpoint, PeerUpdate, parse_network  # noqa: E402

NEW = "n"
# --kernel runs in make bench-kernel's VM, whose CPU is emulated (about ten times
# slower): the deadlines (not the figures) are stretched by this much.
SLOW = 1.0
KEEPALIVE = 25  # the clients' keepalive to the hub (MeshLab.add_client)
# A stream's keep-alive (an empty line, as an HTTP chunk) is not a push.
KEEPALIVE_CHUNK = 16
REBOUND = "c"  # alone behind its router
REGISTRY_TUNNEL_IP = "198.51.100.1"
API_PORT = 51820
# What each client's capture keeps: HTTP answers from the registry (over the
# tunnel) and WireGuard handshake initiations (message type 1, 148 bytes).
CAPTURE_FILTER = (
    f"(tcp and src host {REGISTRY_TUNNEL_IP} and src port {API_PORT}) "
    "or (udp and udp[8] = 1 and udp[9] = 0 and udp[10] = 0 and udp[11] = 0)"
)


def build(lab: Lab, clients: int) -> MeshLab:
    """a and b behind r1, every other client behind its own home NAT; n last."""
    mesh = MeshLab(lab, start_timeout=15 * SLOW)
    mesh.build_registry()
    names = [chr(ord("a") + i) for i in range(clients - 1)] + [NEW]
    routers = [lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")]
    for index, name in enumerate(names):
        if index < 2:
            router = routers[0]
            address = f"192.168.1.{10 + index}/24"
        else:
            k = len(routers) + 1
            router = lab.router(f"r{k}", f"203.0.113.{20 + k}/24", f"192.168.{k}.0/24", "home")
            routers.append(router)
            address = f"192.168.{k}.10/24"
        host = lab.lan_host(router, name, address)
        if name == NEW:
            add_unconfigured(mesh, name, host)
        else:
            mesh.add_client(name, host)
            assert host.ping(REGISTRY_TUNNEL_IP, count=3, timeout=2), name
    return mesh


def add_unconfigured(mesh: MeshLab, name: str, host: Any) -> Node:
    """Like MeshLab.add_client, but the client's device gets its registry peer only
    when the run starts it (`configure_registry_peer`): the hub knows the client,
    the client has not yet spoken to the hub."""
    assert mesh.registry is not None
    address = f"198.51.100.{mesh._next_tunnel}"
    mesh._next_tunnel += 1
    wg = mesh.lab.wireguard(host, f"{address}/24", 51820)
    mesh.registry.wg.set_peer(wg.public_key, allowed_ips=[f"{address}/32"])
    node = Node(name, host, wg, state_dir=os.path.join(mesh.lab.tmpdir, f"state-{name}"))
    mesh.clients[name] = node
    return node


def configure_registry_peer(mesh: MeshLab, node: Node) -> None:
    assert mesh.registry is not None
    if node.wg.kind == "kernel":  # the same change, over netlink
        update = PeerUpdate(
            key_of(mesh.registry.wg.public_key),
            endpoint=Endpoint.parse(f"{REGISTRY_PUBLIC}:51820"),
            allowed_ips=(parse_network(TUNNEL),),
            replace_allowed_ips=True,
            persistent_keepalive=KEEPALIVE,
        )
        kernel_set_peer(node.host.name, node.wg.ifname, update)
        return
    uapi_set(
        node.wg.socket_path,
        [
            f"public_key={key_of(mesh.registry.wg.public_key).hex}",
            f"endpoint={REGISTRY_PUBLIC}:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            f"allowed_ip={TUNNEL}",
        ],
    )


class Devices:
    """Every client's device, read from this process (UAPI or netlink)."""

    def __init__(self, mesh: MeshLab) -> None:
        self.mesh = mesh

    def peer(self, a: str, b: str) -> Any:
        mine, theirs = self.mesh.clients[a], self.mesh.clients[b]
        return device_get(mine.wg).peer(key_of(theirs.wg.public_key))

    def direct(self, a: str, b: str) -> bool:
        entry = self.peer(a, b)
        ip = self.mesh.clients[b].tunnel_ip
        return bool(
            entry
            and entry.latest_handshake
            and any(str(net) == f"{ip}/32" for net in entry.allowed_ips)
        )


def one_run(clients: int, run_index: int = 0, runs: int = 1) -> dict[str, Any]:
    with Lab() as lab:
        mesh = build(lab, clients)
        devices = Devices(mesh)
        captures: dict[str, Capture] = {}
        try:
            mesh.start_registry(extra=("--log-format", "json"))
            others = [name for name in mesh.clients if name != NEW]
            for name in others:
                mesh.start_client(name, extra=("--log-format", "json"))
            pairs = [(x, y) for i, x in enumerate(others) for y in others[i + 1 :]]
            wait_until(
                lambda: all(devices.direct(x, y) and devices.direct(y, x) for x, y in pairs),
                60 * SLOW,
                interval=0.1,
                what=f"the {len(others)} clients to mesh",
            )
            for name, node in mesh.clients.items():
                captures[name] = Capture(
                    node.host, CAPTURE_FILTER, os.path.join(lab.tmpdir, f"capture-{name}.txt")
                )
            new = mesh.clients[NEW]
            # Traffic from c to the new client starts before it runs: relayed first.
            ping = mesh.clients["c"].host.popen(
                ["ping", "-n", "-q", "-c", 150, "-i", 0.02, "-W", 2, new.tunnel_ip],
                stdout=-1,
                stderr=-2,
                text=True,
            )
            time.sleep(0.3)
            started = time.time()
            configure_registry_peer(mesh, new)  # about 1 ms
            mesh.start_client(NEW, extra=("--log-format", "json"))
            assert mesh.clients[NEW].daemon is not None

            def formed() -> bool:
                text = mesh.clients[NEW].daemon.log()  # type: ignore[union-attr]
                return text.count("direct at") >= len(others) and all(
                    devices.direct(NEW, p) and devices.direct(p, NEW) for p in others
                )

            wait_until(
                formed, 30 * SLOW, interval=0.05 * SLOW, what="n to be direct with every peer"
            )
            # Handshake times now, before anything re-handshakes (rekey is 120 s away).
            hub_entry = device_get(mesh.registry.wg).peer(key_of(new.wg.public_key))  # type: ignore[union-attr]
            handshakes = {
                p: [
                    devices.peer(p, NEW).latest_handshake,
                    devices.peer(NEW, p).latest_handshake,
                ]
                for p in others
            }
            endpoints = {
                p: str(device_get(mesh.registry.wg).peer(key_of(node.wg.public_key)).endpoint)  # type: ignore[union-attr]
                for p, node in mesh.clients.items()
            }
            time.sleep(0.3)  # the captures catch up
            packets = {name: capture.stop() for name, capture in captures.items()}
            captures.clear()
            output, _ = ping.communicate(timeout=30)
            formation = analyse_formation(
                mesh, started, hub_entry.latest_handshake, handshakes, endpoints, packets
            )
            formation["ping"] = ping_counts(output)
            formation["rebinding"] = rebinding(mesh, devices, run_index, runs)
            return formation
        finally:
            for capture in captures.values():
                capture.stop()
            mesh.stop_all()
            close_kernel_sockets()


def ping_counts(output: str) -> dict[str, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    sent, received = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return {"sent": sent, "lost": sent - received}


def analyse_formation(
    mesh: MeshLab,
    started: float,
    hub_handshake: float | None,
    handshakes: dict[str, list[float | None]],
    endpoints: dict[str, str],
    packets: dict[str, list[Any]],
) -> dict[str, Any]:
    new = mesh.clients[NEW]
    assert mesh.registry is not None and mesh.registry.daemon is not None
    registry_log = log_lines(mesh.registry.daemon.log_path)
    logs = {name: log_lines(node.daemon.log_path) for name, node in mesh.clients.items()}  # type: ignore[union-attr]
    ready = first_time(logs[NEW], r"wgnat-client on")
    live = first_time(registry_log, about(new.tunnel_ip) + r".*\) live at", started - 1)
    announced = first_time(
        registry_log,
        rf"^{re.escape(key_of(new.wg.public_key).short)} announced LAN endpoints",
        started - 1,
    )
    known = max(live, announced) if live and announced else None
    n_endpoint = endpoints[NEW]

    def first_initiation(name: str, to: str, after: float) -> float | None:
        for packet in packets[name]:
            if (
                packet.proto == "udp"
                and packet.direction == "Out"
                and packet.time >= after
                and packet.destination == to
            ):
                return packet.time
        return None

    peers: dict[str, dict[str, float | None]] = {}
    for p, node in mesh.clients.items():
        if p == NEW:
            continue
        received = None
        if known is not None:
            received = next(
                (
                    packet.time
                    for packet in packets[p]
                    if packet.proto == "tcp"
                    and packet.direction == "In"
                    and packet.length > KEEPALIVE_CHUNK
                    and packet.time >= known
                ),
                None,
            )
        probe = first_time(logs[p], about(new.tunnel_ip) + r".*probing", started)
        probe_back = first_time(logs[NEW], about(node.tunnel_ip) + r".*probing", started)
        initiation = first_initiation(p, n_endpoint, known or started)
        # n reaches a and b... at their public endpoints (n is alone behind its NAT).
        initiation_back = first_initiation(NEW, endpoints[p], started)
        present = [t for t in handshakes[p] if t]
        handshake = min(present) if present else None
        switch_lines = [
            first_line(logs[p], about(new.tunnel_ip) + r".*direct at", started),
            first_line(logs[NEW], about(node.tunnel_ip) + r".*direct at", started),
        ]
        switched = [line.time if line else None for line in switch_lines]
        direct = max(switched) if all(switched) else None
        # What each end's own log says of the switch: how long after the
        # handshake its poll saw it, and whether it switched after the shared
        # moment (a late end costs the other end packets).
        seen = [_ms(line, r"seen (\d+) ms after it") for line in switch_lines]
        late = [_ms(line, r"switched (\d+) ms after the shared moment") for line in switch_lines]
        both_sent = max(initiation, initiation_back) if initiation and initiation_back else None

        peers[p] = {
            "to_handshake": since_or_none(handshake, started),
            "to_direct": since_or_none(direct, started),
            "known_to_handshake": since_or_none(handshake, known),
            "known_to_direct": since_or_none(direct, known),
            "push_delivery": since_or_none(received, known),
            "device_update": since_or_none(initiation, received),
            "receipt_to_probe_logged": since_or_none(probe, received),
            "new_client_ready_to_probe_logged": since_or_none(probe_back, ready),
            "handshake": since_or_none(handshake, both_sent),
            "switch": since_or_none(direct, handshake),
            "switch_skew": spread(switched),
            "seen_after": max(value for value in seen if value is not None) if any(seen) else None,
            "late_ends": sum(1 for value in late if value is not None),
        }
    return {
        "startup": since_or_none(ready, started),
        "hub_handshake": since_or_none(hub_handshake, started),
        "registry_learns_endpoint": since_or_none(live, hub_handshake),
        "registry_knows": since_or_none(known, started),
        "peers": peers,
    }


def spread(times: list[float | None]) -> float | None:
    present = [t for t in times if t is not None]
    return max(present) - min(present) if len(present) == len(times) else None


def first_line(lines: list[Any], pattern: str, after: float) -> Any:
    regex = re.compile(pattern)
    return next((line for line in lines if line.time >= after and regex.search(line.text)), None)


def _ms(line: Any, pattern: str) -> float | None:
    """A figure in milliseconds from a log line, in seconds."""
    match = re.search(pattern, line.text) if line else None
    return int(match.group(1)) / 1000 if match else None


def since_or_none(t: float | None, origin: float | None) -> float | None:
    return t - origin if t is not None and origin is not None else None


def rebinding(mesh: MeshLab, devices: Devices, stratum: int, strata: int) -> dict[str, Any]:
    """c's router moves every mapping: how long until each other client uses c's new one."""
    moved = mesh.clients[REBOUND]
    others = [name for name in mesh.clients if name != REBOUND]
    # A NAT rebinds at a moment unrelated to the moved client's keepalives, which
    # alone tell the hub the new mapping; without a wait the benchmark's own
    # rhythm would fix that phase (and the figure) run after run.  The waits are
    # spread evenly over the keepalive period across the runs (stratified), so
    # a few runs sample the whole of it.
    phase = (stratum + random.random()) / strata * KEEPALIVE
    time.sleep(phase)
    before = {p: str(devices.peer(p, REBOUND).endpoint) for p in others}
    router = moved.host.router
    assert router is not None
    started = time.time()
    router.rebind()
    assert mesh.registry is not None and mesh.registry.daemon is not None
    registry_log_path = mesh.registry.daemon.log_path
    moved_line = about(moved.tunnel_ip) + r".*endpoint moved"
    used: dict[str, float] = {}
    deadline = time.monotonic() + 60 * SLOW
    # Until the registry has seen the move (up to 25 s) its log is watched, which
    # costs little; then the devices are polled every 10 ms.
    while time.monotonic() < deadline:
        if first_time(log_lines(registry_log_path), moved_line, started) is not None:
            break
        time.sleep(0.05)
    while len(used) < len(others) and time.monotonic() < deadline:
        for p in others:
            if p not in used and str(devices.peer(p, REBOUND).endpoint) != before[p]:
                used[p] = time.time()
        time.sleep(0.01)
    seen = first_time(log_lines(registry_log_path), moved_line, started)
    result: dict[str, Any] = {
        "waited_before": phase,
        "registry_sees": since_or_none(seen, started),
        "peers": {},
    }
    for p in others:
        follow = first_time(
            log_lines(mesh.clients[p].daemon.log_path),  # type: ignore[union-attr]
            about(moved.tunnel_ip) + r".*endpoint moved",
            started,
        )
        result["peers"][p] = {
            "used": since_or_none(used.get(p), started),
            "registry_to_follow": since_or_none(follow, seen),
            "follow_to_used": since_or_none(used.get(p), follow),
        }
    return result


def summarise(runs: list[dict[str, Any]], clients: int) -> str:
    def per_peer(name: str) -> list[float | None]:
        return [peer[name] for run in runs for peer in run["peers"].values()]

    def slowest(name: str) -> list[float | None]:
        values = []
        for run in runs:
            got = [peer[name] for peer in run["peers"].values()]
            values.append(max(got) if got and None not in got else None)
        return values

    def run_values(name: str) -> list[float | None]:
        return [run[name] for run in runs]

    rebind = [run["rebinding"] for run in runs]
    lines = [
        f"runs: {len(runs)}, {clients} clients (the new one and {clients - 1} peers); "
        f"load average now {load_average()}",
        f"new client's process start -> direct handshake, each peer: "
        f"{stat(per_peer('to_handshake'))}",
        f"new client's process start -> direct (both ends switched), each peer: "
        f"{stat(per_peer('to_direct'))}",
        f"  ... with all {clients - 1} peers: {stat(slowest('to_direct'))}",
        f"registry knows the new client -> direct handshake, each peer: "
        f"{stat(per_peer('known_to_handshake'))}",
        f"registry knows the new client -> direct, each peer: {stat(per_peer('known_to_direct'))}",
        "parts:",
        f"  process start -> daemon ready: {stat(run_values('startup'))}",
        f"  process start -> first handshake with the hub: {stat(run_values('hub_handshake'))}",
        f"  registry learns the endpoint (hub handshake -> registry read sees it): "
        f"{stat(run_values('registry_learns_endpoint'))}",
        f"  process start -> registry knows the new client (live and announced): "
        f"{stat(run_values('registry_knows'))}",
        f"  push delivery (registry knows -> answer at each peer): "
        f"{stat(per_peer('push_delivery'))}",
        f"  device update (answer -> peer's first initiation to the new client): "
        f"{stat(per_peer('device_update'))}",
        f"    of which answer -> probe logged: {stat(per_peer('receipt_to_probe_logged'))}",
        f"  (new client: ready -> its probe of each peer logged: "
        f"{stat(per_peer('new_client_ready_to_probe_logged'))})",
        f"  handshake (both ends' initiations sent -> handshake): {stat(per_peer('handshake'))}",
        f"  coordinated switch (handshake -> both ends direct): {stat(per_peer('switch'))}",
        f"    handshake -> the later end's poll sees it: {stat(per_peer('seen_after'))}",
        f"    the two ends' switch log lines apart: {stat(per_peer('switch_skew'))}; "
        f"ends that switched after the shared moment: "
        f"{sum(p.get('late_ends', 0) for r in runs for p in r['peers'].values())} of "
        f"{2 * sum(len(r['peers']) for r in runs)}",
        f"ping c -> n every 20 ms during formation: "
        f"{sum(r['ping']['lost'] for r in runs)} lost of {sum(r['ping']['sent'] for r in runs)}",
        f"NAT rebinding of {REBOUND} -> each peer uses the new endpoint: "
        f"{stat([p['used'] for r in rebind for p in r['peers'].values()])}",
        f"  rebinding -> registry sees the new endpoint (waits for {REBOUND}'s keepalive): "
        f"{stat([r['registry_sees'] for r in rebind])}",
        f"  registry -> each peer follows (push, plan): "
        f"{stat([p['registry_to_follow'] for r in rebind for p in r['peers'].values()])}",
        f"  follows -> the device uses it (set over UAPI or netlink; observed by a 10 ms poll): "
        f"{stat([p['follow_to_used'] for r in rebind for p in r['peers'].values()])}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="clients, the new one included")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="kernel WireGuard devices (needs the module: make bench-kernel runs this in a VM)",
    )
    args = parser.parse_args()
    if args.clients < 4:
        parser.error("--clients: at least 4 (a and b share a NAT, c is rebound, n is new)")
    if args.kernel:
        global SLOW
        os.environ[LAB_WIREGUARD_ENV] = "kernel"  # every Lab.wireguard() device
        SLOW = float(os.environ.get("WGNAT_BENCH_SLOW", "4"))
        print(
            "kernel WireGuard devices; under an emulated CPU the absolute times are "
            "not comparable with the host's (compare the parts)",
            flush=True,
        )
    cleanup_leftovers()
    print(f"load average before: {load_average()}", flush=True)
    runs = []
    for index in range(args.runs):
        result = one_run(args.clients, index, args.runs)
        print(f"run {index + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    print(summarise(runs, args.clients))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(runs, handle, indent=1)


if __name__ == "__main__":
    main()
