"""Every byte, both ways: 64 MiB each direction with sha256, and half-close in both directions.

The 64 MiB transfers cross the real asyncio-socks-server on the tunnel route. That server (like
microsocks) closes the whole tunnel on the first EOF, so the half-close tests route the tunnel
through helpers.MiniSocks5, which relays each direction's EOF separately.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    TUNNEL_NAME,
    HalfCloseServer,
    HashServer,
    MiB,
    MiniSocks5,
    RunningProxy,
    Upstream,
    hash_exchange,
    open_connect_tunnel,
    poll_until,
    socks5_request,
)

pytestmark = pytest.mark.timeout(120)
SIZE = 64 * MiB
ROUTES = pytest.mark.parametrize("name", [DIRECT_NAME, TUNNEL_NAME], ids=["direct", "tunnel"])


@pytest.fixture(params=["default", "nosplice"], ids=["relay-default", "relay-nosplice"])
def relay_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each integrity test runs with the relay as shipped (splice(2) for bulk on Linux) and
    with its recv/send path only."""
    if request.param == "nosplice":
        from fwdproxy.net import relay_fast

        monkeypatch.setattr(relay_fast, "SPLICE_AFTER", None)
    return str(request.param)


async def open_tunnel(kind: str, proxy: RunningProxy, name: str, port: int) -> tuple[Any, Any]:
    if kind == "connect":
        return await open_connect_tunnel(proxy, f"{name}:{port}")
    reply, r, w = await socks5_request(proxy, name, port)
    assert reply.code == 0
    return r, w


@ROUTES
@pytest.mark.parametrize("kind", ["connect", "socks5"])
async def test_integrity_64mib_each_way(
    proxy: RunningProxy,
    hash_server: HashServer,
    socks_upstream: Upstream,
    name: str,
    kind: str,
    record_property: Any,
    caplog: pytest.LogCaptureFixture,
    relay_impl: str,
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    r, w = await open_tunnel(kind, proxy, name, hash_server.port)
    try:
        ex = await asyncio.wait_for(hash_exchange(r, w, SIZE, SIZE, seed=len(name)), 100)
    finally:
        w.close()
    mib_s = (ex.up_bytes + ex.down_bytes) / MiB / ex.seconds
    record_property("MiB_per_s_both_directions", round(mib_s, 1))
    total = 2 * SIZE // MiB
    print(f"{relay_impl} {kind}/{name}: {total} MiB in {ex.seconds:.2f}s = {mib_s:.0f} MiB/s")
    if name == TUNNEL_NAME:
        await socks_upstream.wait_carried(hash_server.port)
    else:
        assert socks_upstream.carried(hash_server.port) == 0
    # The access log line counts exactly what was relayed each way.
    await poll_until(lambda: not proxy.server.state.connections, 10, "the tunnel to close")
    (fields,) = [getattr(x, "fields", None) for x in caplog.records if x.name == "fwdproxy.access"]
    assert fields["up"] == SIZE + HashServer.HEADER.size
    assert fields["down"] == SIZE + 72
    assert fields["route"] == ("tunnel" if name == TUNNEL_NAME else "direct")


@pytest.fixture
async def half_close_proxy(make_proxy: Any) -> AsyncIterator[tuple[RunningProxy, MiniSocks5]]:
    """The standard routes, with the tunnel through an upstream that keeps half-closes."""
    async with MiniSocks5() as up:
        yield await make_proxy(upstream_url=f"socks5://127.0.0.1:{up.port}"), up


@ROUTES
@pytest.mark.parametrize("kind", ["connect", "socks5"])
async def test_integrity_client_half_close_still_receives_everything(
    half_close_proxy: tuple[RunningProxy, MiniSocks5],
    hash_server: HashServer,
    name: str,
    kind: str,
    relay_impl: str,
) -> None:
    """The client shuts its write side first; the 4 MiB answer still arrives in full."""
    proxy, up = half_close_proxy
    r, w = await open_tunnel(kind, proxy, name, hash_server.port)
    try:
        # The upload is tiny, so the client's EOF goes out long before the download ends,
        # and the server answers its trailer only after it has seen that EOF.
        await asyncio.wait_for(hash_exchange(r, w, 10, 4 * MiB, seed=3, half_close=True), 30)
    finally:
        w.close()
    assert up.carried == ([("localhost", hash_server.port)] if name == TUNNEL_NAME else [])


@ROUTES
@pytest.mark.parametrize("kind", ["connect", "socks5"])
async def test_integrity_server_half_close_still_receives_client_data(
    half_close_proxy: tuple[RunningProxy, MiniSocks5], name: str, kind: str, relay_impl: str
) -> None:
    """The server shuts its write side first; the client's later upload still reaches it."""
    proxy, up = half_close_proxy
    async with HalfCloseServer() as srv:
        r, w = await open_tunnel(kind, proxy, name, srv.port)
        try:
            banner = await asyncio.wait_for(r.read(), 10)  # ends at the server's EOF
            assert banner == HalfCloseServer.BANNER
            upload = b"after-your-eof;" * 50_000
            w.write(upload)
            await w.drain()
            w.write_eof()
            assert srv.got is not None
            assert await asyncio.wait_for(srv.got, 10) == upload
        finally:
            w.close()
    assert len(up.carried) == (1 if name == TUNNEL_NAME else 0)
