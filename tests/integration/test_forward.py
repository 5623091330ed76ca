"""Plain HTTP forwarding: origin-form rewrite, hop-by-hop headers, framing, keep-alive, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    DIRECT_NAME,
    DIRECT_NAME2,
    TUNNEL_NAME,
    CaptureOrigin,
    MiB,
    Origin,
    RunningProxy,
    Upstream,
    closed_port,
    curl,
    http_exchange,
    payload,
    read_chunked,
    read_response,
    sha256,
)

pytestmark = pytest.mark.timeout(60)
ROUTES = pytest.mark.parametrize("name", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])


def get(url: str, host: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@ROUTES
async def test_forward_rewrites_absolute_url_to_origin_form(proxy: RunningProxy, name: str) -> None:
    async with CaptureOrigin() as cap:
        authority = f"{name}:{cap.port}"
        raw = get(f"http://{authority}/some/path?q=1&r=a%20b", authority)
        resp = await http_exchange(proxy, raw)
    assert resp.status == 200 and resp.body == b"ok"
    assert [c.request_line for c in cap.requests] == ["GET /some/path?q=1&r=a%20b HTTP/1.1"]
    assert cap.requests[0].header("host") == authority


async def test_forward_adds_host_header_when_the_client_sent_none(proxy: RunningProxy) -> None:
    async with CaptureOrigin() as cap:
        raw = f"GET http://{DIRECT_NAME}:{cap.port} HTTP/1.0\r\n\r\n".encode()
        resp = await http_exchange(proxy, raw)
    assert resp.status == 200
    assert cap.requests[0].request_line.startswith("GET / HTTP/1.")
    assert cap.requests[0].header("host") == f"{DIRECT_NAME}:{cap.port}"


async def test_forward_drops_hop_by_hop_request_headers_and_keeps_end_to_end(
    proxy: RunningProxy,
) -> None:
    hop = (
        "Connection: keep-alive, X-Named-Hop\r\n"
        "X-Named-Hop: drop me\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
    )
    e2e = (
        "X-Keep: yes\r\nAuthorization: Bearer end-to-end\r\nCookie: a=b\r\n"
        "User-Agent: fwdproxy-test\r\nAccept: */*\r\n"
    )
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(proxy, get(f"http://{authority}/h", authority, hop + e2e))
    assert resp.status == 200
    seen = cap.requests[0]
    dropped = {
        "connection",
        "x-named-hop",
        "proxy-connection",
        "proxy-authorization",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    }
    assert not (seen.names() & dropped), seen.headers
    assert seen.header("x-keep") == "yes"
    assert seen.header("authorization") == "Bearer end-to-end"
    assert seen.header("cookie") == "a=b"
    assert seen.header("user-agent") == "fwdproxy-test"


async def test_forward_drops_hop_by_hop_response_headers(proxy: RunningProxy) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"
        b"Connection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\nKeep-Alive: timeout=9\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\nUpgrade: h2c\r\n"
        b"X-Resp-Keep: 1\r\nCache-Control: no-store\r\n\r\nbody"
    )
    async with CaptureOrigin(response) as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(proxy, get(f"http://{authority}/", authority))
    assert resp.status == 200 and resp.body == b"body"
    assert not (resp.names() & {"x-resp-hop", "keep-alive", "proxy-authenticate", "upgrade"})
    assert resp.header("connection") in (None, "keep-alive")
    assert resp.header("x-resp-keep") == "1"
    assert resp.header("cache-control") == "no-store"


async def test_forward_relays_a_close_delimited_response_completely(proxy: RunningProxy) -> None:
    body = payload(300_000)
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    async with CaptureOrigin(response, close_after=True) as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(proxy, get(f"http://{authority}/", authority))
    assert resp.status == 200
    assert sha256(resp.body) == sha256(body)


@ROUTES
@pytest.mark.parametrize("kind", ["bytes", "stream"], ids=["content-length", "chunked"])
async def test_forward_large_download(
    proxy: RunningProxy, origin: Origin, name: str, kind: str
) -> None:
    n = 16 * MiB
    async with (
        aiohttp.ClientSession() as s,
        s.get(origin.url(f"/{kind}/{n}", name), proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        if kind == "stream":
            assert resp.headers.get("Transfer-Encoding") == "chunked"
        else:
            assert resp.headers.get("Content-Length") == str(n)
        h = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(256 * 1024):
            h.update(chunk)
    assert h.hexdigest() == sha256(payload(n))


@ROUTES
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_forward_large_upload(
    proxy: RunningProxy, origin: Origin, name: str, framing: str
) -> None:
    n = 16 * MiB
    body = payload(n, seed=3)

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, n, 200_000):
            yield body[i : i + 200_000]

    data = body if framing == "content-length" else gen()
    async with (
        aiohttp.ClientSession() as s,
        s.post(origin.url("/upload", name), data=data, proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
        got = await resp.json()
    assert got["body_len"] == n
    assert got["body_sha256"] == sha256(body)
    if framing == "chunked":
        assert got["te"] == "chunked"


async def test_forward_raw_chunked_upload_is_reframed_for_the_origin(proxy: RunningProxy) -> None:
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        head = get(f"http://{authority}/up", authority, "Transfer-Encoding: chunked\r\n", "POST")
        chunks = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        resp = await http_exchange(proxy, head + chunks)
    assert resp.status == 200
    assert cap.requests[0].body == b"hello world"


async def test_forward_keep_alive_across_routes_on_one_connection(
    proxy: RunningProxy, origin: Origin, socks_upstream: Upstream
) -> None:
    before = socks_upstream.carried(origin.port)
    r, w = await proxy.open()
    peers = []
    try:
        for name in (DIRECT_NAME, TUNNEL_NAME, DIRECT_NAME2, DIRECT_NAME):
            authority = f"{name}:{origin.port}"
            w.write(get(f"http://{authority}/echo/{name}", authority))
            resp = await read_response(r)
            assert resp.status == 200, resp.text
            got = resp.json()
            assert got["path"] == f"/echo/{name}"
            assert dict(got["headers"])["Host"] == authority
            peers.append(got["peer_port"])
        assert len(proxy.server.state.connections) == 1
    finally:
        w.close()
    # Exactly one tunnel through the upstream: only the `localhost` request took it.
    await socks_upstream.wait_carried(origin.port, before + 1)
    assert socks_upstream.carried(origin.port) == before + 1
    assert origin.hits == 4
    assert peers[0] != peers[1]  # the tunnelled request came over another origin connection


async def test_forward_reuses_the_origin_connection_for_the_same_host(
    proxy: RunningProxy, origin: Origin
) -> None:
    r, w = await proxy.open()
    peers = set()
    try:
        authority = f"{DIRECT_NAME}:{origin.port}"
        for i in range(5):
            w.write(get(f"http://{authority}/echo/{i}", authority))
            resp = await read_response(r)
            peers.add(resp.json()["peer_port"])
    finally:
        w.close()
    assert len(peers) == 1


async def test_forward_head_and_bodyless_statuses_keep_framing(
    proxy: RunningProxy, origin: Origin
) -> None:
    authority = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    try:
        w.write(get(f"http://{authority}/bytes/1000", authority, method="HEAD"))
        head = await read_response(r, method="HEAD")
        assert head.status == 200 and head.header("content-length") == "1000"
        for code in (204, 304):
            w.write(get(f"http://{authority}/status/{code}", authority))
            resp = await read_response(r)
            assert resp.status == code
            assert resp.header("transfer-encoding") is None
        # If any of those had leaked a body, this response would be misparsed.
        w.write(get(f"http://{authority}/bytes/1000", authority))
        resp = await read_response(r)
        assert resp.status == 200 and resp.body == payload(1000)
    finally:
        w.close()


async def test_forward_expect_100_continue_upload_with_curl(
    proxy: RunningProxy, origin: Origin, tmp_path: Path
) -> None:
    body = payload(3 * MiB, seed=5)
    f = tmp_path / "upload.bin"
    f.write_bytes(body)
    start = time.monotonic()
    res = await curl(
        "-v",
        "-x",
        proxy.url,
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "20",
        "--data-binary",
        f"@{f}",
        origin.url("/upload", DIRECT_NAME),
    )
    elapsed = time.monotonic() - start
    assert res.rc == 0, res.err
    assert "< HTTP/1.1 100 Continue" in res.err
    got = __import__("json").loads(res.out)
    assert got == {"body_len": len(body), "body_sha256": sha256(body), "te": None}
    assert elapsed < 10, "curl waited for a 100 Continue that never came"


@ROUTES
async def test_forward_origin_down_is_502_text(proxy: RunningProxy, name: str) -> None:
    authority = f"{name}:{closed_port()}"
    resp = await http_exchange(proxy, get(f"http://{authority}/x", authority))
    assert resp.status == 502
    assert resp.header(
        "content-type",
    ).startswith("text/plain")
    assert resp.text.endswith("\n") and resp.text.count("\n") == 1
    assert authority in resp.text


async def test_forward_bad_origin_response_is_502(proxy: RunningProxy) -> None:
    async with CaptureOrigin(b"NOT HTTP AT ALL\r\n\r\n", close_after=True) as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(proxy, get(f"http://{authority}/", authority))
    assert resp.status == 502
    assert "bad response" in resp.text


@pytest.mark.parametrize(
    "target, fragment",
    [("/just/a/path", "absolute URL"), ("https://direct.test/", "CONNECT")],
    ids=["origin-form", "https-url"],
)
async def test_forward_non_http_url_is_400(
    proxy: RunningProxy, origin: Origin, target: str, fragment: str
) -> None:
    resp = await http_exchange(proxy, get(target, DIRECT_NAME))
    assert resp.status == 400
    assert fragment in resp.text
    assert origin.hits == 0


async def test_forward_rejected_host_is_403_and_connection_stays_usable(
    proxy: RunningProxy, origin: Origin
) -> None:
    r, w = await proxy.open()
    try:
        w.write(get("http://x.blocked.test/", "x.blocked.test"))
        resp = await read_response(r)
        assert resp.status == 403 and "blocked" in resp.text
        authority = f"{DIRECT_NAME}:{origin.port}"
        w.write(get(f"http://{authority}/echo/after", authority))
        resp = await read_response(r)
        assert resp.status == 200 and resp.json()["path"] == "/echo/after"
    finally:
        w.close()


async def test_forward_chunked_response_to_http10_client(
    proxy: RunningProxy, origin: Origin
) -> None:
    authority = f"{DIRECT_NAME}:{origin.port}"
    raw = f"GET http://{authority}/stream/250000 HTTP/1.0\r\n\r\n".encode()
    resp = await http_exchange(proxy, raw)
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None  # HTTP/1.0 cannot take chunked
    assert resp.body == payload(250_000)


# -- proxy authentication ----------------------------------------------------------------------


async def test_forward_auth_407_then_success(make_proxy: object, origin: Origin) -> None:
    proxy = await make_proxy(auth={"users": {"alice": "secret"}})  # type: ignore[operator]
    authority = f"{DIRECT_NAME}:{origin.port}"
    resp = await http_exchange(proxy, get(f"http://{authority}/echo/x", authority))
    assert resp.status == 407
    assert resp.header("proxy-authenticate") == 'Basic realm="fwdproxy"'
    assert origin.hits == 0
    token = base64.b64encode(b"alice:secret").decode()
    resp = await http_exchange(
        proxy,
        get(f"http://{authority}/echo/x", authority, f"Proxy-Authorization: Basic {token}\r\n"),
    )
    assert resp.status == 200
    # The credentials are for the proxy only and never reach the origin.
    assert "Proxy-Authorization" not in dict(resp.json()["headers"])
    ok = await curl(
        "-x", proxy.url, "--proxy-user", "alice:secret", origin.url("/echo/c", DIRECT_NAME)
    )
    assert ok.rc == 0 and b'"/echo/c"' in ok.out
    bad = await curl(
        "-x", proxy.url, "-w", "%{http_code}", "-o", "/dev/null", origin.url("/echo/c", DIRECT_NAME)
    )
    assert bad.text == "407"


async def test_forward_pipelined_requests_are_answered_in_order(
    proxy: RunningProxy, origin: Origin
) -> None:
    authority = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    try:
        w.write(b"".join(get(f"http://{authority}/echo/{i}", authority) for i in range(3)))
        for i in range(3):
            resp = await read_response(r)
            assert resp.json()["path"] == f"/echo/{i}"
    finally:
        w.close()


async def test_read_chunked_helper_decodes(proxy: RunningProxy) -> None:
    """Sanity check of the test client's own chunked decoder used above."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    reader.feed_eof()
    assert await read_chunked(reader) == b"abc"


# -- request framing and Host -------------------------------------------------------------------


async def test_forward_host_header_is_replaced_by_the_url_authority(proxy: RunningProxy) -> None:
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(proxy, get(f"http://{authority}/", "x.blocked.test"))
    assert resp.status == 200
    assert cap.requests[0].header("host") == authority


async def test_forward_never_sends_both_content_length_and_chunked(proxy: RunningProxy) -> None:
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        head = get(
            f"http://{authority}/up",
            authority,
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            "POST",
        )
        resp = await http_exchange(proxy, head + b"5\r\nhello\r\n0\r\n\r\n")
    if resp.status == 400:
        assert cap.requests == []
        return
    assert resp.status == 200
    seen = cap.requests[0]
    assert not ({"content-length", "transfer-encoding"} <= seen.names()), seen.headers


async def test_forward_conflicting_content_lengths_are_400(proxy: RunningProxy) -> None:
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        head = get(
            f"http://{authority}/", authority, "Content-Length: 5\r\nContent-Length: 6\r\n", "POST"
        )
        resp = await http_exchange(proxy, head + b"hello!")
    assert resp.status == 400
    assert cap.requests == []


async def test_forward_connection_close_is_honoured(proxy: RunningProxy, origin: Origin) -> None:
    authority = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    try:
        w.write(get(f"http://{authority}/echo/bye", authority, "Connection: close\r\n"))
        resp = await read_response(r)
        assert resp.status == 200
        assert await asyncio.wait_for(r.read(), 5) == b""  # the proxy closed after the response
    finally:
        w.close()
