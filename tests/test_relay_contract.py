"""One contract suite for the relay, in each of its modes, on every event loop we support.

The transport-level relay (`fwdproxy.net.relay_fast`) with splice(2) after a threshold, from
the first byte, and never, must behave the same: handshake leftovers first, every byte both ways,
half-close in each direction, bounded buffering against a slow reader, a reset or an idle
timeout closes both sides, cancellation closes both and re-raises.

Each test runs its own event loop (asyncio's and, when installed, uvloop's) so the relay is
checked on both transport implementations; the rig is real loopback sockets:

    test client  <->  [client Endpoint | relay | target Endpoint]  <->  test origin
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from fwdproxy.net import relay as relay_types
from fwdproxy.net import relay_fast
from fwdproxy.net.relay import Counters, Endpoint, RelayResult

RelayFn = Callable[..., Awaitable[RelayResult]]


def _fast_with_splice_after(threshold: int | None) -> RelayFn:
    """relay_fast with splicing from the first byte (0) or never (None)."""

    async def run(*args: Any, **kwargs: Any) -> RelayResult:
        saved = relay_fast.SPLICE_AFTER
        relay_fast.SPLICE_AFTER = threshold
        try:
            return await relay_fast.relay(*args, **kwargs)
        finally:
            relay_fast.SPLICE_AFTER = saved

    return run


RELAYS: dict[str, RelayFn] = {
    "fast": relay_fast.relay,  # plain path, spliced after SPLICE_AFTER bytes (Linux)
    "fast-nosplice": _fast_with_splice_after(None),
}
if relay_fast.SPLICE_AFTER is not None:
    RELAYS["fast-splice0"] = _fast_with_splice_after(0)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:  # optional extra
    pass

# Bytes the proxy may hold per direction while a reader is stalled: both relays keep it to
# about one receive plus the write high-water mark; without flow control it would be the
# whole transfer (TRANSFER below).
HELD_BOUND = 2 * (relay_fast.HIGH_WATER + relay_fast.RECV_SIZE)
TRANSFER = 64 * 1024 * 1024


@pytest.fixture(params=list(RELAYS), ids=list(RELAYS))
def relay_fn(request: pytest.FixtureRequest) -> RelayFn:
    return RELAYS[request.param]


@pytest.fixture(params=list(LOOPS), ids=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on a fresh loop of the parametrized kind; fail on leaked tasks."""
    factory = LOOPS[request.param]

    def _run(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = factory()
        try:
            result = loop.run_until_complete(asyncio.wait_for(coro, 30))
            leaked = [t for t in asyncio.all_tasks(loop) if not t.done()]
            assert not leaked, f"tasks left running: {leaked}"
            return result
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return _run


async def until(pred: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `pred` with a deadline (the suite never sleeps to synchronise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """All bytes up to EOF, and whether the stream ended by a reset instead of an EOF."""
    chunks = []
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return b"".join(chunks), False
            chunks.append(data)
    except ConnectionError:
        return b"".join(chunks), True


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Rig:
    """A test client and a test origin, with the proxy's two Endpoints between them."""

    client_r: asyncio.StreamReader
    client_w: asyncio.StreamWriter
    origin_r: asyncio.StreamReader
    origin_w: asyncio.StreamWriter
    pc_r: asyncio.StreamReader  # proxy side facing the client
    pc_w: asyncio.StreamWriter
    pt_r: asyncio.StreamReader  # proxy side facing the origin
    pt_w: asyncio.StreamWriter

    def __init__(self) -> None:
        self.servers: list[asyncio.base_events.Server] = []
        self.task: asyncio.Task[RelayResult] | None = None
        self.counters = Counters()

    async def start(self) -> Rig:
        accepted: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()

        def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.put_nowait((r, w))

        for _ in range(2):
            self.servers.append(await asyncio.start_server(on_accept, "127.0.0.1", 0))
        proxy_port = self.servers[0].sockets[0].getsockname()[1]
        origin_port = self.servers[1].sockets[0].getsockname()[1]
        self.client_r, self.client_w = await asyncio.open_connection("127.0.0.1", proxy_port)
        self.pc_r, self.pc_w = await accepted.get()
        self.pt_r, self.pt_w = await asyncio.open_connection("127.0.0.1", origin_port)
        self.origin_r, self.origin_w = await accepted.get()
        return self

    def start_relay(
        self,
        relay_fn: RelayFn,
        *,
        prefetched: bytes = b"",
        target_prefetched: bytes = b"",
        idle_timeout_s: float = 30.0,
    ) -> asyncio.Task[RelayResult]:
        self.task = asyncio.get_running_loop().create_task(
            relay_fn(
                Endpoint(self.pc_r, self.pc_w, prefetched),
                Endpoint(self.pt_r, self.pt_w, target_prefetched),
                idle_timeout_s=idle_timeout_s,
                counters=self.counters,
            )
        )
        return self.task

    def held(self) -> int:
        """Bytes of the client->origin direction sitting in the proxy's userspace buffers."""
        return len(self.pc_r._buffer) + self.pt_w.transport.get_write_buffer_size()

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for w in (self.client_w, self.origin_w, self.pc_w, self.pt_w):
            w.close()
        for srv in self.servers:
            srv.close()
            await srv.wait_closed()


async def with_rig(body: Callable[[Rig], Awaitable[None]]) -> None:
    rig = await Rig().start()
    try:
        await body(rig)
    finally:
        await rig.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, which sends a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- ordering of handshake leftovers -------------------------------------------------------


def test_relay_sends_prefetched_then_buffered_bytes_first(relay_fn: RelayFn, run: Any) -> None:
    """`prefetched`, then what the StreamReader already holds, then live bytes, in order."""
    pipelined = payload(1 << 20, 1)  # a client that pipelines 1 MiB right after the handshake

    async def body(rig: Rig) -> None:
        rig.client_w.write(pipelined)
        await until(lambda: len(rig.pc_r._buffer) > 0, "bytes buffered in the StreamReader")
        rig.origin_w.write(b"early-from-origin")
        await until(lambda: len(rig.pt_r._buffer) > 0, "origin bytes buffered")
        rig.start_relay(relay_fn, prefetched=b"PRE|", target_prefetched=b"TPRE|")
        rig.client_w.write(b"|LIVE")
        rig.client_w.write_eof()
        got = await rig.origin_r.read()
        assert got[:4] == b"PRE|"
        assert hashlib.sha256(got[4:-5]).digest() == hashlib.sha256(pipelined).digest()
        assert got[-5:] == b"|LIVE"
        head = await rig.client_r.readexactly(len(b"TPRE|early-from-origin"))
        assert head == b"TPRE|early-from-origin"
        rig.origin_w.close()
        assert await rig.client_r.read() == b""
        res = await rig.task  # type: ignore[misc]
        assert res.up == len(got)
        assert res.down == len(head)
        assert res.error is None

    run(with_rig(body))


def test_relay_carries_eof_seen_before_start(relay_fn: RelayFn, run: Any) -> None:
    """A client that sent its request and EOF before the relay started is half-closed."""

    async def body(rig: Rig) -> None:
        rig.client_w.write(b"request")
        rig.client_w.write_eof()
        await until(lambda: bool(rig.pc_r._eof), "EOF seen by the StreamReader")
        rig.start_relay(relay_fn)
        assert await rig.origin_r.read() == b"request"
        rig.origin_w.write(b"response")
        rig.origin_w.close()
        assert await rig.client_r.read() == b"response"
        res = await rig.task  # type: ignore[misc]
        assert (res.up, res.down, res.closed_by, res.error) == (7, 8, "client", None)

    run(with_rig(body))


# -- bytes both ways, half-close --------------------------------------------------------------


def test_relay_moves_bytes_both_ways_intact(relay_fn: RelayFn, run: Any) -> None:
    up_data, down_data = payload(8 << 20, 2), payload(6 << 20, 3)

    async def send(w: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), 100_000):
            w.write(data[i : i + 100_000])
            await w.drain()
        w.write_eof()

    async def body(rig: Rig) -> None:
        rig.start_relay(relay_fn)
        _, _, (at_origin, r1), (at_client, r2) = await asyncio.gather(
            send(rig.client_w, up_data),
            send(rig.origin_w, down_data),
            read_to_end(rig.origin_r),
            read_to_end(rig.client_r),
        )
        assert not r1 and not r2
        assert hashlib.sha256(at_origin).digest() == hashlib.sha256(up_data).digest()
        assert hashlib.sha256(at_client).digest() == hashlib.sha256(down_data).digest()
        assert rig.counters.up == len(up_data)  # live counters, before the relay returned
        res = await rig.task  # type: ignore[misc]
        assert (res.up, res.down, res.error) == (len(up_data), len(down_data), None)
        assert res.closed_by in ("client", "target")

    run(with_rig(body))


@pytest.mark.parametrize("first", ["client", "target"], ids=["client-eof", "target-eof"])
def test_relay_half_close_keeps_other_direction(relay_fn: RelayFn, run: Any, first: str) -> None:
    """EOF one way becomes write_eof() on the other side; the reverse keeps flowing."""

    async def body(rig: Rig) -> None:
        rig.start_relay(relay_fn)
        ends = {"client": (rig.client_r, rig.client_w), "target": (rig.origin_r, rig.origin_w)}
        closer_r, closer_w = ends[first]
        other_r, other_w = ends["target" if first == "client" else "client"]
        closer_w.write(b"last words")
        closer_w.write_eof()
        assert await other_r.read() == b"last words"  # EOF arrived after the data
        reply = payload(3 << 20, 4)
        other_w.write(reply)
        await other_w.drain()
        other_w.close()
        got, was_reset = await read_to_end(closer_r)
        assert not was_reset
        assert hashlib.sha256(got).digest() == hashlib.sha256(reply).digest()
        res = await rig.task  # type: ignore[misc]
        assert res.closed_by == first
        assert res.error is None

    run(with_rig(body))


# -- back-pressure ----------------------------------------------------------------------------


def test_relay_bounds_buffering_for_a_slow_reader(relay_fn: RelayFn, run: Any) -> None:
    """While the origin does not read, the sender stalls and the proxy holds ~high-water."""
    data = payload(TRANSFER, 5)
    sent = [0]
    peak = [0]

    async def sender(w: asyncio.StreamWriter) -> None:
        for i in range(0, len(data), 256 * 1024):
            w.write(data[i : i + 256 * 1024])
            await w.drain()
            sent[0] = i + 256 * 1024
        w.write_eof()

    async def body(rig: Rig) -> None:
        loop = asyncio.get_running_loop()

        def sample() -> None:  # every loop iteration while the test runs
            peak[0] = max(peak[0], rig.held())
            if not rig.task.done():  # type: ignore[union-attr]
                loop.call_soon(sample)

        rig.start_relay(relay_fn)
        loop.call_soon(sample)
        send_task = loop.create_task(sender(rig.client_w))
        try:
            stalled_at = -1
            for _ in range(400):  # the sender stalls once kernel and proxy buffers are full
                before = sent[0]
                await asyncio.sleep(0.05)
                if sent[0] == before and before > 0:
                    stalled_at = before
                    break
            assert 0 < stalled_at < TRANSFER, "the sender never stalled: no back-pressure"
            assert rig.held() <= HELD_BOUND
            got, _ = await read_to_end(rig.origin_r)
            await send_task
        finally:
            send_task.cancel()
            await asyncio.gather(send_task, return_exceptions=True)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert peak[0] <= HELD_BOUND, f"proxy held {peak[0]} bytes (bound {HELD_BOUND})"
        rig.origin_w.close()
        res = await rig.task  # type: ignore[misc]
        assert res.up == TRANSFER

    run(with_rig(body))


# -- errors, idle, cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "target"], ids=["client-reset", "target-reset"])
def test_relay_reset_closes_both_with_error(relay_fn: RelayFn, run: Any, side: str) -> None:
    async def body(rig: Rig) -> None:
        rig.start_relay(relay_fn)
        rig.client_w.write(b"ping")
        assert await rig.origin_r.readexactly(4) == b"ping"
        if side == "client":
            reset(rig.client_w)
            survivor = rig.origin_r
        else:
            reset(rig.origin_w)
            survivor = rig.client_r
        _, _ = await read_to_end(survivor)  # EOF or reset: either way it was closed
        res = await rig.task  # type: ignore[misc]
        assert res.closed_by == f"{side}-reset"  # the peer vanished: a normal end, logged at INFO
        assert res.error is not None and "Reset" in res.error
        assert rig.pc_w.transport.is_closing() and rig.pt_w.transport.is_closing()

    run(with_rig(body))


@pytest.mark.parametrize(
    "err",
    [errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET],
    ids=["ENOTCONN", "EPIPE", "ECONNRESET"],
)
def test_relay_peer_gone_at_half_close_is_a_reset(
    relay_fn: RelayFn, err: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Go, Java and Node TLS clients close without close_notify: the origin's close_notify and
    FIN then meet a socket the client has already reset, and the half-close fails with one of
    these errnos. The tunnel carried every byte; it must end as a reset, never as an error."""

    def gone(*_: Any) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(relay_fast, "_shutdown_write", gone)  # the splice path's half-close

    async def body(rig: Rig) -> None:
        rig.pc_w.transport.write_eof = gone  # type: ignore[method-assign]
        rig.start_relay(relay_fn)
        rig.origin_w.write(b"close_notify")
        assert await rig.client_r.readexactly(12) == b"close_notify"
        rig.client_w.write_eof()  # the client is done too (it closes without close_notify)
        rig.origin_w.close()  # FIN from the origin: the relay half-closes toward the client
        res = await rig.task  # type: ignore[misc]
        assert not res.closed_by.endswith("-error"), (res.closed_by, res.error)
        assert res.closed_by in ("client-reset", "client", "target"), res.closed_by

    # asyncio's own transports only: uvloop's cannot have write_eof replaced on an instance.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(with_rig(body), 30))
    finally:
        loop.close()


def test_ended_by_classifies_vanished_peers() -> None:
    for e in (
        OSError(errno.ENOTCONN, "x"),
        OSError(errno.EPIPE, "x"),
        ConnectionResetError(),
        BrokenPipeError(),
        ConnectionAbortedError(),
    ):
        assert relay_types.ended_by("client", e) == "client-reset"
    assert relay_types.ended_by("target", OSError(errno.EIO, "x")) == "target-error"
    assert relay_types.ended_by("target", RuntimeError("x")) == "target-error"


def test_relay_idle_timeout_closes_both(relay_fn: RelayFn, run: Any) -> None:
    async def body(rig: Rig) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = rig.start_relay(relay_fn, idle_timeout_s=0.4)
        for _ in range(5):  # traffic every 0.15 s keeps it open past the idle timeout
            rig.client_w.write(b"k")
            assert await rig.origin_r.readexactly(1) == b"k"
            await asyncio.sleep(0.15)
        assert not task.done(), "closed although bytes kept moving"
        assert (await read_to_end(rig.client_r))[0] == b""
        assert (await read_to_end(rig.origin_r))[0] == b""
        res = await task
        assert res.closed_by == "idle"
        assert res.error is not None
        assert loop.time() - start < 5

    run(with_rig(body))


def test_relay_cancellation_closes_both_and_reraises(relay_fn: RelayFn, run: Any) -> None:
    async def body(rig: Rig) -> None:
        task = rig.start_relay(relay_fn)
        rig.origin_w.write(b"hello")
        assert await rig.client_r.readexactly(5) == b"hello"
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert (await read_to_end(rig.client_r))[0] == b""
        assert (await read_to_end(rig.origin_r))[0] == b""

    run(with_rig(body))
