"""The demo's table says, for every pair, which path it should get and why, and
marks a pair that differs (compose/testbed.py; no Docker needed: the testbed's
observations are stood in for)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compose"))
import testbed


def test_every_pair_has_an_expectation_with_a_reason_in_the_legend():
    names = list(testbed.CLIENTS)
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]
    expected = {pair: testbed.expectation(*pair) for pair in pairs}
    assert {why for _, why in expected.values()} == set(testbed.REASONS)
    assert expected[("a", "b")] == ("direct", "L")
    assert expected[("a", "s")] == ("relayed", "S")
    assert expected[("a", "p")] == ("direct", "P")
    # s's symmetric NAT is passed over IPv6 with the other dual-stack clients.
    assert expected[("s", "p")] == ("direct", "6")
    assert expected[("c", "s")] == ("direct", "6")
    assert expected[("c", "p")] == ("direct", "6")
    assert expected[("s", "x")] == ("relayed", "S")
    assert expected[("c", "x")] == ("direct", "X")
    # g behind r5's mapping gateway: direct with all, s (two symmetric NATs) too.
    assert expected[("a", "g")] == ("direct", "M")
    assert expected[("s", "g")] == ("direct", "M")
    # The same as what the Compose test requires.
    for pair in testbed.EXPECTED_DIRECT:
        assert testbed.expectation(*pair)[0] == "direct"
    for pair in testbed.EXPECTED_RELAYED:
        assert testbed.expectation(*pair)[0] == "relayed"


class Observed(testbed.Testbed):
    """A testbed whose observations are given: every pair direct but a-s (as
    expected) and b-c (not as expected); s relays through the second hub (the
    first gone), the others through the first; the hubs see s at two ports."""

    def __init__(self) -> None:
        self.keys = {name: f"key-{name}" for name in [*testbed.HUBS, *testbed.CLIENTS]}

    def status(self, name):  # type: ignore[no-untyped-def]
        relay = "key-registry2" if name == "s" else "key-registry"
        port = {"registry": 40001, "registry2": 40002} if name == "s" else {}
        return {
            "relay_hub": relay,
            "symmetric_nat": name == "s",
            "hubs": [
                {
                    "public_key": f"key-{hub}",
                    "relays": f"key-{hub}" == relay,
                    "connected": not (name == "s" and hub == "registry"),
                    "sees_us_as": f"198.51.100.23:{port.get(hub, 51820)}",
                }
                for hub in testbed.HUBS
            ],
        }

    def snapshot(self):  # type: ignore[no-untyped-def]
        return {name: {} for name in testbed.CLIENTS}

    def direct(self, a, b, peers=None):  # type: ignore[no-untyped-def]
        return None if {a, b} in ({"a", "s"}, {"b", "c"}) else "198.51.100.1:51820"

    def time_to_direct(self, a, b):  # type: ignore[no-untyped-def]
        return 0.4

    def ping(self, name, address, count=2, timeout=2):  # type: ignore[no-untyped-def]
        return True


def test_the_table_marks_a_pair_that_differs_and_explains_the_letters():
    table = Observed().table()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["pair", "path", "expected"]
    [a_s] = [line for line in lines if line.startswith("a-s ")]
    assert a_s.split()[1:4] == ["relayed", "relayed", "(S)"]
    # Each end's traffic goes through the hub that end relays through.
    assert a_s.split()[4:8] == ["via", "registry", "via", "registry2"]
    [b_c] = [line for line in lines if line.startswith("b-c ")]
    assert b_c.split()[1:5] == ["relayed", "!", "direct", "(H)"]
    assert "! differs from what is expected: b-c" in table
    for letter, sentence in testbed.REASONS.items():
        assert f"  {letter}  {sentence}" in table


def test_the_hubs_table_says_which_hub_relays_and_how_each_sees_a_client():
    lines = Observed().hubs_table().splitlines()
    assert lines[0].startswith("hubs: registry 198.51.100.10 (tunnel 192.0.2.1, relays first)")
    assert "registry2 198.51.100.11 (tunnel 192.0.2.254)" in lines[0]
    assert lines[1].split()[:4] == ["client", "relays", "via", "registry"]
    [a] = [line for line in lines if line.startswith("a ")]
    assert a.split() == ["a", "registry", "198.51.100.23:51820", "198.51.100.23:51820", "no"]
    [s] = [line for line in lines if line.startswith("s ")]
    assert s.split() == [
        "s",
        "registry2",
        "198.51.100.23:40001",
        "(unreachable)",
        "198.51.100.23:40002",
        "yes",
    ]
