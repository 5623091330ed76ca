"""The fast byte relay: asyncio Protocol level, no task, await or copy per chunk.

Same call and contract as `fwdproxy.relay.relay` (which stays the reference implementation),
but after the handshake it takes over the two transports with `transport.set_protocol()`.
Received chunks go straight to the other transport's `write()` from the read callback, so a
chunk costs one `recv` and one `send` and nothing else: no `StreamReader` buffer, no
`drain()` future, no task switch. The stream relay spends most of its time in exactly those.

Flow control is the transports' own: when one side's write buffer passes the high-water mark
its `pause_writing()` pauses reading on the other side, and `resume_writing()` resumes it, so
the bytes held per direction stay below about high-water plus one receive.

Bulk directions move to splice(2) (Linux): once a direction has carried SPLICE_AFTER bytes,
its bytes go socket -> pipe -> socket inside the kernel and never enter Python, which about
halves the proxy's CPU per GiB (bench/splice_experiment.py). Short exchanges never get there
and keep the cheaper set-up of the plain path. FWDPROXY_SPLICE=0 turns splicing off.

Bytes the handshake had already read (`Endpoint.prefetched`, then whatever sits in the
`StreamReader` buffer) go out first, and an EOF the `StreamReader` had already seen is carried
over as a half-close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from fwdproxy.net.relay import Counters, Endpoint, RelayResult, describe, ended_by

__all__ = ["Counters", "Endpoint", "RelayResult", "relay"]

# Pause reading the other side once this much waits in a write buffer; resume below LOW.
HIGH_WATER: Final = 512 * 1024
LOW_WATER: Final = 128 * 1024
# Receive size of the stdlib selector transport (its class default is 256 KiB); uvloop uses its
# own fixed 256 KiB buffer. Larger reads mean fewer callbacks per GiB on bulk transfers.
RECV_SIZE: Final = 1024 * 1024
# A direction that has carried this many bytes is handed to splice(2); None disables it.
SPLICE_AFTER: int | None = (
    1024 * 1024
    if sys.platform == "linux"
    and hasattr(os, "splice")
    and os.environ.get("FWDPROXY_SPLICE") != "0"
    else None
)
PIPE_SIZE: Final = 1024 * 1024


class _IdleSweeper:
    """One timer per event loop checks the last-activity stamp of every open tunnel.

    A timer per tunnel costs ~0.5 KiB each (handle, callback, heap entry) on 10,000 idle
    tunnels; one sweep per second over a set costs ~1 ms. A tunnel closes between idle_s and
    idle_s plus one period (at most a quarter of its idle time).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tunnels: set[Tunnel] = set()
        self.period_s = 1.0
        self.handle: asyncio.TimerHandle | None = None

    def add(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        period = min(1.0, tunnel.idle_s / 4)
        if self.handle is None or period < self.period_s:
            self.period_s = period
            self.schedule()

    def discard(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        if not self.tunnels and self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def schedule(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_later(self.period_s, self.sweep)

    def sweep(self) -> None:
        self.handle = None
        now = time.monotonic()
        shortest = 4.0
        for t in list(self.tunnels):
            if now - t.counters.last_activity >= t.idle_s:
                self.tunnels.discard(t)
                t.finish("idle", f"no data for {t.idle_s:g}s")
            else:
                shortest = min(shortest, t.idle_s)
        if self.tunnels:
            self.period_s = min(1.0, shortest / 4)
            self.schedule()


_SWEEPERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _IdleSweeper] = (
    weakref.WeakKeyDictionary()
)


def _sweeper(loop: asyncio.AbstractEventLoop) -> _IdleSweeper:
    sw = _SWEEPERS.get(loop)
    if sw is None:
        sw = _SWEEPERS[loop] = _IdleSweeper(loop)
    return sw


class Tunnel:
    """State shared by both sides: counters, the idle deadline and the outcome."""

    __slots__ = (
        "__weakref__",
        "closed_by",
        "counters",
        "error",
        "finished",
        "idle_s",
        "loop",
        "on_done",
        "sides",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        idle_s: float,
        on_done: Callable[[RelayResult], None],
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.idle_s = idle_s
        self.on_done = on_done
        self.finished = False
        self.closed_by = ""
        self.error: str | None = None
        self.sides: tuple[_Side, _Side] | None = None

    def finish(self, closed_by: str, error: str | None = None) -> None:
        """Record the first outcome, close both sides and report; later calls are ignored."""
        if self.finished:
            return
        self.finished = True
        self.closed_by = closed_by
        self.error = error
        self.close()
        c = self.counters
        self.on_done(RelayResult(c.up, c.down, closed_by or "client", error))

    def close(self) -> None:
        sw = _SWEEPERS.get(self.loop)
        if sw is not None:
            sw.discard(self)
        for side in self.sides or ():
            if side.splicer is not None:
                side.splicer.close()
            try:
                side.transport.close()  # flushes what is still queued, then closes
            except (OSError, RuntimeError):
                pass


class _Side(asyncio.Protocol):
    """Protocol on one transport: what it receives goes to the peer side's transport."""

    __slots__ = (
        "eof",
        "moved",
        "name",
        "paused_peer",
        "peer",
        "splicer",
        "transport",
        "tunnel",
        "up",
    )

    def __init__(self, tunnel: Tunnel, name: str, up: bool) -> None:
        self.tunnel = tunnel
        self.name = name  # "client" or "target": who closed, in RelayResult.closed_by
        self.up = up  # True: bytes from this side count as client -> target
        self.transport: Any = None
        self.peer: _Side = self
        self.eof = False  # this side sent EOF (we half-closed the peer)
        self.paused_peer = False  # our write buffer is full: the peer is not being read
        self.moved = 0  # bytes received on this side
        self.splicer: _Splicer | None = None  # set once this side's reading moves to splice

    # -- receiving ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.forward(data)

    def forward(self, data: bytes) -> None:
        if self.tunnel.finished:
            return  # the tunnel is being torn down; the peer may already be gone
        c = self.tunnel.counters
        if self.up:
            c.up += len(data)
        else:
            c.down += len(data)
        c.last_activity = time.monotonic()
        self.peer.transport.write(data)
        self.moved += len(data)
        if SPLICE_AFTER is not None and self.moved >= SPLICE_AFTER and self.splicer is None:
            _Splicer.begin(self)

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
                t.finish(ended_by(self.peer.name, e), describe(e))
                return
        else:
            t.finish(self.name)
            return
        if self.peer.eof:
            t.finish(t.closed_by)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.tunnel.finish(ended_by(self.name, exc), describe(exc))
        else:
            self.tunnel.finish(self.tunnel.closed_by or self.name)

    # -- flow control: our transport's write buffer drives the peer's reading ----------------

    def pause_writing(self) -> None:
        self.paused_peer = True
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_peer = False
        sp = self.peer.splicer
        if sp is not None:
            sp.start()  # our transport's buffer ran empty: the peer's splice may begin
        elif not self.peer.eof:
            self.peer.transport.resume_reading()


class _Splicer:
    """One direction moved by splice(2): source socket -> pipe -> destination socket.

    The switch happens between two chunks: reading the source transport stops, and splicing
    starts only after the destination transport has written out everything queued in it, so
    bytes never overtake each other. The transports keep their sockets (the other direction
    still uses them); we work on duplicated descriptors, which the event loop lets us watch.
    """

    __slots__ = (
        "capacity",
        "dst",
        "in_pipe",
        "loop",
        "pipe_r",
        "pipe_w",
        "reading",
        "side",
        "src",
        "state",
        "writing",
    )

    def __init__(self, side: _Side) -> None:
        self.side = side
        self.loop = side.tunnel.loop
        self.state = "draining"  # -> "running" -> "closed"
        self.src = self.dst = self.pipe_r = self.pipe_w = -1
        self.in_pipe = 0
        self.capacity = 64 * 1024  # the pipe's size, once known
        self.reading = False
        self.writing = False  # waiting for the destination to take more

    @classmethod
    def begin(cls, side: _Side) -> None:
        src_sock = side.transport.get_extra_info("socket")
        dst_sock = side.peer.transport.get_extra_info("socket")
        if src_sock is None or dst_sock is None or side.peer.transport.is_closing():
            side.moved = -(1 << 62)  # not a plain socket pair: stay on the plain path
            return
        sp = side.splicer = cls(side)
        side.transport.pause_reading()
        out = side.peer.transport
        # Ask for resume_writing() exactly when the destination's buffer is empty.
        out.set_write_buffer_limits(high=0, low=0)
        if out.get_write_buffer_size() == 0:
            sp.start()

    def start(self) -> None:
        if self.state != "draining" or self.side.tunnel.finished:
            return
        side = self.side
        side.peer.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError, AttributeError):
                import fcntl

                fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                self.capacity = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
            self.src = os.dup(side.transport.get_extra_info("socket").fileno())
            self.dst = os.dup(side.peer.transport.get_extra_info("socket").fileno())
        except OSError as e:
            self.close()
            side.tunnel.finish("error", describe(e))
            return
        self.state = "running"
        self.want_read(True)

    def want_read(self, on: bool) -> None:
        if on and not self.reading:
            self.loop.add_reader(self.src, self.readable)
        elif not on and self.reading:
            self.loop.remove_reader(self.src)
        self.reading = on

    def readable(self) -> None:
        side = self.side
        space = self.capacity - self.in_pipe
        try:
            n = os.splice(self.src, self.pipe_w, space, flags=_SPLICE_FLAGS) if space > 0 else -1
        except BlockingIOError:
            if self.in_pipe:
                n = -1  # the pipe is full (smaller than we thought)
            else:
                return  # spurious wake-up
        except OSError as e:
            side.tunnel.finish(ended_by(side.name, e), describe(e))
            return
        if n < 0:
            self.want_read(False)  # back-pressure: resume once the destination took some
            return
        if n == 0:
            self.want_read(False)
            self.src_eof()
            return
        c = side.tunnel.counters
        if side.up:
            c.up += n
        else:
            c.down += n
        c.last_activity = time.monotonic()
        self.in_pipe += n
        if not self.writing:
            self.flush()

    def flush(self) -> None:
        """Move the pipe's bytes on; while the destination is full, the pipe keeps filling."""
        while self.in_pipe:
            try:
                m = os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.dst, self.writable)
                return
            except OSError as e:
                self.side.tunnel.finish(ended_by(self.side.peer.name, e), describe(e))
                return
            self.in_pipe -= m
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        if self.side.eof:
            self.shut_dst()

    def writable(self) -> None:
        self.flush()
        if self.state == "running" and not self.side.eof and self.in_pipe < self.capacity:
            self.want_read(True)

    def src_eof(self) -> None:
        side = self.side
        side.eof = True
        t = side.tunnel
        if not t.closed_by:
            t.closed_by = side.name
        if self.in_pipe == 0:
            self.shut_dst()

    def shut_dst(self) -> None:
        t = self.side.tunnel
        try:
            _shutdown_write(self.dst)
        except OSError as e:
            t.finish(ended_by(self.side.peer.name, e), describe(e))
            return
        if self.side.peer.eof:
            t.finish(t.closed_by)

    def close(self) -> None:
        if self.state == "closed":
            return
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        for fd in (self.src, self.dst, self.pipe_r, self.pipe_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.state = "closed"


_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def _shutdown_write(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.detach()


def _install(side: _Side, transport: Any) -> None:
    transport.set_protocol(side)
    side.transport = transport
    if hasattr(transport, "max_size"):
        transport.max_size = RECV_SIZE  # stdlib selector transport reads up to this per call
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)


def _shrink(old: Any) -> None:
    """Free what the replaced StreamReaderProtocol holds but will never use again.

    It stays referenced by the session's StreamWriter for the tunnel's lifetime, and since
    Python 3.12 (and 3.11.x) its empty drain-waiter deque alone is ~0.7 KiB; a list does the
    same job (append/remove/iterate) in 56 bytes. 10,000 idle tunnels have 20,000 of them.
    """
    waiters = getattr(old, "_drain_waiters", None)
    if isinstance(waiters, collections.deque) and not waiters:
        old._drain_waiters = []


class Leftover:
    """What one side had already received (and whether it ended) before the relay took over."""

    __slots__ = ("data", "eof", "error")

    def __init__(
        self, data: bytes = b"", eof: bool = False, error: BaseException | None = None
    ) -> None:
        self.data = data
        self.eof = eof
        self.error = error


def start_relay(
    client: asyncio.BaseTransport,
    target: asyncio.BaseTransport,
    *,
    client_leftover: Leftover | None = None,
    target_leftover: Leftover | None = None,
    idle_timeout_s: float,
    counters: Counters | None = None,
    on_done: Callable[[RelayResult], None],
) -> Tunnel:
    """Relay between two transports without a task or coroutine; `on_done` is called once.

    For a protocol-level accept path: the session hands over its two transports and the bytes
    it read past the handshake. Nothing else is allocated per tunnel than two protocol
    objects and the shared state, and nothing waits: every step runs from a transport
    callback. The transports are closed before `on_done(result)` is called.
    """
    c = counters if counters is not None else Counters()
    c.last_activity = time.monotonic()
    tunnel = Tunnel(asyncio.get_running_loop(), c, idle_timeout_s, on_done)
    a = _Side(tunnel, "client", up=True)
    b = _Side(tunnel, "target", up=False)
    a.peer, b.peer = b, a
    tunnel.sides = (a, b)
    _install(a, client)
    _install(b, target)
    lefts = (client_leftover or Leftover(), target_leftover or Leftover())
    for side, left in zip((a, b), lefts, strict=True):
        if left.error is None and side.transport.is_closing():
            left.error = ConnectionResetError("connection closed before the relay started")
        if left.error is not None:
            tunnel.finish(ended_by(side.name, left.error), describe(left.error))
            return tunnel
    for side, left in zip((a, b), lefts, strict=True):
        if left.data:
            side.forward(left.data)
        if left.eof:
            side.on_eof()
    for side in (a, b):
        # A transport that already has more than high-water queued never calls pause_writing()
        # on the new protocol; apply the back-pressure by hand.
        if side.transport.get_write_buffer_size() > HIGH_WATER:
            side.pause_writing()
    for side in (a, b):
        if not side.eof and not side.peer.paused_peer and side.splicer is None:
            side.transport.resume_reading()  # the StreamReader may have paused it
    if not tunnel.finished:
        _sweeper(tunnel.loop).add(tunnel)
    return tunnel


def _leftover(ep: Endpoint) -> Leftover:
    """Take what the endpoint's StreamReader holds; the relay owns the transport from now on.

    Nothing awaits between the takeover of both sides, so no callback can run in between and
    no byte can land in the old StreamReader after its buffer was taken.
    """
    reader: Any = ep.reader  # the StreamReader's buffer: nothing public hands it over
    data = ep.prefetched + bytes(reader._buffer) if reader._buffer else ep.prefetched
    reader._buffer.clear()
    _shrink(ep.writer.transport.get_protocol())
    return Leftover(data, bool(reader._eof), reader.exception())


async def relay(
    client: Endpoint,
    target: Endpoint,
    *,
    idle_timeout_s: float,
    counters: Counters | None = None,
) -> RelayResult:
    """Relay until both directions ended, one side failed, or nothing moved for idle_timeout_s."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[RelayResult] = loop.create_future()
    c = counters if counters is not None else Counters()

    def on_done(result: RelayResult) -> None:
        if not done.done():  # cancelled while waiting: the result has nowhere to go
            done.set_result(result)

    start_relay(
        client.writer.transport,
        target.writer.transport,
        client_leftover=_leftover(client),
        target_leftover=_leftover(target),
        idle_timeout_s=idle_timeout_s,
        counters=c,
        on_done=on_done,
    )
    try:
        return await done
    except asyncio.CancelledError:
        sides = client.writer.transport.get_protocol()
        if isinstance(sides, _Side):
            sides.tunnel.finish("cancelled")
        raise
