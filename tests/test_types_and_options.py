"""Value types, Go durations, both daemons' Options, and the console scripts."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.python import usage

from tests.helpers import record_secret
from wgnat._types import (
    Endpoint,
    InvalidValue,
    PeerUpdate,
    PublicKey,
    parse_network,
)
from wgnat.cli.daemons import client_main, server_main
from wgnat.client import tap as client_tap
from wgnat.duration import format_go_duration, parse_go_duration
from wgnat.metrics import DEFAULT_CLIENT_METRICS, DEFAULT_SERVER_METRICS
from wgnat.options import parse_listen
from wgnat.registry import tap as server_tap

HUGE = "A" * 100_000


def assert_clear(exc: BaseException, *needles: str) -> None:
    """One short line that names what was wrong and does not echo huge input."""
    text = str(exc)
    assert text
    assert "\n" not in text
    assert len(text) < 400, text
    assert HUGE[:100] not in text
    for needle in needles:
        assert needle in text, (needle, text)


# -- PublicKey ------------------------------------------------------------------------


class TestPublicKey:
    def test_known_key(self) -> None:
        raw = bytes(range(32))
        text = base64.b64encode(raw).decode()
        key = PublicKey.from_base64(text)
        assert key.raw == raw
        assert key.base64 == str(key) == text
        assert key.hex == raw.hex()
        assert PublicKey.from_hex(raw.hex()) == key
        assert PublicKey.from_hex(raw.hex().upper()) == key
        assert key.short == text[:8]
        assert repr(key) == f"PublicKey({text!r})"

    @given(st.binary(min_size=32, max_size=32))
    def test_round_trips(self, raw: bytes) -> None:
        key = PublicKey(raw)
        assert PublicKey.from_base64(key.base64) == key
        assert PublicKey.from_hex(key.hex) == key
        assert len(key.base64) == 44 and key.base64.endswith("=")
        assert len(key.hex) == 64

    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
    def test_order_and_equality_follow_the_bytes(self, a: bytes, b: bytes) -> None:
        assert (PublicKey(a) == PublicKey(b)) == (a == b)
        assert (PublicKey(a) < PublicKey(b)) == (a < b)
        assert hash(PublicKey(a)) == hash(PublicKey(a))

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("", "44 base64"),
            ("short=", "44 base64"),
            ("A" * 44, "44 base64"),  # no '='
            ("A" * 45 + "=", "44 base64"),
            ("A" * 42 + "==", "32 bytes"),  # 31 bytes
            ("A" * 42 + "!=", "not valid base64"),
            ("A" * 20 + "=" + "A" * 22 + "=", "not valid base64"),
            ("A" * 41 + " A=", "not valid base64"),
            ("é" * 43 + "=", "not valid base64"),
            ("A" * 42 + "B=", "canonical"),  # padding bits set: a second spelling
            (HUGE + "=", "44 base64"),
        ],
    )
    def test_bad_base64(self, text: str, why: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            PublicKey.from_base64(text)
        assert_clear(caught.value, "WireGuard key", why)

    @pytest.mark.parametrize("value", [None, 42, b"A" * 43 + b"=", ["x"]])
    def test_non_text(self, value: object) -> None:
        with pytest.raises(InvalidValue) as caught:
            PublicKey.from_base64(value)
        assert_clear(caught.value, "WireGuard key")

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("", "not 32 bytes"),
            ("00" * 31, "not 32 bytes"),
            ("00" * 33, "not 32 bytes"),
            ("0" * 63, "malformed"),
            ("zz" * 32, "malformed"),
            (HUGE, "malformed"),
        ],
    )
    def test_bad_hex(self, text: str, why: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            PublicKey.from_hex(text)
        assert_clear(caught.value, "hex WireGuard key", why)

    @pytest.mark.parametrize("raw", [b"", b"x" * 31, b"x" * 33, bytearray(32), "x" * 32])
    def test_bad_raw(self, raw: object) -> None:
        with pytest.raises(InvalidValue):
            PublicKey(raw)  # type: ignore[arg-type]

    @given(st.text())
    def test_arbitrary_text_raises_only_invalid_value(self, text: str) -> None:
        for parse in (PublicKey.from_base64, PublicKey.from_hex):
            try:
                key = parse(text)
            except InvalidValue:
                continue
            assert isinstance(key, PublicKey)

    @given(st.text(alphabet=string.ascii_letters + string.digits + "+/", min_size=43, max_size=43))
    def test_near_keys_are_canonical_or_refused(self, body: str) -> None:
        text = body + "="
        try:
            key = PublicKey.from_base64(text)
        except InvalidValue as exc:
            assert_clear(exc, "canonical")
            return
        assert key.base64 == text  # an accepted key prints back exactly as given


# -- Endpoint -------------------------------------------------------------------------


class TestEndpoint:
    @pytest.mark.parametrize(
        ("text", "host", "port"),
        [
            ("1.2.3.4:51820", "1.2.3.4", 51820),
            ("192.0.2.1:1", "192.0.2.1", 1),
            ("192.0.2.1:65535", "192.0.2.1", 65535),
            ("[2001:db8::1]:51820", "2001:db8::1", 51820),
            ("[::1]:4500", "::1", 4500),
            ("[fe80::1%eth0]:51820", "fe80::1", 51820),
            ("[::ffff:192.0.2.1]:7", "::ffff:192.0.2.1", 7),
        ],
    )
    def test_parse(self, text: str, host: str, port: int) -> None:
        endpoint = Endpoint.parse(text)
        assert endpoint.host == ipaddress.ip_address(host)
        assert endpoint.port == port

    def test_str_is_what_wg_prints(self) -> None:
        assert str(Endpoint.parse("1.2.3.4:51820")) == "1.2.3.4:51820"
        assert str(Endpoint.parse("[2001:DB8::1]:51820")) == "[2001:db8::1]:51820"

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("1.2.3.4:0", "outside 1-65535"),
            ("1.2.3.4:65536", "outside 1-65535"),
            ("1.2.3.4:99999999999", "outside 1-65535"),
            ("1.2.3.4:-1", "IP:PORT"),
            ("1.2.3.4:+80", "IP:PORT"),
            ("1.2.3.4:8o", "IP:PORT"),
            ("1.2.3.4: 80", "IP:PORT"),
            ("1.2.3.4:", "IP:PORT"),
            ("1.2.3.4", "IP:PORT"),
            ("1.2.3.4:\u0663", "IP:PORT"),  # ARABIC-INDIC DIGIT THREE
            ("1.2.3.4:\u00b2", "IP:PORT"),  # SUPERSCRIPT TWO
            ("", "IP:PORT"),
            (":51820", "not an IP address"),
            ("example.com:51820", "not an IP address"),
            ("localhost:51820", "not an IP address"),
            ("[example.com]:51820", "not an IP address"),
            ("1.2.3:51820", "not an IP address"),
            ("01.2.3.4:51820", "not an IP address"),
            ("2001:db8::1:51820", "[ADDR]:PORT"),
            ("::1:51820", "[ADDR]:PORT"),
            ("[2001:db8::1:51820", "not an IP address"),
            ("0.0.0.0:51820", "cannot be used"),
            ("[::]:51820", "cannot be used"),
            ("224.0.0.1:51820", "cannot be used"),
            ("[ff02::1]:51820", "cannot be used"),
            (HUGE + ":1", "IP:PORT"),
        ],
    )
    def test_bad(self, text: str, why: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            Endpoint.parse(text)
        assert_clear(caught.value, why)

    @pytest.mark.parametrize("value", [None, 51820, b"1.2.3.4:1", ("1.2.3.4", 1)])
    def test_non_text(self, value: object) -> None:
        with pytest.raises(InvalidValue):
            Endpoint.parse(value)

    @pytest.mark.parametrize("port", [True, 1.5, "80", 0, 65536])
    def test_bad_constructor_port(self, port: object) -> None:
        with pytest.raises(InvalidValue):
            Endpoint(ipaddress.ip_address("192.0.2.1"), port)  # type: ignore[arg-type]

    @given(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
        st.integers(min_value=1, max_value=65535),
    )
    def test_round_trip(
        self, host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> None:
        assume(not host.is_unspecified and not host.is_multicast)
        endpoint = Endpoint(host, port)
        assert Endpoint.parse(str(endpoint)) == endpoint

    @given(st.text())
    def test_arbitrary_text_raises_only_invalid_value(self, text: str) -> None:
        try:
            endpoint = Endpoint.parse(text)
        except InvalidValue:
            return
        assert Endpoint.parse(str(endpoint)) == endpoint

    @given(
        st.from_regex(
            r"\[?[0-9a-fA-F:.%\[\]]{0,40}\]?:[0-9\u0660-\u0669\u00b2]{0,7}", fullmatch=True
        )
    )
    def test_near_endpoints_raise_only_invalid_value(self, text: str) -> None:
        try:
            endpoint = Endpoint.parse(text)
        except InvalidValue:
            return
        assert 1 <= endpoint.port <= 65535


# -- parse_network --------------------------------------------------------------------


class TestParseNetwork:
    @pytest.mark.parametrize(
        "text", ["10.0.0.2/32", "10.0.0.0/8", "0.0.0.0/0", "fd00::/64", "::/0", "2001:db8::1/128"]
    )
    def test_good(self, text: str) -> None:
        assert parse_network(text) == ipaddress.ip_network(text)

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("10.0.0.1/8", "host bits set"),
            ("fd00::1/64", "host bits set"),
            ("10.0.0.0/33", "malformed network"),
            ("10.0.0.0/-1", "malformed network"),
            ("10.0.0.0/", "malformed network"),
            ("10.0.0/8", "malformed network"),
            ("example.com/8", "malformed network"),
            ("", "malformed network"),
            (HUGE, "ADDR/PREFIX"),
        ],
    )
    def test_bad(self, text: str, why: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            parse_network(text)
        assert_clear(caught.value, why)

    @pytest.mark.parametrize("value", [None, 8, ipaddress.ip_network("10.0.0.0/8")])
    def test_non_text(self, value: object) -> None:
        with pytest.raises(InvalidValue):
            parse_network(value)

    @given(
        st.one_of(
            st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
            st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
        )
    )
    def test_round_trip(self, pair: tuple) -> None:
        network = ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False)
        assert parse_network(str(network)) == network

    @given(st.text())
    def test_arbitrary_text_raises_only_invalid_value(self, text: str) -> None:
        try:
            network = parse_network(text)
        except InvalidValue:
            return
        assert parse_network(str(network)) == network


def test_peer_update_keepalive_range() -> None:
    key = PublicKey(os.urandom(32))
    assert PeerUpdate(key, persistent_keepalive=0).persistent_keepalive == 0
    assert PeerUpdate(key, persistent_keepalive=65535).persistent_keepalive == 65535
    for bad in (-1, 65536):
        with pytest.raises(InvalidValue) as caught:
            PeerUpdate(key, persistent_keepalive=bad)
        assert_clear(caught.value, "0-65535")


# -- Go durations ---------------------------------------------------------------------


class TestGoDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("1m0s", 60.0),
            ("30s", 30.0),
            ("1h2m3s", 3723.0),
            ("1.5s", 1.5),
            ("300ms", 0.3),
            ("1h", 3600.0),
            ("2h45m", 9900.0),
            ("1m30.5s", 90.5),
            (".5s", 0.5),
            ("5.s", 5.0),
            ("+5s", 5.0),
            ("1500us", 0.0015),
            ("1500\u00b5s", 0.0015),  # MICRO SIGN, as Go accepts
            ("1500\u03bcs", 0.0015),  # GREEK SMALL LETTER MU, as Go accepts
            ("2000000000ns", 2.0),
            (" 30s ", 30.0),
        ],
    )
    def test_good(self, text: str, seconds: float) -> None:
        assert parse_go_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            " ",
            "garbage",
            "5",  # Go wants a unit on anything but 0
            "s",
            ".s",
            "1e3s",
            "1d",  # not a Go unit
            "1w",
            "1y",
            "1mm",
            "5 s",
            "1m xx 5s",
            "1m-5s",
            "--5s",
            "1.2.3s",
            "\u0663s",
            "30sec",
            "nan",
            "inf",
            "99999999999999999999h",
            HUGE,
        ],
    )
    def test_garbage(self, text: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            parse_go_duration(text)
        assert_clear(caught.value, "invalid duration", "Go's syntax", "1m0s")

    @pytest.mark.parametrize("text", ["0", "0s", "-0", "-5s", "-1m0s", "1ns"])
    def test_zero_and_negative(self, text: str) -> None:
        with pytest.raises(InvalidValue) as caught:
            parse_go_duration(text)
        assert_clear(caught.value, "invalid duration", "must be positive and at least 0s")

    def test_minimum(self) -> None:
        assert parse_go_duration("2s", minimum=1.0) == 2.0
        assert parse_go_duration("1s", minimum=1.0) == 1.0  # wg-nat accepts -t 1s
        with pytest.raises(InvalidValue) as caught:
            parse_go_duration("500ms", minimum=1.0)
        assert_clear(caught.value, "must be positive and at least 1s")

    @pytest.mark.parametrize("value", [None, 60, 1.5])
    def test_non_text(self, value: object) -> None:
        with pytest.raises(InvalidValue):
            parse_go_duration(value)  # type: ignore[arg-type]

    @given(st.integers(0, 1000), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
    def test_components(self, h: int, m: int, s: int, ms: int) -> None:
        total = h * 3600 + m * 60 + s + ms / 1000
        assume(total > 0)
        text = f"{h}h{m}m{s}s{ms}ms"
        assert parse_go_duration(text) == pytest.approx(total)
        assert parse_go_duration(f"{h}h{m}m{s}.{ms:03d}s") == pytest.approx(total)

    @given(st.integers(1, 10**10))
    def test_format_round_trip(self, milliseconds: int) -> None:
        seconds = milliseconds / 1000
        assert parse_go_duration(format_go_duration(seconds)) == pytest.approx(seconds)

    @given(st.text())
    def test_arbitrary_text_raises_only_invalid_value(self, text: str) -> None:
        try:
            seconds = parse_go_duration(text)
        except InvalidValue:
            return
        assert seconds > 0

    @given(
        st.from_regex(r"[-+]?[0-9.]{0,6}(ns|us|ms|s|m|h|d|x|)[0-9.]{0,4}[a-z]{0,2}", fullmatch=True)
    )
    def test_near_durations_raise_only_invalid_value(self, text: str) -> None:
        try:
            seconds = parse_go_duration(text)
        except InvalidValue:
            return
        assert seconds > 0


# -- Options of the two daemons -------------------------------------------------------


def server_options(*argv: str) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(list(argv))
    return options


def client_options(*argv: str) -> client_tap.Options:
    options = client_tap.Options()
    options.parseOptions(list(argv))
    return options


REGISTRY_KEY = PublicKey(bytes(range(32)))


class TestServerOptions:
    def test_defaults_match_wg_nat(self) -> None:
        options = server_options()
        assert options["interface"] == "wg0"
        assert options["api-port"] is None
        assert options["metrics-listen"] == parse_listen(DEFAULT_SERVER_METRICS)
        assert options["poll-interval"] == 1.0
        assert options["log-format"] == "text"

    def test_values(self) -> None:
        options = server_options(
            "-i", "wg-hub", "--api-port", "8080", "--metrics-listen", "[::1]:9999",
            "--poll-interval", "250ms", "--log-format", "json",
        )  # fmt: skip
        assert options["interface"] == "wg-hub"
        assert options["api-port"] == 8080
        assert options["metrics-listen"] == ("::1", 9999)
        assert options["poll-interval"] == 0.25
        assert options["log-format"] == "json"
        assert server_options("--interface=wg1")["interface"] == "wg1"

    @pytest.mark.parametrize(
        ("argv", "needles"),
        [
            (["-i", ""], ["interface name"]),
            (["-i", "a/b"], ["interface name", "'/'"]),
            (["-i", ".."], ["interface name"]),
            (["-i", "x" * 16], ["interface name", "1-15"]),
            (["-i", "wg 0"], ["interface name"]),
            (["--api-port", "0"], ["--api-port", "port number"]),
            (["--api-port", "65536"], ["--api-port", "port number"]),
            (["--api-port", "http"], ["--api-port", "port number"]),
            (["--api-port", "-1"], ["--api-port", "port number"]),
            (["--api-port", "\u0663"], ["--api-port", "port number"]),
            (["--metrics-listen", "nope"], ["--metrics-listen", "HOST:PORT"]),
            (["--metrics-listen", "127.0.0.1:0"], ["--metrics-listen", "HOST:PORT"]),
            (["--metrics-listen", "127.0.0.1:99999"], ["--metrics-listen", "HOST:PORT"]),
            (["--poll-interval", "soon"], ["--poll-interval", "invalid duration"]),
            (["--poll-interval", "0s"], ["--poll-interval", "must be positive"]),
            (["--poll-interval", "-1s"], ["--poll-interval", "must be positive"]),
            (["--log-format", "xml"], ["--log-format", "text, json"]),
            (["--no-such-flag"], ["no-such-flag"]),
            (["extra-argument"], []),
        ],
    )
    def test_bad(self, argv: list[str], needles: list[str]) -> None:
        with pytest.raises(usage.UsageError) as caught:
            server_options(*argv)
        assert_clear(caught.value, *needles)


class TestClientOptions:
    def test_defaults_match_wg_nat(self) -> None:
        options = client_options("-r", REGISTRY_KEY.base64)
        assert options["interface"] == "wg0"
        assert options["registry"] == REGISTRY_KEY
        assert options["interval"] == 60.0  # -t 1m0s
        assert options["registry-address"] is None
        assert options["registry-port"] is None
        assert options["metrics-listen"] == parse_listen(DEFAULT_CLIENT_METRICS)
        assert options["state-dir"] == "/var/lib/wgnat"
        assert options["keepalive"] == 25
        assert options["log-format"] == "text"
        assert options["accept-routes"] == []

    def test_wg_nat_flags(self) -> None:
        options = client_options("-i", "wg1", "-r", REGISTRY_KEY.base64, "-t", "30s")
        assert options["interface"] == "wg1"
        assert options["interval"] == 30.0
        options = client_options("-i", "wg1", "-r", REGISTRY_KEY.base64, "-t", "1h2m3s")
        assert options["interval"] == 3723.0
        options = client_options(f"--registry={REGISTRY_KEY.base64}", "--interval=1.5s")
        assert options["interval"] == 1.5

    def test_other_values(self) -> None:
        options = client_options(
            "-r", REGISTRY_KEY.base64, "--registry-address", "10.0.0.1",
            "--registry-port", "51820", "--keepalive", "10", "--state-dir", "/tmp/x",
        )  # fmt: skip
        assert options["registry-address"] == ipaddress.ip_address("10.0.0.1")
        assert options["registry-port"] == 51820
        assert options["keepalive"] == 10
        assert options["state-dir"] == "/tmp/x"
        options = client_options("-r", REGISTRY_KEY.base64, "--registry-address", "fd00::1")
        assert options["registry-address"] == ipaddress.ip_address("fd00::1")

    def test_accept_routes_repeatable_and_comma_separated(self) -> None:
        options = client_options(
            "-r", REGISTRY_KEY.base64,
            "--accept-routes", "192.168.0.0/16,10.10.0.0/16",
            "--accept-routes", "fd00:1::/64",
            "--accept-routes=172.16.0.0/12, 198.51.100.0/24",
        )  # fmt: skip
        assert options["accept-routes"] == [
            ipaddress.ip_network("192.168.0.0/16"),
            ipaddress.ip_network("10.10.0.0/16"),
            ipaddress.ip_network("fd00:1::/64"),
            ipaddress.ip_network("172.16.0.0/12"),
            ipaddress.ip_network("198.51.100.0/24"),
        ]

    def test_accept_routes_not_shared_between_instances(self) -> None:
        client_options("-r", REGISTRY_KEY.base64, "--accept-routes", "10.0.0.0/8")
        assert client_options("-r", REGISTRY_KEY.base64)["accept-routes"] == []

    @pytest.mark.parametrize(
        ("argv", "needles"),
        [
            ([], ["-r REGISTRY_PUBLIC_KEY is required"]),
            (["-i", "wg1"], ["-r REGISTRY_PUBLIC_KEY is required"]),
            (["-r", ""], ["-r REGISTRY_PUBLIC_KEY is required"]),
            (["-r", "bad"], ["-r:", "WireGuard key", "wg pubkey"]),
            (["-r", REGISTRY_KEY.hex], ["-r:", "WireGuard key"]),
            (["-r", REGISTRY_KEY.base64[:-2] + "!="], ["-r:", "not valid base64"]),
            (["-r", HUGE], ["-r:", "WireGuard key"]),
        ],
    )
    def test_bad_registry_key(self, argv: list[str], needles: list[str]) -> None:
        with pytest.raises(usage.UsageError) as caught:
            client_options(*argv)
        assert_clear(caught.value, *needles)

    @pytest.mark.parametrize(
        ("argv", "needles"),
        [
            (["-i", ""], ["interface name"]),
            (["-i", "x" * 16], ["interface name"]),
            (["-t", "soon"], ["-t:", "invalid duration", "1m0s"]),
            (["-t", "60"], ["-t:", "invalid duration"]),
            (["-t", "1d"], ["-t:", "invalid duration"]),
            (["-t", "0s"], ["-t:", "must be positive and at least 1s"]),
            (["-t", "-1m0s"], ["-t:", "must be positive and at least 1s"]),
            (["-t", "100ms"], ["-t:", "must be positive and at least 1s"]),
            (["-t", HUGE], ["-t:", "invalid duration"]),
            (["--registry-address", "registry.example"], ["--registry-address", "IP address"]),
            (["--registry-address", "10.0.0.0/24"], ["--registry-address", "IP address"]),
            (["--registry-port", "0"], ["--registry-port", "port number"]),
            (["--registry-port", "70000"], ["--registry-port", "port number"]),
            (["--registry-port", "api"], ["--registry-port", "port number"]),
            (["--keepalive", "0"], ["--keepalive", "seconds"]),
            (["--keepalive", "65536"], ["--keepalive", "seconds"]),
            (["--keepalive", "often"], ["--keepalive", "seconds"]),
            (["--keepalive", "-5"], ["--keepalive", "seconds"]),
            (["--accept-routes", "10.0.0.1/8"], ["--accept-routes", "host bits set"]),
            (["--accept-routes", "10.0.0.0/8,lan"], ["--accept-routes", "'lan'"]),
            (["--accept-routes", "10.0.0.0/8,"], ["--accept-routes", "malformed network"]),
            (["--metrics-listen", "9588"], ["--metrics-listen", "HOST:PORT"]),
            (["--log-format", "yaml"], ["--log-format"]),
            (["--no-such-flag"], ["no-such-flag"]),
        ],
    )
    def test_bad(self, argv: list[str], needles: list[str]) -> None:
        with pytest.raises(usage.UsageError) as caught:
            client_options("-r", REGISTRY_KEY.base64, *argv)
        assert_clear(caught.value, *needles)


# -- the console scripts --------------------------------------------------------------

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"console script {name} is not installed next to {sys.executable}")
        return found
    return str(path)


def real_public_key() -> str:
    """A key as `wg genkey | wg pubkey` prints it (cryptography where wg is absent)."""
    if shutil.which("wg"):
        private = subprocess.run(
            ["wg", "genkey"], capture_output=True, text=True, check=True
        ).stdout
        return subprocess.run(
            ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
        ).stdout.strip()
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = X25519PrivateKey.generate()
    record_secret(private.private_bytes_raw())  # never printed, but the leak check knows it
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# Each run imports Twisted (over a second): they are started together, once.
CLI_RUNS: dict[str, tuple[str, list[str]]] = {
    "client-nosuchif": ("wgnat-client", ["-i", "nosuchif", "-r", "{key}"]),
    "server-nosuchif": ("wgnat-server", ["-i", "nosuchif"]),
    "client-bad-r": ("wgnat-client", ["-r", "not-a-key"]),
    "client-bad-t": ("wgnat-client", ["-r", "{key}", "-t", "soon"]),
    "client-no-r": ("wgnat-client", []),
    "server-bad-poll": ("wgnat-server", ["--poll-interval", "never"]),
    "client-help": ("wgnat-client", ["--help"]),
    "server-help": ("wgnat-server", ["--help"]),
    "client-version": ("wgnat-client", ["--version"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    key = real_public_key()
    cwd = tmp_path_factory.mktemp("cli")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    running = {
        name: subprocess.Popen(
            [script(program), *(arg.replace("{key}", key) for arg in argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        for name, (program, argv) in CLI_RUNS.items()
    }
    results = {}
    try:
        for name, process in running.items():
            out, err = process.communicate(timeout=120)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def assert_one_line_error(result: subprocess.CompletedProcess[str], program: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    return lines[0]


class TestConsoleScripts:
    @pytest.mark.parametrize("run", ["client-nosuchif", "server-nosuchif"])
    def test_missing_interface(self, cli: dict, run: str) -> None:
        result = cli[run]
        assert result.returncode != 0
        line = assert_one_line_error(result, CLI_RUNS[run][0])
        assert "nosuchif" in line and "not found" in line
        assert "wireguard-go nosuchif" in line  # says what to do
        assert result.stdout == ""

    @pytest.mark.parametrize(
        ("run", "needle"),
        [
            ("client-bad-r", "-r:"),
            ("client-bad-t", "-t:"),
            ("client-no-r", "-r REGISTRY_PUBLIC_KEY is required"),
            ("server-bad-poll", "--poll-interval"),
        ],
    )
    def test_usage_errors_exit_2_with_one_line(self, cli: dict, run: str, needle: str) -> None:
        result = cli[run]
        assert result.returncode == 2, result.stderr
        line = assert_one_line_error(result, CLI_RUNS[run][0])
        assert needle in line
        assert "--help" in line
        assert result.stdout == ""

    @pytest.mark.parametrize("run", ["client-help", "server-help"])
    def test_help(self, cli: dict, run: str) -> None:
        result = cli[run]
        assert result.returncode == 0, result.stderr
        assert "--interface" in result.stdout
        assert result.stderr == ""

    def test_client_help_lists_wg_nat_flags(self, cli: dict) -> None:
        text = cli["client-help"].stdout
        for flag in ("-i, --interface", "-r, --registry", "-t, --interval", "--accept-routes"):
            assert flag in text
        assert "[default: 1m0s]" in text
        assert "[default: wg0]" in " ".join(cli["server-help"].stdout.split())

    def test_version(self, cli: dict) -> None:
        from wgnat import __version__

        result = cli["client-version"]
        assert result.returncode == 0
        assert result.stdout.strip() == f"wgnat {__version__}"


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["-i", "-t", "--api-port", "--metrics-listen"]), st.text(max_size=30))
def test_server_options_raise_only_usage_errors(flag: str, value: str) -> None:
    if flag == "-t":
        flag = "--poll-interval"
    try:
        server_options(flag, value)
    except usage.UsageError as exc:
        assert "\n" not in str(exc)


# The same entry points in-process, for the cases not worth a subprocess each.
@pytest.mark.parametrize(
    ("main", "argv", "needle"),
    [
        (client_main, ["-r", REGISTRY_KEY.base64, "-t", "0s"], "-t: invalid duration '0s'"),
        (client_main, ["-i", "nosuchif"], "-r REGISTRY_PUBLIC_KEY is required"),
        (client_main, ["-r", REGISTRY_KEY.base64, "--keepalive", "0"], "--keepalive"),
        (client_main, ["-r", REGISTRY_KEY.base64, "--bogus"], "bogus"),
        (client_main, ["-r", REGISTRY_KEY.base64, "--accept-routes", "lan"], "--accept-routes"),
        (server_main, ["--api-port", "0"], "--api-port"),
        (server_main, ["-i", "x" * 16], "interface name"),
        (server_main, ["--metrics-listen", "x"], "--metrics-listen"),
    ],
)
def test_cli_usage_errors_in_process(
    main: Any, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert needle in line
    assert line.endswith("--help')")


@pytest.mark.parametrize("main", [client_main, server_main])
def test_cli_help_and_version_in_process(main: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from wgnat import __version__

    assert main(["--help"]) == 0
    assert "--interface" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"wgnat {__version__}"
