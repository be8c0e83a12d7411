"""Shared fixtures.  Tests that need root, namespaces and wireguard-go carry the
`realdevice` or `integration` marker and are skipped, with the reason printed,
only where those cannot run."""

from __future__ import annotations

import os
import shutil

import pytest

pytest_plugins = ["leakcheck"]  # tests/leakcheck.py: no key may leak anywhere


@pytest.fixture
def logged():
    """Every log line emitted during the test, formatted as a reader sees it."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[str] = []

    def observe(event):
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def real_network_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("wireguard-go", "wg", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make test installs it)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = real_network_unavailable()
    if reason is None:
        return
    for item in items:
        if "docker" in item.keywords:
            continue  # test_compose.py checks what it needs itself (no WireGuard on the host)
        if "realdevice" in item.keywords or "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
