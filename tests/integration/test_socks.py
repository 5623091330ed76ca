"""SOCKS5 and SOCKS4/4a on the shared port: address types, reply codes, bound address, auth."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import Any

import pytest
from helpers import (
    BLOCKED_NAME,
    DIRECT_NAME,
    LOOPBACK,
    TUNNEL_NAME,
    Blackhole,
    EchoServer,
    RunningProxy,
    Upstream,
    closed_port,
    socks4_request,
    socks5_request,
)
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from fwdproxy.core.errors import Socks5Reply
from fwdproxy.net.dial import classify_os_error

pytestmark = pytest.mark.timeout(60)


def socks5_url(proxy: RunningProxy, auth: str = "") -> str:
    return f"socks5://{auth}{proxy.addr}"


async def roundtrip(sock: socket.socket, data: bytes = b"hello over socks") -> bytes:
    r, w = await asyncio.open_connection(sock=sock)
    try:
        w.write(data)
        return await asyncio.wait_for(r.readexactly(len(data)), 5)
    finally:
        w.close()


async def python_socks_connect(
    proxy: RunningProxy, host: str, port: int, **kw: Any
) -> socket.socket:
    p = Proxy.from_url(socks5_url(proxy, kw.pop("auth", "")), rdns=True)
    return await p.connect(dest_host=host, dest_port=port, timeout=10)


@pytest.fixture
async def echo6() -> Any:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound on this machine")
    async with EchoServer(host="::1") as e:
        yield e


# -- success paths -----------------------------------------------------------------------------


async def test_socks5_no_auth_method_is_chosen(proxy: RunningProxy) -> None:
    r, w = await proxy.open()
    try:
        w.write(b"\x05\x03\x02\x80\x00")  # user/pass, private, no-auth: we pick no-auth
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x00"
    finally:
        w.close()


@pytest.mark.parametrize(
    "host", [LOOPBACK, DIRECT_NAME, TUNNEL_NAME], ids=["atyp-ipv4", "atyp-domain", "domain-tunnel"]
)
async def test_socks5_connect_with_python_socks(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream, host: str
) -> None:
    sock = await python_socks_connect(proxy, host, echo.port)
    assert await roundtrip(sock) == b"hello over socks"
    if host == TUNNEL_NAME:
        await socks_upstream.wait_carried(echo.port)
    else:
        assert socks_upstream.carried(echo.port) == 0


async def test_socks5_connect_atyp_ipv6(proxy: RunningProxy, echo6: EchoServer) -> None:
    reply, r, w = await socks5_request(proxy, "::1", echo6.port)
    try:
        assert reply.code == 0
        w.write(b"v6!")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"v6!"
    finally:
        w.close()
    sock = await python_socks_connect(proxy, "::1", echo6.port)
    assert await roundtrip(sock) == b"hello over socks"
    assert echo6.connections == 2


@pytest.mark.parametrize("host", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])
async def test_socks5_success_reply_carries_the_bound_address(
    proxy: RunningProxy, echo: EchoServer, host: str
) -> None:
    reply, _r, w = await socks5_request(proxy, host, echo.port)
    try:
        assert reply.code == 0
        assert reply.host == LOOPBACK
        assert reply.port != 0
    finally:
        w.close()


@pytest.mark.parametrize("host", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])
async def test_socks5_optimistic_data_after_the_request_is_forwarded(
    proxy: RunningProxy, echo: EchoServer, host: str
) -> None:
    reply, r, w = await socks5_request(proxy, host, echo.port, then=b"OPTIMISTIC")
    try:
        assert reply.code == 0
        assert await asyncio.wait_for(r.readexactly(10), 5) == b"OPTIMISTIC"
    finally:
        w.close()
    assert bytes(echo.received[0]) == b"OPTIMISTIC"


@pytest.mark.parametrize("cmd", [2, 3], ids=["bind", "udp-associate"])
async def test_socks5_bind_and_udp_associate_are_not_supported(
    proxy: RunningProxy, echo: EchoServer, cmd: int
) -> None:
    reply, _r, w = await socks5_request(proxy, LOOPBACK, echo.port, cmd=cmd)
    w.close()
    assert reply.code == 0x07
    assert echo.connections == 0


# -- reply codes -------------------------------------------------------------------------------


async def test_socks5_reject_rule_is_0x02(proxy: RunningProxy) -> None:
    reply, _, w = await socks5_request(proxy, BLOCKED_NAME, 443)
    w.close()
    assert reply.code == 0x02


async def test_socks5_deny_listed_target_is_0x02(proxy: RunningProxy) -> None:
    reply, _, w = await socks5_request(proxy, "169.254.169.254", 80)
    w.close()
    assert reply.code == 0x02


@pytest.mark.parametrize("host", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "via-upstream"])
async def test_socks5_refused_is_0x05(proxy: RunningProxy, host: str) -> None:
    reply, _, w = await socks5_request(proxy, host, closed_port())
    w.close()
    assert reply.code == 0x05


async def test_socks5_dial_timeout_is_0x06(make_proxy: Any, blackhole: Blackhole) -> None:
    proxy = await make_proxy(
        upstreams={"slow": f"socks5://127.0.0.1:{blackhole.port}"},
        rules=[{"name": "to-slow", "domain": ["slow.test"], "via": "slow"}],
        limits={"dial_timeout_s": 0.5},
    )
    reply, _, w = await socks5_request(proxy, "slow.test", 443)
    w.close()
    assert reply.code == 0x06


async def test_socks5_upstream_down_is_0x01(make_proxy: Any) -> None:
    proxy = await make_proxy(
        upstreams={"down": f"socks5://127.0.0.1:{closed_port()}"},
        rules=[{"name": "to-down", "domain": ["down.test"], "via": "down"}],
    )
    reply, _, w = await socks5_request(proxy, "down.test", 443)
    w.close()
    assert reply.code == 0x01


async def test_socks5_unresolvable_name_is_0x04(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS failure (faked in-process, so no query leaves the machine) is host unreachable."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[Any] = []

    async def fake_getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        asked.append(host)
        if host == "nx.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await real(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    reply, _, w = await socks5_request(proxy, "nx.test", 80)
    w.close()
    assert asked == ["nx.test"]
    assert reply.code == 0x04


async def test_socks5_unclassified_dial_error_is_0x01(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def fake_getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        if host == "odd.test":
            raise PermissionError(errno.EACCES, "Permission denied")
        return await real(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    reply, _, w = await socks5_request(proxy, "odd.test", 80)
    w.close()
    assert reply.code == 0x01


@pytest.mark.parametrize(
    "exc, code",
    [
        (socket.gaierror(socket.EAI_NONAME, "x"), Socks5Reply.HOST_UNREACHABLE),
        (ConnectionRefusedError(errno.ECONNREFUSED, "x"), Socks5Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "x"), Socks5Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), Socks5Reply.HOST_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "x"), Socks5Reply.TTL_EXPIRED),
        (
            OSError("Multiple exceptions: [Errno 111] Connect call failed"),
            Socks5Reply.CONNECTION_REFUSED,
        ),
        (OSError("Multiple exceptions: [Errno 113] No route"), Socks5Reply.HOST_UNREACHABLE),
        (OSError(errno.EACCES, "x"), Socks5Reply.GENERAL_FAILURE),
    ],
    ids=[
        "dns",
        "refused",
        "net-unreach",
        "host-unreach",
        "timeout",
        "multi-refused",
        "multi-unreach",
        "other",
    ],
)
def test_dial_error_to_socks5_reply_mapping(exc: OSError, code: Socks5Reply) -> None:
    assert classify_os_error(exc)[0] == code


async def test_socks5_python_socks_sees_the_reply_code(proxy: RunningProxy) -> None:
    with pytest.raises(ProxyError) as err:
        await python_socks_connect(proxy, DIRECT_NAME, closed_port())
    assert err.value.error_code == 0x05


async def test_socks5_keeps_serving_after_failures(proxy: RunningProxy, echo: EchoServer) -> None:
    for host, port in [(BLOCKED_NAME, 1), (DIRECT_NAME, closed_port())] * 3:
        reply, _, w = await socks5_request(proxy, host, port)
        w.close()
        assert reply.code != 0
    sock = await python_socks_connect(proxy, DIRECT_NAME, echo.port)
    assert await roundtrip(sock) == b"hello over socks"


# -- SOCKS4 / SOCKS4a --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", [LOOPBACK, DIRECT_NAME, TUNNEL_NAME], ids=["socks4", "socks4a-direct", "socks4a-tunnel"]
)
async def test_socks4_connect_success(
    proxy: RunningProxy, echo: EchoServer, socks_upstream: Upstream, host: str
) -> None:
    code, r, w = await socks4_request(proxy, host, echo.port)
    try:
        assert code == 0x5A
        w.write(b"four")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"four"
    finally:
        w.close()
    if host == TUNNEL_NAME:
        await socks_upstream.wait_carried(echo.port)


@pytest.mark.parametrize(
    "host, port",
    [(BLOCKED_NAME, 443), (DIRECT_NAME, 0), ("169.254.169.254", 80)],
    ids=["rule-reject", "refused", "deny-list"],
)
async def test_socks4_failure_is_0x5b(proxy: RunningProxy, host: str, port: int) -> None:
    code, _, w = await socks4_request(proxy, host, port or closed_port())
    w.close()
    assert code == 0x5B


# -- authentication ----------------------------------------------------------------------------

AUTH = {"users": {"alice": "secret"}}


async def test_socks5_username_password_success(make_proxy: Any, echo: EchoServer) -> None:
    proxy = await make_proxy(auth=AUTH)
    sock = await python_socks_connect(proxy, DIRECT_NAME, echo.port, auth="alice:secret@")
    assert await roundtrip(sock) == b"hello over socks"


@pytest.mark.parametrize("cred", ["alice:wrong@", "bob:secret@"], ids=["wrong-password", "unknown"])
async def test_socks5_username_password_failure(
    make_proxy: Any, echo: EchoServer, cred: str
) -> None:
    proxy = await make_proxy(auth=AUTH)
    with pytest.raises(ProxyError):
        await python_socks_connect(proxy, DIRECT_NAME, echo.port, auth=cred)
    reply, _, w = await socks5_request(
        proxy,
        DIRECT_NAME,
        echo.port,
        auth=tuple(cred.rstrip("@").split(":")),  # type: ignore[arg-type]
    )
    w.close()
    assert reply.code == -1  # the RFC 1929 status byte was non-zero
    assert echo.connections == 0


async def test_socks5_no_auth_offer_is_refused_when_auth_is_configured(make_proxy: Any) -> None:
    proxy = await make_proxy(auth=AUTH)
    r, w = await proxy.open()
    try:
        w.write(b"\x05\x01\x00")
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\xff"
        assert await asyncio.wait_for(r.read(), 5) == b""
    finally:
        w.close()


async def test_socks4_is_refused_when_auth_is_configured(make_proxy: Any, echo: EchoServer) -> None:
    proxy = await make_proxy(auth=AUTH)
    code, _, w = await socks4_request(proxy, LOOPBACK, echo.port)
    w.close()
    assert code == 0x5B
    assert echo.connections == 0


async def test_socks_raw_reply_layout(proxy: RunningProxy, echo: EchoServer) -> None:
    """The SOCKS4 reply is exactly 8 bytes and nothing follows before tunnel data."""
    r, w = await proxy.open()
    try:
        w.write(b"\x04\x01" + struct.pack("!H", echo.port) + b"\x7f\x00\x00\x01x\x00ping")
        reply = await asyncio.wait_for(r.readexactly(8), 5)
        assert reply[:2] == b"\x00\x5a"
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
    finally:
        w.close()
