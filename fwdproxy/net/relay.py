"""The byte relay between client and target: every byte both ways, bounded buffers, half-close.

This is the one module that moves tunnel bytes, behind one call, `relay(a, b, ...)`, so that a
faster implementation can replace it without touching the session code. Flow control comes from
`drain()`: a slow reader stops us reading from the fast side. EOF from one side becomes
`write_eof()` on the other while the opposite direction keeps flowing. Idle time is measured
across both directions with one watchdog rather than a timeout per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 256 * 1024

_CLOSE_ERRORS = (ConnectionError, OSError, RuntimeError)

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


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    prefetched: bytes,
    count: Callable[[int], None],
) -> None:
    if prefetched:
        dst.write(prefetched)
        count(len(prefetched))
        await dst.drain()
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        dst.write(data)
        count(len(data))
        await dst.drain()
    if dst.can_write_eof():
        with contextlib.suppress(*_CLOSE_ERRORS):
            dst.write_eof()
    else:
        dst.close()


def _close(w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(*_CLOSE_ERRORS):
        w.close()


async def relay(
    client: Endpoint,
    target: Endpoint,
    *,
    idle_timeout_s: float,
    counters: Counters | None = None,
) -> RelayResult:
    """Relay until both directions ended, one side failed, or nothing moved for idle_timeout_s."""
    c = counters if counters is not None else Counters()

    def up(n: int) -> None:
        c.up += n
        c.last_activity = time.monotonic()

    def down(n: int) -> None:
        c.down += n
        c.last_activity = time.monotonic()

    loop = asyncio.get_running_loop()
    t_up = loop.create_task(_pump(client.reader, target.writer, client.prefetched, up))
    t_down = loop.create_task(_pump(target.reader, client.writer, target.prefetched, down))
    pending: set[asyncio.Task[None]] = {t_up, t_down}
    closed_by = ""
    error: str | None = None
    try:
        while pending:
            wait = max(0.05, c.last_activity + idle_timeout_s - time.monotonic())
            done, pending = await asyncio.wait(
                pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                exc = t.exception()
                if exc is not None:
                    # A pump fails on its write side as often as on its read side; the errno
                    # says which peer vanished only in the read case, so name the pump's source.
                    error = describe(exc)
                    closed_by = ended_by("client" if t is t_up else "target", exc)
                    pending.clear()
                    break
                if not closed_by:
                    closed_by = "client" if t is t_up else "target"
            if pending and time.monotonic() - c.last_activity >= idle_timeout_s:
                closed_by, error = "idle", f"no data for {idle_timeout_s:g}s"
                break
    except asyncio.CancelledError:
        closed_by = "cancelled"
        raise
    finally:
        for t in (t_up, t_down):
            if not t.done():
                t.cancel()
        for t in (t_up, t_down):
            with contextlib.suppress(asyncio.CancelledError, *_CLOSE_ERRORS):
                await t
        _close(client.writer)
        _close(target.writer)
    return RelayResult(c.up, c.down, closed_by or "client", error)
