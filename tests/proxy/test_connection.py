"""The connection protocol: admission order, shutdown of handshakes vs tunnels, closing by the
admin API. Real sockets to an in-process proxy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    LOOPBACK,
    EchoServer,
    RunningProxy,
    connect_head,
    open_connect_tunnel,
    poll_until,
    read_response,
)

pytestmark = pytest.mark.timeout(60)
USERS = {"alice": "secret"}


async def closed(r: asyncio.StreamReader) -> bool:
    """True once the proxy closed the connection (EOF, or a reset when bytes were unread)."""
    try:
        return await asyncio.wait_for(r.read(), 5) == b""
    except ConnectionResetError:
        return True


def outside_allow_list(**extra: Any) -> dict[str, Any]:
    """A loopback listener whose allow-list does not contain loopback: we are outside it."""
    return {"listen": [{"listen": f"{LOOPBACK}:0", "allow": ["192.0.2.0/24"]}], **extra}


async def socks5_auth_answer(proxy: RunningProxy, user: str, password: str) -> bytes:
    r, w = await proxy.open()
    try:
        w.write(b"\x05\x01\x02")
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x02"
        u, p = user.encode(), password.encode()
        w.write(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


async def test_socks5_outside_the_allow_list_gets_no_password_oracle(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client outside the allow-list gets the same answer for a right and a wrong password."""
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy = await make_proxy(**outside_allow_list(auth={"users": USERS}))
    right = await socks5_auth_answer(proxy, "alice", "secret")
    wrong = await socks5_auth_answer(proxy, "alice", "wrong")
    assert right == wrong == b"\x01\x01"
    await poll_until(lambda: not proxy.server.state.connections, 5, "both connections closed")
    fields = [r.fields for r in caplog.records if r.name == "fwdproxy.access"]  # type: ignore[attr-defined]
    assert [f["outcome"] for f in fields] == ["rejected", "rejected"]
    assert all("allow-list" in f["error"] for f in fields)


async def test_socks5_inside_the_allow_list_still_checks_the_password(make_proxy: Any) -> None:
    proxy = await make_proxy(auth={"users": USERS})
    assert (await socks5_auth_answer(proxy, "alice", "wrong")) == b"\x01\x01"
    r, w = await proxy.open()
    try:
        w.write(b"\x05\x01\x02\x01\x05alice\x06secret")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"\x05\x02\x01\x00"
    finally:
        w.close()


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
async def test_http_outside_the_allow_list_is_refused_before_auth(
    make_proxy: Any, echo: EchoServer, auth: bool
) -> None:
    extra = {"auth": {"users": USERS}} if auth else {}
    proxy = await make_proxy(**outside_allow_list(**extra))
    r, w = await proxy.open()
    try:
        w.write(connect_head(f"{DIRECT_NAME}:{echo.port}"))
        resp = await read_response(r, method="CONNECT")
    finally:
        w.close()
    assert resp.status == 403 and b"allow-list" in resp.body


async def test_shutdown_closes_handshakes_at_once_and_lets_tunnels_drain(
    make_proxy: Any, echo: EchoServer
) -> None:
    proxy = await make_proxy(limits={"shutdown_grace_s": 30, "handshake_timeout_s": 30})
    tr, tw = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    hr, hw = await proxy.open()
    hw.write(b"CONNECT half")  # a handshake that is not finished
    await poll_until(lambda: len(proxy.server.state.connections) == 2, 5, "both connections")
    stopping = asyncio.ensure_future(proxy.server.stop(grace_s=30))
    try:
        # The handshake is closed at once, not after the 30 s handshake timeout or grace.
        assert await closed(hr)
        # The tunnel still carries bytes both ways while the server drains.
        tw.write(b"still here")
        assert await asyncio.wait_for(tr.readexactly(10), 5) == b"still here"
        assert not stopping.done()
        tw.close()
        await asyncio.wait_for(stopping, 10)  # the last tunnel ended: shutdown completes
    finally:
        hw.close()
        tw.close()
        if not stopping.done():
            stopping.cancel()


async def test_shutdown_closes_idle_keepalive_forwarding_at_once(
    make_proxy: Any, origin: Any
) -> None:
    proxy = await make_proxy(limits={"shutdown_grace_s": 30})
    authority = f"{DIRECT_NAME}:{origin.port}"
    r, w = await proxy.open()
    try:
        w.write(f"GET http://{authority}/echo/1 HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert (await read_response(r)).status == 200
        await asyncio.wait_for(proxy.server.stop(grace_s=30), 10)
        assert await asyncio.wait_for(r.read(), 5) == b""
    finally:
        w.close()


async def test_admin_close_ends_a_connection_in_any_phase(
    proxy: RunningProxy, echo: EchoServer, blackhole: Any
) -> None:
    """Closing by id works for a handshake, a dial in flight and a tunnel alike."""
    server = proxy.server
    hr, hw = await proxy.open()
    hw.write(b"\x05")  # handshake
    _, dw = await proxy.open()
    dw.write(connect_head(f"{DIRECT_NAME}:{blackhole.port}"))  # accepted, never answers
    tr, tw = await open_connect_tunnel(proxy, f"{DIRECT_NAME}:{echo.port}")
    await poll_until(lambda: len(server.state.connections) == 3, 5, "three connections")
    try:
        for conn_id in list(server.state.connections):
            assert server.close_connection(conn_id)
        for r in (hr, tr):
            assert await closed(r)
        await poll_until(lambda: not server.state.connections, 5, "all closed")
    finally:
        for w in (hw, dw, tw):
            w.close()
