"""A leak check across the whole suite (a pytest plugin; tests/conftest.py loads
it with `pytest_plugins = ["leakcheck"]`).

Every private or preshared key a test harness generates is recorded here
(`record_secret`: tests/netns.py records `wg genkey` and `wg genpsk` outputs;
the unit tests only ever create public keys).  Then every text a test can see
is searched for those keys, in base64 and in hex (the UAPI spelling):

- what each test phase captured: stdout, stderr, log records, and the failure
  report itself (pytest_runtest_makereport);
- every Twisted log event of the daemons run in-process (a global observer);
- the output of every command the namespace labs run without `hide_stdout`
  (API answers, metrics and `wgnat status` fetched from inside a namespace), the
  files of each lab's temporary directory at cleanup (wireguard-go and daemon
  logs, state files) and tests/integration/meshlab.py's failure report;
  tests/netns.py and meshlab.py call `check_text` / `check_directory`.

A leak fails the session at its end (exit status 1), listing where each key
appeared; the keys themselves are never printed, only their rank in the record.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

import pytest

_secrets: dict[str, int] = {}  # every spelling of a key -> its rank (1, 2, ...)
_count = 0
leaks: list[str] = []


def record_secret(text: str) -> None:
    """Remember a private or preshared key (base64, as `wg genkey` prints it)."""
    global _count
    key = text.strip()
    if not key:
        return
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if key in _secrets:
        return
    _count += 1
    _secrets[key] = _count
    if len(raw) == 32:
        _secrets[raw.hex()] = _count


def forget_secret(text: str) -> None:
    """For the leak check's own test: drop a key recorded on purpose."""
    rank = _secrets.get(text.strip())
    for spelling in [s for s, r in _secrets.items() if r == rank]:
        del _secrets[spelling]


def secrets_recorded() -> int:
    return len(set(_secrets.values()))


def find(text: str) -> list[int]:
    """The ranks of the recorded keys that appear in `text`."""
    if not _secrets or not text:
        return []
    return sorted({rank for secret, rank in _secrets.items() if secret in text})


def check_text(text: Any, where: str) -> bool:
    """Record a leak for every recorded key in `text`; True when clean."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    ranks = find(str(text)) if text else []
    for rank in ranks:
        leaks.append(f"secret #{rank} appeared in {where}")
    return not ranks


def check_directory(path: str, where: str) -> bool:
    """Check every file under `path` (a lab's logs, state files) before it goes."""
    clean = True
    if not _secrets:
        return clean
    for directory, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            try:
                with open(full, "rb") as handle:
                    content = handle.read(64 * 1024 * 1024)
            except OSError:
                continue
            clean &= check_text(content, f"{where}: {os.path.relpath(full, path)}")
    return clean


# -- the plugin ----------------------------------------------------------------


def _twisted_observer(event: dict[str, Any]) -> None:
    if not _secrets:
        return
    from twisted.logger import formatEvent

    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    check_text(text, f"a Twisted log event ({event.get('log_namespace', '?')})")


def pytest_configure(config: pytest.Config) -> None:
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(_twisted_observer)


def pytest_unconfigure(config: pytest.Config) -> None:
    from twisted.logger import globalLogPublisher

    globalLogPublisher.removeObserver(_twisted_observer)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not _secrets:
        return
    for title, content in report.sections:
        check_text(content, f"{item.nodeid}: {title}")
    if report.longrepr is not None:
        check_text(report.longreprtext, f"{item.nodeid}: the {report.when} failure report")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if leaks and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if leaks:
        terminalreporter.section("leak check: FAILED", sep="=", red=True, bold=True)
        for line in dict.fromkeys(leaks):
            terminalreporter.write_line(line)
    elif secrets_recorded():
        terminalreporter.write_line(
            f"leak check: {secrets_recorded()} private/preshared keys recorded, none leaked"
        )
