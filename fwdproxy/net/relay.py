"""What a relay reports: the byte counters, the result, and how a side's end is classified.

The relay itself (`fwdproxy.net.relay_fast`) moves bytes between two transports; these types are
what the connection code, the admin API and the metrics read from it.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass, field

# How a peer that has gone away shows up on the socket that still talks to it. Go, Java and
# Node TLS clients close without close_notify, so the origin's close_notify meets one of these
# on every successful pull: a normal end, not an error.
_GONE_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN}
)


def describe(exc: BaseException) -> str:
    """`Type: message` for logs (the type alone when the message is empty)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def ended_by(side: str, exc: BaseException) -> str:
    """`client-reset`/`target-reset` when `side` simply went away, else `<side>-error`.

    The one classification both relays use, so a tunnel ends the same way whichever moved it.
    """
    if isinstance(exc, OSError) and exc.errno in _GONE_ERRNOS:
        return f"{side}-reset"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return f"{side}-reset"
    return f"{side}-error"


@dataclass(slots=True)
class Endpoint:
    """One side of a tunnel. `prefetched` bytes were read during the handshake and go first."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    prefetched: bytes = b""


@dataclass(slots=True)
class Counters:
    """Bytes moved so far, readable while the relay runs (admin API, metrics)."""

    up: int = 0  # client -> target
    down: int = 0  # target -> client
    last_activity: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class RelayResult:
    up: int
    down: int
    # "client"/"target" (that side ended first, cleanly), "client-reset"/"target-reset" (that
    # side vanished), "client-error"/"target-error", "idle", "error", "cancelled"
    closed_by: str
    error: str | None = None
