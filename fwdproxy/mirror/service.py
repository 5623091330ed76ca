"""The mirror as a service of the running proxy: its listeners, its cache, its upstream client.

It shares the proxy's ServerState, so a reload's new rules, upstream groups, credentials and
tag TTL apply to the next fetch; its listeners are bound once at start (changing them needs a
restart, as the log says on reload).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from fwdproxy.cache import BlobStore
from fwdproxy.config.mirror import MirrorSpec
from fwdproxy.core.errors import ConfigError
from fwdproxy.mirror.app import Mirror
from fwdproxy.mirror.http import HTTPClient
from fwdproxy.mirror.registry import RegistryClient
from fwdproxy.mirror.stats import MirrorStats
from fwdproxy.mirror.upstream import RoutedOpener, UpstreamFetcher
from fwdproxy.proxy.state import ServerState

__all__ = ["MirrorService", "trust_context"]

logger = logging.getLogger("fwdproxy.mirror")


def trust_context(spec: MirrorSpec | None) -> ssl.SSLContext:
    """Verified TLS for every upstream host: the system store (SSL_CERT_FILE honoured) plus the
    CA files named under mirror.registries, so a site's own CA works as for the runtimes."""
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
    for reg in (spec.registries.values() if spec is not None else ()):
        if reg.ca_file:
            ctx.load_verify_locations(cafile=reg.ca_file)
    for parent in (spec.parents if spec is not None else ()):
        if parent.ca_file:
            ctx.load_verify_locations(cafile=parent.ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class MirrorService:
    """Start/stop the mirror's listeners beside the proxy's (fwdproxy.server.Service)."""

    def __init__(self, state: ServerState, spec: MirrorSpec) -> None:
        self.state = state
        self.spec = spec
        self.stats = MirrorStats()
        self.store: BlobStore | None = None
        self.mirror: Mirror | None = None
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self._http: HTTPClient | None = None
        self._ssl = trust_context(spec)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    def _spec_now(self) -> MirrorSpec:
        return self.state.config.mirror or self.spec

    async def start(self) -> None:
        cache = self.state.config.cache
        if cache is not None:
            try:
                self.store = await asyncio.to_thread(BlobStore, Path(cache.dir), cache.max_size)
            except Exception as e:
                raise ConfigError([f"cache.dir {cache.dir}: cannot open the cache: {e}"]) from e
        self._http = HTTPClient(RoutedOpener(self.state), lambda host: self._ssl)
        fetcher = UpstreamFetcher(RegistryClient(self._http), self.stats,
                                  lambda: self.state.config)
        self.mirror = Mirror(self._spec_now, fetcher, self.store, self.stats,
                             lambda: dict(self.state.config.users))
        self._runner = web.AppRunner(self.mirror.make_app(), handle_signals=False,
                                     access_log=None)
        await self._runner.setup()
        server_ssl = None
        if self.spec.tls_cert and self.spec.tls_key:
            server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                server_ssl.load_cert_chain(self.spec.tls_cert, self.spec.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError([f"mirror.tls: cannot load {self.spec.tls_cert} / "
                                   f"{self.spec.tls_key}: {e}"]) from None
        for lst in self.spec.listeners:
            before = set(self.addresses)
            site = web.TCPSite(self._runner, lst.host, lst.port, reuse_address=True,
                               ssl_context=server_ssl)
            await site.start()
            self._sites.append(site)
            for bound in set(self.addresses) - before:
                self.mirror.listeners[bound] = lst  # whose allow-list applies to a request
        where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses)
        if self.store is not None:
            usage = self.store.usage()
            cache_text = (f"cache {cache.dir if cache else '-'} ({usage.count} blobs, "
                          f"{usage.bytes} bytes, max {self.store.max_size or 'unbounded'})")
        else:
            cache_text = "no cache (streaming only; set cache.dir or --cache-dir)"
        scheme = "https" if server_ssl is not None else "http"
        logger.info("registry mirror on %s://%s, %s", scheme, where, cache_text)

    async def stop(self) -> None:
        if self.mirror is not None:
            await self.mirror.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            self._http.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def snapshot(self) -> dict[str, Any]:
        """Stats plus cache usage for the admin API and dashboard."""
        out: dict[str, Any] = dict(self.stats.snapshot())
        out["addresses"] = [f"{h}:{p}" for h, p in self.addresses]
        if self.store is not None:
            usage = self.store.usage()
            out["cache"] = {"blobs": usage.count, "bytes": usage.bytes,
                            "max_size": self.store.max_size}
        else:
            out["cache"] = None
        return out
