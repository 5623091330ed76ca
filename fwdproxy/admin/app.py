"""The admin HTTP API: Prometheus metrics, health probes, live connections, reload, dashboard,
and the layer cache (usage, prune, verify: this process owns the store, so they run here).

It runs in the proxy's own event loop (aiohttp AppRunner + TCPSite, no signal handling of its
own) and only reads the server state, so it costs nothing while nobody asks. Defaults are for a
loopback listener; three guards make it safe to leave on:

- a bearer token (`admin: {token: ...}`) protects everything but `/`, `/healthz`, `/readyz` and
  `/api/auth`, which reveal nothing about traffic (liveness probes need no credentials);
- without a token, requests must name the server by IP address or `localhost` in their Host
  header, so a web page on a DNS-rebound name cannot read the API from a browser;
- state-changing requests (POST, DELETE) carrying a foreign `Origin` are refused, so a web page
  cannot close tunnels or trigger reloads through the browser of someone on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from fwdproxy import __version__
from fwdproxy.admin.metrics import MirrorCollector, ProxyMetrics, ThroughputSampler, route_key
from fwdproxy.cache.summary import summarize
from fwdproxy.core.addr import AddressError, format_host_port, ip_of, is_loopback, split_host_port
from fwdproxy.core.units import parse_duration
from fwdproxy.mirror.service import MirrorService

if TYPE_CHECKING:
    from fwdproxy.cache import BlobStore
    from fwdproxy.config import AdminSpec
    from fwdproxy.server import Server

logger = logging.getLogger("fwdproxy.admin")

OPEN_PATHS: Final = frozenset({"/", "/healthz", "/readyz", "/api/auth"})
RECENT_ERRORS_SHOWN: Final = 20
DEFAULT_PRUNE_AGE: Final = "30d"  # as `fwdproxy cache prune`
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    """The admin listener of one Server; started and stopped by the Server."""

    def __init__(
        self,
        server: Server,
        spec: AdminSpec,
        *,
        sample_interval_s: float = 1.0,
        history_s: float = 300.0,
    ) -> None:
        self.server = server
        self.spec = spec
        self.state = server.state
        self.metrics = ProxyMetrics(server.state)
        self.sampler = ThroughputSampler(
            server.state, self.metrics.ledger, sample_interval_s, history_s
        )
        self.metrics.registry.register(MirrorCollector(lambda: self.mirror))
        self.reload_lock = asyncio.Lock()
        self.cache_lock = asyncio.Lock()  # one verify or prune at a time
        self.app = make_admin_app(self)
        self._runner: web.AppRunner | None = None
        self._sampler_task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def start(self) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.spec.host, self.spec.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.state.observers.append(self.metrics)
        self.sampler.sample()
        loop = asyncio.get_running_loop()
        self._sampler_task = loop.create_task(self.sampler.run(), name="admin-sampler")
        refresh = getattr(self.server, "_refresh_own", None)
        if refresh is not None:
            refresh()  # the admin port is "this proxy" too: refuse tunnels to it (loops)
        where = ", ".join(format_host_port(h, p) for h, p in self.addresses)
        logger.info(
            "admin API and dashboard on http://%s/ (%s)",
            where,
            "bearer token required" if self.spec.token else "no token",
        )
        if not self.spec.token and not is_loopback(self.spec.host):
            logger.warning(
                "admin API on non-loopback %s without a token: anyone who reaches it can see "
                "connections, close them and reload; set admin.token",
                self.spec.host,
            )

    async def stop(self) -> None:
        if self._sampler_task is not None:
            self._sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler_task
            self._sampler_task = None
        with contextlib.suppress(ValueError):
            self.state.observers.remove(self.metrics)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def mirror(self) -> MirrorService | None:
        """The server's registry mirror, when it runs one."""
        service = getattr(self.server, "mirror", None)
        return service if isinstance(service, MirrorService) else None

    # -- guards ------------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        token = self.spec.token
        if not token:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), token.encode())

    def host_allowed(self, request: web.Request) -> bool:
        """Without a token, only IP literals and localhost: blocks DNS-rebinding pages."""
        if self.spec.token:
            return True
        try:
            host, _ = split_host_port(request.host or "", 80)
        except AddressError:
            return False
        return host == "localhost" or ip_of(host) is not None or host == self.spec.host


ADMIN: Final = web.AppKey("admin", AdminServer)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    admin = request.app[ADMIN]
    if not admin.host_allowed(request):
        return _json({"error": "Host header must be an IP address or localhost"}, 403)
    origin = request.headers.get("Origin")
    if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != request.host:
        return _json({"error": f"cross-origin {request.method} refused"}, 403)
    if request.path not in OPEN_PATHS and not admin.authorized(request):
        return web.json_response(
            {"error": "bearer token required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="fwdproxy"'},
        )
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if not request.path.startswith("/api/"):
            raise
        response = _json({"error": e.reason}, e.status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def make_admin_app(admin: AdminServer) -> web.Application:
    """The aiohttp application; also what tests drive with a test client."""
    app = web.Application(middlewares=[_guard])
    app[ADMIN] = admin
    app.router.add_get("/", dashboard)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/auth", auth)
    app.router.add_get("/api/connections", connections)
    app.router.add_delete("/api/connections/{id}", close_connection)
    app.router.add_get("/api/route", route)
    app.router.add_get("/api/explain", explain)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/api/upstreams", upstreams)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/api/mirror", mirror)
    app.router.add_get("/api/cache", cache_info)
    app.router.add_post("/api/cache/prune", cache_prune)
    app.router.add_post("/api/cache/verify", cache_verify)
    return app


# -- handlers --------------------------------------------------------------------------------

_PAGE_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


async def dashboard(request: web.Request) -> web.Response:
    page = resources.files("fwdproxy.admin").joinpath("static/dashboard.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": _PAGE_CSP, "Referrer-Policy": "no-referrer"},
    )


async def metrics(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(
        body=encoder(admin.metrics.registry), headers={"Content-Type": content_type}
    )


async def healthz(request: web.Request) -> web.Response:
    """200 while listening and (with upstreams) at least one upstream member is healthy."""
    admin = request.app[ADMIN]
    pool = admin.state.pool
    listening = [format_host_port(h, p) for h, p in admin.server.addresses]
    groups = {name: pool.healthy(name) for name in pool.groups}
    problems = []
    if not listening:
        problems.append("no proxy listener is bound")
    if groups and not any(groups.values()):
        problems.append("no upstream member is healthy: " + ", ".join(sorted(groups)))
    body = {
        "status": "unhealthy" if problems else "ok",
        "listening": listening,
        "upstreams": groups,
        "problems": problems,
    }
    return _json(body, 503 if problems else 200)


async def readyz(request: web.Request) -> web.Response:
    """503 once shutdown began, so a load balancer stops sending before the drain ends."""
    if request.app[ADMIN].state.accepting:
        return _json({"ready": True})
    return _json({"ready": False, "reason": "shutting down"}, 503)


async def auth(request: web.Request) -> web.Response:
    """Lets the dashboard learn whether it needs (or holds a valid) token without a 401."""
    admin = request.app[ADMIN]
    return _json({"required": bool(admin.spec.token), "ok": admin.authorized(request)})


def connection_json(admin: AdminServer, info: Any, now: float) -> dict[str, Any]:
    row: dict[str, Any] = info.as_dict()
    rate_up, rate_down = admin.sampler.rate(info.id)
    row.update(
        listener=info.listener,
        upstream=info.decision.upstream if info.decision else None,
        age_s=round(now - info.started, 3),
        dial_s=None if info.dial_s is None else round(info.dial_s, 4),
        rate_up=round(rate_up, 1),
        rate_down=round(rate_down, 1),
    )
    return row


async def connections(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    now = time.time()
    live = sorted(admin.state.connections.values(), key=lambda i: i.id)
    rows = [connection_json(admin, info, now) for info in live]
    return _json({"count": len(rows), "connections": rows})


async def close_connection(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    try:
        conn_id = int(request.match_info["id"])
    except ValueError:
        return _json({"ok": False, "error": "connection id must be an integer"}, 400)
    if not admin.server.close_connection(conn_id):
        return _json({"ok": False, "id": conn_id, "error": "no such connection"}, 404)
    logger.info("admin: closing connection %d", conn_id)
    return _json({"ok": True, "id": conn_id})


def _authority(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a URL (`https://ghcr.io/v2/`) -> (host, port)."""
    if "://" in text:
        parts = urlsplit(text)
        netloc = parts.netloc.rpartition("@")[2]
        port = 80 if parts.scheme == "http" else 443
        return split_host_port(netloc, port)
    return split_host_port(text, default_port)


async def route(request: web.Request) -> web.Response:
    """Dry run: where would a connection to host:port go, by which rule."""
    from fwdproxy.routing.query import route_json

    cfg = request.app[ADMIN].state.config
    host_text = request.query.get("host", "").strip()
    if not host_text:
        return _json({"error": "give ?host=NAME (optionally &port=N)"}, 400)
    try:
        port = int(request.query.get("port", "443"))
        host, port = _authority(host_text, port)
    except (AddressError, ValueError) as e:
        return _json({"error": f"{host_text}: {e}"}, 400)
    d = cfg.router.decide(host, port)
    body = route_json(cfg, host, port, d)
    body["describe"] = d.describe()
    return _json(body)


async def explain(request: web.Request) -> web.Response:
    """Every host a pull of ?image= touches, with its route (see `fwdproxy explain`)."""
    image = request.query.get("image", "").strip()
    if not image:
        return _json({"error": "give ?image=REFERENCE"}, 400)
    try:
        from fwdproxy.routing.explain import explain as explain_image
        from fwdproxy.routing.explain import explanation_json
        from fwdproxy.routing.imageref import ImageRefError
    except ImportError:
        return _json({"error": "image explanation is not available in this build"}, 501)
    cfg = request.app[ADMIN].state.config
    try:
        e = explain_image(image, cfg.router, dict(cfg.catalog))
    except ImageRefError as err:
        return _json({"error": f"{image}: {err}"}, 400)
    return _json(explanation_json(e))


async def reload(request: web.Request) -> web.Response:
    """Re-read the config; 200 {ok: true} when applied, 422 with the problems otherwise."""
    admin = request.app[ADMIN]
    async with admin.reload_lock:
        try:
            problems = await admin.server.reload()
        except OSError as e:
            problems = [f"cannot listen on a new address: {e.strerror or e}"]
            admin.metrics.reloaded(False, "")
    body = {"ok": not problems, "problems": problems, "digest": admin.state.config.digest}
    return _json(body, 422 if problems else 200)


async def upstreams(request: web.Request) -> web.Response:
    pool = request.app[ADMIN].state.pool
    snap: dict[str, Any] = pool.snapshot()
    for name, group in snap.items():
        group["healthy"] = pool.healthy(name)
    return _json({"upstreams": snap})


async def stats(request: web.Request) -> web.Response:
    """Totals, per-route figures and the throughput history the dashboard draws."""
    admin = request.app[ADMIN]
    state, m = admin.state, admin.metrics
    live = list(state.connections.values())
    m.ledger.sync(live)
    active: dict[tuple[str, str], int] = {}
    for info in live:
        key = route_key(info)
        active[key] = active.get(key, 0) + 1
    current = admin.sampler.current()
    routes = []
    for key in sorted(set(m.ledger.totals) | set(active)):
        up, down = m.ledger.totals.get(key, [0, 0])
        rate_up, rate_down = current.get(key, (0.0, 0.0))
        routes.append(
            {
                "route": key[0],
                "registry": key[1],
                "active": active.get(key, 0),
                "bytes_up": up,
                "bytes_down": down,
                "rate_up": round(rate_up, 1),
                "rate_down": round(rate_down, 1),
            }
        )
    now = time.time()
    cfg = state.config
    return _json(
        {
            "version": __version__,
            "now": now,
            "started": state.started,
            "uptime_s": round(now - state.started, 1),
            "accepting": state.accepting,
            "listening": [format_host_port(h, p) for h, p in admin.server.addresses],
            "config": {
                "path": str(cfg.path),
                "digest": cfg.digest,
                "rules": len(cfg.router.rules),
                "reloads": dict(m.reload_counts),
            },
            "totals": {
                "active": len(live),
                "closed": m.closed_total,
                "errors": m.errors_total,
                "bytes_up": sum(r["bytes_up"] for r in routes),
                "bytes_down": sum(r["bytes_down"] for r in routes),
            },
            "routes": routes,
            "history": admin.sampler.series(),
            "recent_errors": list(reversed(state.recent_errors[-RECENT_ERRORS_SHOWN:])),
            "mirror": admin.mirror.snapshot() if admin.mirror is not None else None,
        }
    )


async def mirror(request: web.Request) -> web.Response:
    """The registry mirror's counters per registry and the cache's size."""
    service = request.app[ADMIN].mirror
    if service is None:
        return _json({"error": "the registry mirror is not enabled (mirror: in the config)"},
                     status=404)
    return _json(service.snapshot())


# -- layer cache -------------------------------------------------------------------------------

_NO_CACHE: Final = "no layer cache is configured in this proxy (cache: {dir: ...} in the config)"


def _store(request: web.Request) -> BlobStore | None:
    """The store this process owns: the mirror's, or one set on the server by an embedder."""
    admin = request.app[ADMIN]
    service = admin.mirror
    if service is not None and service.store is not None:
        return service.store
    store: BlobStore | None = getattr(admin.server, "store", None)
    return store


async def cache_info(request: web.Request) -> web.Response:
    """Usage of the running proxy's cache: `fwdproxy cache du` for a store someone owns."""
    store = _store(request)
    if store is None:
        return _json({"error": _NO_CACHE}, 404)
    rows = await asyncio.to_thread(store.list)  # one query, but 100k rows are not free
    tags = await asyncio.to_thread(store.tags)
    body = {"dir": str(store.root), **summarize(rows).as_json(store.max_size), "tags": len(tags)}
    return _json(body)


async def cache_prune(request: web.Request) -> web.Response:
    """Delete blobs unused for ?older_than= (default 30d), or every unpinned one with ?all=1."""
    store = _store(request)
    if store is None:
        return _json({"error": _NO_CACHE}, 404)
    everything = request.query.get("all", "").lower() in ("1", "true", "yes")
    older = request.query.get("older_than")
    if everything and older:
        return _json({"error": "give ?older_than=AGE or ?all=1, not both"}, 400)
    try:
        age = None if everything else parse_duration(older or DEFAULT_PRUNE_AGE)
    except ValueError as e:
        return _json({"error": f"older_than: {e}"}, 400)
    admin = request.app[ADMIN]
    if admin.cache_lock.locked():
        return _json({"error": "a cache verify or prune is already running"}, 409)
    async with admin.cache_lock:

        def run() -> tuple[list[str], int, int]:
            sizes = {str(r.digest): r.size for r in store.list()}
            tags = len(store.tags())
            gone = [str(d) for d in store.prune(older_than_s=age)]
            return gone, sum(sizes.get(d, 0) for d in gone), tags - len(store.tags())

        gone, freed, tags = await asyncio.to_thread(run)
    usage = store.usage()
    logger.info("admin: cache prune removed %d blobs, %d bytes", len(gone), freed)
    return _json(
        {
            "ok": True,
            "older_than_s": age,
            "count": len(gone),
            "freed_bytes": freed,
            "pruned": gone,
            "tags_forgotten": tags,
            "remaining": {"count": usage.count, "bytes": usage.bytes},
        }
    )


async def cache_verify(request: web.Request) -> web.Response:
    """Re-hash every blob in a worker thread; 200 with `ok: false` when some were bad."""
    store = _store(request)
    if store is None:
        return _json({"error": _NO_CACHE}, 404)
    admin = request.app[ADMIN]
    if admin.cache_lock.locked():
        return _json({"error": "a cache verify or prune is already running"}, 409)
    async with admin.cache_lock:
        started = time.monotonic()
        report = await asyncio.to_thread(store.verify)
    took = time.monotonic() - started
    logger.info(
        "admin: cache verify checked %d blobs in %.1fs: %d bad, %d missing",
        report.checked,
        took,
        len(report.bad),
        len(report.missing),
    )
    return _json(
        {
            "ok": report.ok,
            "checked": report.checked,
            "bytes": report.bytes,
            "bad": [str(d) for d in report.bad],
            "missing": [str(d) for d in report.missing],
            "quarantine": str(store.root / "quarantine"),
            "seconds": round(took, 3),
        }
    )
