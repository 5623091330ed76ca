"""The plain-HTTP forwarder as a state machine: flow control in both directions, pipelining,
100-continue, an origin that answers early or not at all, half-closes and shutdown.

Real sockets to an in-process proxy. Where a test looks inside (the forwarder's transports), it
waits for a state the proxy must reach, never for time to pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    TUNNEL_NAME,
    CaptureOrigin,
    MiB,
    MiniSocks5,
    Origin,
    RunningProxy,
    TcpServer,
    payload,
    poll_until,
    read_response,
    sha256,
)

from fwdproxy.net.relay_fast import HIGH_WATER
from fwdproxy.proxy.forward import HOLD_DIAL, HOLD_ORIGIN, Forwarder

pytestmark = pytest.mark.timeout(60)

# What may sit in the proxy for one direction beyond the kernel's socket buffers: the
# transport's high-water mark plus one receive (256 KiB on either loop) plus slack.
BOUND = HIGH_WATER + 1 * MiB


def get(authority: str, path: str, extra: str = "", method: str = "GET") -> bytes:
    head = f"{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n"
    return head.encode()


async def forwarder(proxy: RunningProxy) -> Forwarder:
    """The forwarder of the proxy's only connection, once it has one (white-box: the test
    waits on its state)."""

    def find() -> Forwarder | None:
        infos = list(proxy.server.state.connections.values())
        if len(infos) != 1 or infos[0].closer is None:
            return None
        conn: Any = infos[0].closer.__self__  # type: ignore[attr-defined]
        return conn.forwarder  # type: ignore[no-any-return]

    await poll_until(lambda: find() is not None, 10, "the forwarder")
    fw = find()
    assert fw is not None
    return fw


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "fwdproxy.access"]  # type: ignore[attr-defined]


async def small_buffer_client(proxy: RunningProxy) -> tuple[asyncio.StreamReader, Any]:
    """A client socket with a small receive buffer, so a client that stops reading is felt."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (proxy.host, proxy.port))
    return await asyncio.open_connection(sock=sock, limit=64 * 1024)


# -- flow control ---------------------------------------------------------------------------


async def test_slow_reader_of_a_big_response_pauses_the_origin(
    proxy: RunningProxy, origin: Origin
) -> None:
    """The proxy stops reading the origin instead of buffering a response the client can't take."""
    n = 64 * MiB
    r, w = await small_buffer_client(proxy)
    try:
        w.write(get(f"{DIRECT_NAME}:{origin.port}", f"/bytes/{n}"))
        fw = await forwarder(proxy)
        # The client reads nothing: the proxy must come to a stop with the origin paused.
        await poll_until(
            lambda: fw.origin is not None and not fw.origin.transport.is_reading(),
            20,
            "reading the origin to pause",
        )
        assert fw.transport.get_write_buffer_size() <= BOUND
        assert fw.counters.down < 16 * MiB, fw.counters.down  # of 64 MiB: far from all of it
        resp = await read_response(r, timeout_s=30)  # reading resumes it: all of it arrives
    finally:
        w.close()
    assert resp.status == 200 and len(resp.body) == n
    assert sha256(resp.body) == sha256(payload(n))


class StallingOrigin(TcpServer):
    """Reads a request head, then reads the body only once `gate` is set; answers its hash."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.head_seen = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        self.head_seen.set()
        await self.gate.wait()
        h = hashlib.sha256()
        while length:
            chunk = await r.read(min(length, 1 << 20))
            if not chunk:
                return
            h.update(chunk)
            length -= len(chunk)
        body = h.hexdigest().encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()


async def test_slow_origin_reader_pauses_the_client_upload(proxy: RunningProxy) -> None:
    """An origin that takes the body slowly stops the proxy reading the client."""
    n = 64 * MiB
    body = payload(n, seed=7)
    async with StallingOrigin() as up:
        authority = f"{DIRECT_NAME}:{up.port}"
        r, w = await proxy.open()
        try:
            w.write(get(authority, "/up", f"Content-Length: {n}\r\n", "POST"))
            w.write(body)  # all of it queued on our side; the kernel takes what it can
            await asyncio.wait_for(up.head_seen.wait(), 10)
            fw = await forwarder(proxy)
            await poll_until(
                lambda: bool(fw.hold & HOLD_ORIGIN) and not fw.transport.is_reading(),
                20,
                "reading the client to pause",
            )
            assert fw.origin is not None
            assert fw.origin.transport.get_write_buffer_size() <= BOUND
            assert fw.counters.up < 16 * MiB, fw.counters.up
            up.gate.set()
            resp = await read_response(r, timeout_s=30)
        finally:
            w.close()
    assert resp.status == 200 and resp.text == sha256(body)


class GatedMiniSocks5(MiniSocks5):
    """A SOCKS5 upstream that answers nothing until `gate` is set: a dial that takes long."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.seen = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.seen.set()
        await self.gate.wait()
        await super().handle(r, w)


async def test_a_body_sent_during_a_slow_dial_is_held_back_not_buffered(
    make_proxy: Any, origin: Origin
) -> None:
    """While the origin is being dialled the proxy keeps what came, up to a bound, then stops
    reading the client; after the dial all of the body reaches the origin."""
    n = 16 * MiB
    body = payload(n, seed=9)
    async with GatedMiniSocks5() as up:
        proxy = await make_proxy(upstream_url=f"socks5://127.0.0.1:{up.port}")
        r, w = await proxy.open()
        try:
            w.write(
                get(f"{TUNNEL_NAME}:{origin.port}", "/upload", f"Content-Length: {n}\r\n", "POST")
            )
            w.write(body)
            await asyncio.wait_for(up.seen.wait(), 10)
            fw = await forwarder(proxy)
            await poll_until(
                lambda: bool(fw.hold & HOLD_DIAL) and not fw.transport.is_reading(),
                10,
                "reading the client to pause during the dial",
            )
            assert fw.early <= BOUND, fw.early
            up.gate.set()
            resp = await read_response(r, timeout_s=30)
        finally:
            w.close()
            up.gate.set()
    assert resp.status == 200, resp.text
    assert resp.json()["body_len"] == n and resp.json()["body_sha256"] == sha256(body)


# -- pipelining -----------------------------------------------------------------------------


async def test_pipelined_requests_across_hosts_and_refusals_are_answered_in_order(
    proxy: RunningProxy, origin: Origin
) -> None:
    direct = f"{DIRECT_NAME}:{origin.port}"
    tunnel = f"{TUNNEL_NAME}:{origin.port}"
    body = payload(300_000, seed=2)
    raw = (
        get(direct, "/echo/1")
        + get(direct, "/echo/2", f"Content-Length: {len(body)}\r\n", "POST")
        + body
        + get("x.blocked.test", "/3")
        + get(tunnel, "/echo/4", "Transfer-Encoding: chunked\r\n", "PUT")
        + b"5\r\nhello\r\n0\r\n\r\n"
        + get(direct, "/echo/5")
    )
    r, w = await proxy.open()
    try:
        w.write(raw)
        got = [await read_response(r) for _ in range(5)]
    finally:
        w.close()
    assert [g.status for g in got] == [200, 200, 403, 200, 200]
    assert [got[i].json()["path"] for i in (0, 1, 3, 4)] == [f"/echo/{i}" for i in (1, 2, 4, 5)]
    assert got[1].json()["body_sha256"] == sha256(body)
    assert got[3].json()["body_len"] == 5


async def test_many_pipelined_refusals_are_answered_without_recursion(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Refusals are answered synchronously; a long pipeline of them must not nest calls."""
    n = 3000  # deeper than Python's default recursion limit
    r, w = await proxy.open()
    try:
        w.write(get("x.blocked.test", "/") * n + get(f"{DIRECT_NAME}:{origin.port}", "/echo/z"))
        for _ in range(n):
            assert (await read_response(r)).status == 403
        last = await read_response(r)
    finally:
        w.close()
    assert last.status == 200 and last.json()["path"] == "/echo/z"


# -- 100-continue -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    proxy: RunningProxy, version: str
) -> None:
    """The client waits for the 100 before its body (none for HTTP/1.0, RFC 9110 §10.1.1);
    the origin never sees Expect."""
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        head = (
            f"POST http://{authority}/up HTTP/{version}\r\nHost: {authority}\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        ).encode()
        r, w = await proxy.open()
        try:
            w.write(head)
            if version == "1.1":
                first = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert first.startswith(b"HTTP/1.1 100 ")
            w.write(b"hello")
            resp = await read_response(r)
        finally:
            w.close()
    assert resp.status == 200 and resp.informational == []
    assert cap.requests[0].body == b"hello"
    assert cap.requests[0].header("expect") is None


# -- origins that answer early, late or never ---------------------------------------------------


class EarlyOrigin(TcpServer):
    """Answers 413 as soon as it has the head, before reading the body, and half-closes."""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\n")
        w.write(b"big")
        w.write_eof()
        while await r.read(1 << 20):  # a lingering close: closing unread input would reset
            pass


async def test_an_origin_answering_before_the_body_ends_reaches_the_client(
    proxy: RunningProxy, origin: Origin
) -> None:
    """The response is relayed while the body still streams; the rest of the body is dropped
    and the connection serves the next request."""
    n = 8 * MiB
    async with EarlyOrigin() as up:
        authority = f"{DIRECT_NAME}:{up.port}"
        r, w = await proxy.open()
        try:
            w.write(get(authority, "/up", f"Content-Length: {n}\r\n", "POST"))
            w.write(payload(n))
            resp = await read_response(r, timeout_s=30)
            assert resp.status == 413 and resp.body == b"big"
            w.write(get(f"{DIRECT_NAME}:{origin.port}", "/echo/after"))
            after = await read_response(r, timeout_s=30)
        finally:
            w.close()
    assert after.status == 200 and after.json()["path"] == "/echo/after"


async def test_a_silent_origin_gets_504_and_the_connection_stays_usable(
    make_proxy: Any, origin: Origin, blackhole: Any
) -> None:
    proxy = await make_proxy(limits={"idle_timeout_s": 0.5})
    r, w = await proxy.open()
    try:
        w.write(get(f"{DIRECT_NAME}:{blackhole.port}", "/hang"))
        resp = await read_response(r)
        assert resp.status == 504
        assert f"{DIRECT_NAME}:{blackhole.port}" in resp.text and "no response" in resp.text
        w.write(get(f"{DIRECT_NAME}:{origin.port}", "/echo/next"))
        nxt = await read_response(r)
    finally:
        w.close()
    assert nxt.status == 200 and nxt.json()["path"] == "/echo/next"


class GatedOrigin(TcpServer):
    """Holds its response until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.request_seen = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        self.request_seen.set()
        await self.gate.wait()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await w.drain()
        await r.read()


async def test_shutdown_closes_a_busy_forwarding_connection_once_its_response_is_done(
    make_proxy: Any,
) -> None:
    """In flight at shutdown: the response still arrives, then the connection closes at once
    instead of idling until the grace period ends."""
    proxy = await make_proxy(limits={"shutdown_grace_s": 30})
    async with GatedOrigin() as up:
        r, w = await proxy.open()
        stopping: asyncio.Future[None] | None = None
        try:
            w.write(get(f"{DIRECT_NAME}:{up.port}", "/slow"))
            await asyncio.wait_for(up.request_seen.wait(), 10)
            stopping = asyncio.ensure_future(proxy.server.stop(grace_s=30))
            await poll_until(lambda: not proxy.server.state.accepting, 5, "shutdown to begin")
            assert not stopping.done()  # the exchange in flight holds it
            up.gate.set()
            resp = await read_response(r)
            assert resp.status == 200 and resp.body == b"late"
            assert await asyncio.wait_for(r.read(), 5) == b""
            await asyncio.wait_for(stopping, 5)
        finally:
            w.close()
            up.gate.set()
            if stopping is not None and not stopping.done():
                stopping.cancel()


# -- half-closes --------------------------------------------------------------------------------


async def test_client_half_close_after_the_request_still_gets_a_close_delimited_body(
    proxy: RunningProxy,
) -> None:
    body = payload(500_000, seed=4)
    async with CaptureOrigin(b"HTTP/1.1 200 OK\r\n\r\n" + body, close_after=True) as cap:
        r, w = await proxy.open()
        try:
            w.write(get(f"{DIRECT_NAME}:{cap.port}", "/"))
            w.write_eof()
            resp = await read_response(r)
        finally:
            w.close()
    assert resp.status == 200 and sha256(resp.body) == sha256(body)


async def test_client_gone_in_the_middle_of_a_request_body_is_a_bad_request(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Not an internal error: a half-sent body is the client's doing."""
    caplog.set_level(logging.INFO)
    async with CaptureOrigin() as cap:
        r, w = await proxy.open()
        try:
            w.write(get(f"{DIRECT_NAME}:{cap.port}", "/up", "Content-Length: 100\r\n", "POST"))
            w.write(b"x" * 10)
            w.write_eof()
            rest = await asyncio.wait_for(r.read(), 10)
        finally:
            w.close()
    assert rest.startswith(b"HTTP/1.1 400"), rest[:100]
    await poll_until(lambda: not proxy.server.state.connections, 5, "the connection to end")
    assert not [x for x in caplog.records if x.levelno >= logging.ERROR]
    (fields,) = access_fields(caplog)
    assert fields["outcome"] == "bad-request"
    assert "middle of a request body" in fields["error"]


async def test_informational_responses_are_relayed_before_the_final_one(
    proxy: RunningProxy,
) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with CaptureOrigin(hints + final) as cap:
        r, w = await proxy.open()
        try:
            w.write(get(f"{DIRECT_NAME}:{cap.port}", "/"))
            resp = await read_response(r)
        finally:
            w.close()
    assert resp.informational == [103]
    assert resp.status == 200 and resp.body == b"ok"


async def test_an_idle_kept_alive_connection_is_closed_after_idle_timeout(
    make_proxy: Any, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy = await make_proxy(limits={"idle_timeout_s": 0.5})
    r, w = await proxy.open()
    try:
        w.write(get(f"{DIRECT_NAME}:{origin.port}", "/echo/once"))
        assert (await read_response(r)).status == 200
        assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the proxy, not by us
    finally:
        w.close()
    await poll_until(lambda: not proxy.server.state.connections, 5, "the connection to end")
    (fields,) = access_fields(caplog)
    assert fields["outcome"] == "idle-timeout" and fields["requests"] == 1
