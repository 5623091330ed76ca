"""Garbage and abuse on the shared port; after every case the proxy still serves normally."""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    EchoServer,
    RunningProxy,
    assert_closed_without_reply,
    closed_port,
    connect_head,
    http_exchange,
    open_connect_tunnel,
    poll_until,
    read_response,
    socks4_request_bytes,
    socks5_addr,
    socks5_request,
)

pytestmark = pytest.mark.timeout(60)


async def assert_serves(proxy: RunningProxy, echo: EchoServer) -> None:
    r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    try:
        w.write(b"ok?")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"ok?"
    finally:
        w.close()
    reply, r, w = await socks5_request(proxy, DIRECT_NAME, echo.port, then=b"ok!")
    try:
        assert reply.code == 0
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"ok!"
    finally:
        w.close()


def client_hello() -> bytes:
    """The first flight of a real TLS client (what `https://` in a proxy URL sends)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="proxy.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def test_tls_hello_to_the_plain_port_is_closed_silently(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    hello = client_hello()
    assert hello[0] == 0x16
    r, w = await proxy.open()
    try:
        w.write(hello)
        await assert_closed_without_reply(r)
    finally:
        w.close()
    await assert_serves(proxy, echo)


async def test_tls_client_to_the_plain_port_fails_fast(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    start = time.monotonic()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.wait_for(
            asyncio.open_connection(proxy.host, proxy.port, ssl=ctx, server_hostname="x"), 10
        )
    assert time.monotonic() - start < 5
    await assert_serves(proxy, echo)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\x00\x01\x02\xffgarbage", "unrecognised first byte 0x00"),
        (b"\x7fELF\x02\x01\x01", "unrecognised first byte 0x7f"),
        (b"get / HTTP/1.1\r\n\r\n", "lowercase"),
    ],
    ids=["binary", "elf", "lowercase-method"],
)
async def test_garbage_first_bytes_get_400(
    proxy: RunningProxy, echo: EchoServer, data: bytes, fragment: str
) -> None:
    resp = await http_exchange(proxy, data)
    assert resp.status == 400
    assert fragment in resp.text
    await assert_serves(proxy, echo)


@pytest.mark.parametrize("method", ["GET http://direct.test/", "CONNECT direct.test:443"])
async def test_oversized_head_gets_431(proxy: RunningProxy, echo: EchoServer, method: str) -> None:
    head = f"{method} HTTP/1.1\r\nHost: direct.test\r\nX-Pad: {'a' * 20000}\r\n\r\n".encode()
    resp = await http_exchange(proxy, head)
    assert resp.status == 431
    assert echo.connections == 0
    await assert_serves(proxy, echo)


async def test_unterminated_head_trickled_in_gets_431(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    r, w = await proxy.open()
    try:
        w.write(b"GET http://direct.test/ HTTP/1.1\r\n")
        for _ in range(40):  # 40 x 1000 bytes of headers, never a blank line
            w.write(b"X-Pad: " + b"b" * 991 + b"\r\n")
            await w.drain()
            if r.at_eof():
                break
        resp = await read_response(r)
        assert resp.status == 431
    finally:
        w.close()
    await assert_serves(proxy, echo)


async def test_http2_preface_gets_505(proxy: RunningProxy, echo: EchoServer) -> None:
    resp = await http_exchange(proxy, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert resp.status == 505
    await assert_serves(proxy, echo)


SOCKS_GARBAGE = {
    "socks5-zero-methods": b"\x05\x00",
    "socks5-bad-request-version": b"\x05\x01\x00" + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    "socks5-bad-atyp": b"\x05\x01\x00" + b"\x05\x01\x00\x09\x7f\x00\x00\x01\x00\x50",
    "socks5-empty-domain": b"\x05\x01\x00" + b"\x05\x01\x00\x03\x00\x00\x50",
    "socks5-nul-in-domain": b"\x05\x01\x00" + b"\x05\x01\x00\x03\x03a\x00b\x00\x50",
    "socks4-bad-command": b"\x04\x09\x00\x50\x7f\x00\x00\x01\x00",
    "socks4-huge-userid": b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 5000,
}


@pytest.mark.parametrize("data", list(SOCKS_GARBAGE.values()), ids=list(SOCKS_GARBAGE))
async def test_malformed_socks_is_closed(
    proxy: RunningProxy, echo: EchoServer, data: bytes
) -> None:
    r, w = await proxy.open()
    try:
        w.write(data)
        rest = await asyncio.wait_for(r.read(), 10)  # the proxy must close, not hang
    finally:
        w.close()
    # At most a greeting answer and one failure reply before the close; never success.
    if data[0] == 5:
        assert rest[:2] in (b"", b"\x05\x00", b"\x05\xff"), rest
        reply = rest[2:]
        assert reply == b"" or (reply[0] == 5 and reply[1] != 0), rest
    else:
        assert rest == b"" or rest[1] == 0x5B, rest
    assert echo.connections == 0
    await assert_serves(proxy, echo)


async def test_client_gone_mid_handshake_does_not_hurt(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    for partial in (
        b"CONNECT direct.te",
        b"\x05\x02\x00",
        b"\x05\x01\x00\x05\x01\x00\x03\x10ab",
        b"\x04\x01\x00\x50",
    ):
        _, w = await proxy.open()
        w.write(partial)
        await w.drain()
        w.close()
    await assert_serves(proxy, echo)


async def test_handshake_timeout_closes_a_silent_client(make_proxy: Any, echo: EchoServer) -> None:
    proxy = await make_proxy(limits={"handshake_timeout_s": 0.3})
    start = time.monotonic()
    r, w = await proxy.open()
    try:
        w.write(b"CONNECT direct.test:1 HTTP/1.1\r\n")  # never finished
        data = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    assert time.monotonic() - start < 5
    assert data == b"" or data.startswith(b"HTTP/1.1 4")
    await assert_serves(proxy, echo)


async def test_idle_tunnel_is_closed_after_idle_timeout(make_proxy: Any, echo: EchoServer) -> None:
    proxy = await make_proxy(limits={"idle_timeout_s": 0.3})
    r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    try:
        w.write(b"x")
        assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
        start = time.monotonic()
        assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the proxy
        assert 0.2 < time.monotonic() - start < 5
    finally:
        w.close()


async def test_over_connection_limit_gets_503_and_recovers(
    make_proxy: Any, echo: EchoServer
) -> None:
    proxy = await make_proxy(limits={"max_connections": 1})
    _r1, w1 = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    try:
        resp = await http_exchange(
            proxy, connect_head(f"{DIRECT_NAME}:{echo.port}"), method="CONNECT"
        )
        assert resp.status == 503
        reply, _, w = await socks5_request(proxy, DIRECT_NAME, echo.port)
        w.close()
        assert reply.code == 0x01
    finally:
        w1.close()
    await poll_until(lambda: not proxy.server.state.connections, 5, "the first tunnel to end")
    _r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    w.close()


async def test_socks5_request_split_into_single_bytes(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    data = (
        b"\x05\x01\x00" + b"\x05\x01\x00" + socks5_addr(DIRECT_NAME) + struct.pack("!H", echo.port)
    )
    r, w = await proxy.open()
    try:
        for i in range(len(data)):
            w.write(data[i : i + 1])
            await w.drain()
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x00"
        head = await asyncio.wait_for(r.readexactly(10), 5)
        assert head[1] == 0
    finally:
        w.close()


async def test_socks4a_request_split_into_single_bytes(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    data = socks4_request_bytes(DIRECT_NAME, echo.port)
    r, w = await proxy.open()
    try:
        for i in range(len(data)):
            w.write(data[i : i + 1])
            await w.drain()
        assert (await asyncio.wait_for(r.readexactly(8), 5))[1] == 0x5A
    finally:
        w.close()


# -- peers vanishing mid-stream ------------------------------------------------------------


def get_head(authority: str, path: str, extra: str = "") -> bytes:
    return f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


async def test_client_gone_mid_download_frees_the_connection(
    proxy: RunningProxy, origin: Any, echo: EchoServer
) -> None:
    authority = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    w.write(get_head(authority, f"/bytes/{64 * 1024 * 1024}"))
    await asyncio.wait_for(r.readexactly(100_000), 10)
    w.transport.abort()  # type: ignore[attr-defined]
    await poll_until(lambda: not proxy.server.state.connections, 10, "the session to end")
    await assert_serves(proxy, echo)


async def test_client_gone_mid_tunnel_frees_the_connection(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    w.write(b"z" * 1_000_000)
    await asyncio.wait_for(r.readexactly(1000), 10)
    w.transport.abort()  # type: ignore[attr-defined]
    await poll_until(lambda: not proxy.server.state.connections, 10, "the tunnel to end")
    await assert_serves(proxy, echo)


async def test_origin_truncating_its_response_closes_the_client(proxy: RunningProxy) -> None:
    from helpers import CaptureOrigin

    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
    async with CaptureOrigin(truncated, close_after=True) as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        r, w = await proxy.open()
        try:
            w.write(get_head(authority, "/"))
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            rest = await asyncio.wait_for(r.read(), 10)  # must end, not hang
            assert len(rest) < 1000  # the client can tell the body is incomplete
        finally:
            w.close()


async def test_upstream_dying_mid_tunnel_ends_the_client_tunnel(make_proxy: Any) -> None:
    from helpers import MiniSocks5

    async with EchoServer() as echo, MiniSocks5() as up:
        proxy = await make_proxy(upstream_url=f"socks5://127.0.0.1:{up.port}")
        r, w = await open_connect_tunnel(proxy, f"localhost:{echo.port}")
        try:
            w.write(b"before")
            assert await asyncio.wait_for(r.readexactly(6), 5) == b"before"
            await up.stop()
            assert await asyncio.wait_for(r.read(), 10) == b""
        finally:
            w.close()
        await poll_until(lambda: not proxy.server.state.connections, 10, "the tunnel to end")


async def test_forward_connection_survives_502_and_407(make_proxy: Any, origin: Any) -> None:
    import base64

    proxy = await make_proxy(auth={"users": {"alice": "secret"}})
    token = base64.b64encode(b"alice:secret").decode()
    cred = f"Proxy-Authorization: Basic {token}\r\n"
    good = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    try:
        w.write(get_head(good, "/echo/1"))  # no credentials
        assert (await read_response(r)).status == 407
        w.write(get_head(f"{DIRECT_NAME}:{closed_port()}", "/x", cred))  # refused
        assert (await read_response(r)).status == 502
        w.write(get_head(good, "/echo/2", cred))
        resp = await read_response(r)
        assert resp.status == 200 and resp.json()["path"] == "/echo/2"
    finally:
        w.close()
