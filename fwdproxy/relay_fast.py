"""The fast byte relay: asyncio Protocol level, no task, await or copy per chunk.

Same call and contract as `fwdproxy.relay.relay` (which stays the reference implementation),
but after the handshake it takes over the two transports with `transport.set_protocol()`.
Received chunks go straight to the other transport's `write()` from the read callback, so a
chunk costs one `recv` and one `send` and nothing else: no `StreamReader` buffer, no
`drain()` future, no task switch. The stream relay spends most of its time in exactly those.

Flow control is the transports' own: when one side's write buffer passes the high-water mark
its `pause_writing()` pauses reading on the other side, and `resume_writing()` resumes it, so
the bytes held per direction stay below about high-water plus one receive.

Bytes the handshake had already read (`Endpoint.prefetched`, then whatever sits in the
`StreamReader` buffer) go out first, and an EOF the `StreamReader` had already seen is carried
over as a half-close.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from fwdproxy.relay import Counters, Endpoint, RelayResult

__all__ = ["Counters", "Endpoint", "RelayResult", "relay"]

# Pause reading the other side once this much waits in a write buffer; resume below LOW.
HIGH_WATER: Final = 512 * 1024
LOW_WATER: Final = 128 * 1024
# Receive size of the stdlib selector transport (its class default is 256 KiB); uvloop uses its
# own fixed 256 KiB buffer. Larger reads mean fewer callbacks per GiB on bulk transfers.
RECV_SIZE: Final = 1024 * 1024


class _Tunnel:
    """State shared by both sides: counters, the idle timer and the outcome."""

    __slots__ = ("closed_by", "counters", "done", "error", "idle_s", "loop", "sides", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: Counters, idle_s: float) -> None:
        self.loop = loop
        self.counters = counters
        self.idle_s = idle_s
        self.done: asyncio.Future[None] = loop.create_future()
        self.closed_by = ""
        self.error: str | None = None
        self.sides: tuple[_Side, _Side] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def finish(self, closed_by: str, error: str | None = None) -> None:
        """Record the first outcome and wake the relay coroutine; later calls are ignored."""
        if self.done.done():
            return
        self.closed_by = closed_by
        self.error = error
        self.done.set_result(None)

    def arm_idle(self) -> None:
        """One timer per tunnel, re-armed from the last-activity stamp (not per chunk)."""
        left = self.counters.last_activity + self.idle_s - time.monotonic()
        if left <= 0:
            self.finish("idle", f"no data for {self.idle_s:g}s")
            return
        self.timer = self.loop.call_later(left, self.arm_idle)


class _Side(asyncio.Protocol):
    """Protocol on one transport: what it receives goes to the peer side's transport."""

    __slots__ = ("eof", "name", "paused_peer", "peer", "transport", "tunnel", "up")

    def __init__(self, tunnel: _Tunnel, name: str, up: bool) -> None:
        self.tunnel = tunnel
        self.name = name  # "client" or "target": who closed, in RelayResult.closed_by
        self.up = up  # True: bytes from this side count as client -> target
        self.transport: Any = None
        self.peer: _Side = self
        self.eof = False  # this side sent EOF (we half-closed the peer)
        self.paused_peer = False  # our write buffer is full: the peer is not being read

    # -- receiving ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.forward(data)

    def forward(self, data: bytes) -> None:
        if self.tunnel.done.done():
            return  # the tunnel is being torn down; the peer may already be gone
        c = self.tunnel.counters
        if self.up:
            c.up += len(data)
        else:
            c.down += len(data)
        c.last_activity = time.monotonic()
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.on_eof()
        return True  # keep the transport open: the other direction may still flow

    def on_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        t = self.tunnel
        if not t.closed_by:
            t.closed_by = self.name
        out = self.peer.transport
        if out.can_write_eof() and not out.is_closing():
            try:
                out.write_eof()
            except (OSError, RuntimeError) as e:
                t.finish(self.peer.name + "-error", _describe(e))
                return
        else:
            t.finish(self.name)
            return
        if self.peer.eof:
            t.finish(t.closed_by)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.tunnel.finish(self.name + "-error", _describe(exc))
        else:
            self.tunnel.finish(self.tunnel.closed_by or self.name)

    # -- flow control: our transport's write buffer drives the peer's reading ----------------

    def pause_writing(self) -> None:
        self.paused_peer = True
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_peer = False
        if not self.peer.eof:
            self.peer.transport.resume_reading()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _take_over(side: _Side, ep: Endpoint) -> tuple[bytes, bool, BaseException | None]:
    """Install `side` on the endpoint's transport; return what the StreamReader still held.

    Nothing awaits between the takeover of both sides, so no callback can run in between and
    no byte can land in the old StreamReader after its buffer was taken.
    """
    reader = ep.reader
    transport = ep.writer.transport
    buffered = bytes(reader._buffer)
    reader._buffer.clear()
    eof = bool(reader._eof)
    exc = reader.exception()
    transport.set_protocol(side)
    side.transport = transport
    if hasattr(transport, "max_size"):
        transport.max_size = RECV_SIZE  # stdlib selector transport reads up to this per call
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
    if exc is None and transport.is_closing():
        exc = ConnectionResetError("connection closed before the relay started")
    return buffered, eof, exc


def _start(tunnel: _Tunnel, client: Endpoint, target: Endpoint) -> None:
    a = _Side(tunnel, "client", up=True)
    b = _Side(tunnel, "target", up=False)
    a.peer, b.peer = b, a
    tunnel.sides = (a, b)
    got = [_take_over(a, client), _take_over(b, target)]
    for side, (_, _, exc) in zip((a, b), got, strict=True):
        if exc is not None:
            tunnel.finish(side.name + "-error", _describe(exc))
            return
    for side, ep, (buffered, eof, _) in zip((a, b), (client, target), got, strict=True):
        if ep.prefetched:
            side.forward(ep.prefetched)
        if buffered:
            side.forward(buffered)
        if eof:
            side.on_eof()
    for side in (a, b):
        # A transport that already has more than high-water queued never calls pause_writing()
        # on the new protocol; apply the back-pressure by hand.
        if side.transport.get_write_buffer_size() > HIGH_WATER:
            side.pause_writing()
    for side in (a, b):
        if not side.eof and not side.peer.paused_peer:
            side.transport.resume_reading()  # the StreamReader may have paused it
    if not tunnel.done.done():
        tunnel.arm_idle()


def _close(tunnel: _Tunnel, client: Endpoint, target: Endpoint) -> None:
    if tunnel.timer is not None:
        tunnel.timer.cancel()
    for ep in (client, target):
        try:
            ep.writer.transport.close()  # flushes what is still queued, then closes
        except (OSError, RuntimeError):
            pass


async def relay(
    client: Endpoint,
    target: Endpoint,
    *,
    idle_timeout_s: float,
    counters: Counters | None = None,
) -> RelayResult:
    """Relay until both directions ended, one side failed, or nothing moved for idle_timeout_s."""
    c = counters if counters is not None else Counters()
    c.last_activity = time.monotonic()
    tunnel = _Tunnel(asyncio.get_running_loop(), c, idle_timeout_s)
    try:
        _start(tunnel, client, target)
        await tunnel.done
    except asyncio.CancelledError:
        tunnel.closed_by = "cancelled"
        raise
    finally:
        _close(tunnel, client, target)
    return RelayResult(c.up, c.down, tunnel.closed_by or "client", tunnel.error)
