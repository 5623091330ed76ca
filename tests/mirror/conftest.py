"""Fixtures for the mirror: a fake registry and fwdproxy with its mirror, in-process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fwdproxy.config import parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.mirror.service import MirrorService
from fwdproxy.server import Server
from tests.mirror.fakeregistry import FakeRegistry, make_image, mirror_config, running_registry


@dataclass
class RunningMirror:
    server: Server
    service: MirrorService
    url: str
    session: aiohttp.ClientSession

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.get(self.url + path, **kw)


@contextlib.asynccontextmanager
async def running_mirror(cfg: dict[str, Any], scheme: str = "http"
                         ) -> AsyncIterator[RunningMirror]:
    config = parse_config(load_yaml(yaml.safe_dump(cfg)), "test.yaml", env={})
    server = Server(config, mirror_factory=lambda s, spec: MirrorService(s.state, spec))
    await server.start()
    try:
        service = server.mirror
        assert isinstance(service, MirrorService)
        host, port = service.addresses[0]
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            yield RunningMirror(server, service, f"{scheme}://{host}:{port}", session)
    finally:
        await server.stop(grace_s=1)


MakeMirror = Callable[..., Awaitable[RunningMirror]]


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    reg.add(make_image("team/app", "v1", [300_000, 1_200_000], seed=1))
    async with running_registry(reg) as r:
        yield r


@pytest.fixture
async def make_mirror(tmp_path: Path, registry: FakeRegistry) -> AsyncIterator[MakeMirror]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(cache: bool = True, **mirror: Any) -> RunningMirror:
            mirror.setdefault("registries", {registry.host: {"plain_http": True}})
            cfg = mirror_config(str(tmp_path / "cache") if cache else None, **mirror)
            return await stack.enter_async_context(running_mirror(cfg))

        yield make
