"""The one list of outcomes: values, phases and the classifications built on them."""

from __future__ import annotations

import json

import pytest

from fwdproxy.core.errors import (
    DialError,
    DialTimeout,
    HandshakeTimeout,
    Overloaded,
    ProtocolError,
    Rejected,
)
from fwdproxy.core.outcome import Outcome, Phase, outcome_of


def test_values_are_unique_and_render_as_themselves() -> None:
    values = [o.value for o in Outcome]
    assert len(values) == len(set(values))
    for o in Outcome:
        assert str(o) == o.value == f"{o}"
        assert json.dumps(o) == json.dumps(o.value)
        assert Outcome(o.value) is o


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.OK,
        Outcome.CLIENT_RESET,
        Outcome.TARGET_RESET,
        Outcome.CLIENT_ERROR,
        Outcome.TARGET_ERROR,
        Outcome.RELAY_ERROR,
        Outcome.IDLE_TIMEOUT,
        Outcome.CLOSED_BY_SERVER,
        Outcome.EMPTY,
        Outcome.CLIENT_CLOSED,
        Outcome.OPEN,
    ],
)
def test_relay_ends_and_server_closes_are_not_handshake_errors(outcome: Outcome) -> None:
    assert not outcome.before_tunnel


@pytest.mark.parametrize(
    "outcome",
    [o for o in Outcome if o.phase in (Phase.HANDSHAKE, Phase.DIAL) and o.is_error],
)
def test_refusals_and_failed_dials_are_handshake_errors(outcome: Outcome) -> None:
    assert outcome.before_tunnel


def test_resets_are_normal_ends() -> None:
    assert not Outcome.CLIENT_RESET.is_error and not Outcome.TARGET_RESET.is_error
    assert Outcome.CLIENT_ERROR.is_error and Outcome.TARGET_ERROR.is_error


@pytest.mark.parametrize(
    ("closed_by", "error", "want"),
    [
        ("client", None, Outcome.OK),
        ("target", None, Outcome.OK),
        ("cancelled", None, Outcome.OK),
        ("client-reset", "ConnectionResetError", Outcome.CLIENT_RESET),
        ("target-reset", "BrokenPipeError", Outcome.TARGET_RESET),
        ("client-error", "OSError: x", Outcome.CLIENT_ERROR),
        ("idle", "no data for 1s", Outcome.IDLE_TIMEOUT),
        ("error", "OSError: splice", Outcome.RELAY_ERROR),
        ("something-new", "x", Outcome.RELAY_ERROR),
    ],
)
def test_of_relay(closed_by: str, error: str | None, want: Outcome) -> None:
    assert Outcome.of_relay(closed_by, error) is want


@pytest.mark.parametrize(
    ("err", "want"),
    [
        (Rejected("x"), Outcome.REJECTED),
        (Rejected("x", status=407), Outcome.AUTH_FAILED),
        (DialError("x", hop="direct", kind="refused"), Outcome.DIAL_REFUSED),
        (DialError("x", hop="up", kind="upstream_down"), Outcome.DIAL_UPSTREAM_DOWN),
        (DialError("x", hop="up", kind="no-such-kind"), Outcome.DIAL_ERROR),
        (DialTimeout("x", hop="direct"), Outcome.DIAL_TIMEOUT),
        (ProtocolError("x"), Outcome.BAD_REQUEST),
        (Overloaded("x"), Outcome.OVERLOADED),
        (HandshakeTimeout("x"), Outcome.HANDSHAKE_TIMEOUT),
    ],
)
def test_outcome_of_errors(err: Exception, want: Outcome) -> None:
    assert outcome_of(err) is want  # type: ignore[arg-type]
