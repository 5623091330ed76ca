"""What the mirror did, per registry: the numbers behind its metrics and dashboard panel.

Plain counters the request path bumps without locks (one event loop); the admin layer reads
them when it is scraped, so the mirror never imports the metrics library.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["MAX_REGISTRIES", "MirrorStats", "RegistryStats"]


@dataclass
class RegistryStats:
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by kind
    hits: int = 0  # answered from the cache (blobs and manifests by digest, fresh tags)
    misses: int = 0  # had to ask the upstream
    stale: int = 0  # tag answered from a stale cache entry because the upstream failed
    coalesced: int = 0  # joined another request's upstream fetch
    resumes: int = 0  # upstream transfers continued with Range after a break
    verify_failures: int = 0  # upstream bytes whose digest did not match: never served
    errors: int = 0
    bytes_from_cache: int = 0  # body bytes served from committed cache files
    bytes_fetched: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by route


MAX_REGISTRIES = 256  # registry names come from clients (`ns`): bound the metric labels
OTHER = "other"


class MirrorStats:
    def __init__(self) -> None:
        self.registries: dict[str, RegistryStats] = {}

    def __getitem__(self, registry: str) -> RegistryStats:
        s = self.registries.get(registry)
        if s is None:
            if len(self.registries) >= MAX_REGISTRIES:
                registry = OTHER
                s = self.registries.get(OTHER)
            if s is None:
                s = self.registries[registry] = RegistryStats()
        return s

    def snapshot(self) -> dict[str, object]:
        """JSON for the admin API and the dashboard."""
        out: dict[str, object] = {}
        total_hits = total_misses = served = fetched = 0
        for name, s in sorted(self.registries.items()):
            out[name] = {
                "requests": dict(s.requests),
                "hits": s.hits,
                "misses": s.misses,
                "stale": s.stale,
                "coalesced": s.coalesced,
                "resumes": s.resumes,
                "verify_failures": s.verify_failures,
                "errors": s.errors,
                "bytes_from_cache": s.bytes_from_cache,
                "bytes_fetched": dict(s.bytes_fetched),
            }
            total_hits += s.hits
            total_misses += s.misses
            served += s.bytes_from_cache
            fetched += sum(s.bytes_fetched.values())
        lookups = total_hits + total_misses
        return {
            "registries": out,
            "hits": total_hits,
            "misses": total_misses,
            "hit_ratio": (total_hits / lookups) if lookups else None,
            "bytes_from_cache": served,
            "bytes_fetched": fetched,
        }
