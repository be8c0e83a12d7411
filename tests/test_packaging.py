"""The wheel as users install it: the twistd plugin ships, Twisted's plugin package
is not shadowed, and both ways to run (console scripts, twistd) work from a fresh
virtualenv.  Slow (a wheel build and an install, dependencies from pip's cache or
the package index): deselect with `-m "not slow"`.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/wgnat_plugins.py"


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build from a copy of the tree, so the build leaves nothing in the checkout and a
    stale egg-info or build/ there cannot leak in.  The copy carries a dropin.cache,
    as twistd leaves one next to the plugin, to prove it is not packaged."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "dropin.cache")
    for name in ("pyproject.toml", "README.md", "LICENSE", "wgnat", "twisted"):
        path = SOURCE / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, source / name)
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale pickle")
    out = root / "dist"
    checked(
        run(
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
            "--wheel-dir", out, source,
            cwd=root,
        )
    )  # fmt: skip
    [built] = out.glob("wgnat-*.whl")
    return built


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
    assert not [name for name in names if name.endswith("dropin.cache")]
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if name.startswith("tests/")]
    for module in ("wgnat/__init__.py", "wgnat/cli.py", "wgnat/registry/tap.py"):
        assert module in names
    assert "wgnat/client/tap.py" in names
    assert "wgnat/device/netlink.py" in names


def test_wheel_declares_the_console_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "wgnat-server = wgnat.cli:server_main" in text
    assert "wgnat-client = wgnat.cli:client_main" in text


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


def test_twistd_plugin_help(venv: Path, tmp_path: Path) -> None:
    result = run(venv / "bin" / "twistd", "wgnat-client", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--registry" in result.stdout


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
