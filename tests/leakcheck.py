"""A leak check across the whole suite (a pytest plugin; tests/conftest.py loads
it with `pytest_plugins = ["leakcheck"]`).

Every private or preshared key a test creates is recorded here (`record_secret`),
wherever it is made:

- `wg genkey` / `wg genpsk` run by any test through `subprocess.run` (or
  `check_output`): the plugin wraps it for the session, so the kernel tests and
  the device tests are covered as well as tests/netns.py's labs;
- keys made in-process: `tests/helpers.py` `new_secret()` / `secret_b64()`
  record what they return, and fixed test keys are recorded where defined
  (tests/test_uapi_protocol.py);
- the Compose testbed's keys, read back from its containers (the devices and the
  key volume's configurations) as soon as it is up, and its containers' logs
  checked before teardown (tests/integration/test_compose.py).

Public keys are not secrets and are never recorded.  Then every text a test can
see is searched for every recorded key in each of its spellings: base64 (with
and without padding, standard and URL-safe), hex (lower and upper case, the UAPI
spelling), the repr of the raw bytes (`b'\\x8f...'` as a traceback or a `{!r}`
would show it), the raw bytes themselves (in files and byte strings), and those
forms as JSON escapes them:

- what each test phase captured: stdout, stderr, log records, and the failure
  report itself (pytest_runtest_makereport);
- every Twisted log event of the code run in-process (a global observer), both
  as the text log shows it and as the JSON log serialises it (`eventAsJSON`,
  what `--log-format json` writes: every field, named in the format or not);
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
import json
import os
import re
import subprocess
from typing import Any

import pytest

_texts: dict[str, int] = {}  # every text spelling of a key -> its rank (1, 2, ...)
_raws: dict[bytes, int] = {}  # every byte spelling of a key -> its rank
_count = 0
_patterns: tuple[re.Pattern[str], re.Pattern[bytes]] | None = None
leaks: list[str] = []


def spellings(raw: bytes) -> tuple[set[str], set[bytes]]:
    """Every form in which a 32-byte key could show up: as text, and as bytes."""
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    inner_repr = repr(raw)[2:-1]
    charmap = raw.decode("latin-1")
    texts = {
        standard,
        standard.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
        raw.hex(),
        raw.hex().upper(),
        inner_repr,
        json.dumps(inner_repr)[1:-1],  # a repr inside a JSON string
        json.dumps(charmap)[1:-1],  # raw bytes as eventAsJSON writes them
        charmap,  # raw bytes decoded as latin-1 (or Twisted's "charmap")
    }
    texts = {text for text in texts if len(text) >= 32}
    return texts, {raw, *(text.encode("utf-8", "surrogateescape") for text in texts)}


def record_secret(key: str | bytes) -> None:
    """Remember a private or preshared key: base64 text as `wg genkey` prints it,
    or the raw 32 bytes."""
    global _count, _patterns
    text = ""
    if isinstance(key, bytes) and len(key) == 32:
        raw = key
    else:
        text = (key.decode("ascii", "replace") if isinstance(key, bytes) else key).strip()
        if not text:
            return
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
    if len(raw) == 32:
        texts, raws = spellings(raw)
    else:  # not a key as WireGuard spells one: search for the text as it is
        texts, raws = {text}, {text.encode()}
        raw = text.encode()
    if raw in _raws:
        return
    _count += 1
    for text in texts:
        _texts[text] = _count
    for spelled in raws:
        _raws[spelled] = _count
    _patterns = None


def forget_secret(key: str | bytes) -> None:
    """For the leak check's own test: drop a key recorded on purpose."""
    global _patterns
    raw = key if isinstance(key, bytes) else base64.b64decode(key.strip())
    rank = _raws.get(raw)
    if rank is None:
        return
    for text in [t for t, r in _texts.items() if r == rank]:
        del _texts[text]
    for spelled in [s for s, r in _raws.items() if r == rank]:
        del _raws[spelled]
    _patterns = None


def secrets_recorded() -> int:
    return len(set(_raws.values()))


def _compiled() -> tuple[re.Pattern[str], re.Pattern[bytes]]:
    global _patterns
    if _patterns is None:
        # One alternation per kind: one pass over a text whatever the number of keys.
        longest_first = sorted(_texts, key=len, reverse=True)
        _patterns = (
            re.compile("|".join(re.escape(t) for t in longest_first)),
            re.compile(b"|".join(re.escape(r) for r in sorted(_raws, key=len, reverse=True))),
        )
    return _patterns


def find(content: str | bytes) -> list[int]:
    """The ranks of the recorded keys that appear in `content`, in any spelling.
    Overlapping spellings are all found: each match is searched again from the
    next character."""
    if not _raws or not content:
        return []
    text_pattern, bytes_pattern = _compiled()
    ranks: set[int] = set()
    if isinstance(content, bytes):
        pattern: Any = bytes_pattern
        table: Any = _raws
    else:
        pattern, table = text_pattern, _texts
    position = 0
    while (match := pattern.search(content, position)) is not None:
        ranks.add(table[match.group(0)])
        position = match.start() + 1
    return sorted(ranks)


def check_text(content: Any, where: str) -> bool:
    """Record a leak for every recorded key in `content` (text or bytes); True
    when clean."""
    if not content:
        return True
    if not isinstance(content, (str, bytes)):
        content = str(content)
    ranks = find(content)
    for rank in ranks:
        leaks.append(f"secret #{rank} appeared in {where}")
    return not ranks


def check_directory(path: str, where: str) -> bool:
    """Check every file under `path` (a lab's logs, state files) before it goes."""
    clean = True
    if not _raws:
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


_CONFIG_SECRET = re.compile(r"^\s*(?:PrivateKey|PresharedKey)\s*=\s*(\S+)\s*$", re.M | re.I)


def record_secrets_in_config(text: str) -> int:
    """Record every PrivateKey/PresharedKey of a wg-quick style configuration
    (what the Compose testbed's keygen writes to its volume); returns how many."""
    found = _CONFIG_SECRET.findall(text)
    for key in found:
        record_secret(key)
    return len(found)


def record_secrets_in_wg_show(text: str) -> int:
    """Record the keys `wg show IFACE private-key` or `... preshared-keys` print
    (one per line, the preshared key last on its line; "(none)" skipped)."""
    count = 0
    for line in text.splitlines():
        words = line.split()
        if words and words[-1] != "(none)":
            record_secret(words[-1])
            count += 1
    return count


# -- keys made by subprocess ---------------------------------------------------

_real_run = subprocess.run


def _makes_a_key(argv: Any) -> bool:
    if isinstance(argv, (str, bytes)) or not argv:
        return False
    words = [os.path.basename(str(argv[0])), *(str(a) for a in list(argv)[1:2])]
    return words in (["wg", "genkey"], ["wg", "genpsk"])


def _recording_run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run, recording what `wg genkey` and `wg genpsk` print."""
    result = _real_run(*args, **kwargs)
    argv = args[0] if args else kwargs.get("args")
    if _makes_a_key(argv) and result.returncode == 0 and result.stdout:
        record_secret(result.stdout)
    return result


# -- the plugin ----------------------------------------------------------------


def _twisted_observer(event: dict[str, Any]) -> None:
    if not _raws:
        return
    from twisted.logger import eventAsJSON, formatEvent

    # The text log shows only the fields its format names; the JSON log writes
    # every field (a key passed as an unnamed field reaches it): search both.
    text = formatEvent(event)
    try:
        text += "\n" + eventAsJSON(dict(event))  # a copy: eventAsJSON flattens in place
    except Exception as exc:  # a log event must never break the test that logged it
        text += f"\n{event!r}\n(eventAsJSON failed: {exc.__class__.__name__})"
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    check_text(text, f"a Twisted log event ({event.get('log_namespace', '?')})")


def pytest_configure(config: pytest.Config) -> None:
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(_twisted_observer)
    subprocess.run = _recording_run  # type: ignore[assignment]


def pytest_unconfigure(config: pytest.Config) -> None:
    from twisted.logger import globalLogPublisher

    globalLogPublisher.removeObserver(_twisted_observer)
    subprocess.run = _real_run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not _raws:
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
    else:
        terminalreporter.write_line(
            f"leak check: {secrets_recorded()} private/preshared keys recorded, none leaked"
        )
