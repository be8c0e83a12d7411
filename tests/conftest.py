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


class LostErrors:
    """Collects the failures Twisted reports as "Unhandled error in Deferred"
    (it does so only when such a Deferred is garbage collected)."""

    def __init__(self) -> None:
        self.tracebacks: list[str] = []

    def __call__(self, event: dict) -> None:
        failure = event.get("log_failure")
        if failure is not None and event.get("log_namespace") == "twisted.internet.defer":
            self.tracebacks.append(failure.getTraceback())

    def __enter__(self) -> LostErrors:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        from twisted.logger import globalLogPublisher

        gc.collect()
        globalLogPublisher.removeObserver(self)


@pytest.fixture(autouse=True)
def no_unhandled_errors_in_deferreds(request):
    """Fail any test that leaves a Deferred holding an unhandled error: a lost
    failure is a bug that says nothing useful in production.  (The test of this
    guard itself is marked `loses_errors_on_purpose`.)"""
    if request.node.get_closest_marker("loses_errors_on_purpose"):
        yield
        return
    with LostErrors() as lost:
        yield
    if lost.tracebacks:
        pytest.fail("unhandled error in a Deferred:\n" + "\n".join(lost.tracebacks), pytrace=False)


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


def pytest_collection_finish(session: pytest.Session) -> None:
    # Every module is imported by now: set those objects aside, so that the
    # full collection after each test (no_unhandled_errors_in_deferreds) scans
    # only what tests create (0.05 s a test otherwise).
    import gc

    gc.collect()
    gc.freeze()


# The end-to-end tests take minutes each: a line as each starts and ends, so a
# run (CI's log among them) is not silent for minutes at a time.
SLOW_KINDS = ("docker", "integration", "kernel")


def _progress(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(text)
        reporter.flush()  # a pipe or a file (CI's log) is block-buffered


def pytest_runtest_setup(item: pytest.Item) -> None:
    if any(kind in item.keywords for kind in SLOW_KINDS):
        import time

        _progress(item.config, f"{time.strftime('%H:%M:%S')} start {item.nodeid}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" or not any(kind in report.keywords for kind in SLOW_KINDS):
        return
    import time

    _progress(
        _CONFIG[0],
        f"{time.strftime('%H:%M:%S')} {report.outcome} {report.nodeid} ({report.duration:.0f} s)",
    )


_CONFIG: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG.append(config)
