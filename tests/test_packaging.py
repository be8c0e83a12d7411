"""The package as it is released and as users install it: `python -m build` makes an
sdist and a wheel from a clean copy of the tree, `twine check` accepts both, the
sdist holds what a packager needs and nothing of a machine's, the twistd plugin
ships without shadowing Twisted's plugin package, and both ways to run (console
scripts, twistd) work from a fresh virtualenv with the one version.  Slow (a build,
whose isolated environment takes setuptools from pip's cache or the package
index, and an install): deselect with `-m "not slow"`.
"""

from __future__ import annotations

import base64
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/wgnat_plugins.py"
# What a machine leaves in a checkout and no package may carry: twistd's plugin
# cache, and WireGuard configurations and keys (a test of the copy plants them).
PLANTED = [
    "twisted/plugins/dropin.cache",
    "wg0.conf",
    "wgnat/wg0.conf",
    "contrib/systemd/wg0.conf",
    "keys/registry.key",
    "wgnat/client/private.key",
]


def source_version() -> str:
    found = re.search(
        r'^__version__ = "([^"]+)"$', (SOURCE / "wgnat" / "__init__.py").read_text(), re.M
    )
    assert found, 'wgnat/__init__.py has no __version__ = "..." line'
    return found.group(1)


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def tree_files() -> list[str]:
    """The files of a clean clone: tracked or new, not ignored (so no .venv, build/,
    egg-info or dropin.cache of this checkout)."""
    listed = subprocess.run(
        ["git", "-C", str(SOURCE), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no clean copy of the tree: {listed.stderr!r}")
    return [name for name in listed.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m build` (the sdist, then the wheel from the sdist) on a copy of the
    tree, so the build leaves nothing in the checkout and a stale egg-info or build/
    there cannot leak in.  The copy carries what a machine leaves behind (PLANTED),
    to prove none of it is packaged."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    for name in tree_files():
        path = SOURCE / name
        if path.is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    for name in PLANTED:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("planted by tests/test_packaging.py\n")
    out = root / "dist"
    checked(run(sys.executable, "-m", "build", "--outdir", out, source, cwd=root, timeout=600))
    [sdist] = out.glob("wgnat-*.tar.gz")
    [wheel] = out.glob("wgnat-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def wheel(dists: dict[str, Path]) -> Path:
    return dists["wheel"]


@pytest.fixture(scope="module")
def sdist_names(dists: dict[str, Path]) -> list[str]:
    with tarfile.open(dists["sdist"]) as archive:
        # Every name under the one top directory, wgnat-VERSION/.
        return [member.name.split("/", 1)[1] for member in archive if "/" in member.name]


def test_twine_check_accepts_both(dists: dict[str, Path], tmp_path: Path) -> None:
    """twine renders the README as the long description and checks the metadata;
    --strict: a warning (e.g. no content type for the README) fails too."""
    result = checked(
        run(
            sys.executable, "-m", "twine", "check", "--strict", dists["sdist"], dists["wheel"],
            cwd=tmp_path,
        )
    )  # fmt: skip
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_metadata_is_the_one_version_and_the_readme(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    assert metadata["Version"] == source_version()
    assert wheel.name == f"wgnat-{source_version()}-py3-none-any.whl"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().startswith("# wgnat")
    assert metadata["License-Expression"] == "MIT"
    # No address unless it is the project's real one: none yet.
    assert not metadata.get_all("Project-URL")
    assert not metadata.get("Home-page")


def test_sdist_holds_what_a_packager_needs(sdist_names: list[str]) -> None:
    for name in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        PLUGIN,
        "wgnat/__init__.py",
        "wgnat/registry/tap.py",
        "wgnat/client/tap.py",
        "contrib/systemd/wgnat-client@.service",
        "contrib/systemd/wgnat-server@.service",
        "contrib/systemd/wgnat.default",
    ):
        assert name in sdist_names, f"{name} is not in the sdist"


def test_sdist_holds_nothing_of_a_machines(sdist_names: list[str]) -> None:
    for name in PLANTED:
        assert name not in sdist_names
    assert not [n for n in sdist_names if n.endswith(("dropin.cache", ".pyc", ".key", ".conf"))]
    assert not [n for n in sdist_names if "__pycache__" in n]
    # The tests need the rest of a clone (conftest.py, compose/, docker/): none, not half.
    assert not [n for n in sdist_names if n.startswith("tests/")]
    assert "twisted/plugins/__init__.py" not in sdist_names
    assert "twisted/__init__.py" not in sdist_names


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only the wheel and its dependencies installed."""
    root = tmp_path_factory.mktemp("venv")
    target = root / "venv"
    # No pip inside (ensurepip is slow): this interpreter's pip installs into it.
    checked(run(sys.executable, "-m", "venv", "--without-pip", target, cwd=root))
    python = target / "bin" / "python"
    checked(
        run(
            sys.executable, "-m", "pip", "--python", python,
            "install", "--quiet", "--no-compile", "--disable-pip-version-check", wheel,
            cwd=root,
        )
    )  # fmt: skip
    return target


@pytest.fixture(scope="module")
def registry_key() -> str:
    if shutil.which("wg"):
        private = checked(run("wg", "genkey", cwd=Path("/"))).stdout
        return subprocess.run(
            ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
        ).stdout.strip()
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_wheel_ships_the_plugin_and_nothing_of_twisteds(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert PLUGIN in names
    twisted_files = [name for name in names if name.startswith("twisted/")]
    # Anything else under twisted/ would shadow or clobber Twisted's own files.
    assert twisted_files == [PLUGIN]
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [name for name in names if name.endswith(("dropin.cache", ".key", ".conf"))]
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if name.startswith("tests/")]
    for module in ("wgnat/__init__.py", "wgnat/cli/daemons.py", "wgnat/registry/tap.py"):
        assert module in names
    assert "wgnat/client/tap.py" in names
    assert "wgnat/device/netlink.py" in names


def test_wheel_declares_the_console_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "wgnat-server = wgnat.cli.daemons:server_main" in text
    assert "wgnat-client = wgnat.cli.daemons:client_main" in text
    assert "wgnat = wgnat.cli.wgnat:main" in text


def test_installed_package_is_the_wheels(venv: Path, tmp_path: Path) -> None:
    result = checked(
        run(
            venv / "bin" / "python", "-c",
            "import wgnat, twisted.plugins.wgnat_plugins as p; print(wgnat.__file__); "
            "print(p.__file__)",
            cwd=tmp_path,
        )
    )  # fmt: skip
    for line in result.stdout.split():
        assert Path(line).resolve().is_relative_to(venv.resolve()), line
    # Twisted's own plugins are still there: the package was not shadowed.
    [init] = list((venv / "lib").glob("python*/site-packages/twisted/plugins/__init__.py"))
    assert "twisted" in init.read_text().lower()


def test_twistd_lists_both_plugins(venv: Path, tmp_path: Path) -> None:
    result = run(venv / "bin" / "twistd", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert "wgnat-server" in commands
    assert "wgnat-client" in commands
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["wgnat-server", "wgnat-client"])
def test_console_scripts_help(venv: Path, tmp_path: Path, name: str) -> None:
    script = venv / "bin" / name
    assert script.exists()
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--interface" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("name", "flag"), [("wgnat-server", "--poll-interval"), ("wgnat-client", "--registry")]
)
def test_twistd_plugin_help(venv: Path, tmp_path: Path, name: str, flag: str) -> None:
    result = run(venv / "bin" / "twistd", name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["wgnat-server", "wgnat-client", "wgnat"])
def test_console_scripts_print_the_one_version(venv: Path, tmp_path: Path, name: str) -> None:
    result = run(venv / "bin" / name, "--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wgnat {source_version()}\n"
    assert result.stderr == ""


def test_build_info_metric_says_the_installed_version(venv: Path, tmp_path: Path) -> None:
    """What Prometheus sees (wgnat_build_info) is what pip installed."""
    script = (
        "import importlib.metadata, prometheus_client\n"
        "from wgnat.client.metrics import ClientMetrics\n"
        "from wgnat.registry.metrics import RegistryMetrics\n"
        "print(importlib.metadata.version('wgnat'))\n"
        "for metrics in (RegistryMetrics(), ClientMetrics()):\n"
        "    text = prometheus_client.generate_latest(metrics.registry).decode()\n"
        "    print(*[x for x in text.split('\\n') if x.startswith('wgnat_build_info{')])\n"
    )
    result = checked(run(venv / "bin" / "python", "-c", script, cwd=tmp_path))
    installed, *info = result.stdout.splitlines()
    assert installed == source_version()
    assert sorted(info) == [
        f'wgnat_build_info{{role="client",version="{installed}"}} 1.0',
        f'wgnat_build_info{{role="registry",version="{installed}"}} 1.0',
    ]


def test_twistd_client_missing_interface_is_one_line(
    venv: Path, tmp_path: Path, registry_key: str
) -> None:
    result = run(
        venv / "bin" / "twistd", "wgnat-client", "-i", "nosuchif", "-r", registry_key,
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("wgnat-client: error: interface nosuchif not found")
    # It failed before daemonizing: no pid file, no log file left behind.
    assert not (tmp_path / "twistd.pid").exists()
    assert not (tmp_path / "twistd.log").exists()
