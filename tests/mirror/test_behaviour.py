"""The mirror's answers beyond the happy path: errors, exposure, auth, stale tags, ranges."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from fwdproxy.config import parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.core.errors import ConfigError
from fwdproxy.mirror.service import MirrorService
from fwdproxy.proto.digest import parse_digest
from fwdproxy.server import Server
from tests.helpers import closed_port
from tests.mirror.conftest import MakeMirror, running_mirror
from tests.mirror.fakeregistry import (
    OCI_MANIFEST,
    FakeRegistry,
    digest_of,
    make_image,
    mirror_config,
    running_registry,
)

REPO = "team/app"


def ns(reg: FakeRegistry) -> str:
    return f"ns={reg.host}"


def biggest(reg: FakeRegistry) -> str:
    return max(reg.blobs, key=lambda d: len(reg.blobs[d]))


async def _errors(r: aiohttp.ClientResponse) -> list[dict[str, str]]:
    doc = json.loads(await r.read())
    return list(doc["errors"])


async def test_write_methods_are_refused_as_pull_only(make_mirror: MakeMirror,
                                                      registry: FakeRegistry) -> None:
    m = await make_mirror()
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        async with m.session.request(method, f"{m.url}/v2/{REPO}/blobs/uploads/?{ns(registry)}"
                                     ) as r:
            assert r.status == 405
            assert "pull-only" in (await _errors(r))[0]["message"]
            assert r.headers["Allow"] == "GET, HEAD"


async def test_unknown_manifest_names_the_upstream(make_mirror: MakeMirror,
                                                   registry: FakeRegistry) -> None:
    m = await make_mirror()
    async with await m.get(f"/v2/{REPO}/manifests/nope?{ns(registry)}") as r:
        assert r.status == 404
        err = (await _errors(r))[0]
        assert err["code"] == "MANIFEST_UNKNOWN" and registry.host in err["message"]


async def test_head_manifest_by_tag_costs_no_upstream_get(make_mirror: MakeMirror,
                                                          registry: FakeRegistry) -> None:
    m = await make_mirror()
    async with m.session.head(f"{m.url}/v2/{REPO}/manifests/v1?{ns(registry)}",
                              headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 200
        manifest = registry.manifests[(REPO, "v1")][0]
        assert r.headers["Docker-Content-Digest"] == digest_of(manifest)
        assert r.headers["Content-Length"] == str(len(manifest))
        assert r.headers["Content-Type"] == OCI_MANIFEST
    assert registry.manifest_gets["v1"] == 0 and registry.manifest_heads["v1"] == 1


async def test_range_on_a_cached_blob_is_206(make_mirror: MakeMirror,
                                             registry: FakeRegistry) -> None:
    m = await make_mirror()
    d = biggest(registry)
    data = registry.blobs[d]
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
        assert await r.read() == data
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}",
                           headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert r.headers["X-Fwdproxy-Cache"] == "hit"
        assert await r.read() == data[1000:]
    async with m.session.head(f"{m.url}/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data))


async def test_range_while_the_blob_is_in_flight(make_mirror: MakeMirror,
                                                 registry: FakeRegistry) -> None:
    m = await make_mirror()
    d = biggest(registry)
    data = registry.blobs[d]
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}",
                           headers={"Range": "bytes=4096-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 4096-{len(data) - 1}/{len(data)}"
        assert await r.read() == data[4096:]
    assert registry.blob_gets[d] == 1


async def test_without_a_cache_blobs_stream_verified(make_mirror: MakeMirror,
                                                     registry: FakeRegistry) -> None:
    m = await make_mirror(cache=False)
    d = biggest(registry)
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
        assert r.headers["X-Fwdproxy-Cache"] == "bypass"
        assert await r.read() == registry.blobs[d]
    registry.corrupt.add(d)
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert m.service.stats[registry.host].verify_failures == 1


async def test_stale_tag_served_when_the_upstream_is_down(make_mirror: MakeMirror,
                                                          registry: FakeRegistry) -> None:
    m = await make_mirror(tag_ttl=0, retries=1)
    url = f"/v2/{REPO}/manifests/v1?{ns(registry)}"
    async with await m.get(url) as r:
        assert r.status == 200 and r.headers["X-Fwdproxy-Cache"] == "miss"
        body = await r.read()
    registry.down = True
    async with await m.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["X-Fwdproxy-Cache"] == "stale"
        assert "stale" in r.headers["Warning"]
        assert await r.read() == body
    d = biggest(registry)
    async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
        assert r.status == 503  # never fetched: nothing to serve
    async with await m.get(f"/v2/{REPO}/manifests/{digest_of(body)}?{ns(registry)}") as r:
        assert r.status == 200 and r.headers["X-Fwdproxy-Cache"] == "hit"


async def test_stale_window_is_bounded(make_mirror: MakeMirror, registry: FakeRegistry) -> None:
    m = await make_mirror(tag_ttl=0, serve_stale=0)
    url = f"/v2/{REPO}/manifests/v1?{ns(registry)}"
    async with await m.get(url) as r:
        assert r.status == 200
    registry.down = True
    async with await m.get(url) as r:
        assert r.status in (502, 503)


async def test_registries_outside_only_are_refused(make_mirror: MakeMirror,
                                                   registry: FakeRegistry) -> None:
    m = await make_mirror(only=["quay.io"])
    async with await m.get(f"/v2/{REPO}/manifests/v1?{ns(registry)}") as r:
        assert r.status == 403
        assert "does not serve" in (await _errors(r))[0]["message"]
    assert registry.manifest_heads["v1"] == 0


async def test_path_addressing_like_podman(make_mirror: MakeMirror,
                                           registry: FakeRegistry) -> None:
    m = await make_mirror()
    async with await m.get(f"/v2/{registry.host}/{REPO}/manifests/v1") as r:
        assert r.status == 200, await r.text()
        assert "OCI-Namespace" not in r.headers


async def test_loopback_registry_refused_unless_allowed(tmp_path: Path,
                                                        registry: FakeRegistry) -> None:
    cfg = mirror_config(str(tmp_path / "c"), registries={registry.host: {"plain_http": True}})
    cfg["loopback_targets"] = False
    async with running_mirror(cfg) as m, await m.get(
        f"/v2/{REPO}/manifests/v1?{ns(registry)}"
    ) as r:
        assert r.status == 403
        assert "loopback" in (await _errors(r))[0]["message"]
    assert registry.manifest_heads["v1"] == 0


async def test_mirror_refuses_to_fetch_from_itself(make_mirror: MakeMirror) -> None:
    m = await make_mirror()
    host, port = m.service.addresses[0]
    me = f"{host}:{port}"
    async with await m.get(f"/v2/{REPO}/manifests/v1?ns={me}") as r:
        assert r.status == 403
        assert "itself" in (await _errors(r))[0]["message"]


async def test_mirror_auth_and_allow_list(tmp_path: Path, registry: FakeRegistry) -> None:
    cfg = mirror_config(str(tmp_path / "c"), registries={registry.host: {"plain_http": True}},
                        auth=True)
    cfg["auth"] = {"users": {"node": "s3cret"}}
    async with running_mirror(cfg) as m:
        async with await m.get(f"/v2/{REPO}/manifests/v1?{ns(registry)}") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Basic")
        good = "Basic " + base64.b64encode(b"node:s3cret").decode()
        async with await m.get(f"/v2/{REPO}/manifests/v1?{ns(registry)}",
                               headers={"Authorization": good}) as r:
            assert r.status == 200
    cfg = mirror_config(str(tmp_path / "d"), registries={registry.host: {"plain_http": True}},
                        allow=["10.0.0.0/8"])
    async with running_mirror(cfg) as m, await m.get("/v2/") as r:
        assert r.status == 403
        assert "not allowed" in (await _errors(r))[0]["message"]


async def test_non_loopback_mirror_needs_allow_list_or_auth(tmp_path: Path) -> None:
    cfg = mirror_config(None)
    cfg["mirror"]["listen"] = "0.0.0.0:0"
    config = parse_config(load_yaml(yaml.safe_dump(cfg)), "t.yaml", env={})
    server = Server(config, mirror_factory=lambda s, spec: MirrorService(s.state, spec))
    with pytest.raises(ConfigError, match="registry mirror"):
        await server.start()
    await server.stop(grace_s=0)


async def test_registry_credentials_go_to_the_token_realm(tmp_path: Path) -> None:
    reg = FakeRegistry(basic_user=("bot", "pw"))
    reg.add(make_image(REPO, "v1", [1000], seed=3))
    async with running_registry(reg):
        for password, status in (("pw", 200), ("wrong", 403)):
            cfg = mirror_config(str(tmp_path / password), registries={
                reg.host: {"plain_http": True, "username": "bot", "password": password}})
            async with running_mirror(cfg) as m, await m.get(
                f"/v2/{REPO}/manifests/v1?{ns(reg)}"
            ) as r:
                assert r.status == status, await r.text()
        assert not any("pw" in a for a in reg.auth_seen)  # the registry API never saw it


async def test_blob_bigger_than_the_cache_streams_uncached(tmp_path: Path,
                                                          registry: FakeRegistry) -> None:
    cfg = mirror_config(str(tmp_path / "c"), registries={registry.host: {"plain_http": True}})
    cfg["cache"]["max_size"] = 100_000
    async with running_mirror(cfg) as m:
        d = biggest(registry)
        async with await m.get(f"/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
            assert r.status == 200
            assert await r.read() == registry.blobs[d]
        assert m.service.store is not None
        assert m.service.store.lookup(parse_digest(d)) is None


async def test_admin_reports_the_mirror(tmp_path: Path, registry: FakeRegistry) -> None:
    from fwdproxy.admin.app import AdminServer

    cfg = mirror_config(str(tmp_path / "c"), registries={registry.host: {"plain_http": True}})
    cfg["admin"] = "127.0.0.1:0"
    config = parse_config(load_yaml(yaml.safe_dump(cfg)), "t.yaml", env={})
    server = Server(config, admin_factory=AdminServer,
                    mirror_factory=lambda s, spec: MirrorService(s.state, spec))
    await server.start()
    try:
        assert server.mirror is not None and server.admin is not None
        mh, mp = server.mirror.addresses[0]
        ah, ap = server.admin.addresses[0]
        async with aiohttp.ClientSession() as s:
            d = biggest(registry)
            for _ in range(2):
                async with s.get(f"http://{mh}:{mp}/v2/{REPO}/blobs/{d}?{ns(registry)}") as r:
                    await r.read()
            async with s.get(f"http://{ah}:{ap}/api/mirror") as r:
                snap = await r.json()
            async with s.get(f"http://{ah}:{ap}/metrics") as r:
                text = await r.text()
        assert snap["hits"] == 1 and snap["misses"] == 1
        assert snap["bytes_from_cache"] == len(registry.blobs[d])
        assert snap["cache"]["bytes"] == len(registry.blobs[d])
        assert f'fwdproxy_mirror_cache_hits_total{{registry="{registry.host}"}} 1.0' in text
        assert "fwdproxy_cache_size_bytes" in text
        assert 'fwdproxy_mirror_fetched_bytes_total{registry="' in text
    finally:
        await server.stop(grace_s=0)


async def test_without_a_cache_a_corrupt_small_blob_is_a_clear_502(
    make_mirror: MakeMirror, registry: FakeRegistry
) -> None:
    m = await make_mirror(cache=False)
    small = min(registry.blobs, key=lambda d: len(registry.blobs[d]))
    async with await m.get(f"/v2/{REPO}/blobs/{small}?{ns(registry)}") as r:
        assert r.status == 200 and await r.read() == registry.blobs[small]
    registry.corrupt.add(small)
    async with await m.get(f"/v2/{REPO}/blobs/{small}?{ns(registry)}") as r:
        assert r.status == 502
        assert "do not match" in (await _errors(r))[0]["message"]


@pytest.mark.parametrize("order", ["loopback-first", "loopback-last"])
async def test_each_listener_on_a_shared_port_keeps_its_own_allow_list(
        tmp_path: Path, order: str) -> None:
    """Two listeners on one port (two addresses, as a node that serves its runtimes on
    127.0.0.1:5000 and its peers on its LAN address): a request is judged by the allow-list of
    the address it reached, whichever listener was bound last."""
    port = closed_port()
    local = {"listen": f"127.0.0.1:{port}", "allow": ["127.0.0.0/8"]}
    lan = {"listen": f"127.0.0.2:{port}", "allow": ["10.0.0.0/8"]}  # our client is 127.0.0.1
    cfg = mirror_config(None)
    cfg["mirror"]["listen"] = [local, lan] if order == "loopback-first" else [lan, local]
    async with running_mirror(cfg) as m:
        async with m.session.get(f"http://127.0.0.1:{port}/v2/") as r:
            assert r.status == 200, await r.text()
        async with m.session.get(f"http://127.0.0.2:{port}/v2/") as r:
            assert r.status == 403, await r.text()
            assert "not allowed" in (await _errors(r))[0]["message"]
