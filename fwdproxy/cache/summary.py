"""Space per registry, from the index's refs: what `cache du` and `GET /api/cache` report.

Blobs are keyed by digest only, so one layer shared by two registries is stored once: the total
counts it once, while each registry that asked for it shows it in its own figure (that is the
space the registry would free if it were the only user). The per-registry figures can therefore
add up to more than the total; that is the point of a content-addressed store, not a bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fwdproxy.cache.index import BlobRow, Usage

__all__ = ["CacheSummary", "RegistryUsage", "percent_full", "registry_of", "summarize"]


@dataclass(frozen=True, slots=True)
class RegistryUsage:
    registry: str
    count: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CacheSummary:
    count: int
    bytes: int
    registries: tuple[RegistryUsage, ...]  # most bytes first
    unreferenced: Usage  # blobs no registry is recorded for (e.g. re-adopted after a crash)

    @property
    def shared(self) -> bool:
        """Whether some blob is counted under more than one registry."""
        return sum(r.bytes for r in self.registries) + self.unreferenced.bytes > self.bytes

    def as_json(self, max_size: int | None) -> dict[str, Any]:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "max_size": max_size,
            "percent_full": percent_full(self.bytes, max_size),
            "registries": {
                r.registry: {"count": r.count, "bytes": r.bytes} for r in self.registries
            },
            "unreferenced": {"count": self.unreferenced.count, "bytes": self.unreferenced.bytes},
        }


def registry_of(ref: str) -> str:
    """`docker.io/library/alpine` -> `docker.io` (a registry name holds no `/`, even [::1]:5000)."""
    return ref.partition("/")[0]


def percent_full(used: int, max_size: int | None) -> float | None:
    """Share of `max_size` in use, to one decimal; None for an unbounded store."""
    if not max_size:
        return None
    return round(100.0 * used / max_size, 1)


def summarize(rows: Iterable[BlobRow]) -> CacheSummary:
    """Totals (each blob once) and per-registry usage (a shared blob under each registry)."""
    count = total = 0
    per: dict[str, list[int]] = {}
    loose = [0, 0]
    for row in rows:
        count += 1
        total += row.size
        registries = {registry_of(ref) for ref in row.refs}
        for registry in registries:
            entry = per.setdefault(registry, [0, 0])
            entry[0] += 1
            entry[1] += row.size
        if not registries:
            loose[0] += 1
            loose[1] += row.size
    ranked = sorted(per.items(), key=lambda kv: (-kv[1][1], kv[0]))
    return CacheSummary(
        count,
        total,
        tuple(RegistryUsage(name, n, size) for name, (n, size) in ranked),
        Usage(loose[0], loose[1]),
    )
