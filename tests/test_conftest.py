"""The suite's own guards work: a test that loses an error in a Deferred is
caught (tests/conftest.py)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import fail

from tests.conftest import LostErrors


@pytest.mark.loses_errors_on_purpose
def test_a_deferred_left_with_an_error_is_reported():
    with LostErrors() as lost:
        fail(RuntimeError("a failure nobody handled"))
    assert len(lost.tracebacks) == 1 and "a failure nobody handled" in lost.tracebacks[0]


def test_a_handled_error_is_not_reported():
    with LostErrors() as lost:
        fail(RuntimeError("handled")).addErrback(lambda failure: None)
    assert lost.tracebacks == []
