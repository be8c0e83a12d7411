"""A WireGuard hub and spokes in namespaces, with the real daemons running as a
user runs them (installed console scripts, or twistd plugins).

    registry  203.0.113.10   wg 198.51.100.1/24   (relays: ip_forward on)
    clients   behind NAT routers or public, wg 198.51.100.N/24, each with the
              registry as its one configured peer (allowed 198.51.100.0/24,
              keepalive 25), as a hub-and-spoke network is set up by hand.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netns import Host, Lab, WireGuard, leakcheck

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "compose"))
from testbed import wait_until as testbed_wait_until

TUNNEL = "198.51.100.0/24"
REGISTRY_TUNNEL = "198.51.100.1"
REGISTRY_PUBLIC = "203.0.113.10"
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
            allowed_ips=[TUNNEL],
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

    def start_registry(self, twistd: bool = False, extra: tuple[str, ...] = ()) -> Daemon:
        node = self.registry
        assert node is not None
        args = [
            "-i",
            node.wg.ifname,
            "--poll-interval",
            "1s",
            "--state-dir",
            os.path.join(self.lab.tmpdir, "state-registry"),
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
            "--state-dir",
            node.state_dir,
            *extra,
        ]
        if twistd:
            argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "wgnat-client", *args]
        else:
            argv = [os.path.join(BIN, "wgnat-client"), *args]
        return self._spawn(node, argv)

    # -- observing ---------------------------------------------------------
    def direct(self, a: str, b: str) -> str | None:
        """The endpoint a uses for b when a has b as a direct peer with b's
        address routed to it and a handshake, else None."""
        mine, theirs = self.clients[a], self.clients[b]
        entry = mine.wg.peers().get(theirs.wg.public_key)
        if entry and f"{theirs.tunnel_ip}/32" in entry["allowed_ips"] and entry["latest_handshake"]:
            return entry["endpoint"]
        return None

    def has_entry(self, a: str, b: str) -> bool:
        return self.clients[b].wg.public_key in self.clients[a].wg.peers()

    def report(self) -> str:
        """What a failing test prints: every host's `wg show` (keys redacted) and logs."""
        parts = []
        for node in [self.registry, *self.clients.values()]:
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
        for node in [*self.clients.values(), self.registry]:
            if node is not None and node.daemon is not None:
                node.daemon.stop()
