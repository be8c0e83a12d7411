"""A namespace lab: simulated internet, NAT routers, LAN hosts and WireGuard devices.

Everything lives in network namespaces this module creates; nothing is added to the
root namespace (its firewall may belong to Docker) and no packet can leave, since no
namespace has a link to the outside.  Addresses follow the project's network rule:
203.0.113.0/24 is the internet, 198.51.100.0/24 the tunnel addresses, private
192.168.x.0/24 only for LANs behind the simulated NAT routers.

    with Lab() as lab:
        r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", mode="home")
        alice = lab.lan_host(r1, "alice", "192.168.1.10/24")
        server = lab.public_host("srv", "203.0.113.10/24")
        wg = lab.wireguard(alice, "198.51.100.2/24")

The internet is a bridge ("br0") inside a namespace of its own, `<prefix>-inet`; each
public host or router has a veth pair to it (`eth0` in a host, `wan` in a router, the
host's name on the bridge side).  A router's LAN is a bridge named `lan` holding the
LAN's `.1`; each LAN host has `eth0` on it and a default route via `.1`.

Names: every namespace is `<prefix>-<name>`; the prefix is unique per Lab instance
(`wnl` + the pid in base 36 + a counter), so parallel runs and leftovers never
collide.  WireGuard interfaces are `<prefix>g<n>`: their UAPI sockets share
/var/run/wireguard across namespaces, so their names must be unique machine-wide.

A WireGuard device is wireguard-go (`kind="go"`, the default: this machine's kernel
has no WireGuard module) or a kernel device (`kind="kernel"`: `ip link add NAME type
wireguard` in the host's namespace, configured with `wg`), where the kernel has the
module (`make test-kernel` boots one in a VM).  `WGNAT_LAB_WIREGUARD=kernel` changes
the default for a whole run.

Private keys are generated at run time, passed to `wg` on stdin and never put on a
command line, in a log line or in a repr.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

try:  # Leak check hook (tests/leakcheck.py, a pytest plugin): not needed outside pytest.
    import leakcheck
except ImportError:  # pragma: no cover
    leakcheck = None  # type: ignore[assignment]

UAPI_SOCKET_DIR = "/var/run/wireguard"
FAMILY = "wnl"  # every default prefix starts with this
INTERNET_BRIDGE = "br0"
# A realistic router's forwarding, IPv4 and IPv6 alike: what the LAN opened is
# answered, nothing else comes in.
STATEFUL_FORWARD = (
    ["-P", "FORWARD", "DROP"],
    [
        "-A",
        "FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ],
    ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"],
)

MODES = ("home", "symmetric", "accept_all", "upnp")
# A "upnp" router is a symmetric NAT whose gateway runs miniupnpd (PCP, NAT-PMP,
# UPnP IGD).  miniupnpd refuses to map behind a reserved external address, which
# every documentation range is, unless a STUN test says the address is public:
# a STUN server (coturn) on two internet addresses does that (Lab.stun_server).
STUN_ADDRESSES = ("203.0.113.60", "203.0.113.61")
STUN_PORT = 3478
# Port ranges a router's MASQUERADE moves to on successive rebind() calls; none
# holds 51820 or the ports tests bind by hand, so every mapping really moves.
REBIND_RANGES = ((40000, 49999), (30000, 39999), (20000, 29999))
WIREGUARD_KINDS = ("go", "kernel")
LAB_WIREGUARD_ENV = "WGNAT_LAB_WIREGUARD"  # the default kind of Lab.wireguard()
WIREGUARD_ENV = {
    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
    "LOG_LEVEL": "verbose",
}

_counter = itertools.count(1)
_live_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if not number:
            return text


def _pid_width() -> int:
    """Width of a pid in base 36 on this machine: fixed, so prefixes never overlap."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
    except OSError:
        pid_max = 4194304
    return len(_base36(pid_max))


_PID_WIDTH = _pid_width()


def default_wireguard_kind() -> str:
    kind = os.environ.get(LAB_WIREGUARD_ENV, "go")
    if kind not in WIREGUARD_KINDS:
        raise ValueError(f"{LAB_WIREGUARD_ENV}={kind!r}: one of {', '.join(WIREGUARD_KINDS)}")
    return kind


def kernel_wireguard_unavailable() -> str | None:
    """Why kernel WireGuard devices cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "wg"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        netns = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
        if netns.returncode != 0:
            return "cannot create a network namespace here"
        probe = subprocess.run(
            ["unshare", "--net", "ip", "link", "add", "wgprobe0", "type", "wireguard"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot probe for WireGuard: {exc}"
    if probe.returncode != 0:
        return "kernel has no WireGuard module (make test-kernel runs these tests in a VM)"
    return None


def default_prefix() -> str:
    return f"{FAMILY}{_base36(os.getpid()).rjust(_PID_WIDTH, '0')}{_base36(next(_counter))}"


class LabError(RuntimeError):
    pass


def _leak_hook(
    argv: Sequence[Any], result: subprocess.CompletedProcess, hidden: bool, where: str
) -> None:
    """Leak check hook: record the keys `wg genkey`/`wg genpsk` print; search what
    other commands print (API answers, metrics, status fetched in a namespace)."""
    if leakcheck is None:
        return
    if [str(a) for a in argv[:2]] in (["wg", "genkey"], ["wg", "genpsk"]):
        leakcheck.record_secret(result.stdout or "")
    elif not hidden:
        text = (result.stdout or "") + (result.stderr or "")
        leakcheck.check_text(text, f"the output of '{' '.join(map(str, argv))[:80]}' in {where}")


class CommandFailed(LabError):
    """A command in a namespace failed; the message carries its stdout and stderr."""

    def __init__(
        self,
        where: str,
        argv: Sequence[str],
        result: subprocess.CompletedProcess,
        hide_stdout: bool,
    ) -> None:
        stdout = "(hidden: may hold a key)" if hide_stdout else (result.stdout or "").strip()
        super().__init__(
            f"[{where}] {' '.join(map(str, argv))!s} exited {result.returncode}\n"
            f"stdout: {stdout}\nstderr: {(result.stderr or '').strip()}"
        )
        self.returncode = result.returncode
        self.result = result


def _run_root(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    hide_stdout: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command in the root namespace (only `ip netns ...`, `wg genkey/pubkey`)."""
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, input=input
    )
    _leak_hook(argv, result, hide_stdout, "the root namespace")
    if check and result.returncode != 0:
        raise CommandFailed("root", argv, result, hide_stdout)
    return result


def netns_list() -> list[str]:
    out = _run_root(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Host:
    """One network namespace."""

    def __init__(self, lab: Lab, name: str, short: str) -> None:
        self.lab = lab
        self.name = name  # the namespace name
        self.short = short  # the name given to the lab
        self.address: ipaddress.IPv4Interface | None = None
        self.router: Router | None = None  # the NAT router in front of a LAN host

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.address or ''}>"

    def run(
        self,
        *argv: Any,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        hide_stdout: bool = False,
    ) -> subprocess.CompletedProcess:
        """`ip netns exec NAME argv...`: text mode, output captured."""
        argv = tuple(str(a) for a in argv)
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        _leak_hook(argv, result, hide_stdout, self.name)
        if check and result.returncode != 0:
            raise CommandFailed(self.name, argv, result, hide_stdout)
        return result

    def popen(self, argv: Sequence[Any], **kwargs: Any) -> subprocess.Popen:
        """A long-running process in the namespace; the lab kills it at cleanup."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *map(str, argv)], **kwargs)
        self.lab._processes.append(proc)
        return proc

    def python(
        self,
        script: str,
        *args: Any,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a Python snippet (the test's interpreter) inside the namespace."""
        return self.run(
            sys.executable, "-c", script, *args, timeout=timeout, check=check, input=input
        )

    def ping(self, address: Any, count: int = 1, timeout: float = 2) -> bool:
        """True when at least one of `count` echo requests got a reply within `timeout` s each."""
        result = self.run(
            "ping",
            "-n",
            "-q",
            "-c",
            count,
            "-i",
            "0.2",
            "-W",
            timeout,
            address,
            check=False,
            timeout=count * (timeout + 0.5) + 5,
        )
        return result.returncode == 0

    # -- UDP helpers (tiny Python programs run inside the namespace) -----------
    def udp_echo(self, port: int, bind: str = "0.0.0.0") -> subprocess.Popen:
        """Start a UDP echo server answering each datagram with the sender's `ip:port`."""
        proc = self.popen(
            [sys.executable, "-c", _UDP_ECHO, bind, port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_ready(proc, f"udp echo on {self.name}:{port}")
        return proc

    def udp_exchange(
        self,
        targets: Iterable[tuple[Any, int]],
        source_port: int = 0,
        timeout: float = 2.0,
        payload: str = "probe",
    ) -> dict[str, str | None]:
        """From one socket (bound to `source_port`), send to each target until it answers.

        Returns `{"ip:port": answer or None}` plus `"local": "ip:port"` of the socket.
        Against `udp_echo` the answer is the source address the target saw.
        """
        spec = json.dumps(
            {
                "source_port": source_port,
                "targets": [[str(ip), int(port)] for ip, port in targets],
                "timeout": timeout,
                "payload": payload,
            }
        )
        result = self.python(_UDP_EXCHANGE, spec, timeout=timeout + 10)
        return json.loads(result.stdout)

    def udp_send(
        self, address: Any, port: int, payload: str = "hello", source_port: int = 0, count: int = 1
    ) -> None:
        """Fire and forget `count` datagrams."""
        self.python(_UDP_SEND, str(address), port, payload, source_port, count)

    def udp_listen(self, port: int, duration: float, bind: str = "0.0.0.0") -> UDPListener:
        """Collect datagrams on `port` for `duration` seconds (in the background)."""
        proc = self.popen(
            [sys.executable, "-c", _UDP_LISTEN, bind, port, duration],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_ready(proc, f"udp listener on {self.name}:{port}")
        return UDPListener(proc, duration)


class UDPListener:
    def __init__(self, proc: subprocess.Popen, duration: float) -> None:
        self.proc = proc
        self.duration = duration

    def wait(self) -> list[tuple[str, str]]:
        """The (source `ip:port`, payload) pairs received, once the listener finished."""
        out, err = self.proc.communicate(timeout=self.duration + 10)
        if self.proc.returncode != 0:
            raise LabError(f"udp listener failed: {err.strip()}")
        return [tuple(item) for item in json.loads(out)]  # type: ignore[misc]


class Router(Host):
    """A NAT router: `wan` on the internet, bridge `lan` (holding `.1`) behind it."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        short: str,
        public: ipaddress.IPv4Interface,
        lan: ipaddress.IPv4Network,
        mode: str,
    ) -> None:
        super().__init__(lab, name, short)
        self.address = public
        self.public_address: ipaddress.IPv4Address = public.ip
        self.lan: ipaddress.IPv4Network = lan
        self.lan_address = ipaddress.IPv4Interface(f"{lan.network_address + 1}/{lan.prefixlen}")
        self.mode = mode
        self.rebinds = 0
        self._lan_ports = itertools.count(0)
        self.ipv6_lan: ipaddress.IPv6Network | None = None  # Lab.ipv6_router

    @property
    def iptables(self) -> str:
        """miniupnpd changes the firewall through libiptc: the legacy tables,
        which every rule of its router must then be in."""
        return "iptables-legacy" if self.mode == "upnp" else "iptables"

    def _masquerade_rules(self, ports: tuple[int, int] | None) -> list[list[str]]:
        random = ["--random-fully"] if self.mode in ("symmetric", "upnp") else []
        if self.mode == "upnp":
            # Only the LAN's packets: with --random-fully on the gateway's own,
            # miniupnpd's STUN test sees a symmetric NAT and refuses to map.
            random = ["-s", str(self.lan), *random]
        if ports is None:
            return [["-o", "wan", "-j", "MASQUERADE", *random]]
        to_ports = ["--to-ports", f"{ports[0]}-{ports[1]}"]
        return [
            ["-o", "wan", "-p", "udp", "-j", "MASQUERADE", *to_ports, *random],
            ["-o", "wan", "-p", "tcp", "-j", "MASQUERADE", *to_ports, *random],
            ["-o", "wan", "-j", "MASQUERADE", *random],
        ]

    def _setup_firewall(self) -> None:
        rules: list[list[str]] = []
        if self.mode == "upnp":
            # miniupnpd's chains (what its iptables_init.sh makes), before the NAT.
            rules += [
                ["-t", "nat", "-N", "MINIUPNPD"],
                ["-t", "nat", "-A", "PREROUTING", "-i", "wan", "-j", "MINIUPNPD"],
                ["-t", "nat", "-N", "MINIUPNPD-POSTROUTING"],
                ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MINIUPNPD-POSTROUTING"],
                ["-t", "mangle", "-N", "MINIUPNPD"],
                ["-t", "mangle", "-A", "PREROUTING", "-i", "wan", "-j", "MINIUPNPD"],
                ["-N", "MINIUPNPD"],
                ["-A", "FORWARD", "-i", "wan", "!", "-o", "wan", "-j", "MINIUPNPD"],
            ]
            # Its STUN test asks for answers from the server's other address
            # and port, which no outgoing packet of ours matched.
            rules += [
                ["-A", "INPUT", "-i", "wan", "-p", "udp", "-s", address, "-j", "ACCEPT"]
                for address in STUN_ADDRESSES
            ]
        rules += [["-t", "nat", "-A", "POSTROUTING", *r] for r in self._masquerade_rules(None)]
        rules += [
            *STATEFUL_FORWARD,
            # LAN to LAN stays on the bridge; with br_netfilter it also passes FORWARD.
            ["-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT"],
        ]
        if self.mode != "accept_all":
            rules += [
                ["-P", "INPUT", "DROP"],
                ["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                [
                    "-A",
                    "INPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
                ["-A", "INPUT", "-i", "lan", "-j", "ACCEPT"],
            ]
        for rule in rules:
            self.run(self.iptables, "-w", *rule)

    def start_miniupnpd(
        self, allowed: str | None = None, pcp: bool = True, lifetime: int | None = None
    ) -> subprocess.Popen:
        """miniupnpd on this ("upnp") router: PCP/NAT-PMP and UPnP IGD on the LAN,
        its external address checked by STUN (Lab.stun_server must run), mapping
        only for `allowed` (a network: the LAN by default; others are refused),
        with PCP/NAT-PMP (`pcp`) or with UPnP IGD only, granting PCP leases of at
        most `lifetime` seconds (its default: up to a day).
        It answers no request before its STUN test ends (about 10 s):
        `miniupnpd_ready()` says when."""
        assert self.mode == "upnp", "miniupnpd runs on a router made with mode='upnp'"
        config = os.path.join(self.lab.tmpdir, f"miniupnpd-{self.short}.conf")
        with open(config, "w") as handle:
            handle.write(
                "ext_ifname=wan\n"
                "listening_ip=lan\n"
                "http_port=0\n"
                f"enable_natpmp={'yes' if pcp else 'no'}\n"
                "enable_upnp=yes\n"
                "secure_mode=yes\n"
                "system_uptime=yes\n"
                "ext_perform_stun=yes\n"
                f"ext_stun_host={STUN_ADDRESSES[0]}\n"
                f"ext_stun_port={STUN_PORT}\n"
                + (f"min_lifetime=2\nmax_lifetime={lifetime}\n" if lifetime else "")
                + f"allow 1024-65535 {allowed or self.lan} 1024-65535\n"
                "deny 0-65535 0.0.0.0/0 0-65535\n"
            )
        self.miniupnpd_log = os.path.join(self.lab.tmpdir, f"miniupnpd-{self.short}.log")
        pidfile = os.path.join(self.lab.tmpdir, f"miniupnpd-{self.short}.pid")
        with open(self.miniupnpd_log, "ab") as log:
            return self.popen(
                ["miniupnpd", "-d", "-f", config, "-P", pidfile],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def miniupnpd_output(self) -> str:
        with open(self.miniupnpd_log, errors="replace") as handle:
            return handle.read()

    def miniupnpd_ready(self) -> bool:
        output = self.miniupnpd_output()
        return "Listening for NAT-PMP/PCP traffic" in output or (
            "HTTP listening on port" in output and "Port forwarding is now enabled" in output
        )

    def rebind(self) -> None:
        """Move every NAT mapping: MASQUERADE to a new port range, conntrack flushed."""
        ports = REBIND_RANGES[self.rebinds % len(REBIND_RANGES)]
        self.rebinds += 1
        self.run(self.iptables, "-w", "-t", "nat", "-F", "POSTROUTING")
        for rule in self._masquerade_rules(ports):
            self.run(self.iptables, "-w", "-t", "nat", "-A", "POSTROUTING", *rule)
        self.flush_conntrack()

    def flush_conntrack(self) -> None:
        result = self.run("conntrack", "-F", check=False)
        if result.returncode != 0 and "0 flow entries" not in result.stderr:
            raise CommandFailed(self.name, ["conntrack", "-F"], result, False)

    def conntrack(self) -> str:
        """The router's conntrack table (for assertions and failure messages)."""
        result = self.run("conntrack", "-L", check=False)
        return result.stdout


class WireGuard:
    """A WireGuard device inside a Host: wireguard-go (`wireguard-go -f`, kind "go",
    with a process and a log) or a kernel link (kind "kernel", neither)."""

    def __init__(
        self,
        lab: Lab,
        host: Host,
        ifname: str,
        private_key: str,
        public_key: str,
        listen_port: int,
        address: ipaddress.IPv4Interface,
        process: subprocess.Popen | None,
        log_path: str | None,
        kind: str = "go",
    ) -> None:
        self.lab = lab
        self.host = host
        self.ifname = ifname
        self.private_key = private_key  # stays in the test; never printed
        self.public_key = public_key
        self.listen_port = listen_port
        self.address = address
        self.process = process
        self.log_path = log_path
        self.kind = kind

    def __repr__(self) -> str:
        return (
            f"<WireGuard {self.kind} {self.ifname} in {self.host.name} {self.address} "
            f":{self.listen_port}>"
        )

    @property
    def backend(self) -> str:
        """The wgnat device backend that serves this device (what the daemons report)."""
        return "netlink" if self.kind == "kernel" else "uapi"

    @property
    def socket_path(self) -> str:
        return os.path.join(UAPI_SOCKET_DIR, f"{self.ifname}.sock")

    def wg(
        self, *args: Any, input: str | None = None, hide_stdout: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self.host.run("wg", *args, input=input, hide_stdout=hide_stdout, check=check)

    def set_peer(
        self,
        public_key: str,
        endpoint: str | None = None,
        allowed_ips: Iterable[Any] | None = None,
        keepalive: int | None = None,
        preshared_key: str | None = None,
    ) -> None:
        """`wg set IF peer KEY ...`; fields left None are not touched.

        `allowed_ips` replaces the peer's list (an empty iterable clears it).  A
        preshared key goes through stdin, never argv.
        """
        args: list[Any] = ["set", self.ifname, "peer", public_key]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if allowed_ips is not None:
            args += ["allowed-ips", ",".join(str(a) for a in allowed_ips)]
        if keepalive is not None:
            args += ["persistent-keepalive", keepalive or "off"]
        stdin = None
        if preshared_key is not None:
            args += ["preshared-key", "/dev/stdin"]
            stdin = preshared_key + "\n"
        self.wg(*args, input=stdin)

    def remove_peer(self, public_key: str) -> None:
        self.wg("set", self.ifname, "peer", public_key, "remove")

    def dump(self, redact: bool = True) -> str:
        """`wg show IF dump`; with `redact` the private and preshared keys are masked."""
        text = self.wg("show", self.ifname, "dump", hide_stdout=True).stdout
        if not redact:
            return text
        lines = text.splitlines()
        out = []
        for i, line in enumerate(lines):
            fields = line.split("\t")
            if i == 0 and fields:
                fields[0] = "(hidden)"
            elif len(fields) > 1 and fields[1] != "(none)":
                fields[1] = "(hidden)"
            out.append("\t".join(fields))
        return "\n".join(out) + ("\n" if text.endswith("\n") else "")

    def peers(self) -> dict[str, dict[str, Any]]:
        """public_key -> {endpoint, allowed_ips, latest_handshake, rx, tx, keepalive}.

        endpoint is None when unset; keepalive 0 when off; no preshared key.
        """
        result: dict[str, dict[str, Any]] = {}
        for line in self.dump().splitlines()[1:]:
            key, _psk, endpoint, allowed, handshake, rx, tx, keepalive = line.split("\t")
            result[key] = {
                "endpoint": None if endpoint == "(none)" else endpoint,
                "allowed_ips": [] if allowed == "(none)" else allowed.split(","),
                "latest_handshake": int(handshake),
                "rx": int(rx),
                "tx": int(tx),
                "keepalive": 0 if keepalive == "off" else int(keepalive),
            }
        return result

    def log(self) -> str:
        """wireguard-go's log; a kernel device logs nothing of its own here."""
        if self.log_path is None:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """Terminate wireguard-go (it removes its socket and its interface), or delete
        the kernel link."""
        if self.process is not None:
            _terminate(self.process)
        else:
            self.host.run("ip", "link", "del", self.ifname, check=False)


def _terminate(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=grace)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def _wait_ready(proc: subprocess.Popen, what: str, timeout: float = 10) -> None:
    """Wait for the helper's `ready` line on stdout."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            _terminate(proc)
            raise LabError(f"{what}: not ready within {timeout} s")
    line = proc.stdout.readline()
    if line.strip() != "ready":
        _terminate(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise LabError(f"{what} failed to start: {line!r} {err.strip()}")


def uapi_ready(socket_path: str, timeout: float = 1.0) -> bool:
    """True when a UAPI socket answers `get=1` with errno=0."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(b"get=1\n\n")
            data = b""
            while b"\n\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return b"errno=0\n" in data
    except OSError:
        return False


class Lab:
    """A set of namespaces, links and processes, all removed by cleanup()."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or default_prefix()
        if not re.fullmatch(r"[a-z0-9]{1,9}", self.prefix):
            raise ValueError("a lab prefix is 1-9 lowercase letters or digits")
        # A crashed earlier process with our pid may have left these behind.
        cleanup_leftovers(self.prefix)
        self.tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        os.chmod(self.tmpdir, 0o700)
        self.hosts: dict[str, Host] = {}
        self.devices: list[WireGuard] = []
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._internet: str | None = None
        self._wg_counter = itertools.count(0)
        self._closed = False
        self._ipv6_ready = False
        _live_labs.add(self)

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} {sorted(self.hosts)}>"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- building -----------------------------------------------------------
    def _ns_name(self, name: str) -> str:
        # The name is also the host's link on the internet bridge: not "lo" or "br0".
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,14}", name) or name in ("inet", "lo", "br0"):
            raise ValueError(
                f"bad lab host name {name!r}: up to 15 of [a-z0-9_]; not inet, lo or br0"
            )
        if name in self.hosts:
            raise ValueError(f"lab host {name!r} exists already")
        return f"{self.prefix}-{name}"

    def _add_namespace(self, nsname: str) -> None:
        _run_root(["ip", "netns", "add", nsname])
        self._namespaces.append(nsname)
        cmds = [["ip", "link", "set", "lo", "up"]]
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
            cmds.append(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"])
        for cmd in cmds:
            subprocess.run(["ip", "netns", "exec", nsname, *cmd], capture_output=True, check=False)

    def _internet_ns(self) -> str:
        if self._internet is None:
            nsname = f"{self.prefix}-inet"
            self._add_namespace(nsname)
            self._internet = nsname
            _run_root(["ip", "-n", nsname, "link", "add", INTERNET_BRIDGE, "type", "bridge"])
            _run_root(["ip", "-n", nsname, "link", "set", INTERNET_BRIDGE, "up"])
        return self._internet

    def _attach_to_internet(
        self, nsname: str, short: str, ifname: str, address: ipaddress.IPv4Interface
    ) -> None:
        inet = self._internet_ns()
        _run_root(
            [
                "ip",
                "-n",
                nsname,
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                short,
                "netns",
                inet,
            ]
        )
        _run_root(["ip", "-n", inet, "link", "set", short, "master", INTERNET_BRIDGE, "up"])
        _run_root(["ip", "-n", nsname, "addr", "add", str(address), "dev", ifname])
        _run_root(["ip", "-n", nsname, "link", "set", ifname, "up"])

    def host(self, name: str) -> Host:
        """An isolated namespace (loopback only)."""
        nsname = self._ns_name(name)
        self._add_namespace(nsname)
        host = Host(self, nsname, name)
        self.hosts[name] = host
        return host

    def public_host(self, name: str, address: str) -> Host:
        """A host on the internet segment, e.g. ("srv", "203.0.113.10/24")."""
        iface = ipaddress.IPv4Interface(address)
        host = self.host(name)
        self._attach_to_internet(host.name, name, "eth0", iface)
        host.address = iface
        return host

    def stun_server(self, name: str = "stun") -> Host:
        """A STUN server (coturn, STUN only) on the internet at both
        STUN_ADDRESSES, as miniupnpd's STUN test needs (a second address and
        port to ask for answers from)."""
        host = self.public_host(name, f"{STUN_ADDRESSES[0]}/24")
        for address in STUN_ADDRESSES[1:]:
            host.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        log_path = os.path.join(self.tmpdir, f"turnserver-{name}.log")
        listening = [f"--listening-ip={address}" for address in STUN_ADDRESSES]
        with open(log_path, "ab") as log:
            host.popen(
                [
                    "turnserver",
                    "-n",
                    "--no-cli",
                    "-S",
                    "-z",
                    *listening,
                    f"--listening-port={STUN_PORT}",
                    f"--alt-listening-port={STUN_PORT + 1}",
                    f"--pidfile={os.path.join(self.tmpdir, f'turnserver-{name}.pid')}",
                    "--log-file=stdout",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return host

    def router(self, name: str, public_address: str, lan: str, mode: str = "home") -> Router:
        """A NAT router, e.g. ("r1", "203.0.113.21/24", "192.168.1.0/24", mode="home")."""
        if mode not in MODES:
            raise ValueError(f"router mode {mode!r}: one of {', '.join(MODES)}")
        public = ipaddress.IPv4Interface(public_address)
        network = ipaddress.IPv4Network(lan)
        nsname = self._ns_name(name)
        self._add_namespace(nsname)
        router = Router(self, nsname, name, public, network, mode)
        self.hosts[name] = router
        self._attach_to_internet(nsname, name, "wan", public)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run_root(["ip", "-n", nsname, "link", "add", "lan", "type", "bridge"])
        _run_root(["ip", "-n", nsname, "addr", "add", str(router.lan_address), "dev", "lan"])
        _run_root(["ip", "-n", nsname, "link", "set", "lan", "up"])
        router._setup_firewall()
        return router

    # -- IPv6 ---------------------------------------------------------------
    # The IPv6 internet: the internet bridge's namespace routes 2001:db8::/32
    # (the documentation range) between the routers' and public hosts' `/64`s
    # on the bridge; a router routes its LAN's /64 (no NAT: IPv6) behind a
    # stateful firewall.  Addresses are added without duplicate address
    # detection, so they are usable at once.
    IPV6_CORE = "2001:db8::1"

    def _ipv6_core(self) -> str:
        inet = self._internet_ns()
        if not self._ipv6_ready:
            for cmd in (
                ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
                [
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    f"{self.IPV6_CORE}/64",
                    "dev",
                    INTERNET_BRIDGE,
                    "nodad",
                ],
            ):
                _run_root(["ip", "netns", "exec", inet, *cmd])
            self._ipv6_ready = True
        return inet

    def ipv6_public(self, host: Host, address: str) -> None:
        """Give a public host (or a router's `wan`) an address on the IPv6
        internet's segment, e.g. "2001:db8::30/64", and its default route."""
        self._ipv6_core()
        ifname = "wan" if isinstance(host, Router) else "eth0"
        _run_root(["ip", "-n", host.name, "-6", "addr", "add", address, "dev", ifname, "nodad"])
        _run_root(["ip", "-n", host.name, "-6", "route", "add", "default", "via", self.IPV6_CORE])

    def ipv6_router(self, router: Router, wan: str, lan: str) -> None:
        """Route the IPv6 prefix `lan` (e.g. "2001:db8:3::/64") to `router`'s LAN,
        whose `::1` it holds, with `wan` (e.g. "2001:db8::23/64") on the internet.
        Its IPv6 firewall is a home router's: forwarding from the LAN out and
        what answers it, nothing else in (so two hosts behind two such routers
        need the simultaneous open that hole punching does)."""
        inet = self._ipv6_core()
        self.ipv6_public(router, wan)
        network = ipaddress.IPv6Network(lan)
        gateway = network.network_address + 1
        router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        inside = f"{gateway}/{network.prefixlen}"
        _run_root(["ip", "-n", router.name, "-6", "addr", "add", inside, "dev", "lan", "nodad"])
        wan_ip = ipaddress.IPv6Interface(wan).ip
        _run_root(["ip", "-n", inet, "-6", "route", "add", str(network), "via", str(wan_ip)])
        router.ipv6_lan = network
        for rule in STATEFUL_FORWARD:
            router.run("ip6tables", "-w", *rule)

    def ipv6_lan_host(self, host: Host, address: str) -> None:
        """Give a LAN host an address in its router's IPv6 prefix (e.g.
        "2001:db8:3::10/64") and its default route through the router."""
        router = host.router
        network = router.ipv6_lan if router is not None else None
        if network is None:
            raise ValueError(f"{host.short} is behind no router with IPv6 (Lab.ipv6_router)")
        _run_root(["ip", "-n", host.name, "-6", "addr", "add", address, "dev", "eth0", "nodad"])
        gateway = str(network.network_address + 1)
        _run_root(["ip", "-n", host.name, "-6", "route", "add", "default", "via", gateway])

    def lan_host(self, router: Router, name: str, address: str) -> Host:
        """A host on `router`'s LAN with a default route via the router's `.1`."""
        iface = ipaddress.IPv4Interface(address)
        if iface.ip not in router.lan:
            raise ValueError(f"{address} is not in {router.short}'s LAN {router.lan}")
        host = self.host(name)
        port = f"p{next(router._lan_ports)}_{name}"[:15]
        _run_root(
            [
                "ip",
                "-n",
                host.name,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                router.name,
            ]
        )
        _run_root(["ip", "-n", router.name, "link", "set", port, "master", "lan", "up"])
        _run_root(["ip", "-n", host.name, "addr", "add", str(iface), "dev", "eth0"])
        _run_root(["ip", "-n", host.name, "link", "set", "eth0", "up"])
        _run_root(
            ["ip", "-n", host.name, "route", "add", "default", "via", str(router.lan_address.ip)]
        )
        host.address = iface
        host.router = router
        return host

    def wireguard(
        self,
        host: Host,
        address: str,
        listen_port: int = 51820,
        verbose: bool = True,
        kind: str | None = None,
    ) -> WireGuard:
        """A WireGuard device in `host` with fresh keys, addressed and up.

        `kind`: "go" starts `wireguard-go -f`, "kernel" adds a kernel link; None
        takes $WGNAT_LAB_WIREGUARD (default "go").  `verbose`: wireguard-go logs
        every packet (for failing tests); a benchmark measuring wireguard-go's CPU
        runs it as deployed, errors only."""
        kind = kind or default_wireguard_kind()
        if kind not in WIREGUARD_KINDS:
            raise ValueError(f"WireGuard kind {kind!r}: one of {', '.join(WIREGUARD_KINDS)}")
        iface = ipaddress.IPv4Interface(address)
        ifname = f"{self.prefix}g{next(self._wg_counter)}"
        assert len(ifname) <= 15
        private_key = _run_root(["wg", "genkey"], hide_stdout=True).stdout.strip()
        public_key = _run_root(["wg", "pubkey"], input=private_key + "\n").stdout.strip()
        if kind == "kernel":
            process, log_path = None, None
            host.run("ip", "link", "add", ifname, "type", "wireguard")
        else:
            process, log_path = self._start_wireguard_go(host, ifname, verbose)
        device = WireGuard(
            self, host, ifname, private_key, public_key, listen_port, iface, process, log_path, kind
        )
        self.devices.append(device)
        device.wg(
            "set",
            ifname,
            "private-key",
            "/dev/stdin",
            "listen-port",
            listen_port,
            input=private_key + "\n",
        )
        if listen_port == 0:
            device.listen_port = int(device.wg("show", ifname, "listen-port").stdout)
        host.run("ip", "addr", "add", str(iface), "dev", ifname)
        host.run("ip", "link", "set", ifname, "up")
        return device

    def _start_wireguard_go(
        self, host: Host, ifname: str, verbose: bool
    ) -> tuple[subprocess.Popen, str]:
        """`wireguard-go -f IFNAME` in `host`, once its UAPI socket answers."""
        socket_path = os.path.join(UAPI_SOCKET_DIR, f"{ifname}.sock")
        log_path = os.path.join(self.tmpdir, f"{ifname}.log")
        env = dict(os.environ, **WIREGUARD_ENV)
        if not verbose:
            env.pop("LOG_LEVEL", None)
        with open(log_path, "wb") as log:
            proc = host.popen(
                ["wireguard-go", "-f", ifname],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        # Generous: under a VM's emulated CPU (make test-kernel) it starts in seconds.
        deadline = time.monotonic() + 30
        while not uapi_ready(socket_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                _terminate(proc)
                with open(log_path, errors="replace") as f:
                    log_text = f.read()
                raise LabError(f"wireguard-go {ifname} in {host.name} did not start:\n{log_text}")
            time.sleep(0.01)
        return proc, log_path

    # -- tearing down ---------------------------------------------------------
    def cleanup(self) -> None:
        """Remove every process, namespace (with its links) and socket this lab made."""
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        for proc in reversed(self._processes):
            try:
                _terminate(proc)
            except Exception as exc:  # keep going: everything else must still go
                problems.append(f"process {proc.args}: {exc}")
        for nsname in reversed(self._namespaces):
            try:
                _remove_namespace(nsname)
            except Exception as exc:
                problems.append(f"namespace {nsname}: {exc}")
        for device in self.devices:
            if device.kind == "go":  # a kernel link went with its namespace
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(device.socket_path)
        if leakcheck is not None:  # leak check hook: logs and state files, before they go
            leakcheck.check_directory(self.tmpdir, f"lab {self.prefix} files")
        if os.environ.get("WGNAT_LAB_KEEP_LOGS"):
            print(f"lab {self.prefix}: logs kept in {self.tmpdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        _live_labs.discard(self)
        if problems:
            raise LabError("lab cleanup incomplete:\n" + "\n".join(problems))


def _kill_pids(pids: Iterable[int]) -> None:
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _pid_alive(pid)]
            if alive:
                time.sleep(0.02)
        if not alive:
            return
        pids = alive


def _pid_alive(pid: int) -> bool:
    try:
        # A zombie child counts as gone: reap it if it is ours.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _remove_namespace(nsname: str) -> None:
    result = _run_root(["ip", "netns", "pids", nsname], check=False)
    if result.returncode == 0:
        _kill_pids(int(p) for p in result.stdout.split())
    result = _run_root(["ip", "netns", "del", nsname], check=False)
    if result.returncode != 0 and nsname in netns_list():
        raise LabError(f"ip netns del {nsname}: {result.stderr.strip()}")


def _wireguard_processes() -> dict[int, str]:
    """pid -> interface name of every `wireguard-go [-f] IFNAME` process."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in argv if a]
        if argv and os.path.basename(argv[0]) == "wireguard-go":
            names = [a for a in argv[1:] if not a.startswith("-")]
            if names:
                found[int(entry)] = names[-1]
    return found


def _owner_dead(prefix: str) -> bool:
    """For a default-family prefix, whether the process that made it is gone."""
    digits = prefix[len(FAMILY) : len(FAMILY) + _PID_WIDTH]
    try:
        pid = int(digits, 36)
    except ValueError:
        return False
    return not os.path.exists(f"/proc/{pid}")


def cleanup_leftovers(prefix: str | None = None) -> None:
    """Remove namespaces, processes, UAPI sockets and log directories a crashed run left.

    With a prefix: everything named with that prefix.  Without: everything of the
    default family (`wnl...`) whose creating process no longer exists.
    """
    if prefix is None:
        family = re.compile(rf"{FAMILY}[0-9a-z]{{{_PID_WIDTH}}}[0-9a-z]+(-[a-z0-9_]+|g[0-9]+)")

        def ours(name: str) -> bool:
            return family.fullmatch(name) is not None and _owner_dead(name)
    else:
        exact = re.compile(rf"{re.escape(prefix)}(-[a-z0-9_]+|g[0-9]+)")

        def ours(name: str) -> bool:
            return exact.fullmatch(name) is not None

    for pid, ifname in _wireguard_processes().items():
        if ours(ifname):
            _kill_pids([pid])
    for nsname in netns_list():
        if ours(nsname):
            _remove_namespace(nsname)
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):  # the labs' log directories, `<prefix>-XXXXXXXX`
        path = os.path.join(tmp, entry)
        if ours(entry) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(UAPI_SOCKET_DIR):
            if entry.endswith(".sock") and ours(entry[: -len(".sock")]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(UAPI_SOCKET_DIR, entry))


@atexit.register
def _cleanup_at_exit() -> None:
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.cleanup()


# -- the helper programs run inside namespaces (the test's own interpreter) --------

_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, src = s.recvfrom(65535)
    s.sendto(("%s:%d" % src).encode(), src)
"""

_UDP_EXCHANGE = r"""
import json, socket, sys, time
spec = json.loads(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", spec["source_port"]))
targets = {"%s:%d" % (ip, port): (ip, port) for ip, port in spec["targets"]}
answers = {name: None for name in targets}
deadline = time.monotonic() + spec["timeout"]
next_send = 0.0
while time.monotonic() < deadline and any(v is None for v in answers.values()):
    now = time.monotonic()
    if now >= next_send:
        for name, addr in targets.items():
            if answers[name] is None:
                s.sendto(spec["payload"].encode(), addr)
        next_send = now + 0.25
    s.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
    try:
        data, src = s.recvfrom(65535)
    except socket.timeout:
        continue
    name = "%s:%d" % src
    if name in answers and answers[name] is None:
        answers[name] = data.decode(errors="replace")
answers["local"] = "%s:%d" % s.getsockname()
print(json.dumps(answers))
"""

_UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[4])))
for _ in range(int(sys.argv[5])):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

_UDP_LISTEN = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
got = []
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        data, src = s.recvfrom(65535)
    except socket.timeout:
        break
    got.append(["%s:%d" % src, data.decode(errors="replace")])
print(json.dumps(got))
"""
