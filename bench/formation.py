"""How fast the mesh forms, whether a packet is lost on the way, and how fast a
NAT rebinding is followed: real wireguard-go devices in network namespaces behind
NAT routers, the daemons run as installed.  Needs root.

    python bench/formation.py [--runs 5] [--json results.json]

Topology per run: a registry; a and b behind one home NAT, c behind another,
three clients already meshed; then a new client n (behind its own home NAT) is
started and timed.  Reported: medians and p95 over runs, split into parts from
the new client's JSON log (process start -> daemon ready -> first probe ->
direct).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "integration")]

from meshlab import MeshLab, wait_until  # noqa: E402
from netns import Lab, cleanup_leftovers  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def log_events(path: str) -> list[dict]:
    events = []
    with open(path, errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    return events


def first_time(events: list[dict], pattern: str) -> float | None:
    regex = re.compile(pattern)
    for event in events:
        text = event.get("log_format", "")
        try:
            text = text.format(**event)
        except (KeyError, IndexError, ValueError):
            pass
        if regex.search(text):
            return float(event["log_time"])
    return None


def build(lab: Lab) -> MeshLab:
    mesh = MeshLab(lab)
    mesh.build_registry()
    r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
    r2 = lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    r4 = lab.router("r4", "203.0.113.24/24", "192.168.4.0/24", "home")
    mesh.add_client("a", lab.lan_host(r1, "a", "192.168.1.10/24"))
    mesh.add_client("b", lab.lan_host(r1, "b", "192.168.1.11/24"))
    mesh.add_client("c", lab.lan_host(r2, "c", "192.168.2.10/24"))
    mesh.add_client("n", lab.lan_host(r4, "n", "192.168.4.10/24"))
    for node in mesh.clients.values():
        assert node.host.ping("198.51.100.1", count=3, timeout=2), node.name
    return mesh


def one_run() -> dict:
    with Lab() as lab:
        mesh = build(lab)
        try:
            mesh.start_registry()
            for name in "abc":
                mesh.start_client(name, extra=("--log-format", "json"))
            for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
                wait_until(
                    lambda x=x, y=y: mesh.direct(x, y) and mesh.direct(y, x),
                    20,
                    what=f"{x}-{y} direct",
                )
            # Traffic from c to the new client starts before it runs: relayed first.
            ping = mesh.clients["c"].host.popen(
                ["ping", "-n", "-q", "-c", 200, "-i", 0.02, "-W", 2, "198.51.100.5"],
                stdout=-1,
                stderr=-2,
                text=True,
            )
            time.sleep(0.3)
            started_wall = time.time()
            started = time.monotonic()
            mesh.start_client("n", extra=("--log-format", "json"))
            per_peer = {}
            pending = set("abc")
            while pending and time.monotonic() - started < 20:
                for peer in list(pending):
                    if mesh.direct("n", peer) and mesh.direct(peer, "n"):
                        per_peer[peer] = time.monotonic() - started
                        pending.discard(peer)
                time.sleep(0.01)
            output, _ = ping.communicate(timeout=60)
            match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
            sent, received = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
            events = log_events(mesh.clients["n"].daemon.log_path)
            ready = first_time(events, r"wgnat-client on")
            probe = first_time(events, r"probing")
            direct = first_time(events, r"direct at")
            # Rebinding: c's router moves every mapping; how long until a uses c's new one.
            router = mesh.clients["c"].host.router
            before = mesh.direct("a", "c")
            router.rebind()
            rebind_started = time.monotonic()
            wait_until(
                lambda: (mesh.direct("a", "c") or before) != before,
                60,
                interval=0.05,
                what="a to follow c's new mapping",
            )
            rebinding = time.monotonic() - rebind_started
            return {
                "to_direct": per_peer,
                "startup": (ready - started_wall) if ready else None,
                "ready_to_first_probe": (probe - ready) if probe and ready else None,
                "first_probe_to_direct": (direct - probe) if direct and probe else None,
                "ping_sent": sent,
                "ping_lost": sent - received,
                "rebinding": rebinding,
            }
        finally:
            mesh.stop_all()


def summarise(runs: list[dict]) -> str:
    all_peers = [t for run in runs for t in run["to_direct"].values()]
    slowest = [max(run["to_direct"].values()) for run in runs if run["to_direct"]]

    def stat(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        return f"median {statistics.median(values):.3f} s, p95 {percentile(values, 0.95):.3f} s"

    lines = [
        f"runs: {len(runs)}",
        f"new client -> direct with each peer (process start): {stat(all_peers)}",
        f"new client -> direct with all 3 peers: {stat(slowest)}",
        f"  part: process start -> daemon ready: {stat([r['startup'] for r in runs])}",
        f"  part: ready -> first probe (registry + push): "
        f"{stat([r['ready_to_first_probe'] for r in runs])}",
        f"  part: first probe -> direct (handshake + 0.25 s switch): "
        f"{stat([r['first_probe_to_direct'] for r in runs])}",
        f"ping c->n every 20 ms during formation: "
        f"{sum(r['ping_lost'] for r in runs)} lost of {sum(r['ping_sent'] for r in runs)}",
        f"NAT rebinding followed: {stat([r['rebinding'] for r in runs])}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    cleanup_leftovers()
    runs = []
    for index in range(args.runs):
        result = one_run()
        print(f"run {index + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    print(summarise(runs))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(runs, handle, indent=1)


if __name__ == "__main__":
    main()
