"""A WireGuard hub and spokes in namespaces, with the real daemons running as a
user runs them (installed console scripts, or twistd plugins).

    registry  203.0.113.10   wg 198.51.100.1/24   (relays: ip_forward on)
    clients   behind NAT routers or public, wg 198.51.100.N/24, each with the
              registry as its one configured peer (allowed 198.51.100.0/24,
              keepalive 25), as a hub-and-spoke network is set up by hand.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netns import Host, Lab, WireGuard, leakcheck

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "compose"))
from testbed import wait_until as testbed_wait_until

TUNNEL = "198.51.100.0/24"
REGISTRY_TUNNEL = "198.51.100.1"
REGISTRY_PUBLIC = "203.0.113.10"
# A second hub (issue 15): its own public address and tunnel address.
HUB2_TUNNEL = "198.51.100.254"
HUB2_PUBLIC = "203.0.113.11"
BIN = os.path.dirname(sys.executable)


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition"
) -> Any:
    """compose/testbed.py's wait, polled more often (timings here are figures)."""
    return testbed_wait_until(predicate, timeout, interval=interval, what=what)


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    log_path: str
    # When the process was spawned (time.monotonic()): what times to an outcome
    # count from when they include the daemon's own start-up.
    started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, sig: int = 15, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Node:
    name: str
    host: Host
    wg: WireGuard
    daemon: Daemon | None = None
    state_dir: str = ""

    @property
    def tunnel_ip(self) -> str:
        return str(self.wg.address.ip)


@dataclass
class MeshLab:
    lab: Lab
    registry: Node | None = None
    # A second registry (build_second_hub): clients made after it have both hubs
    # as peers, hub 1 with its own address and the tunnel network, hub 2 with
    # its own address only, and are started with -r for each.
    hub2: Node | None = None
    clients: dict[str, Node] = field(default_factory=dict)
    # How long a registry may take to log that it runs: seconds on the host, more
    # under a VM's emulated CPU (tests/integration/test_kernel_mesh.py).
    start_timeout: float = 15.0
    _next_tunnel: int = 2

    # -- building ----------------------------------------------------------
    # `kind`: the WireGuard device, "go" or "kernel" (netns.Lab.wireguard); None
    # takes the lab's default ($WGNAT_LAB_WIREGUARD).
    def build_registry(self, kind: str | None = None) -> Node:
        host = self.lab.public_host("reg", f"{REGISTRY_PUBLIC}/24")
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        wg = self.lab.wireguard(host, f"{REGISTRY_TUNNEL}/24", 51820, kind=kind)
        self.registry = Node("reg", host, wg)
        return self.registry

    def build_second_hub(self, kind: str | None = None) -> Node:
        """A second hub, sharing nothing with the first: its own public address
        on the simulated internet (every NAT router reaches it), its own tunnel
        address, its own registry."""
        host = self.lab.public_host("reg2", f"{HUB2_PUBLIC}/24")
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        wg = self.lab.wireguard(host, f"{HUB2_TUNNEL}/24", 51820, kind=kind)
        self.hub2 = Node("reg2", host, wg)
        return self.hub2

    def add_client(self, name: str, host: Host, kind: str | None = None) -> Node:
        assert self.registry is not None
        address = f"198.51.100.{self._next_tunnel}"
        self._next_tunnel += 1
        wg = self.lab.wireguard(host, f"{address}/24", 51820, kind=kind)
        # The hub first: the spoke's keepalive sends an initiation at once, and one
        # the hub cannot yet match costs WireGuard's 5 s retry.
        self.registry.wg.set_peer(wg.public_key, allowed_ips=[f"{address}/32"])
        wg.set_peer(
            self.registry.wg.public_key,
            endpoint=f"{REGISTRY_PUBLIC}:51820",
            allowed_ips=[f"{REGISTRY_TUNNEL}/32", TUNNEL] if self.hub2 else [TUNNEL],
            keepalive=25,
        )
        if self.hub2 is not None:
            self.hub2.wg.set_peer(wg.public_key, allowed_ips=[f"{address}/32"])
            wg.set_peer(
                self.hub2.wg.public_key,
                endpoint=f"{HUB2_PUBLIC}:51820",
                allowed_ips=[f"{HUB2_TUNNEL}/32"],
                keepalive=25,
            )
        node = Node(name, host, wg, state_dir=os.path.join(self.lab.tmpdir, f"state-{name}"))
        self.clients[name] = node
        return node

    def add_wg_quick_client(self, name: str, host: Host, table: str = "auto") -> Node:
        """A client whose kernel interface `wg-quick up` makes, routing everything
        to the hub (`AllowedIPs = 0.0.0.0/0`) with `Table = table`: wg-quick's
        fwmark and policy rules are then in play.  The config holds no private key:
        a PostUp hook sets it from wg-quick's stdin."""
        assert self.registry is not None
        address = f"198.51.100.{self._next_tunnel}"
        self._next_tunnel += 1
        ifname = f"{self.lab.prefix}q{self._next_tunnel}"
        private_key = host.run("wg", "genkey", hide_stdout=True).stdout.strip()
        public_key = host.run("wg", "pubkey", input=private_key + "\n").stdout.strip()
        self.registry.wg.set_peer(public_key, allowed_ips=[f"{address}/32"])
        config = os.path.join(self.lab.tmpdir, f"{ifname}.conf")
        with open(config, "w") as handle:
            handle.write(
                f"[Interface]\nAddress = {address}/24\nListenPort = 51820\nTable = {table}\n"
                "PostUp = wg set %i private-key /dev/stdin\n\n"
                f"[Peer]\nPublicKey = {self.registry.wg.public_key}\n"
                f"Endpoint = {REGISTRY_PUBLIC}:51820\nAllowedIPs = 0.0.0.0/0\n"
                "PersistentKeepalive = 25\n"
            )
        host.run("wg-quick", "up", config, input=private_key + "\n", timeout=60)
        wg = WireGuard(
            self.lab,
            host,
            ifname,
            private_key,
            public_key,
            51820,
            ipaddress.IPv4Interface(f"{address}/24"),
            None,
            None,
            "kernel",
        )
        self.lab.devices.append(wg)
        node = Node(name, host, wg, state_dir=os.path.join(self.lab.tmpdir, f"state-{name}"))
        self.clients[name] = node
        return node

    # -- running the daemons -------------------------------------------------
    def _spawn(self, node: Node, argv: list[str]) -> Daemon:
        log_path = os.path.join(self.lab.tmpdir, f"daemon-{node.name}.log")
        with open(log_path, "ab") as log:
            process = node.host.popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        node.daemon = Daemon(node.name, process, log_path)
        return node.daemon

    def start_registry(
        self, twistd: bool = False, extra: tuple[str, ...] = (), node: Node | None = None
    ) -> Daemon:
        """The first hub's registry, or `node`'s (the second hub's)."""
        node = node or self.registry
        assert node is not None
        args = [
            "-i",
            node.wg.ifname,
            "--poll-interval",
            "1s",
            "--state-dir",
            os.path.join(
                self.lab.tmpdir, "state-registry" if node is self.registry else f"state-{node.name}"
            ),
            *extra,
        ]
        if twistd:
            argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "wgnat-server", *args]
        else:
            argv = [os.path.join(BIN, "wgnat-server"), *args]
        daemon = self._spawn(node, argv)
        wait_until(
            lambda: "wgnat-server on" in daemon.log() or daemon.process.poll() is not None,
            self.start_timeout,
            what="the registry to start",
        )
        assert daemon.process.poll() is None, daemon.log()
        return daemon

    def start_client(self, name: str, twistd: bool = False, extra: tuple[str, ...] = ()) -> Daemon:
        assert self.registry is not None
        node = self.clients[name]
        args = [
            "-i",
            node.wg.ifname,
            "-r",
            self.registry.wg.public_key,
            *(["-r", self.hub2.wg.public_key] if self.hub2 is not None else []),
            "--state-dir",
            node.state_dir,
            *extra,
        ]
        if twistd:
            argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "wgnat-client", *args]
        else:
            argv = [os.path.join(BIN, "wgnat-client"), *args]
        return self._spawn(node, argv)

    def kill_hub(self, node: Node) -> None:
        """A hub dies at once: its registry and its WireGuard are SIGKILLed (the
        interface goes with wireguard-go; a kernel link is deleted)."""
        if node.daemon is not None:
            node.daemon.process.kill()
            node.daemon.process.wait()
        if node.wg.process is not None:
            node.wg.process.kill()
            node.wg.process.wait()
        else:
            node.host.run("ip", "link", "del", node.wg.ifname, check=False)

    def revive_hub(self, node: Node, endpoints: dict[str, str]) -> None:
        """Bring a killed hub's WireGuard back, same key, address and peers
        (`endpoints`: each client's public endpoint, as the other hub sees it,
        so that it need not wait for their keepalives)."""
        wg = node.wg
        if wg.kind == "kernel":
            node.host.run("ip", "link", "add", wg.ifname, "type", "wireguard")
        else:
            wg.process, wg.log_path = self.lab._start_wireguard_go(node.host, wg.ifname, True)
        wg.wg(
            "set",
            wg.ifname,
            "private-key",
            "/dev/stdin",
            "listen-port",
            wg.listen_port,
            input=wg.private_key + "\n",
        )
        node.host.run("ip", "addr", "add", str(wg.address), "dev", wg.ifname)
        node.host.run("ip", "link", "set", wg.ifname, "up")
        for client in self.clients.values():
            endpoint = endpoints.get(client.wg.public_key)
            wg.set_peer(
                client.wg.public_key,
                endpoint=endpoint,
                allowed_ips=[f"{client.tunnel_ip}/32"],
            )

    # -- observing ---------------------------------------------------------
    def direct(self, a: str, b: str) -> str | None:
        """The endpoint a uses for b when a has b as a direct peer with b's
        address routed to it and a handshake, else None."""
        mine, theirs = self.clients[a], self.clients[b]
        entry = mine.wg.peers().get(theirs.wg.public_key)
        if entry and f"{theirs.tunnel_ip}/32" in entry["allowed_ips"] and entry["latest_handshake"]:
            return entry["endpoint"]
        return None

    def times_to_direct(
        self, pairs: list[tuple[str, str]], since: float, timeout: float
    ) -> dict[tuple[str, str], float]:
        """Seconds from `since` (time.monotonic()) until each pair was direct at
        both ends, watched together (so that no pair's figure includes another's
        wait); a pair not direct within `timeout` fails the test with the report."""
        found: dict[tuple[str, str], float] = {}
        while len(found) < len(pairs):
            for x, y in pairs:
                if (x, y) not in found and self.direct(x, y) and self.direct(y, x):
                    found[(x, y)] = time.monotonic() - since
            if time.monotonic() - since > timeout:
                missing = ", ".join(f"{x}-{y}" for x, y in pairs if (x, y) not in found)
                check(False, self, f"not direct within {timeout:g} s: {missing}")
            time.sleep(0.02)
        return found

    def has_entry(self, a: str, b: str) -> bool:
        return self.clients[b].wg.public_key in self.clients[a].wg.peers()

    def report(self) -> str:
        """What a failing test prints: every host's `wg show` (keys redacted) and logs."""
        parts = []
        for node in [self.registry, self.hub2, *self.clients.values()]:
            if node is None:
                continue
            parts.append(f"--- {node.name} {node.tunnel_ip} wg dump")
            try:
                parts.append(node.wg.dump())
            except Exception as exc:
                parts.append(f"(dump failed: {exc})")
            if node.daemon is not None:
                parts.append(f"--- {node.name} daemon log (tail)")
                parts.append("\n".join(node.daemon.log().splitlines()[-40:]))
        report = "\n".join(parts)
        if leakcheck is not None:  # leak check hook (tests/leakcheck.py)
            leakcheck.check_text(report, "the mesh lab report")
        return report

    def stop_all(self) -> None:
        for node in [*self.clients.values(), self.registry, self.hub2]:
            if node is not None and node.daemon is not None:
                node.daemon.stop()


@contextlib.contextmanager
def running(mesh: MeshLab, hub_reachable: bool = True) -> Iterator[MeshLab]:
    """A fixture's body: with `hub_reachable`, first that the hub-and-spoke
    network works before wgnat runs (every spoke pings the first hub); then the
    mesh, and every daemon stopped after the test."""
    if hub_reachable:
        for node in mesh.clients.values():
            assert node.host.ping(REGISTRY_TUNNEL, count=3, timeout=2), node.name
    try:
        yield mesh
    finally:
        mesh.stop_all()


def check(condition: object, mesh: MeshLab, message: str) -> None:
    """Assert, with the lab's report (devices, daemon logs) when it fails."""
    if not condition:
        raise AssertionError(f"{message}\n{mesh.report()}")
