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
import time
import urllib.parse
from collections.abc import Callable
from typing import Final, Protocol

from fwdproxy.config import Config
from fwdproxy.config.mirror import MirrorParent, MirrorRegistry, MirrorSpec
from fwdproxy.core.addr import is_loopback
from fwdproxy.core.errors import FwdProxyError, Rejected
from fwdproxy.mirror.http import FetchError, Response
from fwdproxy.mirror.registry import RegistryClient, Upstream
from fwdproxy.mirror.stats import MirrorStats
from fwdproxy.net.dial import Deadline, Dialed, dial_direct
from fwdproxy.proto.byterange import ContentRangeError, check_content_range
from fwdproxy.proto.digest import Digest, DigestError, parse_digest
from fwdproxy.proto.manifest import MAX_MANIFEST_BYTES
from fwdproxy.proto.oci import OCIError, Registry
from fwdproxy.proxy import admission
from fwdproxy.proxy.state import ServerState

__all__ = ["VIA_HEADER", "BlobSink", "ManifestHead", "RoutedOpener", "Source",
           "UpstreamFetcher", "upstream_error"]

logger = logging.getLogger("fwdproxy.mirror")

BACKOFF_S: Final = (0.25, 0.5, 1.0, 2.0, 4.0)
VIA_HEADER: Final = "X-Fwdproxy-Via"  # the mirrors a request has passed, to refuse loops
PARENT_DOWN_S: Final = 30.0  # a parent that failed is skipped this long
# A parent's answers that end the search (the registry said so, through the parent); any
# other failure of a parent sends the request to the next parent or the node's own route.
_PARENT_FINAL: Final = frozenset({200, 206, 404, 429})


class Source:
    """Where one attempt goes: a parent mirror (asked with `ns=` and the via chain) or the
    registry itself through the node's own route."""

    __slots__ = ("headers", "parent", "query", "up")

    def __init__(self, up: Upstream, query: str = "", headers: tuple[tuple[str, str], ...] = (),
                 parent: MirrorParent | None = None) -> None:
        self.up = up
        self.query = query
        self.headers = headers
        self.parent = parent

    def route(self, resp: Response) -> str:
        return f"parent {self.parent.authority}" if self.parent is not None else resp.route

    def join_query(self, query: str) -> str:
        return "&".join(q for q in (self.query, query) if q)


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


class _ParentFailed(Exception):
    """A parent answered something that is not the registry's answer (5xx, 401, 403, 508)."""


class UpstreamFetcher:
    """The mirror's upstream operations, with retries and resume."""

    def __init__(self, client: RegistryClient, stats: MirrorStats,
                 config: Callable[[], Config]) -> None:
        self._client = client
        self._stats = stats
        self._config = config
        self._parent_down: dict[str, float] = {}

    @property
    def spec(self) -> MirrorSpec:
        spec = self._config().mirror
        return spec if spec is not None else MirrorSpec(listeners=())

    # -- sources: parents first, then the registry --------------------------------------------

    def sources(self, up: Upstream, via: tuple[str, ...]) -> list[Source]:
        """The parents that are not marked down, in order, then the registry itself."""
        now = time.monotonic()
        out = []
        for p in self.spec.parents:
            if self._parent_down.get(p.url, 0.0) > now:
                continue
            reg = Registry(p.authority, p.authority)
            settings = MirrorRegistry(p.authority, p.username, p.password, p.ca_file,
                                      plain_http=p.scheme == "http")
            ns = urllib.parse.quote(up.registry.name, safe="")
            out.append(Source(Upstream(reg, settings, up.repository), f"ns={ns}",
                              ((VIA_HEADER, ", ".join(via)),), p))
        out.append(Source(up))
        return out

    def _parent_failed(self, src: Source, why: str) -> None:
        assert src.parent is not None
        self._parent_down[src.parent.url] = time.monotonic() + PARENT_DOWN_S
        logger.warning("mirror: parent %s failed (%s); using the next source for %gs",
                       src.parent.url, why, PARENT_DOWN_S)

    def _count(self, up: Upstream, src: Source, resp: Response, n: int) -> None:
        self._stats[up.registry.name].bytes_fetched[src.route(resp)] += n

    async def blob(self, up: Upstream, digest: Digest, sink: BlobSink,
                   via: tuple[str, ...] = ()) -> None:
        """Fetch a blob into `sink`, resuming after breaks. Raises OCIError (an answer for the
        client) or FetchError (the upstream could not be reached or kept failing). A parent
        that fails hands over to the next source, which resumes where it stopped."""
        spec = self.spec
        path = f"/v2/{up.repository}/blobs/{digest}"
        attempt = 0
        started = False
        size: int | None = None
        sources = self.sources(up, via)
        while True:
            src = sources[0]
            offset = sink.offset
            headers = [("Range", f"bytes={offset}-")] if offset else []
            try:
                resp = await self._client.get(src.up, "GET", path, src.query,
                                              headers + list(src.headers),
                                              timeout_s=spec.fetch_timeout_s)
                try:
                    if src.parent is not None and resp.status not in _PARENT_FINAL:
                        raise _ParentFailed(f"answered {resp.status}")
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
                        self._count(up, src, resp, len(chunk))
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
            except _ParentFailed as e:
                self._parent_failed(src, str(e))
                sources.pop(0)
                continue
            except FetchError as e:
                if src.parent is not None:
                    self._parent_failed(src, str(e))
                    sources.pop(0)
                    continue
                if not e.retryable or attempt >= spec.retries:
                    raise
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                self._stats[up.registry.name].resumes += 1
                logger.warning("mirror: %s %s broke at byte %d (%s); resuming in %.2gs "
                               "(attempt %d of %d)", up.registry.name, digest, sink.offset, e,
                               delay, attempt, spec.retries)
                await asyncio.sleep(delay)

    async def head_manifest(self, up: Upstream, reference: str, accept: str,
                            via: tuple[str, ...] = ()) -> ManifestHead:
        """Resolve a tag with HEAD: a HEAD costs no Docker Hub pull, a GET does."""
        resp, _ = await self._retrying(up, "HEAD", f"/v2/{up.repository}/manifests/{reference}",
                                       [("Accept", accept)], via=via)
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

    async def manifest(self, up: Upstream, reference: str, accept: str,
                       via: tuple[str, ...] = ()) -> tuple[bytes, str]:
        """GET a manifest (by digest, or by tag when HEAD gave no digest): body, media type."""
        resp, src = await self._retrying(up, "GET", f"/v2/{up.repository}/manifests/{reference}",
                                         [("Accept", accept)], via=via)
        try:
            if resp.status != 200:
                raise upstream_error(up, resp, f"manifest {up.repository}:{reference}")
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            body = await resp.read(MAX_MANIFEST_BYTES)
            self._count(up, src, resp, len(body))
            return body, media_type
        finally:
            resp.close()

    async def passthrough(self, up: Upstream, path: str, query: str, accept: str | None,
                          limit: int, via: tuple[str, ...] = ()
                          ) -> tuple[int, dict[str, str], bytes]:
        """Small read-only answers passed on uncached (tags list, referrers)."""
        headers = [("Accept", accept)] if accept else []
        resp, src = await self._retrying(up, "GET", path, headers, query, via=via)
        try:
            body = await resp.read(limit)
            self._count(up, src, resp, len(body))
            return resp.status, resp.headers, body
        finally:
            resp.close()

    async def _retrying(self, up: Upstream, method: str, path: str,
                        headers: list[tuple[str, str]], query: str = "",
                        via: tuple[str, ...] = ()) -> tuple[Response, Source]:
        spec = self.spec
        attempt = 0
        sources = self.sources(up, via)
        while True:
            src = sources[0]
            try:
                resp = await self._client.get(src.up, method, path, src.join_query(query),
                                              headers + list(src.headers),
                                              timeout_s=spec.fetch_timeout_s)
            except FetchError as e:
                if src.parent is not None:
                    self._parent_failed(src, str(e))
                    sources.pop(0)
                    continue
                if not e.retryable or attempt >= min(spec.retries, 2):
                    raise
                await asyncio.sleep(BACKOFF_S[attempt])
                attempt += 1
                continue
            if src.parent is not None and resp.status not in _PARENT_FINAL:
                resp.close()
                self._parent_failed(src, f"answered {resp.status}")
                sources.pop(0)
                continue
            if resp.status >= 500 and attempt < min(spec.retries, 2):
                resp.close()
                await asyncio.sleep(BACKOFF_S[attempt])
                attempt += 1
                continue
            return resp, src
