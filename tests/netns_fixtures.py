"""The `lab` fixture: a function-scoped namespace Lab, always cleaned up.

Import it where it is needed (`from netns_fixtures import lab`), or re-export it
from conftest.py.  Set WGNAT_LAB_KEEP_LOGS=1 to keep the wireguard-go logs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns import Lab, cleanup_leftovers


@pytest.fixture
def lab() -> Iterator[Lab]:
    cleanup_leftovers()  # namespaces of crashed earlier runs (their pid is gone)
    instance = Lab()
    try:
        yield instance
    finally:
        instance.cleanup()
