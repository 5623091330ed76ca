"""Shared fixtures: real upstream proxies (session), origins and the proxy under test (per test).

Upstream processes are started once per run because they cost a Python start-up each. Every
test that asserts on an upstream's log looks only at the lines written during that test and
for its own origin's port, so sharing them cannot leak between tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    STARTED_UPSTREAMS,
    Blackhole,
    DnsGuard,
    EchoServer,
    HashServer,
    Origin,
    RunningProxy,
    Upstream,
    proxy_config,
    running_proxy,
    start_asyncio_socks,
    start_microsocks,
    start_microsocks_auth,
    start_tinyproxy,
)
from hypothesis import HealthCheck, settings

# No per-example deadline: a loaded 2-core CI machine must not turn slowness into failures.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=2000
)
settings.register_profile("fast", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _upstream(
    tmp_path_factory: pytest.TempPathFactory,
    start: Callable[[Path], Upstream],
    tool: str | None = None,
) -> Iterator[Upstream]:
    if tool is not None and shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (Debian package {tool})", pytrace=False)
    up = start(tmp_path_factory.mktemp(start.__name__))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream_logs() -> None:
    """Each test sees only the tunnels its own run logged (ports get reused across tests)."""
    for up in STARTED_UPSTREAMS:
        up.reset()


@pytest.fixture(scope="session")
def socks_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """asyncio-socks-server 0.3: an independent SOCKS5 implementation, resolving names itself."""
    yield from _upstream(tmp_path_factory, start_asyncio_socks)


@pytest.fixture(scope="session")
def microsocks_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    yield from _upstream(tmp_path_factory, start_microsocks, "microsocks")


@pytest.fixture(scope="session")
def microsocks_auth_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    yield from _upstream(tmp_path_factory, start_microsocks_auth, "microsocks")


@pytest.fixture(scope="session")
def tinyproxy_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    yield from _upstream(tmp_path_factory, start_tinyproxy, "tinyproxy")


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as o:
        yield o


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as e:
        yield e


@pytest.fixture
async def hash_server() -> AsyncIterator[HashServer]:
    async with HashServer() as h:
        yield h


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    async with Blackhole() as b:
        yield b


MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def dns_guard() -> AsyncIterator[DnsGuard]:
    """No name but `localhost` resolves in this test's loop; fails the test if one was tried."""
    guard = DnsGuard(asyncio.get_running_loop())
    guard.install()
    try:
        yield guard
    finally:
        guard.uninstall()
    assert not guard.blocked, f"the proxy tried to resolve {guard.blocked} through DNS"


@pytest.fixture
async def make_proxy(socks_upstream: Upstream, dns_guard: DnsGuard) -> AsyncIterator[MakeProxy]:
    """`await make_proxy(**proxy_config_kwargs)` or `await make_proxy(config=dict)`.

    The upstream defaults to the session's asyncio-socks-server. The DNS guard is active for
    as long as the proxy runs.
    """
    async with AsyncExitStack() as stack:

        async def make(config: dict[str, Any] | None = None, **kw: Any) -> RunningProxy:
            if config is None:
                kw.setdefault("upstream_url", socks_upstream.url)
                config = proxy_config(**kw)
            return await stack.enter_async_context(running_proxy(config))

        yield make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> RunningProxy:
    """The standard proxy: `localhost` via asyncio-socks-server, `direct.test` direct."""
    return await make_proxy()
