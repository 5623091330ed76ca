"""HTTP CONNECT tunnels: reply ordering, early data, failure statuses and proxy auth."""

from __future__ import annotations

import asyncio
import base64

import pytest
from helpers import (
    DIRECT_NAME,
    TUNNEL_NAME,
    Blackhole,
    EchoServer,
    GatedSocks5,
    RunningProxy,
    Upstream,
    closed_port,
    connect_head,
    curl,
    http_exchange,
    open_connect_tunnel,
    read_response,
)

pytestmark = pytest.mark.timeout(60)


async def assert_serves(proxy: RunningProxy, echo: EchoServer) -> None:
    """The proxy still opens a working tunnel (used after every failure)."""
    r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    try:
        w.write(b"still alive")
        assert await asyncio.wait_for(r.readexactly(11), 5) == b"still alive"
    finally:
        w.close()


def assert_one_line_reason(text: str) -> None:
    assert text.endswith("\n") and text.count("\n") == 1, f"not a one-line reason: {text!r}"
    assert len(text.strip()) > 10


@pytest.mark.parametrize("name", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])
async def test_connect_forwards_bytes_sent_with_the_head(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream, name: str
) -> None:
    r, w = await proxy.open()
    try:
        # One write: the CONNECT head and the first tunnel bytes arrive in the same segment.
        w.write(connect_head(f"{name}:{echo.port}") + b"EARLY-")
        resp = await read_response(r, method="CONNECT")
        assert resp.status == 200, resp.text
        assert await asyncio.wait_for(r.readexactly(6), 5) == b"EARLY-"
        w.write(b"LATER")
        assert await asyncio.wait_for(r.readexactly(5), 5) == b"LATER"
    finally:
        w.close()
    assert bytes(echo.received[0]).startswith(b"EARLY-LATER")
    if name == TUNNEL_NAME:
        await socks_upstream.wait_carried(echo.port)
    else:
        assert socks_upstream.carried(echo.port) == 0


async def test_connect_replies_200_only_after_the_upstream_dial_succeeded(
    make_proxy: object,
) -> None:
    async with GatedSocks5() as gated:
        proxy = await make_proxy(  # type: ignore[operator]
            upstreams={"gated": f"socks5://127.0.0.1:{gated.port}"},
            rules=[{"name": "gated", "domain": ["gated.test"], "via": "gated"}],
        )
        r, w = await proxy.open()
        try:
            w.write(connect_head("gated.test:9999"))
            await asyncio.wait_for(gated.request_seen.wait(), 5)
            assert gated.requested == [("gated.test", 9999)]
            # The upstream has the request but has not answered: the client must hear nothing.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.read(1), 0.3)
            gated.gate.set()
            resp = await read_response(r, method="CONNECT")
            assert resp.status == 200
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        finally:
            w.close()


async def test_connect_to_refused_target_is_502_naming_the_direct_hop(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    port = closed_port()
    resp = await http_exchange(proxy, connect_head(f"{DIRECT_NAME}:{port}"), method="CONNECT")
    assert resp.status == 502
    assert_one_line_reason(resp.text)
    assert "(direct)" in resp.text and f"{DIRECT_NAME}:{port}" in resp.text
    assert (resp.header("content-type") or "").startswith("text/plain")
    await assert_serves(proxy, echo)


async def test_connect_refused_reason_says_refused(proxy: RunningProxy) -> None:
    port = closed_port()
    resp = await http_exchange(proxy, connect_head(f"{DIRECT_NAME}:{port}"), method="CONNECT")
    assert resp.status == 502
    assert "refused" in resp.text.lower(), resp.text


async def test_connect_refused_behind_upstream_is_502_naming_the_upstream(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream
) -> None:
    port = closed_port()
    resp = await http_exchange(proxy, connect_head(f"{TUNNEL_NAME}:{port}"), method="CONNECT")
    assert resp.status == 502
    assert_one_line_reason(resp.text)
    assert "upstream tunnel" in resp.text and socks_upstream.url in resp.text
    await assert_serves(proxy, echo)


async def test_connect_upstream_down_is_502_naming_the_upstream(
    make_proxy: object, echo: EchoServer
) -> None:
    proxy = await make_proxy(  # type: ignore[operator]
        upstreams={"down": f"socks5://127.0.0.1:{closed_port()}"},
        rules=[{"name": "to-down", "domain": ["down.test"], "via": "down"}],
    )
    resp = await http_exchange(proxy, connect_head("down.test:443"), method="CONNECT")
    assert resp.status == 502
    assert_one_line_reason(resp.text)
    assert "upstream down" in resp.text and "unreachable" in resp.text
    await assert_serves(proxy, echo)


async def test_connect_dial_timeout_is_504(
    make_proxy: object, echo: EchoServer, blackhole: Blackhole
) -> None:
    proxy = await make_proxy(  # type: ignore[operator]
        upstreams={"slow": f"socks5://127.0.0.1:{blackhole.port}"},
        rules=[{"name": "to-slow", "domain": ["slow.test"], "via": "slow"}],
        limits={"dial_timeout_s": 0.5},
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await http_exchange(proxy, connect_head("slow.test:443"), method="CONNECT")
    elapsed = loop.time() - start
    assert resp.status == 504
    assert_one_line_reason(resp.text)
    assert "slow" in resp.text
    assert 0.4 <= elapsed < 4, elapsed
    await assert_serves(proxy, echo)


async def test_connect_rejected_by_rule_is_403_naming_the_rule(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    resp = await http_exchange(proxy, connect_head("x.blocked.test:443"), method="CONNECT")
    assert resp.status == 403
    assert_one_line_reason(resp.text)
    assert "blocked" in resp.text and "line" in resp.text
    await assert_serves(proxy, echo)


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT direct.test HTTP/1.1\r\n\r\n",
        b"CONNECT direct.test:notaport HTTP/1.1\r\n\r\n",
        b"CONNECT [::1 HTTP/1.1\r\n\r\n",
        b"CONNECT direct.test:443 HTTP/1.1 extra\r\n\r\n",
        b"CONNECT direct.test:443 HTTP/1.1\r\nbad header line\r\n\r\n",
    ],
    ids=["no-port", "bad-port", "bad-v6", "bad-request-line", "bad-header"],
)
async def test_connect_malformed_is_400(proxy: RunningProxy, echo: EchoServer, head: bytes) -> None:
    resp = await http_exchange(proxy, head, method="CONNECT")
    assert resp.status == 400
    assert_one_line_reason(resp.text)
    await assert_serves(proxy, echo)


async def test_connect_to_metadata_address_is_refused(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    resp = await http_exchange(proxy, connect_head("169.254.169.254:80"), method="CONNECT")
    assert resp.status == 403
    assert "deny-list" in resp.text
    await assert_serves(proxy, echo)


async def test_connect_keeps_serving_many_sequential_tunnels(
    proxy: RunningProxy, echo: EchoServer
) -> None:
    for _ in range(20):
        await assert_serves(proxy, echo)
    assert echo.connections == 20


# -- proxy authentication ----------------------------------------------------------------------

AUTH = {"users": {"alice": "secret"}}


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n"


@pytest.mark.parametrize(
    "extra",
    ["", basic("alice", "wrong"), basic("mallory", "secret"), "Proxy-Authorization: x\r\n"],
    ids=["missing", "wrong-password", "unknown-user", "not-basic"],
)
async def test_connect_auth_failure_is_407_with_challenge(
    make_proxy: object, echo: EchoServer, extra: str
) -> None:
    proxy = await make_proxy(auth=AUTH)  # type: ignore[operator]
    head = connect_head(f"{DIRECT_NAME}:{echo.port}", extra)
    resp = await http_exchange(proxy, head, method="CONNECT")
    assert resp.status == 407
    assert resp.header("proxy-authenticate") == 'Basic realm="fwdproxy"'
    assert echo.connections == 0


async def test_connect_auth_success_with_basic_credentials(
    make_proxy: object, echo: EchoServer
) -> None:
    proxy = await make_proxy(auth=AUTH)  # type: ignore[operator]
    r, w = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}", basic("alice", "secret"))
    try:
        w.write(b"hi")
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"hi"
    finally:
        w.close()


async def test_connect_auth_with_curl_proxy_user(make_proxy: object, origin: object) -> None:
    proxy = await make_proxy(auth=AUTH)  # type: ignore[operator]
    url = origin.url("/echo/auth", DIRECT_NAME)  # type: ignore[attr-defined]
    ok = await curl("-p", "-x", proxy.url, "-U", "alice:secret", url)
    assert ok.rc == 0, ok.err
    assert b'"/echo/auth"' in ok.out
    denied = await curl("-p", "-x", proxy.url, "-U", "alice:nope", url)
    assert denied.rc != 0
    assert "407" in denied.err


async def test_connect_many_concurrent_tunnels_on_both_routes(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream
) -> None:
    async def one(i: int) -> None:
        name = TUNNEL_NAME if i % 4 == 0 else DIRECT_NAME
        r, w = await open_connect_tunnel(proxy, f"{name}:{echo.port}")
        try:
            msg = f"tunnel-{i}".encode() * 100
            w.write(msg)
            assert await asyncio.wait_for(r.readexactly(len(msg)), 10) == msg
        finally:
            w.close()

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 30)
    assert echo.connections == 100
    await socks_upstream.wait_carried(echo.port, 25)
