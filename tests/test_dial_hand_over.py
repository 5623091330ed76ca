"""Dialed.hand_over: a protocol that takes a dialled transport over sees what Inbound held, in
the order it happened, as if it had owned the transport from the start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers import LOOPBACK, TcpServer, poll_until

from fwdproxy.net.dial import Dialed, Inbound

pytestmark = pytest.mark.timeout(30)


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open: bool = True) -> None:
        self.events: list[Any] = []
        self.keep_open = keep_open

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


class SpeakFirst(TcpServer):
    """Sends a banner and half-closes, then reads until the client closes (a server that
    speaks first: SSH, SMTP)."""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()
        while await r.read(65536):
            pass


async def dial(port: int) -> Dialed:
    t, ib = await asyncio.get_running_loop().create_connection(Inbound, LOOPBACK, port)
    return Dialed(t, ib)


async def test_early_bytes_then_eof_are_replayed_in_order() -> None:
    async with SpeakFirst() as srv:
        d = await dial(srv.port)
        await poll_until(lambda: d.inbound.eof, 5, "the banner and its EOF")
        rec = Recorder()
        d.hand_over(rec)
        assert rec.events == ["made", b"banner", "eof"]
        assert not d.transport.is_closing()  # the new protocol asked to keep it open
        d.transport.write(b"still writable")
        d.transport.close()
        await poll_until(lambda: rec.events[-1][0] == "lost", 5, "the close")


async def test_eof_closes_when_the_new_protocol_says_so() -> None:
    async with SpeakFirst() as srv:
        d = await dial(srv.port)
        await poll_until(lambda: d.inbound.eof, 5, "the EOF")
        rec = Recorder(keep_open=False)
        d.hand_over(rec)
        assert d.transport.is_closing()
        await poll_until(lambda: rec.events[-1][0] == "lost", 5, "the close")


async def test_a_connection_already_lost_is_reported_after_its_bytes() -> None:
    async with SpeakFirst() as srv:
        d = await dial(srv.port)
        await poll_until(lambda: d.inbound.eof, 5, "the EOF")
        d.transport.close()
        await poll_until(lambda: d.inbound.lost, 5, "the loss")
        rec = Recorder()
        d.hand_over(rec)
        assert rec.events == ["made", b"banner", ("lost", None)]


async def test_reading_paused_by_inbound_is_resumed() -> None:
    async with SpeakFirst() as srv:
        t, ib = await asyncio.get_running_loop().create_connection(Inbound, LOOPBACK, srv.port)
        t.pause_reading()  # as Inbound does at EARLY_LIMIT
        rec = Recorder()
        Dialed(t, ib).hand_over(rec)
        await poll_until(lambda: "eof" in rec.events, 5, "reading to resume")
        assert rec.events == ["made", b"banner", "eof"]
        t.close()
