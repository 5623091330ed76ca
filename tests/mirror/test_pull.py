"""Pulls through the mirror from a fake registry: headers, cache hits, coalescing, resume."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp

from tests.mirror.conftest import MakeMirror
from tests.mirror.fakeregistry import OCI_MANIFEST, FakeRegistry, digest_of

REPO = "team/app"


def _ns(reg: FakeRegistry) -> str:
    return f"ns={reg.host}"


async def test_ping_answers_with_the_api_version(make_mirror: MakeMirror) -> None:
    m = await make_mirror()
    async with await m.get("/v2/") as r:
        assert r.status == 200
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_pull_by_tag_then_blobs_from_cache(make_mirror: MakeMirror,
                                                 registry: FakeRegistry) -> None:
    m = await make_mirror()
    async with await m.get(f"/v2/{REPO}/manifests/v1?{_ns(registry)}",
                           headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 200, await r.text()
        body = await r.read()
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == digest_of(body)
        assert r.headers["OCI-Namespace"] == registry.host
    manifest = json.loads(body)
    digests = [manifest["config"]["digest"]] + [x["digest"] for x in manifest["layers"]]
    for _ in range(2):
        for d in digests:
            async with await m.get(f"/v2/{REPO}/blobs/{d}?{_ns(registry)}") as r:
                assert r.status == 200, await r.text()
                data = await r.read()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == d
                assert r.headers["Docker-Content-Digest"] == d
    for d in digests:
        assert registry.blob_gets[d] == 1  # the second round came from the cache
    assert registry.manifest_heads["v1"] == 1
    assert registry.manifest_gets["v1"] == 0  # tags are resolved with HEAD only


async def test_concurrent_pulls_share_one_upstream_fetch(make_mirror: MakeMirror,
                                                         registry: FakeRegistry) -> None:
    m = await make_mirror()
    big = max(registry.blobs, key=lambda d: len(registry.blobs[d]))
    registry.gate = asyncio.Event()

    async def pull() -> bytes:
        async with await m.get(f"/v2/{REPO}/blobs/{big}?{_ns(registry)}") as r:
            assert r.status == 200
            return await r.read()

    tasks = [asyncio.create_task(pull()) for _ in range(4)]
    for _ in range(200):  # bounded: until the fetch is under way and everyone has joined
        stats = m.service.stats[registry.host]
        if stats.misses + stats.coalesced == 4 and registry.blob_gets[big] == 1:
            break
        await asyncio.sleep(0.01)
    registry.gate.set()
    bodies = await asyncio.gather(*tasks)
    assert all(b == registry.blobs[big] for b in bodies)
    assert registry.blob_gets[big] == 1
    assert m.service.stats[registry.host].coalesced == 3


async def test_broken_transfer_is_resumed(make_mirror: MakeMirror,
                                          registry: FakeRegistry) -> None:
    m = await make_mirror()
    big = max(registry.blobs, key=lambda d: len(registry.blobs[d]))
    registry.break_after[big] = 500_000
    async with await m.get(f"/v2/{REPO}/blobs/{big}?{_ns(registry)}") as r:
        assert r.status == 200
        assert await r.read() == registry.blobs[big]
    assert registry.blob_gets[big] == 2
    assert registry.blob_bytes[big] == len(registry.blobs[big])  # nothing fetched twice
    assert m.service.stats[registry.host].resumes == 1


async def test_corrupt_upstream_bytes_are_never_served_or_cached(
    make_mirror: MakeMirror, registry: FakeRegistry
) -> None:
    m = await make_mirror()
    big = max(registry.blobs, key=lambda d: len(registry.blobs[d]))
    registry.corrupt.add(big)
    async with await m.get(f"/v2/{REPO}/blobs/{big}?{_ns(registry)}") as r:
        assert r.status == 200
        try:
            data = await r.read()
        except aiohttp.ClientPayloadError:  # a short body is the expected failure
            data = b""
        assert data != registry.blobs[big] and len(data) < len(registry.blobs[big])
    assert m.service.store is not None and m.service.store.lookup(
        __import__("fwdproxy.proto.digest", fromlist=["x"]).parse_digest(big)) is None
    registry.corrupt.clear()
    async with await m.get(f"/v2/{REPO}/blobs/{big}?{_ns(registry)}") as r:
        assert await r.read() == registry.blobs[big]


async def test_large_cache_hit_is_sent_whole_and_counted(make_mirror: MakeMirror,
                                                         registry: FakeRegistry) -> None:
    """A hit goes out as a file response (sendfile); it must be sent once, whole, and counted."""
    from tests.mirror.fakeregistry import make_image

    img = make_image("team/big", "v1", [9 * 1024 * 1024], seed=9)
    registry.add(img)
    m = await make_mirror()
    d = max(img.blobs, key=lambda k: len(img.blobs[k]))
    for state in ("miss", "hit", "hit"):
        async with await m.get(f"/v2/team/big/blobs/{d}?{_ns(registry)}") as r:
            assert r.headers["X-Fwdproxy-Cache"] == state
            assert await r.read() == img.blobs[d]
    assert m.service.stats[registry.host].bytes_from_cache == 2 * len(img.blobs[d])


async def test_corrupt_small_blob_is_a_clear_502(make_mirror: MakeMirror,
                                                 registry: FakeRegistry) -> None:
    m = await make_mirror()
    small = min(registry.blobs, key=lambda d: len(registry.blobs[d]))
    registry.corrupt.add(small)
    async with await m.get(f"/v2/{REPO}/blobs/{small}?{_ns(registry)}") as r:
        assert r.status == 502
        err = (await r.json())["errors"][0]
        assert "do not match" in err["message"] and "nothing was served or cached" in err["message"]


async def test_concurrent_manifest_requests_share_one_upstream_request(
    make_mirror: MakeMirror, registry: FakeRegistry
) -> None:
    m = await make_mirror()
    registry.manifest_gate = asyncio.Event()
    digest = digest_of(registry.manifests[(REPO, "v1")][0])

    async def pull(ref: str) -> int:
        async with await m.get(f"/v2/{REPO}/manifests/{ref}?{_ns(registry)}") as r:
            await r.read()
            return r.status

    tags = [asyncio.create_task(pull("v1")) for _ in range(4)]
    for _ in range(500):  # bounded: until the one HEAD is waiting at the registry
        if registry.manifest_waiting == 1:
            break
        await asyncio.sleep(0.01)
    registry.manifest_gate.set()
    assert await asyncio.gather(*tags) == [200] * 4
    assert registry.manifest_heads["v1"] == 1
    assert registry.manifest_gets[digest] == 1
