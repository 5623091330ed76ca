"""TLS-SNI routing of IP-literal targets, end to end on loopback.

A client that resolved the registry name itself connects (CONNECT or SOCKS5) to
127.0.0.1:PORT and sends a ClientHello naming `registry.fake.localhost`. fwdproxy must route by
that name: through the upstream (a real asyncio-socks-server that resolves `*.localhost` to
loopback itself), dialling the name rather than the IP, with the name in ConnInfo and the access
log, and the TLS handshake and an HTTPS request must complete end to end. Without SNI (plain
bytes, TLS to an IP, nothing sent) the IP decides: direct.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from helpers import LOOPBACK, EchoServer, RunningProxy, Upstream, poll_until, running_proxy
from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy
from test_discover import start_resolving_socks

from fwdproxy.proxy.state import ConnInfo, Observer

pytestmark = pytest.mark.timeout(60)

NAME = "registry.fake.localhost"


@dataclass
class TlsOrigin:
    """HTTPS on 127.0.0.1 with a certificate for NAME and for the IP; records each SNI."""

    ca: trustme.CA
    port: int = 0
    snis: list[str | None] = field(default_factory=list)
    hits: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> TlsOrigin:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(NAME, LOOPBACK).configure_cert(ctx)
        ctx.sni_callback = lambda _obj, name, _ctx: self.snis.append(name)  # type: ignore[assignment]

        async def hello(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text=f"hello {request.host}")

        app = web.Application()
        app.router.add_get("/", hello)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0, ssl_context=ctx)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Closed(Observer):
    """Collects the ConnInfo of every finished session."""

    def __init__(self) -> None:
        self.infos: list[ConnInfo] = []

    def closed(self, info: ConnInfo) -> None:
        self.infos.append(info)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = start_resolving_socks(tmp_path_factory.mktemp("socks"))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
async def origin(ca: trustme.CA) -> AsyncIterator[TlsOrigin]:
    o = await TlsOrigin(ca).start()
    try:
        yield o
    finally:
        await o.stop()


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def sni_config(upstream: Upstream, ports: list[int], **sniff: Any) -> dict[str, Any]:
    return {
        "listen": f"{LOOPBACK}:0",
        "loopback_targets": True,
        "upstreams": {"tunnel": upstream.url},
        "sniff_tls": {"enabled": True, "ports": ports, "timeout_s": 2, **sniff},
        "rules": [{"name": "fake-registry", "domain": [NAME], "via": "tunnel"}],
        "default": "direct",
        "limits": {"dial_timeout_s": 5, "handshake_timeout_s": 5},
    }


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def start_proxy(stack: AsyncExitStack, cfg: dict[str, Any]) -> tuple[RunningProxy, Closed]:
    proxy = await stack.enter_async_context(running_proxy(cfg))
    closed = Closed()
    proxy.server.state.observers.append(closed)
    return proxy, closed


async def https_via_connect(proxy: RunningProxy, port: int, ctx: Any, sni: str | None) -> str:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(
            f"https://{LOOPBACK}:{port}/",
            proxy=proxy.url,
            ssl=ctx,
            server_hostname=sni,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


async def socks5_socket(proxy: RunningProxy, port: int) -> Any:
    p = Proxy(ProxyType.SOCKS5, proxy.host, proxy.port, rdns=False)
    return await p.connect(dest_host=LOOPBACK, dest_port=port, timeout=10)


async def https_via_socks5(proxy: RunningProxy, port: int, ctx: Any, sni: str | None) -> str:
    sock = await socks5_socket(proxy, port)
    r, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=sni or LOOPBACK)
    try:
        w.write(f"GET / HTTP/1.1\r\nHost: {sni or LOOPBACK}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


CLIENTS = {"connect": https_via_connect, "socks5": https_via_socks5}


async def finished(closed: Closed, n: int = 1) -> ConnInfo:
    await poll_until(lambda: len(closed.infos) >= n, 5, f"{n} finished session(s)")
    return closed.infos[n - 1]


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "fwdproxy.access"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", sorted(CLIENTS), ids=sorted(CLIENTS))
async def test_sni_ip_literal_is_tunnelled_by_its_sni_name(
    protocol: str,
    origin: TlsOrigin,
    upstream: Upstream,
    ca: trustme.CA,
    stack: AsyncExitStack,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy, closed = await start_proxy(stack, sni_config(upstream, [origin.port]))
    names_before = upstream.log().count(f"shim: resolve {NAME}")
    body = await CLIENTS[protocol](proxy, origin.port, client_ctx(ca), NAME)
    # aiohttp sends the URL's authority as Host; the raw SOCKS client sends the name.
    assert body == (f"hello {NAME}" if protocol == "socks5" else f"hello {LOOPBACK}:{origin.port}")
    assert origin.snis == [NAME] and origin.hits == 1
    # Through the upstream, dialled by name (the upstream resolved it, not fwdproxy).
    await upstream.wait_carried(origin.port, 1)
    assert upstream.log().count(f"shim: resolve {NAME}") == names_before + 1
    info = await finished(closed)
    assert (info.protocol, info.target, info.sni, info.route) == (
        protocol,
        f"{LOOPBACK}:{origin.port}",
        NAME,
        "tunnel",
    )
    assert info.decision is not None and info.decision.rule == "fake-registry"
    assert info.outcome == "ok" and info.counters.down > 0
    (fields,) = [f for f in access_fields(caplog) if f["target"] == f"{LOOPBACK}:{origin.port}"]
    assert (fields["sni"], fields["route"], fields["rule"]) == (NAME, "tunnel", "fake-registry")


async def test_sni_dial_name_false_tunnels_the_ip(
    origin: TlsOrigin, upstream: Upstream, ca: trustme.CA, stack: AsyncExitStack
) -> None:
    proxy, closed = await start_proxy(stack, sni_config(upstream, [origin.port], dial_name=False))
    resolves_before = upstream.log().count("shim: resolve")
    await https_via_connect(proxy, origin.port, client_ctx(ca), NAME)
    await upstream.wait_carried(origin.port, 1)
    assert upstream.log().count("shim: resolve") == resolves_before  # IP sent, nothing resolved
    info = await finished(closed)
    assert (info.sni, info.route) == (NAME, "tunnel")


async def test_sni_tls_without_sni_to_an_ip_goes_direct(
    origin: TlsOrigin, upstream: Upstream, ca: trustme.CA, stack: AsyncExitStack
) -> None:
    proxy, closed = await start_proxy(stack, sni_config(upstream, [origin.port]))
    body = await https_via_socks5(proxy, origin.port, client_ctx(ca), None)
    assert body == f"hello {LOOPBACK}"
    assert origin.snis == [None]  # Python sends no SNI for an IP address
    info = await finished(closed)
    assert (info.sni, info.route, info.decision and info.decision.rule) == (
        None,
        "direct",
        "default",
    )
    assert upstream.carried(origin.port) == 0


@pytest.mark.parametrize("protocol", ["connect", "socks5"], ids=["connect", "socks5"])
async def test_sni_plain_bytes_to_an_ip_are_routed_by_the_ip(
    protocol: str, upstream: Upstream, stack: AsyncExitStack
) -> None:
    echo = await stack.enter_async_context(EchoServer())
    proxy, closed = await start_proxy(stack, sni_config(upstream, [echo.port]))
    if protocol == "socks5":
        r, w = await asyncio.open_connection(sock=await socks5_socket(proxy, echo.port))
    else:
        r, w = await proxy.open()
        w.write(f"CONNECT {LOOPBACK}:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    try:
        w.write(b"PING not tls\n")
        assert await asyncio.wait_for(r.readexactly(13), 5) == b"PING not tls\n"
    finally:
        w.close()
    assert time.monotonic() - start < 1.5  # not TLS: decided at once, no wait for a hello
    info = await finished(closed)
    assert (info.sni, info.route, info.target) == (None, "direct", f"{LOOPBACK}:{echo.port}")
    assert upstream.carried(echo.port) == 0


async def test_sni_silent_client_is_routed_by_the_ip_after_the_sniff_timeout(
    upstream: Upstream, stack: AsyncExitStack
) -> None:
    banner = b"220 server speaks first\r\n"

    async def speak_first(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(banner)
        await w.drain()
        await r.read()
        w.close()

    srv = await asyncio.start_server(speak_first, LOOPBACK, 0)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    port = int(srv.sockets[0].getsockname()[1])
    proxy, closed = await start_proxy(stack, sni_config(upstream, [port], timeout_s=0.3))
    r, w = await asyncio.open_connection(sock=await socks5_socket(proxy, port))
    start = time.monotonic()
    try:
        assert await asyncio.wait_for(r.readexactly(len(banner)), 5) == banner
        waited = time.monotonic() - start
    finally:
        w.close()
    assert 0.25 <= waited < 3
    info = await finished(closed)
    assert (info.sni, info.route) == (None, "direct")


async def test_sni_port_not_configured_is_not_sniffed(
    origin: TlsOrigin, upstream: Upstream, ca: trustme.CA, stack: AsyncExitStack
) -> None:
    proxy, closed = await start_proxy(stack, sni_config(upstream, [443]))
    await https_via_connect(proxy, origin.port, client_ctx(ca), NAME)
    info = await finished(closed)
    assert (info.sni, info.route) == (None, "direct")
    assert origin.snis == [NAME] and upstream.carried(origin.port) == 0


async def _connect_status(proxy: RunningProxy, target: str) -> bytes:
    r, w = await proxy.open()
    try:
        w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return await asyncio.wait_for(r.read(4096), 5)
    finally:
        w.close()


@pytest.mark.parametrize("port", [9443, 8443], ids=["not-sniffed", "sniff-port"])
async def test_sni_denied_ip_target_gets_403_on_connect(
    port: int, upstream: Upstream, stack: AsyncExitStack
) -> None:
    """A refusal that needs no SNI is answered before the early success reply of the sniff."""
    cfg = sni_config(upstream, [8443])
    cfg["deny_targets"] = ["127.0.0.2/32"]
    proxy, closed = await start_proxy(stack, cfg)
    reply = await _connect_status(proxy, f"127.0.0.2:{port}")
    assert reply.startswith(b"HTTP/1.1 403") and b"deny-list" in reply
    assert (await finished(closed)).outcome == "rejected"


@pytest.mark.parametrize("port", [9443, 8443], ids=["not-sniffed", "sniff-port"])
async def test_sni_denied_ip_target_gets_socks5_not_allowed(
    port: int, upstream: Upstream, stack: AsyncExitStack
) -> None:
    cfg = sni_config(upstream, [8443])
    cfg["deny_targets"] = ["127.0.0.2/32"]
    proxy, closed = await start_proxy(stack, cfg)
    r, w = await proxy.open()
    try:
        w.write(b"\x05\x01\x00")
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x00"
        w.write(b"\x05\x01\x00\x01" + bytes([127, 0, 0, 2]) + port.to_bytes(2, "big"))
        reply = await asyncio.wait_for(r.readexactly(10), 5)
    finally:
        w.close()
    assert reply[:2] == b"\x05\x02"  # NOT_ALLOWED, not a success followed by a close
    assert (await finished(closed)).outcome == "rejected"


# -- an SNI never widens what the address's own decision allows (security) -----------------


@pytest.mark.parametrize("protocol", sorted(CLIENTS), ids=sorted(CLIENTS))
async def test_sni_cannot_turn_a_rejected_ip_into_a_dial(
    protocol: str, origin: TlsOrigin, upstream: Upstream, ca: trustme.CA, stack: AsyncExitStack
) -> None:
    """`route 127.0.0.1:PORT` says reject; an SNI naming a direct-routed host must not dial it."""
    cfg = sni_config(upstream, [origin.port])
    cfg["rules"] = [
        {"name": "allowed", "domain": ["allowed.example"], "action": "direct"},
        {"name": "no-local", "cidr": ["127.0.0.1/32"], "action": "reject"},
    ]
    proxy, closed = await start_proxy(stack, cfg)
    with pytest.raises((aiohttp.ClientError, OSError, AssertionError, ProxyError)):
        await CLIENTS[protocol](proxy, origin.port, client_ctx(ca), "allowed.example")
    info = await finished(closed)
    assert info.outcome == "rejected", info.outcome
    assert origin.snis == []  # the origin never saw a TLS handshake
    assert info.counters.up == 0


async def test_sni_rejected_ip_is_refused_before_any_success_reply(
    upstream: Upstream, stack: AsyncExitStack
) -> None:
    """Under `default: reject` an IP on a sniffed port gets 403, not an early 200 and a close."""
    cfg = sni_config(upstream, [8443])
    cfg["default"] = "reject"
    proxy, closed = await start_proxy(stack, cfg)
    reply = await _connect_status(proxy, "127.0.0.2:8443")
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert (await finished(closed)).outcome == "rejected"


async def test_sni_naming_a_tunnelled_host_still_tunnels_a_direct_ip(
    origin: TlsOrigin, upstream: Upstream, ca: trustme.CA, stack: AsyncExitStack
) -> None:
    """What an SNI may do: send a connection the address would dial directly through a tunnel."""
    proxy, closed = await start_proxy(stack, sni_config(upstream, [origin.port], dial_name=False))
    body = await https_via_connect(proxy, origin.port, client_ctx(ca), NAME)
    assert body.startswith("hello")
    info = await finished(closed)
    assert info.route == "tunnel" and upstream.carried(origin.port) >= 1
