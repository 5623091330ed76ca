"""Split routing end to end: tunnelled names cross a REAL upstream, direct names never touch it.

Each real upstream (asyncio-socks-server, microsocks, tinyproxy) logs the targets it carried;
the tests read that log for their own origin's port.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    DIRECT_NAME,
    LOOPBACK,
    TUNNEL_NAME,
    DnsGuard,
    EchoServer,
    Origin,
    RunningProxy,
    Upstream,
    connect_head,
    curl,
    http_exchange,
    open_connect_tunnel,
    socks4_request,
    socks5_request,
)

pytestmark = pytest.mark.timeout(60)

CLIENTS = {
    "connect": ["-p", "-x", "{http}"],
    "plain-http": ["-x", "{http}"],
    "socks5h": ["--socks5-hostname", "{addr}"],
    "socks4a": ["--socks4a", "{addr}"],
}


def client_args(kind: str, proxy: RunningProxy) -> list[str]:
    return [a.format(http=proxy.url, addr=proxy.addr) for a in CLIENTS[kind]]


async def fetch(kind: str, proxy: RunningProxy, origin: Origin, name: str, path: str) -> Any:
    res = await curl(*client_args(kind, proxy), origin.url(path, name))
    assert res.rc == 0, f"curl {kind} {name}: {res.err}"
    return __import__("json").loads(res.out)


@pytest.mark.parametrize("kind", list(CLIENTS), ids=list(CLIENTS))
async def test_route_tunnelled_name_goes_through_the_upstream(
    proxy: RunningProxy, origin: Origin, socks_upstream: Upstream, kind: str
) -> None:
    got = await fetch(kind, proxy, origin, TUNNEL_NAME, f"/echo/{kind}")
    assert got["path"] == f"/echo/{kind}"
    await socks_upstream.wait_carried(origin.port)
    assert socks_upstream.carried(origin.port) == 1


@pytest.mark.parametrize("kind", list(CLIENTS), ids=list(CLIENTS))
async def test_route_direct_name_never_touches_the_upstream(
    proxy: RunningProxy, origin: Origin, socks_upstream: Upstream, kind: str
) -> None:
    total = socks_upstream.total()
    got = await fetch(kind, proxy, origin, DIRECT_NAME, f"/echo/{kind}")
    assert got["path"] == f"/echo/{kind}"
    assert origin.hits == 1
    assert socks_upstream.carried(origin.port) == 0
    assert socks_upstream.total() == total


@pytest.mark.parametrize("flag", ["--socks5", "--socks4"])
async def test_route_client_side_resolution_loses_the_name_and_goes_direct(
    proxy: RunningProxy, origin: Origin, socks_upstream: Upstream, flag: str
) -> None:
    """curl --socks5/--socks4 resolve `localhost` themselves: the proxy sees 127.0.0.1."""
    res = await curl(flag, proxy.addr, origin.url("/echo/ip", TUNNEL_NAME))
    assert res.rc == 0, res.err
    assert socks_upstream.carried(origin.port) == 0


async def test_route_aiohttp_client_plain_forwarding_both_routes(
    proxy: RunningProxy, origin: Origin, socks_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        for name in (DIRECT_NAME, TUNNEL_NAME, DIRECT_NAME):
            async with s.get(origin.url(f"/echo/{name}", name), proxy=proxy.url) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == f"/echo/{name}"
    await socks_upstream.wait_carried(origin.port)
    assert socks_upstream.carried(origin.port) == 1


# -- aiohttp CONNECT to a TLS origin -----------------------------------------------------------


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed (Debian package openssl)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    yield cert, key


@pytest.fixture
async def tls_origin(tls_cert: tuple[Path, Path]) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_cert)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=ctx)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])
async def test_route_aiohttp_client_connect_to_tls_origin(
    proxy: RunningProxy, tls_origin: int, socks_upstream: Upstream, name: str
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"https://{name}:{tls_origin}/secret", proxy=proxy.url, ssl=False) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "tls /secret"
    if name == TUNNEL_NAME:
        await socks_upstream.wait_carried(tls_origin)
    else:
        assert socks_upstream.carried(tls_origin) == 0


# -- other real upstreams ----------------------------------------------------------------------


@pytest.fixture(params=["asyncio-socks-server", "microsocks", "tinyproxy"])
def any_upstream(request: pytest.FixtureRequest) -> Upstream:
    fixture = {
        "asyncio-socks-server": "socks_upstream",
        "microsocks": "microsocks_upstream",
        "tinyproxy": "tinyproxy_upstream",
    }[request.param]
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["connect", "plain-http", "socks5h"])
async def test_route_through_each_real_upstream(
    make_proxy: Any, origin: Origin, any_upstream: Upstream, kind: str
) -> None:
    proxy = await make_proxy(upstream_url=any_upstream.url)
    got = await fetch(kind, proxy, origin, TUNNEL_NAME, "/echo/t")
    assert got["path"] == "/echo/t"
    await any_upstream.wait_carried(origin.port)
    total = any_upstream.total()
    got = await fetch(kind, proxy, origin, DIRECT_NAME, "/echo/d")
    assert got["path"] == "/echo/d"
    assert any_upstream.carried(origin.port) == 1
    assert any_upstream.total() == total


# -- rule order and ports ----------------------------------------------------------------------


async def test_route_first_matching_rule_wins_with_port_filter(
    make_proxy: Any, socks_upstream: Upstream
) -> None:
    async with EchoServer() as a, EchoServer() as b:
        proxy = await make_proxy(
            rules=[
                {"name": "local-a", "domain": [TUNNEL_NAME], "port": [a.port], "action": "direct"}
            ]
        )
        for port in (a.port, b.port):
            reply, r, w = await socks5_request(proxy, TUNNEL_NAME, port, then=b"x")
            assert reply.code == 0
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
            w.close()
        await socks_upstream.wait_carried(b.port)
        assert socks_upstream.carried(a.port) == 0


async def test_route_access_log_names_rule_and_route(
    proxy: RunningProxy, echo: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    for name in (DIRECT_NAME, TUNNEL_NAME):
        _reply, r, w = await socks5_request(proxy, name, echo.port, then=b"y")
        assert await asyncio.wait_for(r.readexactly(1), 5) == b"y"
        w.close()
    await_fields: list[dict[str, Any]] = []

    def collected() -> bool:
        await_fields[:] = [
            getattr(rec, "fields", {}) for rec in caplog.records if rec.name == "fwdproxy.access"
        ]
        return len(await_fields) >= 2

    from helpers import poll_until

    await poll_until(collected, 5, "two access log lines")
    routes = {f["target"]: (f["route"], f["rule"]) for f in await_fields}
    assert routes[f"{DIRECT_NAME}:{echo.port}"] == ("direct", "default")
    assert routes[f"{TUNNEL_NAME}:{echo.port}"] == ("tunnel", "tunnelled")


# -- client allow-list and target deny-list ----------------------------------------------------


@pytest.fixture
async def allow_list_proxy(make_proxy: Any) -> RunningProxy:
    return await make_proxy(listen=[{"listen": "127.0.0.1:0", "allow": ["10.0.0.0/8"]}])


async def test_route_allow_list_refuses_connect_with_403(
    allow_list_proxy: RunningProxy, echo: EchoServer
) -> None:
    resp = await http_exchange(
        allow_list_proxy, connect_head(f"{DIRECT_NAME}:{echo.port}"), method="CONNECT"
    )
    assert resp.status == 403
    assert "allow-list" in resp.text
    assert echo.connections == 0


async def test_route_allow_list_refuses_plain_http_with_403(
    allow_list_proxy: RunningProxy, origin: Origin
) -> None:
    url = origin.url("/echo/x", DIRECT_NAME)
    resp = await http_exchange(allow_list_proxy, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp.status == 403
    assert origin.hits == 0


async def test_route_allow_list_refuses_socks(
    allow_list_proxy: RunningProxy, echo: EchoServer
) -> None:
    reply, _, w = await socks5_request(allow_list_proxy, DIRECT_NAME, echo.port)
    w.close()
    assert reply.code == 0x02
    code, _, w = await socks4_request(allow_list_proxy, LOOPBACK, echo.port)
    w.close()
    assert code == 0x5B
    assert echo.connections == 0


async def test_route_deny_list_refuses_metadata_for_plain_http(proxy: RunningProxy) -> None:
    raw = b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    resp = await http_exchange(proxy, raw)
    assert resp.status == 403
    assert "deny-list" in resp.text


async def test_route_deny_list_applies_to_hosts_overrides(make_proxy: Any) -> None:
    proxy = await make_proxy(hosts={"meta.test": "169.254.169.254"})
    resp = await http_exchange(proxy, connect_head("meta.test:80"), method="CONNECT")
    assert resp.status == 403


async def test_route_connect_to_the_proxy_itself_is_refused(proxy: RunningProxy) -> None:
    resp = await http_exchange(proxy, connect_head(proxy.addr), method="CONNECT")
    assert resp.status == 403
    assert "loop" in resp.text


@pytest.fixture
async def denied_echo(make_proxy: Any) -> AsyncIterator[tuple[RunningProxy, EchoServer]]:
    """An echo server on 127.0.0.2 and a proxy whose deny-list holds exactly that address."""
    async with EchoServer(host="127.0.0.2") as e:
        yield await make_proxy(deny_targets=["127.0.0.2/32"]), e


async def test_route_deny_list_refuses_the_canonical_address(
    denied_echo: tuple[RunningProxy, EchoServer],
) -> None:
    proxy, echo = denied_echo
    resp = await http_exchange(proxy, connect_head(f"127.0.0.2:{echo.port}"), method="CONNECT")
    assert resp.status == 403
    assert echo.connections == 0


@pytest.mark.parametrize(
    "spelling",
    ["2130706434", "127.2", "0177.0.0.2", "0x7f000002"],
    ids=["integer", "short", "octal", "hex"],
)
async def test_route_deny_list_cannot_be_bypassed_by_ipv4_spellings(
    denied_echo: tuple[RunningProxy, EchoServer], spelling: str
) -> None:
    proxy, echo = denied_echo
    resp = await http_exchange(proxy, connect_head(f"{spelling}:{echo.port}"), method="CONNECT")
    assert resp.status in (400, 403), resp.status
    assert echo.connections == 0


async def test_route_deny_list_cannot_be_bypassed_by_ipv4_mapped_ipv6(
    denied_echo: tuple[RunningProxy, EchoServer],
) -> None:
    proxy, echo = denied_echo
    head = connect_head(f"[::ffff:127.0.0.2]:{echo.port}")
    resp = await http_exchange(proxy, head, method="CONNECT")
    assert resp.status in (400, 403), resp.status
    assert echo.connections == 0


# -- name normalisation at the edge (the DNS guard proves no lookup escaped) -------------------


async def test_route_dns_guard_is_active(proxy: RunningProxy, dns_guard: DnsGuard) -> None:
    """Self-test of the rig: an unknown direct name is looked up, and the guard stops it."""
    resp = await http_exchange(proxy, connect_head("unknown-name.example:80"), method="CONNECT")
    assert resp.status == 502 and "cannot resolve" in resp.text
    assert dns_guard.blocked == ["unknown-name.example"]
    dns_guard.blocked.clear()


SPELLINGS = pytest.mark.parametrize(
    "spelling", ["DIRECT.TEST", "direct.test.", "Direct.Test."], ids=["upper", "dot", "mixed-dot"]
)


def tunnel_spelling(spelling: str) -> str:
    return {"DIRECT.TEST": "LOCALHOST", "direct.test.": "localhost.", "Direct.Test.": "LocalHost."}[
        spelling
    ]


@SPELLINGS
async def test_route_connect_names_are_normalised(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream, spelling: str
) -> None:
    _, w = await open_connect_tunnel(proxy, f"{spelling}:{echo.port}")
    w.close()
    _, w = await open_connect_tunnel(proxy, f"{tunnel_spelling(spelling)}:{echo.port}")
    w.close()
    await socks_upstream.wait_carried(echo.port)
    url = f"http://{spelling}:{echo.port}/"
    resp = await http_exchange(proxy, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp.status == 502  # the echo server is no HTTP origin: but it was reached directly
    assert echo.connections == 3


@SPELLINGS
async def test_route_socks5_names_are_normalised(
    proxy: RunningProxy, echo: EchoServer, dns_guard: DnsGuard, spelling: str
) -> None:
    try:
        reply, _, w = await socks5_request(proxy, spelling, echo.port)
        w.close()
        assert reply.code == 0
        reply, _, w = await socks5_request(proxy, tunnel_spelling(spelling), echo.port)
        w.close()
        assert reply.code == 0
        assert dns_guard.blocked == []
    finally:
        dns_guard.blocked.clear()


@SPELLINGS
async def test_route_socks4a_names_are_normalised(
    proxy: RunningProxy, echo: EchoServer, dns_guard: DnsGuard, spelling: str
) -> None:
    try:
        code, _, w = await socks4_request(proxy, spelling, echo.port)
        w.close()
        assert code == 0x5A
        assert dns_guard.blocked == []
    finally:
        dns_guard.blocked.clear()


async def test_route_connect_blocked_name_in_any_spelling_is_rejected(proxy: RunningProxy) -> None:
    for spelling in ("X.BLOCKED.TEST", "x.blocked.test.", "deep.X.Blocked.Test"):
        resp = await http_exchange(proxy, connect_head(f"{spelling}:443"), method="CONNECT")
        assert resp.status == 403, spelling


@pytest.mark.parametrize("spelling", ["X.BLOCKED.TEST", "x.blocked.test.", "deep.X.Blocked.Test"])
async def test_route_socks5_blocked_name_in_any_spelling_is_rejected(
    proxy: RunningProxy, dns_guard: DnsGuard, spelling: str
) -> None:
    try:
        reply, _, w = await socks5_request(proxy, spelling, 443)
        w.close()
        assert reply.code == 0x02
    finally:
        dns_guard.blocked.clear()


@pytest.mark.parametrize("spelling", ["2130706434", "127.2", "0x7f000002"])
async def test_route_socks5_deny_list_cannot_be_bypassed_by_ipv4_spellings(
    denied_echo: tuple[RunningProxy, EchoServer], dns_guard: DnsGuard, spelling: str
) -> None:
    proxy, echo = denied_echo
    try:
        reply, _, w = await socks5_request(proxy, spelling, echo.port)
        w.close()
        assert reply.code == 0x02
    finally:
        dns_guard.blocked.clear()


# -- upstream credentials and upstream-side failures ---------------------------------------


async def test_route_upstream_with_username_and_password(
    make_proxy: Any, origin: Origin, microsocks_auth_upstream: Upstream
) -> None:
    from urllib.parse import quote

    from helpers import MICROSOCKS_USER

    user, password = MICROSOCKS_USER
    good = f"socks5://{user}:{quote(password, safe='')}@127.0.0.1:{microsocks_auth_upstream.port}"
    proxy = await make_proxy(upstream_url=good)
    got = await fetch("connect", proxy, origin, TUNNEL_NAME, "/echo/authed")
    assert got["path"] == "/echo/authed"
    await microsocks_auth_upstream.wait_carried(origin.port)

    bad = f"socks5://{user}:wrong@127.0.0.1:{microsocks_auth_upstream.port}"
    proxy = await make_proxy(upstream_url=bad)
    resp = await http_exchange(
        proxy, connect_head(f"{TUNNEL_NAME}:{origin.port}"), method="CONNECT"
    )
    assert resp.status == 502
    assert "upstream tunnel" in resp.text and "wrong" not in resp.text  # no password in errors
    assert microsocks_auth_upstream.carried(origin.port) == 1


async def test_route_http_upstream_refusal_is_502_naming_the_upstream(
    make_proxy: Any, tinyproxy_upstream: Upstream
) -> None:
    from helpers import closed_port

    proxy = await make_proxy(upstream_url=tinyproxy_upstream.url)
    resp = await http_exchange(
        proxy, connect_head(f"{TUNNEL_NAME}:{closed_port()}"), method="CONNECT"
    )
    assert resp.status in (502, 504)
    assert "upstream tunnel" in resp.text and tinyproxy_upstream.url in resp.text
