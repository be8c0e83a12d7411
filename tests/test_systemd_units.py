"""contrib/systemd: the templated units (wgnat-client@.service, wgnat-server@.service)
and their settings file.  systemd itself checks them where `systemd-analyze` runs;
everywhere, the keys they depend on are read from the files, and their ExecStart
line is run through sh (as systemd would, with a stand-in twistd) to see the
command it starts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
CLIENT = UNITS / "wgnat-client@.service"
SERVER = UNITS / "wgnat-server@.service"
DEFAULTS = UNITS / "wgnat.default"
KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists, in order: a key may repeat
    (EnvironmentFile=, After=), which configparser does not allow."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [value for name, value in parse_unit(path)[section] if name == key]


def value(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= set {len(found)} times"
    return found[0]


def test_only_the_templated_units_ship() -> None:
    # The per-interface templates replace the units that were fixed on wg0.
    assert sorted(p.name for p in UNITS.glob("*.service")) == [
        "wgnat-client@.service",
        "wgnat-server@.service",
    ]


@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_unit_runs_twistd_on_its_instances_interface(unit: Path) -> None:
    daemon = unit.name.split("@")[0]
    exec_start = value(unit, "Service", "ExecStart")
    assert f"exec twistd -n --pidfile= {daemon} -i %i " in exec_start
    assert value(unit, "Service", "Type") == "simple"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_unit_follows_wg_quick_on_the_same_interface(unit: Path) -> None:
    assert values(unit, "Unit", "BindsTo") == ["wg-quick@%i.service"]
    after = " ".join(values(unit, "Unit", "After")).split()
    assert "wg-quick@%i.service" in after


@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_unit_reads_optional_settings_files_global_then_per_interface(unit: Path) -> None:
    assert values(unit, "Service", "EnvironmentFile") == [
        "-/etc/default/wgnat",
        "-/etc/default/wgnat-%i",
    ]


@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_unit_keeps_its_hardening(unit: Path) -> None:
    assert value(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_ADMIN"
    assert value(unit, "Service", "AmbientCapabilities") == "CAP_NET_ADMIN"
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    assert value(unit, "Service", "ProtectSystem") == "strict"
    assert value(unit, "Service", "ProtectHome") == "yes"
    assert value(unit, "Service", "PrivateTmp") == "yes"
    families = value(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    # Instances share /run/wgnat (one status socket each): one stopping must not
    # remove the others' sockets.
    assert value(unit, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_server_may_hold_a_connection_per_client() -> None:
    assert int(value(SERVER, "Service", "LimitNOFILE")) >= 65536


@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_units_name_no_placeholder_address(unit: Path) -> None:
    # No address until the project has a real one (then here and in pyproject.toml's
    # [project.urls] together): the one these units had led nowhere.
    assert values(unit, "Unit", "Documentation") == []
    assert "http" not in unit.read_text()


# -- what ExecStart starts ---------------------------------------------------------
def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads these (no quotes used)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, val = line.partition("=")
            found[key] = val
    return found


def run_exec_start(
    unit: Path, interface: str, settings: list[dict[str, str]], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """ExecStart with systemd's own substitutions made (%i the instance, `$$` a `$`),
    split into words as systemd does for a quoted line, and run with the settings'
    environment and a stand-in twistd that prints the arguments it got."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "twistd"
    fake.write_text(
        "#!/bin/sh\nexec python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"
    )
    fake.chmod(0o755)
    line = value(unit, "Service", "ExecStart").replace("%i", interface).replace("$$", "$")
    argv = shlex.split(line)
    environment = {"PATH": f"{bindir}:/usr/bin:/bin"}
    for layer in settings:  # later files win, as with two EnvironmentFile= lines
        environment.update(layer)
    return subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=30)


def test_client_exec_start_with_the_shipped_settings_and_a_per_interface_file(
    tmp_path: Path,
) -> None:
    shipped = read_environment_file(DEFAULTS)
    per_interface = {"WGNAT_REGISTRY_KEY": KEY, "WGNAT_CLIENT_FLAGS": "--accept-routes 10.1.0.0/16"}
    result = run_exec_start(CLIENT, "wg1", [shipped, per_interface], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "-n", "--pidfile=", "wgnat-client", "-i", "wg1", "-r", KEY,
        "--state-dir", "/var/lib/wgnat", "--accept-routes", "10.1.0.0/16",
    ]  # fmt: skip


def test_client_without_a_key_says_where_to_set_it(tmp_path: Path) -> None:
    result = run_exec_start(CLIENT, "wg0", [read_environment_file(DEFAULTS)], tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "WGNAT_REGISTRY_KEY" in result.stderr
    assert "/etc/default/wgnat or /etc/default/wgnat-wg0" in result.stderr


def test_server_exec_start_with_no_settings_and_with_flags(tmp_path: Path) -> None:
    bare = run_exec_start(SERVER, "wg0", [], tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert json.loads(bare.stdout) == [
        "-n", "--pidfile=", "wgnat-server", "-i", "wg0", "--state-dir", "/var/lib/wgnat",
    ]  # fmt: skip
    flags = {"WGNAT_SERVER_FLAGS": "--metrics-listen 10.0.0.1:9587 --log-format json"}
    result = run_exec_start(SERVER, "wg0", [read_environment_file(DEFAULTS), flags], tmp_path)
    assert json.loads(result.stdout) == [
        "-n", "--pidfile=", "wgnat-server", "-i", "wg0", "--state-dir", "/var/lib/wgnat",
        "--metrics-listen", "10.0.0.1:9587", "--log-format", "json",
    ]  # fmt: skip


# -- systemd's own check -----------------------------------------------------------
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
WG_QUICK_UNIT = "wg-quick@.service"


def system_has_unit(name: str) -> bool:
    return any(
        Path(directory, name).exists()
        for directory in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
    )


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (Debian's systemd package has it): the units "
    "are only checked by the tests above",
)
@pytest.mark.parametrize("unit", [CLIENT, SERVER], ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # An instance (wg0) of the template, beside it: verify loads units from there.
    shutil.copy(unit, tmp_path / unit.name)
    instance = tmp_path / unit.name.replace("@.", "@wg0.")
    instance.symlink_to(unit.name)
    if not system_has_unit(WG_QUICK_UNIT):
        # wireguard-tools ships it; without it BindsTo= names a missing unit.
        (tmp_path / WG_QUICK_UNIT).write_text(
            "[Unit]\nDescription=stand-in for wireguard-tools' wg-quick@.service\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        )
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    # It warns of an unknown key or a bad value on stderr and still exits 0.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
