"""The mirror's upstream HTTP client against hostile and broken servers, and TLS checks."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.mirror.http import URL, FetchError, HTTPClient
from fwdproxy.net.dial import Dialed, dial_direct

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, ssl_ctx: ssl.SSLContext | None = None
                     ) -> AsyncIterator[tuple[int, list[int]]]:
    accepted: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ssl_ctx)
    try:
        yield srv.sockets[0].getsockname()[1], accepted
    finally:
        srv.close()
        await srv.wait_closed()


async def _open(host: str, port: int) -> tuple[Dialed, str]:
    return await dial_direct(host, port, timeout_s=5), "direct"


def client(ctx: ssl.SSLContext | None = None) -> HTTPClient:
    default = ssl.create_default_context()
    return HTTPClient(_open, lambda host: ctx or default)


async def _head(r: asyncio.StreamReader) -> None:
    await r.readuntil(b"\r\n\r\n")


def canned(*responses: bytes, keep: bool = True) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for resp in responses:
            await _head(r)
            w.write(resp)
            await w.drain()
        if keep:
            await r.read()

    return handler


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_malformed_responses_are_fetch_errors(response: bytes) -> None:
    async with raw_server(canned(response, keep=False)) as (port, _):
        c = client()
        with pytest.raises(FetchError):
            resp = await c.request("GET", URL.parse(f"http://127.0.0.1:{port}/x"), timeout_s=2)
            await resp.read(1 << 20)
        c.close()


async def test_body_limit_is_enforced() -> None:
    body = b"x" * 5000
    async with raw_server(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + body)) as (
        port, _):
        c = client()
        resp = await c.request("GET", URL.parse(f"http://127.0.0.1:{port}/x"))
        with pytest.raises(FetchError, match="larger than"):
            await resp.read(1000)
        c.close()


async def test_connections_are_kept_alive_and_a_dead_one_is_replaced() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(canned(ok, ok)) as (port, accepted):
        c = client()
        url = URL.parse(f"http://127.0.0.1:{port}/x")
        for _ in range(2):
            resp = await c.request("GET", url)
            assert await resp.read(10) == b"ok"
        assert len(accepted) == 1
        c.close()
    async with raw_server(canned(ok, keep=False)) as (port, accepted):
        c = client()
        url = URL.parse(f"http://127.0.0.1:{port}/x")
        resp = await c.request("GET", url)
        assert await resp.read(10) == b"ok"
        # The server closed that connection after one answer: the next request must not fail.
        for _ in range(100):
            idle = next(iter(c._idle.values()))[0]
            if idle.reader.at_eof():
                break
            await asyncio.sleep(0.01)
        resp = await c.request("GET", url)
        assert await resp.read(10) == b"ok"
        assert len(accepted) == 2
        c.close()


async def test_stalled_upstream_times_out() -> None:
    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await w.drain()
        await r.read()

    async with raw_server(stall) as (port, _):
        c = client()
        resp = await c.request("GET", URL.parse(f"http://127.0.0.1:{port}/x"), timeout_s=0.3)
        with pytest.raises(FetchError, match="no data"):
            await resp.read(1000)
        c.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_is_verified(ca: trustme.CA, tmp_path: object) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(canned(ok), server_ctx) as (port, _):
        url = URL.parse(f"https://localhost:{port}/x")
        c = client()
        with pytest.raises(FetchError, match="not trusted") as e:
            await c.request("GET", url)
        assert not e.value.retryable
        c.close()
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        c = client(trusting)
        resp = await c.request("GET", url)
        assert await resp.read(10) == b"ok"
        c.close()


def test_url_parse() -> None:
    u = URL.parse("https://Registry-1.Docker.IO/v2/?x=1")
    want = ("https", "registry-1.docker.io", 443, "/v2/?x=1")
    assert (u.scheme, u.host, u.port, u.target) == want
    assert str(u.join("/cdn/a?sig=secret")) == "https://registry-1.docker.io/cdn/a?sig=secret"
    assert u.join("https://cdn.example:8443/b").authority == "cdn.example:8443"
    assert URL.parse("https://h/p?sig=secret").redacted() == "https://h/p?…"
    for bad in ("ftp://h/", "https://user:pw@h/", "https://h:99999/", "https:///x", "h/x",
                "https://h/ x", "https://bücher.example/"):
        with pytest.raises(FetchError):
            URL.parse(bad)


@given(st.text(max_size=80))
def test_url_parse_fails_only_with_fetch_error(text: str) -> None:
    try:
        URL.parse(text)
    except FetchError:
        pass


async def test_a_body_cut_short_is_reported_as_a_closed_connection() -> None:
    """A tunnel that drops mid-layer is a retryable break, and the log must say so: not
    'malformed HTTP', which sends an operator looking for a broken registry."""
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
    async with raw_server(canned(cut, keep=False)) as (port, _):
        c = client()
        resp = await c.request("GET", URL.parse(f"http://127.0.0.1:{port}/x"), timeout_s=2)
        with pytest.raises(FetchError, match="closed the connection") as info:
            await resp.read(1000)
        assert info.value.retryable
        assert "malformed" not in str(info.value)
        assert "received 5 bytes, expected 10" in str(info.value)
        c.close()
