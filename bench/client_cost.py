"""What a client costs with a large mesh: applying a registry state of N peers
(1,000 by default) to a real wireguard-go device, and CPU per minute at rest
with N direct peers and nothing changing.  Needs root.

    python bench/client_cost.py [--peers 1000] [--rest 120] [--json FILE]

The client is `wgnat-client` as installed, unchanged, with its real HTTP
registry connection over a real WireGuard tunnel; only the far side is
simulated, in a second namespace ("world", 203.0.113.50, tunnel 198.18.0.1/16:
198.18.0.0/15 is the range set aside for benchmarks):

- the registry: this file's `--world` mode, the registry's own code (Registry
  hub and model, the API's build_site, a 1 s device poll, as the daemon builds
  them) over an in-memory device listing the client and N synthetic peers,
  whose handshakes it keeps recent (the registry serves only live peers) and for
  which it has an announcement each (a wgnat client runs there), served on the
  tunnel address of a real wireguard-go device whose peer is the client;
- the N peers: bench/wgfarm.py, one UDP port each on 203.0.113.50, answering
  the client's handshakes and keepalives with real WireGuard messages, so the
  client's device holds N direct peers with live handshakes, as in a real mesh.

Device operations are counted by a proxy on the client's UAPI socket: the
interface is renamed after wireguard-go starts (wireguard-go keeps its socket
under the old name), and the client is told the new name, whose socket is the
proxy (labtools.UAPICounter).  The proxy adds well under a millisecond to each
operation.  CPU is read from /proc/PID/stat for the client's process and for
wireguard-go's, separately.

Phases: (1) apply: the client starts; measured from process start to the
daemon ready, to all N probed (on the device) and to all N direct (allowed IPs
on the device, after a handshake), with the UAPI `set` and `get` operations
issued and both processes' CPU; (2) rest: after the mesh is quiet, --rest
seconds with nothing changing at the registry (the client's periodic work
only: health checks, the long poll, the -t 1m full resynchronisation, and
WireGuard's keepalives and 2-minute rekeys): CPU-seconds per minute of each
process, and device operations per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from labtools import (  # noqa: E402
    UAPICounter,
    load_average,
    log_lines,
    process_cpu,
    uapi_get,
)

WORLD = "203.0.113.50"
CLIENT = "203.0.113.2"
REGISTRY_TUNNEL = "198.18.0.1"
CLIENT_TUNNEL = "198.18.0.2"
TUNNEL = "198.18.0.0/16"
FIRST_PORT = 40000
API_PORT = 51820


def peer_tunnel_address(index: int) -> str:
    """198.18.1.0, 198.18.1.1, ...: inside the tunnel, never the registry's or ours."""
    return f"198.18.{1 + index // 256}.{index % 256}"


# -- the world process: registry and peers -----------------------------------------------
def run_world(peers: int, client_key: str, registry_key: str) -> None:
    import resource

    import wgfarm
    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol
    from twisted.internet.stdio import StandardIO
    from twisted.internet.task import LoopingCall

    from wgnat._types import Announcement, Endpoint, PeerState, PublicKey, parse_network
    from wgnat.device.memory import MemoryDevice
    from wgnat.registry.api import build_site
    from wgnat.registry.hub import Registry

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, peers + 256)), hard))
    responders = wgfarm.make_responders(peers)

    class LiveDevice(MemoryDevice):
        """Every peer handshook a few seconds ago, at every read: live, unchanged."""

        def read(self) -> Any:
            now = reactor.seconds()
            for key, peer in list(self.peers.items()):
                self.peers[key] = PeerState(
                    key, peer.endpoint, peer.allowed_ips, now - 5, peer.rx_bytes, peer.tx_bytes
                )
            return super().read()

    device = LiveDevice("world", public_key=PublicKey.from_base64(registry_key))
    now = reactor.seconds()
    device.add_peer(
        PeerState(
            PublicKey.from_base64(client_key),
            Endpoint.parse(f"{CLIENT}:51820"),
            (parse_network(f"{CLIENT_TUNNEL}/32"),),
            now,
        )
    )
    keys = []
    for index, responder in enumerate(responders):
        key = PublicKey(responder.public)
        keys.append(key)
        device.add_peer(
            PeerState(
                key,
                Endpoint.parse(f"{WORLD}:{FIRST_PORT + index}"),
                (parse_network(f"{peer_tunnel_address(index)}/32"),),
                now,
            )
        )
    hub = Registry(device, reactor)
    hub.model.observe(device.snapshot(), now)
    for index, key in enumerate(keys):
        hub.model.announce(key, Announcement(f"{index:016x}", ()))
    reactor.listenTCP(API_PORT, build_site(hub), interface=REGISTRY_TUNNEL)
    LoopingCall(hub.poll).start(1.0, now=False)
    wgfarm.serve(reactor, responders, WORLD, FIRST_PORT)

    class Control(Protocol):
        def dataReceived(self, data: bytes) -> None:
            for line in data.decode().split("\n"):
                if line.strip() == "stats":
                    self.say(
                        {
                            "handshakes": sum(r.handshakes for r in responders),
                            "keepalives": sum(r.keepalives for r in responders),
                            "version": hub.model.version,
                        }
                    )

        def say(self, document: dict[str, Any]) -> None:
            self.transport.write((json.dumps(document) + "\n").encode())

        def connectionLost(self, reason: Any) -> None:
            if reactor.running:
                reactor.stop()

    control = Control()
    StandardIO(control)
    control.say({"ready": True, "live": hub.model.live_count()})
    reactor.run()


# -- the benchmark ---------------------------------------------------------------------
class World:
    def __init__(self, host: Any, peers: int, client_key: str, registry_key: str) -> None:
        self.process = host.popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--world",
                "--peers",
                peers,
                "--client-key",
                client_key,
                "--registry-key",
                registry_key,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._read(60)
        if not hello.get("ready"):
            raise RuntimeError(f"the world process did not start: {hello}")
        self.live = hello["live"]

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the world process stopped answering")
        return json.loads(line)

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return self._read(30)


def build(lab: Any, peers: int) -> dict[str, Any]:
    cli = lab.public_host("cli", f"{CLIENT}/24")
    world = lab.public_host("world", f"{WORLD}/24")
    client_wg = lab.wireguard(cli, f"{CLIENT_TUNNEL}/16", 51820, verbose=False)
    registry_wg = lab.wireguard(world, f"{REGISTRY_TUNNEL}/16", 51820)
    registry_wg.set_peer(client_wg.public_key, allowed_ips=[f"{CLIENT_TUNNEL}/32"])
    client_wg.set_peer(
        registry_wg.public_key,
        endpoint=f"{WORLD}:51820",
        allowed_ips=[f"{REGISTRY_TUNNEL}/32"],
        keepalive=25,
    )
    assert cli.ping(REGISTRY_TUNNEL, count=3, timeout=2), "no tunnel to the registry"
    # The client is pointed at a new name for the same interface; its UAPI socket
    # is the counting proxy (wireguard-go keeps its socket under the old name).
    measured = f"{lab.prefix}g90"
    cli.run("ip", "link", "set", client_wg.ifname, "down")
    cli.run("ip", "link", "set", client_wg.ifname, "name", measured)
    cli.run("ip", "link", "set", measured, "up")
    counter = UAPICounter(f"/var/run/wireguard/{measured}.sock", client_wg.socket_path)
    return {
        "cli": cli,
        "world_host": world,
        "client_wg": client_wg,
        "registry_wg": registry_wg,
        "ifname": measured,
        "counter": counter,
    }


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(interval)
    return None


def profiler(pid: int, seconds: float, path: str | None) -> Any:
    """py-spy (pip install py-spy) sampling the client, collapsed stacks into `path`."""
    if path is None:
        return None
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-r",
            "100",
            "-d",
            str(int(seconds)),
            "-f",
            "raw",
            "-o",
            path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(peers: int, rest: float, settle: float, profile: str | None = None) -> dict[str, Any]:
    from netns import Lab

    with Lab() as lab:
        parts = build(lab, peers)
        counter: UAPICounter = parts["counter"]
        client_wg = parts["client_wg"]
        world = World(
            parts["world_host"], peers, client_wg.public_key, parts["registry_wg"].public_key
        )
        assert world.live == peers + 1, world.live
        device_path = client_wg.socket_path  # the real socket: our reads are not counted
        tunnel_ips = {f"{peer_tunnel_address(i)}/32" for i in range(peers)}
        log_path = os.path.join(lab.tmpdir, "client.log")
        wg_pid = client_wg.process.pid
        load_before = load_average()
        cpu_wg_before = process_cpu(wg_pid)
        started = time.time()
        with open(log_path, "wb") as log:
            client = parts["cli"].popen(
                [
                    os.path.join(os.path.dirname(sys.executable), "wgnat-client"),
                    "-i",
                    parts["ifname"],
                    "-r",
                    parts["registry_wg"].public_key,
                    "--state-dir",
                    os.path.join(lab.tmpdir, "state"),
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        spy = profiler(client.pid, 300, f"{profile}-apply.txt" if profile else None)
        try:
            # Progress from the client's log, not the device: reading a device of
            # N peers would load the wireguard-go process being measured.
            def logged(text: str) -> int:
                return sum(1 for ln in log_lines(log_path) if text in ln.text)

            wait_for(lambda: logged("wgnat-client on") >= 1, 60, interval=0.02)
            cpu_client_startup = process_cpu(client.pid)
            wait_for(lambda: logged("direct at") >= peers, 300, interval=0.5)
            state = uapi_get(device_path)
            direct_now = count_direct(state, tunnel_ips)
            all_direct = time.time() if direct_now >= peers else None
            cpu_client_apply = process_cpu(client.pid)
            cpu_wg_apply = process_cpu(wg_pid) - cpu_wg_before
            applied_at = time.time()
            sets_apply = counter.count("set=1", started, applied_at)
            gets_apply = counter.count("get=1", started, applied_at)
            lines = log_lines(log_path)
            ready = next((ln.time for ln in lines if "wgnat-client on" in ln.text), None)
            probes = [ln.time for ln in lines if "probing" in ln.text]
            directs = [ln.time for ln in lines if "direct at" in ln.text]
            result: dict[str, Any] = {
                "peers": peers,
                "load_before": load_before,
                "apply": {
                    "ready": _since(ready, started),
                    "first_probe": _since(min(probes, default=None), started),
                    "all_probed_logged": _since(max(probes, default=None), started)
                    if len(probes) >= peers
                    else None,
                    "all_direct_logged": _since(max(directs, default=None), started)
                    if len(directs) >= peers
                    else None,
                    "direct_on_device": direct_now,
                    "probes_logged": len(probes),
                    "directs_logged": len(directs),
                    "uapi_sets": sets_apply,
                    "uapi_gets": gets_apply,
                    "client_cpu_startup": cpu_client_startup,
                    "client_cpu": cpu_client_apply - cpu_client_startup,
                    "wireguard_cpu": cpu_wg_apply,
                    "farm": world.stats(),
                },
            }
            if all_direct is None:
                result["error"] = f"{direct_now} of {peers} peers direct after 300 s"
                return result
            if spy is not None:
                spy.terminate()
                spy.wait()
            time.sleep(settle)  # the last switches, logs and reads
            spy = profiler(client.pid, rest, f"{profile}-rest.txt" if profile else None)
            rest_started = time.time()
            cpu = (process_cpu(client.pid), process_cpu(wg_pid))
            farm_before = world.stats()
            time.sleep(rest)
            cpu_after = (process_cpu(client.pid), process_cpu(wg_pid))
            rest_ended = time.time()
            farm_after = world.stats()
            minutes = (rest_ended - rest_started) / 60
            lines_rest = [ln for ln in log_lines(log_path) if rest_started <= ln.time < rest_ended]
            state = uapi_get(device_path)
            result["rest"] = {
                "seconds": rest_ended - rest_started,
                "client_cpu_per_minute": (cpu_after[0] - cpu[0]) / minutes,
                "wireguard_cpu_per_minute": (cpu_after[1] - cpu[1]) / minutes,
                "uapi_sets_per_minute": counter.count("set=1", rest_started, rest_ended) / minutes,
                "uapi_gets_per_minute": counter.count("get=1", rest_started, rest_ended) / minutes,
                "uapi_get_times": [
                    round(t - rest_started, 2)
                    for kind, t, _ in counter.operations
                    if kind == "get=1" and rest_started <= t < rest_ended
                ],
                "log_lines": len(lines_rest),
                "log_sample": [ln.text for ln in lines_rest[:5]],
                "registry_version_moved": farm_after["version"] != farm_before["version"],
                "handshakes_answered": farm_after["handshakes"] - farm_before["handshakes"],
                "keepalives_answered": farm_after["keepalives"] - farm_before["keepalives"],
                "direct_at_end": count_direct(state, tunnel_ips),
            }
            result["load_after"] = load_average()
            return result
        finally:
            if spy is not None:
                spy.wait(30)
            client.terminate()
            client.wait(10)
            counter.close()


def count_direct(state: Any, tunnel_ips: set[str]) -> int:
    """Peers with a handshake and one of the synthetic peers' addresses routed to them."""
    return sum(
        1
        for p in state.peers
        if p.latest_handshake and {str(n) for n in p.allowed_ips} & tunnel_ips
    )


def _since(t: float | None, origin: float) -> float | None:
    return t - origin if t is not None else None


def summarise(result: dict[str, Any]) -> str:
    apply, n = result["apply"], result["peers"]

    def s(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} s"

    lines = [
        f"{n} peers; load average before {result['load_before']}, "
        f"after {result.get('load_after', '?')}",
        "apply (from the client's process start):",
        f"  daemon ready {s(apply['ready'])}, first probe {s(apply['first_probe'])}, "
        f"all {n} probed {s(apply['all_probed_logged'])}, "
        f"all direct {s(apply['all_direct_logged'])} "
        f"({apply['direct_on_device']} direct on the device then)",
        f"  UAPI operations: {apply['uapi_sets']} set, {apply['uapi_gets']} get "
        f"({apply['uapi_sets'] / n:.2f} set per peer)",
        f"  CPU: client {apply['client_cpu']:.2f} s (and {apply['client_cpu_startup']:.2f} s "
        f"to start), wireguard-go {apply['wireguard_cpu']:.2f} s",
        f"  peers' side: {apply['farm']['handshakes']} handshakes answered",
    ]
    if "rest" in result:
        rest = result["rest"]
        lines += [
            f"at rest ({rest['seconds']:.0f} s, {rest['direct_at_end']} of {n} direct at the end, "
            f"registry version moved: {rest['registry_version_moved']}):",
            f"  CPU per minute: client {rest['client_cpu_per_minute']:.3f} s, "
            f"wireguard-go {rest['wireguard_cpu_per_minute']:.3f} s",
            f"  UAPI operations per minute: {rest['uapi_sets_per_minute']:.1f} set, "
            f"{rest['uapi_gets_per_minute']:.1f} get",
            f"  client log lines: {rest['log_lines']}; peers' side answered "
            f"{rest['handshakes_answered']} handshakes (rekeys), "
            f"{rest['keepalives_answered']} keepalives",
        ]
    if "error" in result:
        lines.append(f"ERROR: {result['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rest", type=float, default=120.0, help="seconds at rest measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before the rest")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="py-spy the client: PREFIX-apply.txt, PREFIX-rest.txt (collapsed stacks)",
    )
    parser.add_argument("--world", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-key", help=argparse.SUPPRESS)
    parser.add_argument("--registry-key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.world:
        run_world(args.peers, args.client_key, args.registry_key)
        return
    if not 1 <= args.peers <= 60000:
        parser.error("--peers: 1 to 60000")
    from netns import cleanup_leftovers

    cleanup_leftovers()
    result = run(args.peers, args.rest, args.settle, args.profile)
    print(json.dumps(result), flush=True)
    print(summarise(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
