"""The suite's leak check (tests/leakcheck.py) fires: each spelling of a
recorded key, in text, files, byte strings and log events (text and JSON), and
keys made by `wg genkey` in a subprocess or found in a testbed's configuration
are recorded.  Each test leaks on purpose and takes its leaks back."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator

import leakcheck
import pytest
from twisted.logger import Logger

from tests.helpers import new_secret


@pytest.fixture
def secret() -> Iterator[bytes]:
    """A recorded key; the leaks the test provokes are taken back afterwards."""
    raw = new_secret()
    before = len(leakcheck.leaks)
    try:
        yield raw
    finally:
        provoked = leakcheck.leaks[before:]
        del leakcheck.leaks[before:]
        leakcheck.forget_secret(raw)
        # A leak report never prints the key itself, in any spelling.
        assert leakcheck.check_text(" ".join(provoked), "the leak reports")


def test_every_spelling_of_a_key_is_found_in_text(secret):
    standard = base64.b64encode(secret).decode()
    forms = {
        "base64": f"private_key = {standard}",
        "unpadded base64": f"key={standard.rstrip('=')}.",
        "URL-safe base64": base64.urlsafe_b64encode(secret).decode(),
        "hex (UAPI)": f"private_key={secret.hex()}\n",
        "upper-case hex": secret.hex().upper(),
        "a repr": f"PeerState(psk={secret!r})",
        "a repr in JSON": json.dumps({"psk": repr(secret)}),
        "raw bytes as latin-1 text": secret.decode("latin-1"),
        "raw bytes as Twisted's JSON writes them": json.dumps(secret.decode("latin-1")),
    }
    assert leakcheck.check_text(
        "public keys only: " + base64.b64encode(os.urandom(32)).decode(), "a clean text"
    )
    for name, text in forms.items():
        assert not leakcheck.check_text(text, name), f"{name} was not found"


def test_raw_bytes_and_text_spellings_are_found_in_files_and_byte_strings(secret, tmp_path):
    assert not leakcheck.check_text(b"\x00header" + secret + b"trailer", "a byte string")
    (tmp_path / "state.bin").write_bytes(b"..." + secret)
    (tmp_path / "daemon-a.log").write_text(f"oops {base64.b64encode(secret).decode()}\n")
    (tmp_path / "clean.log").write_text("nothing\n")
    before = len(leakcheck.leaks)
    assert not leakcheck.check_directory(str(tmp_path), "a lab")
    found = leakcheck.leaks[before:]
    assert sorted(line.rsplit(": ", 1)[1] for line in found) == ["daemon-a.log", "state.bin"]


def test_a_key_in_a_log_field_the_format_does_not_name_is_found(secret):
    """The text log shows only the fields its format names; the JSON log
    (--log-format json) writes every field: the observer searches both."""
    log = Logger(namespace="leakcheck.test")
    before = len(leakcheck.leaks)
    log.info("peer updated", secret=base64.b64encode(secret).decode())
    assert len(leakcheck.leaks) == before + 1
    assert "a Twisted log event (leakcheck.test)" in leakcheck.leaks[-1]
    log.info("peer updated", raw=secret)  # bytes: eventAsJSON writes them as \\u00XX escapes
    assert len(leakcheck.leaks) == before + 2
    log.info("nothing secret here", count=3)
    assert len(leakcheck.leaks) == before + 2


def test_a_key_made_by_wg_genkey_in_a_subprocess_is_recorded(tmp_path, monkeypatch):
    """Any test that runs `wg genkey` or `wg genpsk` through subprocess.run (the
    kernel tests do) has its key recorded: here a stand-in `wg` on PATH."""
    key = base64.b64encode(os.urandom(32)).decode()
    fake = tmp_path / "wg"
    fake.write_text(f"#!/bin/sh\necho {key}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    before = len(leakcheck.leaks)
    try:
        out = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout
        assert out.strip() == key
        assert not leakcheck.check_text(f"psk {key}", "a test's output")
        out = subprocess.check_output(["wg", "genkey"])  # bytes, through run too
        assert not leakcheck.check_text(out, "a byte string")
    finally:
        del leakcheck.leaks[before:]
        leakcheck.forget_secret(key)


def test_the_keys_of_a_wg_quick_configuration_are_recorded():
    """What test_compose.py does with the testbed's key volume and devices."""
    private, psk = os.urandom(32), os.urandom(32)
    config = (
        "[Interface]\nPrivateKey = {}\nAddress = 192.0.2.2/24\n\n"
        "[Peer]\nPublicKey = {}\nPresharedKey={}\nAllowedIPs = 192.0.2.0/24\n"
    ).format(*(base64.b64encode(k).decode() for k in (private, os.urandom(32), psk)))
    before = len(leakcheck.leaks)
    try:
        assert leakcheck.record_secrets_in_config(config) == 2
        assert not leakcheck.check_text(private.hex(), "a dump")
        assert not leakcheck.check_text(psk.hex(), "a dump")
        shown = f"peerkey\t{base64.b64encode(psk).decode()}\nother\t(none)\n"
        assert leakcheck.record_secrets_in_wg_show(shown) == 1
    finally:
        del leakcheck.leaks[before:]
        leakcheck.forget_secret(private)
        leakcheck.forget_secret(psk)
