"""A registry stand-in for the mirror's tests: token auth, manifests, blobs with Range,
redirects to a "CDN" path, and switches to misbehave (break a transfer, corrupt bytes, go down).

It counts what it served so a test can assert that a layer crossed "the tunnel" once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    repo: str
    tag: str
    layers: list[bytes]
    config: bytes
    manifest: bytes
    digest: str

    @property
    def blobs(self) -> dict[str, bytes]:
        out = {digest_of(b): b for b in self.layers}
        out[digest_of(self.config)] = self.config
        return out


def make_image(repo: str, tag: str, sizes: list[int], seed: int = 0) -> Image:
    rnd = random.Random(seed)
    layers = [rnd.randbytes(n) for n in sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b), "size": len(b)}
                   for b in layers],
    }).encode()
    return Image(repo, tag, layers, config, manifest, digest_of(manifest))


@dataclass
class FakeRegistry:
    """Serve images; `require_token` makes every API path demand a Bearer token."""

    require_token: bool = True
    basic_user: tuple[str, str] | None = None  # token endpoint demands these credentials
    redirect_blobs: bool = True
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    # misbehaviour switches
    break_after: dict[str, int] = field(default_factory=dict)  # digest -> cut after N bytes, once
    corrupt: set[str] = field(default_factory=set)
    down: bool = False
    ignore_range: bool = False
    gate: asyncio.Event | None = None  # blob bodies wait for this before the first byte
    manifest_gate: asyncio.Event | None = None  # manifest answers wait for this
    # counters
    blob_bytes: Counter[str] = field(default_factory=Counter)
    blob_gets: Counter[str] = field(default_factory=Counter)
    manifest_gets: Counter[str] = field(default_factory=Counter)
    manifest_heads: Counter[str] = field(default_factory=Counter)
    token_requests: int = 0
    manifest_waiting: int = 0
    auth_seen: list[str] = field(default_factory=list)
    port: int = 0

    def add(self, image: Image) -> None:
        self.manifests[(image.repo, image.tag)] = (image.manifest, OCI_MANIFEST)
        self.manifests[(image.repo, image.digest)] = (image.manifest, OCI_MANIFEST)
        self.blobs.update(image.blobs)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/cdn/{digest}", self._cdn)
        app.router.add_route("*", "/v2/{tail:.*}", self._api)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.basic_user is not None:
            import base64

            want = "Basic " + base64.b64encode(":".join(self.basic_user).encode()).decode()
            if request.headers.get("Authorization") != want:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        scope = request.query.get("scope", "")
        return web.json_response({"token": f"tok-{scope}", "expires_in": 300})

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        self.auth_seen.append(auth)
        return not self.require_token or auth.startswith("Bearer tok-")

    def _challenge(self) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="http://{self.host}/token",'
                                         'service="fake"'},
        )

    async def _api(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.Response(status=503, text="down")
        tail = request.match_info["tail"]
        if tail == "":
            return web.json_response({}) if self._authorized(request) else self._challenge()
        if not self._authorized(request):
            return self._challenge()
        if "/manifests/" in tail:
            repo, ref = tail.rsplit("/manifests/", 1)
            found = self.manifests.get((repo, ref))
            if found is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            body, media_type = found
            if self.manifest_gate is not None:
                self.manifest_waiting += 1
                await self.manifest_gate.wait()
            headers = {"Docker-Content-Digest": digest_of(body), "Content-Type": media_type}
            if request.method == "HEAD":
                self.manifest_heads[ref] += 1
                return web.Response(headers={**headers, "Content-Length": str(len(body))})
            self.manifest_gets[ref] += 1
            return web.Response(body=body, headers=headers)
        if "/blobs/" in tail:
            repo, digest = tail.rsplit("/blobs/", 1)
            if digest not in self.blobs:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
            if self.redirect_blobs and request.method == "GET":
                raise web.HTTPTemporaryRedirect(f"http://localhost:{self.port}/cdn/{digest}?sig=abc")
            return await self._send_blob(request, digest)
        return web.json_response({"errors": [{"code": "UNSUPPORTED"}]}, status=404)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.Response(status=503, text="down")
        if request.headers.get("Authorization"):
            return web.Response(status=400, text="S3 refuses signed URLs with Authorization")
        return await self._send_blob(request, request.match_info["digest"])

    async def _send_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self.blobs[digest]
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = request.headers.get("Range")
        status = 200
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        self.blob_gets[digest] += 1
        await resp.prepare(request)
        if self.gate is not None:
            await self.gate.wait()
        cut = self.break_after.pop(digest, None)
        sent = 0
        for i in range(0, len(body), 64 * 1024):
            chunk = body[i : i + 64 * 1024]
            if cut is not None and sent + len(chunk) > cut:
                chunk = chunk[: cut - sent]
                await resp.write(chunk)
                self.blob_bytes[digest] += len(chunk)
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            self.blob_bytes[digest] += len(chunk)
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def running_registry(reg: FakeRegistry) -> AsyncIterator[FakeRegistry]:
    runner = web.AppRunner(reg.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    reg.port = int(runner.addresses[0][1])
    try:
        yield reg
    finally:
        await runner.cleanup()


def mirror_config(cache_dir: str | None, **mirror: Any) -> dict[str, Any]:
    """A proxy config with the mirror on an ephemeral loopback port and local registries."""
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": False,
        "loopback_targets": True,
        "default": "direct",
        "mirror": {"listen": "127.0.0.1:0", "tag_ttl": "60s", **mirror},
    }
    if cache_dir is not None:
        cfg["cache"] = {"dir": cache_dir}
    return cfg
