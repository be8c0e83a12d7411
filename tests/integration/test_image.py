"""The image keeps nothing secret that sat in the build directory.

A copy of this tree (the files git knows, as they are in the working tree) gets
WireGuard configurations and key files planted where a user might leave them: a
wg0.conf at the top, a private.key, a *.key in a subdirectory, others inside the
package and beside the Docker scripts.  The image is built from that copy the
way the testbed builds it (scripts/docker-build.sh), then every layer of
`docker save` is searched for those files by name and for the planted secret's
bytes (base64, hex and raw), and `docker history` and the image's configuration
for the secret.  A COPY of the build directory in the final image (even one
removed again by a later layer) fails this test.
"""

from __future__ import annotations

import base64
import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_compose import docker_unavailable, skip_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "wgnat-planted-secrets:test"
# Where a user might leave keys and configurations in the build directory.
PLANTED = (
    "wg0.conf",
    "private.key",
    "keys/planted-hub.key",
    "wgnat/wg0.conf",
    "wgnat/client/planted-peer.key",
    "docker/wg0.conf",
    "twisted/planted.key",
)
PLANTED_NAMES = {os.path.basename(path) for path in PLANTED}


def tree_copy(destination: str) -> None:
    """The files git knows (tracked, and new ones it does not ignore), as they are
    in the working tree."""
    listed = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in (entry.decode() for entry in listed if entry):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def spellings(key: bytes) -> list[bytes]:
    return [base64.b64encode(key), key.hex().encode(), key]


def layer_files(saved: str) -> Iterator[tuple[str, str, bytes]]:
    """(layer, path, content) of every regular file in every layer of a
    `docker save` archive (Docker's layout or OCI's, compressed or not)."""
    with tarfile.open(saved) as outer:
        for member in outer:
            if not member.isfile() or member.name.endswith((".json", "repositories")):
                continue
            handle = outer.extractfile(member)
            assert handle is not None
            data = handle.read()
            try:
                layer = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            except tarfile.TarError:
                continue  # a blob that is not a layer (an OCI index or config)
            with layer:
                for entry in layer:
                    content = b""
                    if entry.isfile():
                        extracted = layer.extractfile(entry)
                        content = extracted.read() if extracted is not None else b""
                    yield member.name, entry.name, content


@pytest.fixture(scope="module")
def planted_image(tmp_path_factory) -> Iterator[tuple[str, bytes, str]]:
    reason = docker_unavailable()
    if reason:
        skip_or_fail(reason)
    tree = tmp_path_factory.mktemp("planted") / "tree"
    tree_copy(str(tree))
    key = secrets.token_bytes(32)
    for path in PLANTED:
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".conf"):
            target.write_text(
                f"[Interface]\nPrivateKey = {base64.b64encode(key).decode()}\nListenPort = 51820\n"
            )
        else:
            target.write_text(base64.b64encode(key).decode() + "\n")
    (tree / "keys" / "planted-raw.bin").write_bytes(key)
    subprocess.run(
        [str(tree / "scripts" / "docker-build.sh"), IMAGE],
        check=True,
        env={**os.environ, "PROMETHEUS_IMAGE": "", "PYTHON": sys.executable},
    )
    try:
        yield IMAGE, key, str(tree)
    finally:
        subprocess.run(["docker", "rmi", "-f", IMAGE], capture_output=True, check=False)


def test_no_key_or_configuration_from_the_build_directory_in_any_layer(planted_image, tmp_path):
    image, key, _ = planted_image
    forms = spellings(key)
    saved = str(tmp_path / "image.tar")
    with open(saved, "wb") as out:
        subprocess.run(["docker", "save", image], stdout=out, check=True)
    found = []
    layers = set()
    files = 0
    for layer, path, content in layer_files(saved):
        layers.add(layer)
        files += 1
        name = os.path.basename(path.rstrip("/"))
        if name in PLANTED_NAMES or name == "planted-raw.bin":
            found.append(f"{path} (layer {layer})")
        elif any(form in content for form in forms):
            found.append(f"the planted secret in {path} (layer {layer})")
    assert files > 1000, f"only {files} files in {len(layers)} layers: not the image's layers"
    assert not found, "from the build directory in the image:\n" + "\n".join(found)
    history = subprocess.run(
        ["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
        capture_output=True,
        check=True,
    ).stdout
    inspected = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, check=True
    ).stdout
    for text, where in ((history, "docker history"), (inspected, "the image's configuration")):
        assert not any(form in text for form in forms[:2]), f"the planted secret in {where}"


def test_the_build_context_is_only_what_the_build_needs(planted_image, tmp_path):
    """.dockerignore is an allow-list: the planted files never reach the builder
    (nor its cache), whatever the Dockerfile copies."""
    image, _, tree = planted_image
    dockerfile = tmp_path / "Dockerfile.context"
    dockerfile.write_text(f"FROM {image}\nCOPY . /context\n")
    probe = "wgnat-build-context:test"
    try:
        subprocess.run(
            ["docker", "build", "-q", "-f", str(dockerfile), "-t", probe, tree],
            capture_output=True,
            check=True,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        listed = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "find",
                probe,
                "/context",
                "-type",
                "f",
            ],
            capture_output=True,
            check=True,
            text=True,
        ).stdout.split()
    finally:
        subprocess.run(["docker", "rmi", "-f", probe], capture_output=True, check=False)
    sent = sorted(os.path.relpath(path, "/context") for path in listed)
    allowed = re.compile(
        r"(pyproject\.toml|README\.md|LICENSE|wgnat/.*\.py|twisted/plugins/wgnat_plugins\.py"
        r"|build/docker-wheels/[^/]+\.whl|docker/[^/]+\.sh)"
    )
    assert "wgnat/__init__.py" in sent and "docker/entrypoint.sh" in sent, sent
    unexpected = [path for path in sent if not allowed.fullmatch(path)]
    assert not unexpected, f"sent to the builder beyond what it needs: {unexpected}"
