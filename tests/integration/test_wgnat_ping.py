"""`wgnat ping` against real daemons and wireguard-go devices in namespaces:
a direct peer (two home NATs), a relayed one (a symmetric NAT), and a peer that
does not exist; the pings show up in the client's traffic by path.

    r1 (home)       a 192.168.1.10
    r2 (home)       c 192.168.2.10
    r3 (symmetric)  s 192.168.3.10      (relayed: a new port for every destination)
"""

from __future__ import annotations

import json
import os

import pytest
from meshlab import BIN, REGISTRY_TUNNEL, MeshLab, running, wait_until
from netns_fixtures import lab  # noqa: F401 - the fixture
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

WGNAT = os.path.join(BIN, "wgnat")


@pytest.fixture
def mesh(lab):  # noqa: F811
    m = MeshLab(lab)
    m.build_registry()
    r1 = lab.router("r1", "203.0.113.21/24", "192.168.1.0/24", "home")
    r2 = lab.router("r2", "203.0.113.22/24", "192.168.2.0/24", "home")
    r3 = lab.router("r3", "203.0.113.23/24", "192.168.3.0/24", "symmetric")
    m.add_client("a", lab.lan_host(r1, "a", "192.168.1.10/24"))
    m.add_client("c", lab.lan_host(r2, "c", "192.168.2.10/24"))
    m.add_client("s", lab.lan_host(r3, "s", "192.168.3.10/24"))
    with running(m, hub_reachable=False):
        yield m


def wgnat(mesh: MeshLab, name: str, *args: str):
    node = mesh.clients[name]
    return node.host.run(WGNAT, *args, check=False, timeout=30)


def path_of(mesh: MeshLab, name: str, other: str) -> str | None:
    """`other`'s path in `name`'s `wgnat status --json`."""
    answer = wgnat(mesh, name, "status", "-i", mesh.clients[name].wg.ifname, "--json")
    if answer.returncode not in (0, 1):  # 1: degraded, with its document all the same
        return None
    key = mesh.clients[other].wg.public_key
    for row in json.loads(answer.stdout)["peers"]:
        if row["public_key"] == key:
            return row["path"]
    return None


def metrics(mesh: MeshLab, name: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the client's /metrics."""
    text = (
        mesh.clients[name]
        .host.python(
            "import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:9588/metrics',timeout=5).read().decode())"
        )
        .stdout
    )
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sent(mesh: MeshLab, name: str, path: str) -> float:
    return metrics(mesh, name)[("wgnat_client_sent_bytes_total", (("path", path),))]


# An echo request of ping's default size is an 84-byte IP packet; WireGuard's
# counters count it encrypted (more), so 3 pings move at least this many bytes.
THREE_PINGS = 3 * 84


def test_wgnat_ping_direct_relayed_and_missing(mesh):
    mesh.start_registry()
    mesh.start_client("a", extra=("--metrics-per-peer",))
    for name in ("c", "s"):
        mesh.start_client(name)
    a, c, s = mesh.clients["a"], mesh.clients["c"], mesh.clients["s"]
    ifname = a.wg.ifname
    registry_key = mesh.registry.wg.public_key
    wait_until(lambda: mesh.direct("a", "c") and mesh.direct("c", "a"), 30, what="a-c direct")
    wait_until(lambda: path_of(mesh, "a", "s") == "relayed", 30, what="a to relay s")

    # The relayed peer first (its retry comes 1 to 10 s after the fallback).
    relayed_before, direct_before = sent(mesh, "a", "relayed"), sent(mesh, "a", "direct")
    relayed = wgnat(mesh, "a", "ping", "-i", ifname, "-c", "3", "--interval", "0.2", s.tunnel_ip)
    print(f"\n# wgnat ping {s.tunnel_ip}   (s, behind a symmetric NAT)\n{relayed.stdout}")
    assert relayed.returncode == 0, relayed.stdout + relayed.stderr + mesh.report()
    first, *rest = relayed.stdout.splitlines()
    hub = f"the registry {REGISTRY_TUNNEL} ({registry_key[:8]})"
    assert first.startswith(f"{s.tunnel_ip} ({s.wg.public_key[:8]}) is relayed through {hub}")
    if ": no direct handshake" in first:  # relayed, not already probing again
        assert "(symmetric NAT or firewall?)" in first and "; next direct attempt in " in first
    assert f"pong from {s.tunnel_ip} ({s.wg.public_key[:8]}) via {hub} in " in rest[0]
    assert rest[-1].startswith("3 pings, 3 pongs, 0 lost")

    # The direct peer, named by the start of its key as wgnat status shows it.
    direct = wgnat(mesh, "a", "ping", "-i", ifname, "-c", "3", "--interval", "0.2",
                   c.wg.public_key[:8])  # fmt: skip
    print(f"# wgnat ping {c.wg.public_key[:8]}   (c, behind a home NAT)\n{direct.stdout}")
    assert direct.returncode == 0, direct.stdout + direct.stderr + mesh.report()
    name = f"{c.tunnel_ip} ({c.wg.public_key[:8]})"
    lines = direct.stdout.splitlines()
    assert lines[0].startswith(f"{name} is direct at 203.0.113.22:51820, last handshake ")
    assert lines[1].startswith(f"pong from {name} via 203.0.113.22:51820 in ")
    assert lines[-1].startswith("3 pings, 3 pongs, 0 lost; round trip min/avg/max ")

    # The pings in the traffic by path, at the client's next device reads (a
    # path carrying data is read every 5 s), and c's own per-peer series.
    wait_until(
        lambda: (
            sent(mesh, "a", "relayed") >= relayed_before + THREE_PINGS
            and sent(mesh, "a", "direct") >= direct_before + THREE_PINGS
        ),
        20,
        interval=0.5,
        what="a's traffic metrics to count the pings",
    )
    per_peer = metrics(mesh, "a")
    c_labels = (("interface", ifname), ("public_key", c.wg.public_key))
    assert per_peer[("wgnat_client_peer_sent_bytes_total", c_labels)] >= THREE_PINGS
    path_labels = tuple(sorted((*c_labels, ("path", "direct"))))
    assert per_peer[("wgnat_client_peer_path", path_labels)] == 1.0

    # A peer that does not exist: one line, exit 1, nothing pinged.
    missing = wgnat(mesh, "a", "ping", "-i", ifname, "198.51.100.99")
    print(f"# wgnat ping 198.51.100.99   (no such peer; exit {missing.returncode})")
    print(missing.stderr)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == (
        f"wgnat ping: error: no peer '198.51.100.99' on {ifname}: give a tunnel address, "
        f"a public key or the start of one, as 'wgnat status -i {ifname}' lists them\n"
    )
