"""How a client connection ended: the one list the access log, metrics and recent errors share.

Each outcome knows the phase it ends in and whether it is an error, so nobody keeps a second
list of "fine" outcomes that drifts from the first. The string values are the access log's
`outcome=` field and the metrics' `outcome`/`kind` label values; they never change.
"""

from __future__ import annotations

import enum

from fwdproxy.core.errors import (
    DialError,
    FwdProxyError,
    HandshakeTimeout,
    Overloaded,
    ProtocolError,
    Rejected,
)

__all__ = ["Outcome", "Phase", "outcome_of"]


class Phase(enum.Enum):
    """Where in a connection's life an outcome happens."""

    HANDSHAKE = "handshake"  # before a target was chosen: parsing, auth, policy
    DIAL = "dial"  # reaching the target, directly or through an upstream
    RELAY = "relay"  # the tunnel (or forwarded exchange) was up
    ANY = "any"  # can end a connection in any phase (shutdown, bugs)


class Outcome(str, enum.Enum):
    """A connection's outcome: `.value` is what logs and metrics show."""

    phase: Phase
    is_error: bool

    def __new__(cls, value: str, phase: Phase, is_error: bool) -> Outcome:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.phase = phase
        obj.is_error = is_error
        return obj

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)

    OPEN = "open", Phase.ANY, False  # still running (live connections in the admin API)
    OK = "ok", Phase.RELAY, False
    EMPTY = "empty", Phase.HANDSHAKE, False  # connected and closed without a byte (port probes)
    CLIENT_CLOSED = "client-closed", Phase.HANDSHAKE, False  # left while we waited for it
    CLIENT_RESET = "client-reset", Phase.RELAY, False  # a peer that vanished: normal on the net
    TARGET_RESET = "target-reset", Phase.RELAY, False
    CLIENT_ERROR = "client-error", Phase.RELAY, True
    TARGET_ERROR = "target-error", Phase.RELAY, True
    RELAY_ERROR = "error", Phase.RELAY, True
    IDLE_TIMEOUT = "idle-timeout", Phase.RELAY, False  # nothing moved for idle_timeout_s
    HANDSHAKE_TIMEOUT = "handshake-timeout", Phase.HANDSHAKE, True
    BAD_REQUEST = "bad-request", Phase.HANDSHAKE, True
    REJECTED = "rejected", Phase.HANDSHAKE, True
    AUTH_FAILED = "auth-failed", Phase.HANDSHAKE, True
    OVERLOADED = "overloaded", Phase.HANDSHAKE, True
    DIAL_REFUSED = "dial-refused", Phase.DIAL, True
    DIAL_UNREACHABLE = "dial-unreachable", Phase.DIAL, True
    DIAL_TIMEOUT = "dial-timeout", Phase.DIAL, True
    DIAL_DNS = "dial-dns", Phase.DIAL, True
    DIAL_ERROR = "dial-error", Phase.DIAL, True
    DIAL_UPSTREAM_DOWN = "dial-upstream_down", Phase.DIAL, True
    DIAL_UPSTREAM_REFUSED = "dial-upstream_refused", Phase.DIAL, True
    DIAL_UPSTREAM_ERROR = "dial-upstream_error", Phase.DIAL, True
    CLOSED_BY_SERVER = "closed-by-server", Phase.ANY, True  # shutdown or the admin API
    INTERNAL_ERROR = "internal-error", Phase.ANY, True

    @property
    def before_tunnel(self) -> bool:
        """A failure of the handshake or the dial (the `handshake_errors` metric): not a reset,
        not a relay error, not a connection the server closed."""
        return self.is_error and self.phase in (Phase.HANDSHAKE, Phase.DIAL)

    @classmethod
    def of_dial(cls, kind: str) -> Outcome:
        """The outcome of a failed dial of `kind` (DialError.kind)."""
        return _BY_VALUE.get(f"dial-{kind}", cls.DIAL_ERROR)

    @classmethod
    def of_relay(cls, closed_by: str, error: str | None) -> Outcome:
        """The outcome of a relay that ended as `closed_by` (RelayResult.closed_by)."""
        if error is None:
            return cls.OK
        if closed_by == "idle":
            return cls.IDLE_TIMEOUT
        return _BY_VALUE.get(closed_by, cls.RELAY_ERROR)


_BY_VALUE: dict[str, Outcome] = {o.value: o for o in Outcome}


def outcome_of(e: FwdProxyError) -> Outcome:
    """The outcome of a connection refused or failed with `e`."""
    if isinstance(e, Rejected):
        return Outcome.AUTH_FAILED if e.status == 407 else Outcome.REJECTED
    if isinstance(e, DialError):
        return Outcome.of_dial(e.kind)
    if isinstance(e, ProtocolError):
        return Outcome.BAD_REQUEST
    if isinstance(e, Overloaded):
        return Outcome.OVERLOADED
    if isinstance(e, HandshakeTimeout):
        return Outcome.HANDSHAKE_TIMEOUT
    return Outcome.INTERNAL_ERROR
