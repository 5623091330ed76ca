"""The cache CLI against the real mirror: `warm` fills the mirror's cache through it, the
read-only view and `explain` see what it stored while it owns the store, and the admin API's
/api/cache endpoints act on the mirror service's store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml

from fwdproxy.admin.app import AdminServer
from fwdproxy.cache import ReadOnlyStore
from fwdproxy.cache.image import image_status
from fwdproxy.cli.main import main
from fwdproxy.cli.warm import warm
from fwdproxy.config import parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.mirror.service import MirrorService
from fwdproxy.proto.digest import parse_digest
from fwdproxy.proto.manifest import Platform
from fwdproxy.server import Server
from tests.mirror.fakeregistry import FakeRegistry, digest_of, mirror_config

TOKEN = "t0ken"
AMD64 = Platform("linux", "amd64")


@asynccontextmanager
async def proxy(tmp_path: Path, registry: FakeRegistry) -> AsyncIterator[tuple[str, str]]:
    """fwdproxy with its mirror (cache in tmp_path/cache) and admin API, as `serve` wires it."""
    cfg = mirror_config(str(tmp_path / "cache"), registries={registry.host: {"plain_http": True}})
    cfg["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
    config = parse_config(load_yaml(yaml.safe_dump(cfg)), "test.yaml", env={})
    server = Server(
        config,
        admin_factory=AdminServer,
        mirror_factory=lambda s, spec: MirrorService(s.state, spec),
    )
    await server.start()
    try:
        assert server.mirror is not None and server.admin is not None
        mhost, mport = server.mirror.addresses[0]
        ahost, aport = server.admin.addresses[0]
        yield f"http://{mhost}:{mport}", f"http://{ahost}:{aport}"
    finally:
        await server.stop(grace_s=1)


async def test_warm_through_the_mirror_fills_its_cache(
    tmp_path: Path, registry: FakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    image = ("team/app", "v1")  # what the `registry` fixture serves
    ref = f"{registry.host}/{image[0]}:{image[1]}"
    manifest, _ = registry.manifests[image]
    blobs = set(registry.blobs)
    async with proxy(tmp_path, registry) as (mirror_url, admin_url):
        report = await warm(mirror_url, [ref], [AMD64])
        assert report.ok, report.images[0].errors
        assert report.blobs == len(blobs) and report.images[0].digest == digest_of(manifest)
        assert set(registry.blob_gets) == blobs and set(registry.blob_gets.values()) == {1}

        # A second run is answered from the cache: the registry sees no blob request.
        again = await warm(mirror_url, [ref], [AMD64])
        assert again.ok and registry.blob_gets.total() == len(blobs)

        # The mirror owns the store; a read-only view beside it sees every blob and the tag.
        root = tmp_path / "cache"
        with ReadOnlyStore(root) as view:
            for d in blobs | {digest_of(manifest)}:
                assert view.lookup(parse_digest(d)) is not None, d
            tag = view.get_tag(registry.host, image[0], image[1])
            assert tag is not None and str(tag.digest) == digest_of(manifest)
            status = image_status(
                view, registry.host, image[0], tag=image[1], digest=None, platform=AMD64
            )
            assert status.problem is None and status.layers_cached == len(status.layers) == 2

        # explain, offline, from the same cache.
        code = await asyncio.to_thread(main, ["explain", ref, "--cache-dir", str(root), "--json"])
        cache = json.loads(capsys.readouterr().out)["cache"]
        assert code == 0 and cache["layers_cached"] == 2 and cache["problem"] is None

        # The admin API acts on the mirror service's store.
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(admin_url + "/api/cache") as resp:
                body = await resp.json()
            assert resp.status == 200 and body["dir"] == str(root)
            assert body["count"] == len(blobs) + 1
            assert body["registries"][registry.host]["count"] == len(blobs) + 1
            async with http.post(admin_url + "/api/cache/verify") as resp:
                body = await resp.json()
            assert body["ok"] and body["checked"] == len(blobs) + 1


def test_warm_standalone_fills_a_cache_dir_without_a_running_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cache warm --standalone` runs its own mirror in-process, routed by the config."""
    import threading

    from tests.mirror.fakeregistry import make_image, running_registry

    reg = FakeRegistry()
    img = make_image("team/solo", "v1", [200_000, 50_000], seed=5)
    reg.add(img)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def serve() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with running_registry(reg):
            started.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert started.wait(10)
        cfg = mirror_config(None, registries={reg.host: {"plain_http": True}})
        cfg["listen"] = "127.0.0.1:3128"  # ignored: standalone binds nothing fixed
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cache = tmp_path / "cache"
        code = main(["cache", "warm", "--standalone", "-q", "-c", str(path), "--cache-dir",
                     str(cache), f"{reg.host}/team/solo:v1"])
        out = capsys.readouterr().out
        assert code == 0, out
        view = ReadOnlyStore(cache)
        try:
            for d in img.blobs:
                assert view.lookup(parse_digest(d)) is not None
        finally:
            view.close()
        assert all(reg.blob_gets[d] == 1 for d in img.blobs)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()
