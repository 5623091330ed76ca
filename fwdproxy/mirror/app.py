"""The registry mirror's HTTP surface: the pull side of the OCI Distribution API.

One request's path: the listener's allow-list and optional Basic auth → `parse_mirror_request`
(which upstream registry, repository and reference the runtime means, whatever way it names the
mirror) → the cache (blobs and manifests by digest; tag answers with a TTL) → on a miss, one
upstream fetch per digest (single-flight), routed by the rules, resumed when it breaks, verified
before it is committed. Clients of a blob in flight read the growing file; the last byte of
anything is only served once its digest matched.

Answers carry what runtimes rely on: `Docker-Content-Digest`, `Content-Type`, `Content-Length`,
`Docker-Distribution-API-Version`, `206` + `Content-Range` for a resumed blob; errors are OCI
JSON bodies that say why (and which upstream said what). Write methods get 405: pull-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from aiohttp import web

from fwdproxy.cache import (
    BlobHandle,
    BlobStore,
    CacheError,
    DigestMismatch,
    Flight,
    FlightFailed,
    Flights,
    StoreFull,
)
from fwdproxy.config.mirror import MirrorListener, MirrorSpec
from fwdproxy.mirror.http import FetchError
from fwdproxy.mirror.passthrough import PassThrough
from fwdproxy.mirror.registry import Upstream
from fwdproxy.mirror.stats import MirrorStats, RegistryStats
from fwdproxy.mirror.upstream import VIA_HEADER, UpstreamFetcher
from fwdproxy.proto.byterange import parse_range
from fwdproxy.proto.digest import Digest
from fwdproxy.proto.http1 import parse_basic_credentials
from fwdproxy.proto.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    accept_header,
    accepts,
    parse_accept,
)
from fwdproxy.proto.oci import (
    Addressing,
    MirrorRequest,
    OCIError,
    RequestKind,
    Tag,
    error_body,
    parse_mirror_request,
)
from fwdproxy.proxy.admission import check_password, client_refusal

__all__ = ["API_VERSION", "Mirror", "TagAnswer"]

logger = logging.getLogger("fwdproxy.mirror")
_T = TypeVar("_T")

API_VERSION: Final = ("Docker-Distribution-API-Version", "registry/2.0")
MAX_PASSTHROUGH: Final = 1024 * 1024
CACHE_HEADER: Final = "X-Fwdproxy-Cache"  # hit | miss | coalesced | stale | bypass
_MANIFEST_LIKE: Final = MANIFEST_TYPES | INDEX_TYPES
VERIFY_FIRST_BYTES: Final = 1024 * 1024  # blobs up to this size are verified before sending
MAX_HOPS: Final = 8  # mirrors a request may pass; a longer chain is a loop we cannot name
# The request's via chain with this mirror added (a typed key where aiohttp has them).
_VIA: Final[Any] = (
    web.RequestKey("fwdproxy_via", tuple) if hasattr(web, "RequestKey") else "fwdproxy_via"
)


class TagAnswer:
    """A tag resolved to a digest, and when the upstream said so."""

    __slots__ = ("digest", "fetched_at", "media_type")

    def __init__(self, digest: Digest, media_type: str, fetched_at: float) -> None:
        self.digest = digest
        self.media_type = media_type
        self.fetched_at = fetched_at


class Mirror:
    """Request handling for every mirror listener; the cache is optional (`store` None)."""

    def __init__(
        self,
        spec: Callable[[], MirrorSpec],
        fetcher: UpstreamFetcher,
        store: BlobStore | None,
        stats: MirrorStats,
        users: Callable[[], dict[str, str]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spec = spec
        self.fetcher = fetcher
        self.store = store
        self.flights = Flights(store) if store is not None else None
        self.stats = stats
        self._users = users
        self._clock = clock
        self._tags: dict[tuple[str, str, str], TagAnswer] = {}  # without a store
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        # Bound (address, port) -> its listener: two listeners may share a port (loopback for
        # the runtimes, a LAN address for peers), each with its own allow-list.
        self.listeners: dict[tuple[str, int], MirrorListener] = {}
        # Names this mirror in the via chain of requests it sends to a parent mirror.
        self.instance_id = secrets.token_hex(6)

    # -- the aiohttp application ---------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Allow-list first (a stranger learns nothing), then Basic auth when configured."""
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        peer = request.remote or ""
        listener = self.listener_for(sock)
        if listener is None and self.listeners:  # cannot tell whose rules apply: refuse
            logger.warning("mirror: refused %s: arrived on %s, which is no mirror listener",
                           peer, sock)
            return _error(OCIError("DENIED", f"client {peer} is not allowed to use this mirror",
                                   403))
        if listener is not None and client_refusal(listener, peer) is not None:  # type: ignore[arg-type]
            logger.warning("mirror: refused %s: not in the allow-list of %s", peer,
                           listener.address)
            return _error(OCIError("DENIED", f"client {peer} is not allowed to use this mirror",
                                   403))
        if self._spec().auth:
            cred = parse_basic_credentials(request.headers.get("Authorization", "").encode())
            if cred is None or not check_password(self._users(), cred[0], cred[1]):
                resp = _error(OCIError("UNAUTHORIZED", "authentication required", 401))
                resp.headers["WWW-Authenticate"] = 'Basic realm="fwdproxy mirror"'
                if cred is not None:
                    logger.warning("mirror: authentication failed for %s from %s", cred[0], peer)
                return resp
        return await handler(request)

    def listener_for(self, sockname: Any) -> MirrorListener | None:
        """The listener a connection reached, by its local address: the one bound to that
        address, else the wildcard one (0.0.0.0 or ::) on that port."""
        if not sockname:
            return None
        host, port = str(sockname[0]), int(sockname[1])
        wildcard = "::" if ":" in host else "0.0.0.0"
        return self.listeners.get((host, port)) or self.listeners.get((wildcard, port))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        spec = self._spec()
        start = time.monotonic()
        url = request.rel_url
        try:
            mreq = parse_mirror_request(
                request.method,
                url.raw_path,
                url.raw_query_string,
                spec.default_registry,
                prefixes=spec.prefixes,
            )
        except OCIError as e:
            logger.info("mirror: %s %s -> %d %s", request.method, url.raw_path[:200], e.status,
                        e.message)
            return _error(e)
        if mreq.kind is RequestKind.PING:
            return web.json_response({}, headers=[API_VERSION])
        reg = self.stats[mreq.registry.name]
        reg.requests[mreq.kind.value] += 1
        via = tuple(v.strip() for v in request.headers.get(VIA_HEADER, "").split(",")
                    if v.strip())[:MAX_HOPS + 1]
        if self.instance_id in via or len(via) >= MAX_HOPS:
            reg.errors += 1
            if self.instance_id in via:
                why = "this request already passed through this mirror"
            else:  # a loop that does not include us, or a chain longer than any sane one
                n = f"more than {MAX_HOPS}" if len(via) > MAX_HOPS else str(len(via))
                why = (f"this request already passed through {n} mirrors "
                       f"(at most {MAX_HOPS - 1} allowed)")
            logger.error("mirror: %s: refused a loop of mirrors (via %s); check mirror.parent",
                         mreq.describe(), ", ".join(via))
            return _error(OCIError("UNAVAILABLE", f"mirror loop: {why} (via {', '.join(via)}); "
                                   "check the mirror.parent settings", 508), mreq)
        request[_VIA] = (*via, self.instance_id)
        try:
            if not spec.serves(mreq.registry.name):
                raise OCIError("DENIED", f"this mirror does not serve {mreq.registry.name} "
                               "(mirror.only)", 403)
            up = Upstream(mreq.registry, spec.registry(mreq.registry.name), mreq.repository)
            if mreq.kind is RequestKind.BLOB:
                resp = await self._blob(request, mreq, up)
            elif mreq.kind is RequestKind.MANIFEST:
                resp = await self._manifest(request, mreq, up)
            else:
                resp = await self._passthrough(request, mreq, up)
        except OCIError as e:
            reg.errors += 1
            logger.warning("mirror: %s -> %d %s", mreq.describe(), e.status, e.message)
            return _error(e, mreq)
        except FetchError as e:
            reg.errors += 1
            logger.warning("mirror: %s -> %d %s", mreq.describe(), e.status, e)
            code = "DENIED" if e.status == 403 else "UNAVAILABLE"
            return _error(OCIError(code, f"upstream {mreq.registry.name}: {e}", e.status), mreq)
        logger.info("mirror: %s %s -> %d %s (%.0f ms)", request.method, mreq.describe(),
                    resp.status, resp.headers.get(CACHE_HEADER, "-"),
                    (time.monotonic() - start) * 1000)
        return resp

    # -- blobs -----------------------------------------------------------------------------------

    async def _blob(self, request: web.Request, mreq: MirrorRequest,
                    up: Upstream) -> web.StreamResponse:
        digest = mreq.reference
        assert isinstance(digest, Digest)
        reg = self.stats[mreq.registry.name]
        store, flights = self.store, self.flights
        if store is None or flights is None:
            reg.misses += 1
            return await self._blob_passthrough(request, mreq, up, digest)
        if request.method == "HEAD":
            info = store.lookup(digest)
            if info is not None:
                reg.hits += 1
                return _blob_head(mreq, digest, info.size, "hit")
        else:
            handle = store.open_blob(digest)
            if handle is not None:
                reg.hits += 1
                return _CachedBlob(handle, reg, headers=_blob_headers(mreq, digest, "hit"))
        # No await since the lookup above: a flight leaves only once its blob is indexed.
        flight = flights.join(digest)
        state = "coalesced"
        if flight is None:
            flight = flights.claim(digest)
            assert flight is not None
            state = "miss"
            reg.misses += 1
            self._spawn(self._fill(flight, up, digest, request[_VIA]))
        else:
            reg.coalesced += 1
        try:
            head = await flight.wait_started()
        except FlightFailed as e:
            cause = e.__cause__
            if isinstance(cause, StoreFull):  # too big to cache: stream it to this client
                logger.warning("mirror: %s: %s; streaming without caching", digest, cause)
                return await self._blob_passthrough(request, mreq, up, digest)
            raise _failure(mreq, digest, cause) from None
        size = head.expected_size
        if request.method == "GET" and size is not None and size <= VERIFY_FIRST_BYTES:
            # Small blobs (configs, small layers) are verified before the answer starts, so a
            # bad upstream gets the client a clear 502 rather than a short body.
            try:
                await _committed(flight)
            except FlightFailed as e:
                raise _failure(mreq, digest, e.__cause__) from None
        if request.method == "HEAD":
            if size is None:
                info = await _committed(flight)
                size = info.size if info is not None else None
            return _blob_head(mreq, digest, size, state)
        return await self._stream_flight(request, mreq, digest, flight, size, state)

    async def _stream_flight(self, request: web.Request, mreq: MirrorRequest, digest: Digest,
                             flight: Flight, size: int | None, state: str) -> web.StreamResponse:
        start, end, status = 0, None, 200
        headers = _blob_headers(mreq, digest, state)
        if size is not None:
            rng = parse_range(request.headers.get("Range"), size)
            if rng is not None:
                start, end, status = rng.start, rng.end + 1, 206
                headers["Content-Range"] = rng.content_range()
        resp = web.StreamResponse(status=status, headers=headers)
        if size is not None:
            resp.content_length = (end if end is not None else size) - start
        await resp.prepare(request)
        try:
            async with flight.reader(start, end) as reader:
                async for chunk in reader:
                    await resp.write(chunk)
        except FlightFailed as e:
            logger.warning("mirror: %s: ending the response short: %s", mreq.describe(),
                           _reason(e.__cause__))
            _abort(request)
            return resp
        await resp.write_eof()
        return resp

    async def _fill(self, flight: Flight, up: Upstream, digest: Digest,
                    via: tuple[str, ...]) -> None:
        """The one upstream fetch of a digest, independent of the client that started it."""
        reg = self.stats[up.registry.name]
        t0 = time.monotonic()
        try:
            async with flight:
                await self.fetcher.blob(up, digest, flight, via)
                info = await flight.commit()
        except DigestMismatch as e:
            reg.verify_failures += 1
            logger.error("mirror: %s from %s failed verification, not cached: %s", digest,
                         up.registry.name, e)
            return
        except (OCIError, FetchError, CacheError, OSError) as e:
            logger.warning("mirror: fetch of %s from %s failed: %s", digest, up.registry.name,
                           _reason(e))
            return
        if self.store is not None and up.repository:
            with contextlib.suppress(CacheError, OSError):
                self.store.add_ref(digest, up.registry.name, up.repository)
        logger.info("mirror: cached %s (%d bytes from %s in %.1fs)", digest, info.size,
                    up.registry.name, time.monotonic() - t0)

    async def _blob_passthrough(self, request: web.Request, mreq: MirrorRequest, up: Upstream,
                                digest: Digest) -> web.StreamResponse:
        sink = PassThrough(digest)

        async def fetch() -> None:
            try:
                await self.fetcher.blob(up, digest, sink, request[_VIA])
                await sink.finish()
            except asyncio.CancelledError:
                sink.fail(FetchError("cancelled"))
                raise
            except Exception as e:
                sink.fail(e)

        task = asyncio.get_running_loop().create_task(fetch())
        try:
            try:
                size = await sink.wait_started()
            except FlightFailed as e:
                raise _failure(mreq, digest, sink.error or e.__cause__) from None
            headers = _blob_headers(mreq, digest, "bypass")
            if request.method == "HEAD":
                return _blob_head(mreq, digest, size, "bypass")
            if size is not None and size <= VERIFY_FIRST_BYTES:
                try:
                    body = b"".join([c async for c in sink.chunks()])
                except FlightFailed as e:
                    if isinstance(sink.error, DigestMismatch):
                        self.stats[mreq.registry.name].verify_failures += 1
                    raise _failure(mreq, digest, sink.error or e.__cause__) from None
                return web.Response(body=body, headers=headers)
            resp = web.StreamResponse(status=200, headers=headers)
            if size is not None:
                resp.content_length = size
            await resp.prepare(request)
            try:
                async for chunk in sink.chunks():
                    await resp.write(chunk)
            except FlightFailed as e:
                if isinstance(sink.error, DigestMismatch):
                    self.stats[mreq.registry.name].verify_failures += 1
                logger.warning("mirror: %s: ending the response short: %s", mreq.describe(),
                               _reason(sink.error or e))
                _abort(request)
                return resp
            await resp.write_eof()
            return resp
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- manifests -------------------------------------------------------------------------------

    async def _manifest(self, request: web.Request, mreq: MirrorRequest,
                        up: Upstream) -> web.StreamResponse:
        accepted = parse_accept(request.headers.getall("Accept", []))
        accept = accept_header(accepted)
        ref = mreq.reference
        reg = self.stats[mreq.registry.name]
        if isinstance(ref, Digest):
            body, media_type, state = await self._manifest_by_digest(request, up, ref, accept)
            return _manifest_response(request, mreq, ref, body, media_type, state)
        assert isinstance(ref, Tag) and up.repository is not None
        spec = self._spec()
        now = self._clock()
        cached = self._get_tag(up, str(ref))
        usable = cached is not None and accepts(accepted, cached.media_type)
        if cached is not None and usable and now - cached.fetched_at < spec.tag_ttl_s:
            reg.hits += 1
            body, media_type, _ = await self._manifest_by_digest(request, up, cached.digest,
                                                                 accept)
            return _manifest_response(request, mreq, cached.digest, body, media_type, "hit")
        try:
            head = await self._once(
                ("head", up.registry.name, up.repository, str(ref), accept),
                lambda: self.fetcher.head_manifest(up, str(ref), accept, request[_VIA]))
        except (FetchError, OCIError) as e:
            unreachable = isinstance(e, FetchError) or e.code in ("UNAVAILABLE",
                                                                  "TOOMANYREQUESTS")
            age = now - cached.fetched_at if cached is not None else 0.0
            if cached is None or not usable or not unreachable or age > spec.serve_stale_s:
                raise
            reg.stale += 1
            logger.warning("mirror: %s: upstream failed (%s); serving the tag as cached %.0fs "
                           "ago (stale)", mreq.describe(), _reason(e), age)
            body, media_type, _ = await self._manifest_by_digest(request, up, cached.digest,
                                                                 accept)
            resp = _manifest_response(request, mreq, cached.digest, body, media_type, "stale")
            resp.headers["Warning"] = f'110 fwdproxy "stale: upstream unreachable, age {age:.0f}s"'
            return resp
        reg.misses += 1
        if head.digest is None:
            body, media_type = await self.fetcher.manifest(up, str(ref), accept, request[_VIA])
            digest = Digest("sha256", hashlib.sha256(body).hexdigest())
            media_type = _check_manifest_type(media_type or head.media_type, mreq)
            await self._store_manifest(digest, body, media_type, up)
            self._put_tag(up, str(ref), digest, media_type)
            return _manifest_response(request, mreq, digest, body, media_type, "miss")
        self._put_tag(up, str(ref), head.digest, head.media_type)
        if request.method == "HEAD" and head.size is not None and head.media_type:
            cached_body = self._cached_manifest(head.digest)
            if cached_body is None:
                resp = web.StreamResponse(status=200, headers=_content_headers(
                    mreq, head.digest, head.media_type, "miss"))
                resp.content_length = head.size
                return resp
        body, media_type, state = await self._manifest_by_digest(request, up, head.digest,
                                                                 accept)
        return _manifest_response(request, mreq, head.digest, body, media_type,
                                  "miss" if state == "miss" else "hit")

    async def _manifest_by_digest(self, request: web.Request, up: Upstream, digest: Digest,
                                  accept: str) -> tuple[bytes, str, str]:
        """A manifest's verified bytes: from the cache, else from the upstream (then cached)."""
        cached = self._cached_manifest(digest)
        if cached is not None:
            return cached[0], cached[1], "hit"
        body, media_type = await self._once(
            ("manifest", up.registry.name, str(digest)),
            lambda: self.fetcher.manifest(up, str(digest), accept, request.get(_VIA, ())))
        if not digest.matches(_hash(digest, body)):
            self.stats[up.registry.name].verify_failures += 1
            raise OCIError("UNKNOWN", f"{up.registry.name} sent a manifest whose {digest.algorithm}"
                           f" does not match {digest}; not served, not cached", 502)
        media_type = _check_manifest_type(media_type, None)
        await self._store_manifest(digest, body, media_type, up)
        return body, media_type, "miss"

    async def _once(self, key: tuple[object, ...], fetch: Callable[[], Awaitable[_T]]) -> _T:
        """Concurrent identical manifest requests share one upstream request: a cluster's
        nodes resolving one tag at once cost the registry one HEAD (and Docker Hub one
        pull for the GET), not one per node."""
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fetch())
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._forget(key, f))
        return await asyncio.shield(fut)  # type: ignore[no-any-return]

    def _forget(self, key: tuple[object, ...], fut: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: every waiter may have gone

    def _cached_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        if self.store is None:
            return None
        handle = self.store.open_blob(digest)
        if handle is None:
            return None
        with handle:
            info = handle.info
            if info.size > 4 * 1024 * 1024 or info.media_type not in _MANIFEST_LIKE:
                return None
            body = handle.pread(info.size, 0)
        return body, info.media_type

    async def _store_manifest(self, digest: Digest, body: bytes, media_type: str,
                              up: Upstream) -> None:
        store = self.store
        if store is None:
            return

        def write() -> None:
            with store.begin(digest, len(body), media_type) as w:
                w.write(body)
                w.commit()
            if up.repository:
                store.add_ref(digest, up.registry.name, up.repository)

        try:
            await asyncio.to_thread(write)
        except (CacheError, OSError) as e:
            logger.warning("mirror: could not cache manifest %s: %s", digest, e)

    def _get_tag(self, up: Upstream, tag: str) -> TagAnswer | None:
        repo = up.repository or ""
        if self.store is None:
            return self._tags.get((up.registry.name, repo, tag))
        try:
            info = self.store.get_tag(up.registry.name, repo, tag)
        except (CacheError, OSError):
            return None
        return None if info is None else TagAnswer(info.digest, info.media_type, info.fetched_at)

    def _put_tag(self, up: Upstream, tag: str, digest: Digest, media_type: str) -> None:
        repo = up.repository or ""
        now = self._clock()
        if self.store is None:
            if len(self._tags) > 10_000:
                self._tags.clear()
            self._tags[(up.registry.name, repo, tag)] = TagAnswer(digest, media_type, now)
            return
        with contextlib.suppress(CacheError, OSError):
            self.store.put_tag(up.registry.name, repo, tag, digest, media_type, now)

    # -- tags list, referrers ----------------------------------------------------------------------

    async def _passthrough(self, request: web.Request, mreq: MirrorRequest,
                           up: Upstream) -> web.StreamResponse:
        if request.method == "HEAD":
            raise OCIError("UNSUPPORTED", "HEAD is not supported here; use GET", 405)
        status, headers, body = await self.fetcher.passthrough(
            up, mreq.upstream_path, mreq.upstream_query, request.headers.get("Accept"),
            MAX_PASSTHROUGH, request[_VIA])
        out = {"Content-Type": headers.get("content-type", "application/json")}
        if "link" in headers:
            out["Link"] = headers["link"]
        resp = web.Response(status=status if status < 500 else 502, body=body, headers=out)
        resp.headers[API_VERSION[0]] = API_VERSION[1]
        _namespace(resp, mreq)
        return resp

    # -- lifecycle ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel fetches still running (their flights fail; nothing half-written is kept)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


# -- helpers -------------------------------------------------------------------------------------


class _CachedBlob(web.FileResponse):
    """A committed blob sent with aiohttp's file response (sendfile where the loop has it,
    Range and HEAD handled), holding the blob's pin until it has been sent, so eviction cannot
    remove the file between the lookup and the send."""

    def __init__(self, handle: BlobHandle, reg: RegistryStats, headers: dict[str, str]) -> None:
        super().__init__(handle.info.path, chunk_size=1024 * 1024, headers=headers)
        self._handle = handle
        self._reg = reg
        # A response aiohttp never prepares (the client left first) still lets go of the pin.
        weakref.finalize(self, handle.close)

    async def prepare(self, request: web.BaseRequest) -> Any:
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD":
                self._reg.bytes_from_cache += self.content_length or 0
            return writer
        finally:
            self._handle.close()



def _hash(digest: Digest, body: bytes) -> str:
    h = digest.hasher()
    h.update(body)
    return h.hexdigest()


async def _committed(flight: Flight) -> Any:
    async with flight.reader(0) as r:
        async for _ in r:
            pass
    return flight.info


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    if isinstance(e, OCIError):
        return e.message
    return str(e) or type(e).__name__


def _failure(mreq: MirrorRequest, digest: Digest, cause: BaseException | None) -> Exception:
    """Why a fetch failed, as the answer for a client that has not got a byte yet."""
    if isinstance(cause, OCIError):
        return cause
    if isinstance(cause, DigestMismatch):
        return OCIError("UNKNOWN", f"{mreq.registry.name} sent bytes that do not match {digest}; "
                        "nothing was served or cached", 502)
    if isinstance(cause, FetchError):
        return cause
    return OCIError("UNAVAILABLE", f"fetching {digest} failed: {_reason(cause)}", 503)


def _abort(request: web.Request) -> None:
    """End a response whose length was promised but cannot be kept: the client sees a short
    body (an error it retries), never a complete wrong one."""
    if request.transport is not None:
        request.transport.abort()


def _namespace(resp: web.StreamResponse, mreq: MirrorRequest | None) -> None:
    if mreq is not None and mreq.addressing is Addressing.NS:
        resp.headers["OCI-Namespace"] = mreq.registry.name


def _error(e: OCIError, mreq: MirrorRequest | None = None) -> web.Response:
    resp = web.Response(status=e.status, body=error_body(e), content_type="application/json")
    resp.headers[API_VERSION[0]] = API_VERSION[1]
    for name, value in e.headers:
        resp.headers[name] = value
    _namespace(resp, mreq)
    return resp


def _content_headers(mreq: MirrorRequest, digest: Digest, media_type: str,
                     state: str) -> dict[str, str]:
    """What every manifest and blob answer carries (HEAD included)."""
    headers = {
        "Content-Type": media_type,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        API_VERSION[0]: API_VERSION[1],
        CACHE_HEADER: state,
    }
    if mreq.addressing is Addressing.NS:
        headers["OCI-Namespace"] = mreq.registry.name
    return headers


def _blob_headers(mreq: MirrorRequest, digest: Digest, state: str) -> dict[str, str]:
    headers = _content_headers(mreq, digest, "application/octet-stream", state)
    headers["Accept-Ranges"] = "bytes"
    headers["Cache-Control"] = "max-age=31536000"
    return headers


def _blob_head(mreq: MirrorRequest, digest: Digest, size: int | None,
               state: str) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=_blob_headers(mreq, digest, state))
    if size is not None:
        resp.content_length = size
    return resp


def _manifest_response(request: web.Request, mreq: MirrorRequest, digest: Digest, body: bytes,
                       media_type: str, state: str) -> web.StreamResponse:
    headers = _content_headers(mreq, digest, media_type, state)
    if request.method == "HEAD":
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = len(body)
        return resp
    return web.Response(status=200, body=body, headers=headers)


def _check_manifest_type(media_type: str, mreq: MirrorRequest | None) -> str:
    """A manifest must come with a manifest media type, or clients choke on it later."""
    if media_type in _MANIFEST_LIKE:
        return media_type
    if media_type.startswith("application/vnd.oci.") or media_type.startswith(
        "application/vnd.docker."
    ):
        return media_type  # artifacts and older types: pass through as the registry said
    raise OCIError("MANIFEST_INVALID", f"upstream sent a manifest as {media_type[:80]!r}", 502)

