"""The origin side of plain HTTP forwarding: one dialled connection as an asyncio.Protocol.

The forwarder (fwdproxy.proxy.forward) runs the exchange; this module owns the origin's
transport and the h11 machine (CLIENT role) that frames what the origin says. Received bytes go
into h11 at once and the owner is told to pull the events, from the same callback; the
transport's write-buffer callbacks are passed on, so the owner can stop reading the client
while the origin is slow to take a request body. Nothing here waits or runs a Task.

An Origin is created over a `Dialed` transport before it takes the transport over: the owner
writes the request first and then calls `Dialed.hand_over(origin)`, so bytes the origin sent
early are parsed as the response to that request.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import h11

from fwdproxy.core.addr import format_host_port
from fwdproxy.net.relay_fast import HIGH_WATER, LOW_WATER

Key = tuple[str, int, str]  # host, port, route: an origin connection is reused only for the same


class Owner(Protocol):
    """What an Origin reports to (the forwarder)."""

    def origin_data(self, origin: Origin) -> None:
        """New bytes (or the EOF) are in `origin.conn`: pull the events."""

    def origin_lost(self, origin: Origin, exc: Exception | None) -> None:
        """The transport is gone (after its bytes and EOF were reported)."""

    def origin_full(self, origin: Origin, full: bool) -> None:
        """The origin's write buffer passed high-water (True) or drained below low (False)."""


class Origin(asyncio.Protocol):
    """An open origin connection, framed by h11; see the module docstring."""

    __slots__ = ("closed", "conn", "eof", "key", "owner", "transport")

    def __init__(self, key: Key, transport: Any, owner: Owner) -> None:
        self.key = key
        self.transport = transport
        self.owner = owner
        self.conn = h11.Connection(h11.CLIENT)
        self.eof = False
        self.closed = False  # we closed it: later callbacks are not the owner's business
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    @property
    def where(self) -> str:
        """`host:port` for messages."""
        return format_host_port(self.key[0], self.key[1])

    def usable(self, key: Key) -> bool:
        """Idle, open, and for the same host, port and route: the next request may use it."""
        c = self.conn
        return (
            self.key == key
            and c.our_state is h11.IDLE
            and c.their_state is h11.IDLE
            and not self.eof
            and not self.closed
            and not self.transport.is_closing()
        )

    def send(self, event: Any) -> None:
        """Frame `event` with h11 and write it; a body chunk is not copied."""
        parts = self.conn.send_with_data_passthrough(event)
        if parts:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed and not self.eof:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close (what is queued is still written); the owner hears nothing more."""
        if not self.closed:
            self.closed = True
            self.transport.close()

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.closed:
            self.conn.receive_data(data)
            self.owner.origin_data(self)

    def eof_received(self) -> bool:
        if not self.closed:
            self.eof = True
            self.conn.receive_data(b"")
            self.owner.origin_data(self)
        return True  # the owner closes it once the exchange allows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if not self.eof:
            self.eof = True
            self.conn.receive_data(b"")
        self.owner.origin_lost(self, exc)
        self.closed = True

    def pause_writing(self) -> None:
        if not self.closed:
            self.owner.origin_full(self, True)

    def resume_writing(self) -> None:
        if not self.closed:
            self.owner.origin_full(self, False)
