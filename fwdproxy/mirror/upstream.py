"""Fetching from upstream registries for the mirror: routing each host, resuming blobs.

Every host the mirror contacts (registry API, token realm, CDN redirect target) is opened by
`RoutedOpener`, which applies the proxy's own protections (deny-list, its own listeners, loopback
targets only with `loopback_targets: true`) and then the rules — the same decision a CONNECT to
that host would get, through the same upstream groups with their health and failover.

A blob fetch that breaks mid-way continues with `Range: bytes=<offset>-` (bounded retries with
back-off); each attempt asks the registry again, so an expired signed CDN URL is replaced by a
fresh redirect, and a dead group member is skipped by the pool's failover on the next dial.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from typing import Final, Protocol

from fwdproxy.config import Config
from fwdproxy.config.mirror import MirrorSpec
from fwdproxy.core.addr import is_loopback
from fwdproxy.core.errors import FwdProxyError, Rejected
from fwdproxy.mirror.http import FetchError, Response
from fwdproxy.mirror.registry import RegistryClient, Upstream
from fwdproxy.mirror.stats import MirrorStats
from fwdproxy.net.dial import Deadline, Dialed, dial_direct
from fwdproxy.proto.byterange import ContentRangeError, check_content_range
from fwdproxy.proto.digest import Digest, DigestError, parse_digest
from fwdproxy.proto.manifest import MAX_MANIFEST_BYTES
from fwdproxy.proto.oci import OCIError
from fwdproxy.proxy import admission
from fwdproxy.proxy.state import ServerState

__all__ = ["BlobSink", "ManifestHead", "RoutedOpener", "SSLContexts", "UpstreamFetcher",
           "upstream_error"]

logger = logging.getLogger("fwdproxy.mirror")

BACKOFF_S: Final = (0.25, 0.5, 1.0, 2.0, 4.0)


class RoutedOpener:
    """Opens host:port for the mirror exactly as the rules route a proxied connection."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def __call__(self, host: str, port: int) -> tuple[Dialed, str]:
        cfg = self._state.config
        if is_loopback(host) and not cfg.loopback_targets:
            raise FetchError(f"refusing to fetch from loopback host {host} "
                             "(set loopback_targets: true to allow it)", retryable=False,
                             status=403)
        try:
            admission.check_target(cfg, host, port, "127.0.0.1", overloaded=False,
                                   is_own=self._state.is_own_address)
            d = cfg.router.decide(host, port)
            admission.check_decision(d, host, port)
        except Rejected as e:
            raise FetchError(f"refused by the proxy's rules: {e}", retryable=False,
                             status=403) from None
        deadline = Deadline(cfg.limits.dial_timeout_s)
        try:
            if d.action == "via" and d.upstream:
                dialed = await self._state.pool.open(d.upstream, host, port, deadline)
            else:
                dialed = await dial_direct(host, port, timeout_s=deadline.left(),
                                           hosts=cfg.hosts)
        except FwdProxyError as e:
            raise FetchError(f"{e} (route {d.route})") from None
        logger.debug("mirror fetch %s:%d via %s (rule %s)", host, port, d.route, d.rule)
        return dialed, d.route


class SSLContexts:
    """Verified client TLS contexts: the system store (SSL_CERT_FILE honoured), or one with a
    registry's own CA file added, built once each."""

    def __init__(self) -> None:
        self._default: ssl.SSLContext | None = None
        self._by_ca: dict[str, ssl.SSLContext] = {}

    def get(self, ca_file: str | None) -> ssl.SSLContext:
        if ca_file is None:
            if self._default is None:
                self._default = _context(None)
            return self._default
        ctx = self._by_ca.get(ca_file)
        if ctx is None:
            ctx = self._by_ca[ca_file] = _context(ca_file)
        return ctx


def _context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class BlobSink(Protocol):
    """Where a blob's bytes go: a cache Flight or a pass-through to one client."""

    @property
    def offset(self) -> int: ...

    async def start(self, expected_size: int | None, media_type: str | None) -> None: ...
    async def write(self, data: bytes) -> None: ...


class ManifestHead:
    """What a registry says about a manifest reference without sending it (HEAD)."""

    __slots__ = ("digest", "media_type", "size")

    def __init__(self, digest: Digest | None, media_type: str, size: int | None) -> None:
        self.digest = digest
        self.media_type = media_type
        self.size = size


def upstream_error(up: Upstream, resp: Response, what: str) -> OCIError:
    """An upstream's refusal as the OCI error to give our client (named after the upstream)."""
    where = f"{up.registry.name} answered {resp.status} for {what}"
    if resp.status == 404:
        code = "BLOB_UNKNOWN" if what.startswith("blob") else "MANIFEST_UNKNOWN"
        return OCIError(code, where, 404)
    if resp.status == 429:
        return OCIError("TOOMANYREQUESTS", f"{where} (rate limited upstream)", 429)
    if resp.status in (401, 403):
        return OCIError("DENIED", f"{where}: the upstream refused the mirror's credentials "
                        f"(set mirror.registries.{up.registry.name}.username/password)", 403)
    return OCIError("UNAVAILABLE", where, 503 if resp.status >= 500 else 502)


class UpstreamFetcher:
    """The mirror's upstream operations, with retries and resume."""

    def __init__(self, client: RegistryClient, stats: MirrorStats,
                 config: Callable[[], Config]) -> None:
        self._client = client
        self._stats = stats
        self._config = config

    @property
    def spec(self) -> MirrorSpec:
        spec = self._config().mirror
        return spec if spec is not None else MirrorSpec(listeners=())

    def _count(self, up: Upstream, resp: Response, n: int) -> None:
        self._stats[up.registry.name].bytes_fetched[resp.route] += n

    async def blob(self, up: Upstream, digest: Digest, sink: BlobSink) -> None:
        """Fetch a blob into `sink`, resuming after breaks. Raises OCIError (an answer for the
        client) or FetchError (the upstream could not be reached or kept failing)."""
        spec = self.spec
        path = f"/v2/{up.repository}/blobs/{digest}"
        attempt = 0
        started = False
        size: int | None = None
        while True:
            offset = sink.offset
            headers = [("Range", f"bytes={offset}-")] if offset else []
            try:
                resp = await self._client.get(up, "GET", path, headers=headers,
                                              timeout_s=spec.fetch_timeout_s)
                try:
                    skip = 0
                    if resp.status == 200:
                        skip = offset  # the upstream ignored our Range: drop what we have
                        if not started:
                            size = resp.content_length
                    elif resp.status == 206:
                        try:
                            cr = check_content_range(resp.headers.get("content-range", ""),
                                                     offset, size)
                        except ContentRangeError as e:
                            raise FetchError(f"bad resume answer: {e}") from None
                        if not started:
                            size = cr.size
                    else:
                        err = upstream_error(up, resp, f"blob {digest}")
                        if resp.status >= 500 or resp.status == 408:
                            raise FetchError(err.message, status=err.status)
                        raise err
                    if not started:
                        await sink.start(size, "application/octet-stream")
                        started = True
                    async for chunk in resp.chunks():
                        self._count(up, resp, len(chunk))
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        await sink.write(chunk)
                finally:
                    resp.close()
                if size is not None and sink.offset < size:
                    raise FetchError(f"upstream ended the blob at {sink.offset} of {size} bytes")
                return
            except FetchError as e:
                if not e.retryable or attempt >= spec.retries:
                    raise
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                self._stats[up.registry.name].resumes += 1
                logger.warning("mirror: %s %s broke at byte %d (%s); resuming in %.2gs "
                               "(attempt %d of %d)", up.registry.name, digest, sink.offset, e,
                               delay, attempt, spec.retries)
                await asyncio.sleep(delay)

    async def head_manifest(self, up: Upstream, reference: str, accept: str) -> ManifestHead:
        """Resolve a tag with HEAD: a HEAD costs no Docker Hub pull, a GET does."""
        resp = await self._retrying(up, "HEAD", f"/v2/{up.repository}/manifests/{reference}",
                                    [("Accept", accept)])
        try:
            if resp.status != 200:
                raise upstream_error(up, resp, f"manifest {up.repository}:{reference}")
            digest = None
            text = resp.headers.get("docker-content-digest")
            if text:
                try:
                    digest = parse_digest(text.strip())
                except DigestError:
                    digest = None  # fall back to GET and hashing
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            return ManifestHead(digest, media_type, resp.content_length)
        finally:
            resp.close()

    async def manifest(self, up: Upstream, reference: str, accept: str) -> tuple[bytes, str]:
        """GET a manifest (by digest, or by tag when HEAD gave no digest): body, media type."""
        resp = await self._retrying(up, "GET", f"/v2/{up.repository}/manifests/{reference}",
                                    [("Accept", accept)])
        try:
            if resp.status != 200:
                raise upstream_error(up, resp, f"manifest {up.repository}:{reference}")
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            body = await resp.read(MAX_MANIFEST_BYTES)
            self._count(up, resp, len(body))
            return body, media_type
        finally:
            resp.close()

    async def passthrough(self, up: Upstream, path: str, query: str, accept: str | None,
                          limit: int) -> tuple[int, dict[str, str], bytes]:
        """Small read-only answers passed on uncached (tags list, referrers)."""
        headers = [("Accept", accept)] if accept else []
        resp = await self._retrying(up, "GET", path, headers, query)
        try:
            body = await resp.read(limit)
            self._count(up, resp, len(body))
            return resp.status, resp.headers, body
        finally:
            resp.close()

    async def _retrying(self, up: Upstream, method: str, path: str,
                        headers: list[tuple[str, str]], query: str = "") -> Response:
        spec = self.spec
        attempt = 0
        while True:
            try:
                resp = await self._client.get(up, method, path, query, headers,
                                              timeout_s=spec.fetch_timeout_s)
                if resp.status >= 500 and attempt < min(spec.retries, 2):
                    resp.close()
                    raise FetchError(f"{up.registry.name} answered {resp.status}")
                return resp
            except FetchError as e:
                if not e.retryable or attempt >= min(spec.retries, 2):
                    raise
                await asyncio.sleep(BACKOFF_S[attempt])
                attempt += 1
