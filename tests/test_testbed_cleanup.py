"""compose/testbed.py's account of what `make demo-down` leaves and what `make
demo-clean` removes, against a stand-in Docker client (no engine needed)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import docker.errors
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compose"))
import testbed


class FakeImages:
    def __init__(self, sizes: dict[str, int], parents: dict[str, str]) -> None:
        self.sizes = dict(sizes)
        self.parents = parents  # image -> the image it was built on
        self.removed: list[str] = []

    def get(self, name: str) -> Any:
        if name not in self.sizes:
            raise docker.errors.ImageNotFound(f"no such image: {name}")
        return type("Image", (), {"attrs": {"Size": self.sizes[name]}})()

    def remove(self, name: str) -> None:
        # As Docker by ID: an image that another is built on cannot go first.
        if any(self.parents.get(other) == name for other in self.sizes):
            raise docker.errors.APIError("conflict", explanation="image has dependent child images")
        del self.sizes[name]
        self.removed.append(name)


class FakeDocker:
    def __init__(self, sizes: dict[str, int], build_cache: list[Any] | None = None) -> None:
        self.images = FakeImages(
            sizes,
            {
                "wgnat-prometheus:latest": "wgnat:latest",
                "wgnat:latest": "wgnat-base:bookworm",
            },
        )
        self.build_cache = build_cache or []

    def df(self) -> dict[str, Any]:
        return {"BuildCache": self.build_cache}


ALL = {
    "wgnat-prometheus:latest": 326_000_000,
    "wgnat:latest": 276_000_000,
    "wgnat-base:bookworm": 117_000_000,
}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wheels = tmp_path / "build" / "docker-wheels"
    wheels.mkdir(parents=True)
    (wheels / "wgnat-0.1.0-py3-none-any.whl").write_bytes(b"x" * 2_000_000)
    monkeypatch.setattr(testbed, "WHEELS_DIR", str(wheels))
    monkeypatch.setattr(testbed, "VENV_DIR", str(tmp_path / ".venv"))
    return tmp_path


def test_down_names_each_thing_left_and_how_to_remove_it(tree: Path) -> None:
    (tree / ".venv").mkdir()
    text = testbed.leftovers(FakeDocker(ALL, build_cache=[{"ID": "x"}]))
    assert "326 MB on disk in all" in text
    for name in ALL:
        assert name in text
    assert "build/docker-wheels (2 MB)" in text
    assert "make demo-clean" in text
    assert "docker builder prune" in text
    assert ".venv (0 MB)" in text and "make clean" in text


def test_down_after_clean_names_no_image_nor_wheels(tree: Path) -> None:
    shutil.rmtree(testbed.WHEELS_DIR)
    text = testbed.leftovers(FakeDocker({}))
    assert "images" not in text
    assert "docker-wheels" not in text
    assert "demo-clean" not in text
    assert "builder prune" not in text


def test_clean_removes_the_images_top_first_and_the_wheels(tree: Path) -> None:
    client = FakeDocker(ALL)
    bed = testbed.Testbed(docker=client, compose=["true"])
    text = testbed.remove_builds(bed)
    assert client.images.removed == [
        "wgnat-prometheus:latest",
        "wgnat:latest",
        "wgnat-base:bookworm",
    ]
    assert not os.path.exists(testbed.WHEELS_DIR)
    assert text.startswith("removed wgnat-prometheus:latest (326 MB)")
    assert "build/docker-wheels (2 MB)" in text
    assert testbed.remove_builds(bed) == "removed nothing: no image nor wheels were left"


def test_clean_says_what_holds_an_image(tree: Path) -> None:
    client = FakeDocker(ALL)
    client.images.parents["other:latest"] = "wgnat-base:bookworm"
    client.images.sizes["other:latest"] = 1  # someone's image on our base
    bed = testbed.Testbed(docker=client, compose=["true"])
    with pytest.raises(RuntimeError, match="cannot remove wgnat-base:bookworm: image has"):
        testbed.remove_builds(bed)
