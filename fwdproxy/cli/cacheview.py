"""Formatting shared by `fwdproxy cache` and `fwdproxy explain`'s cache section.

Separate from cache.py because `explain` (in main.py) uses it, and cache.py imports main.py
for the shared argument helpers: one module each way would be an import cycle.
"""

from __future__ import annotations

import platform as host
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # imported where used: registering `cache` must stay cheap
    from fwdproxy.proto.manifest import Platform
    from fwdproxy.routing.imageref import ImageRef

__all__ = [
    "ago",
    "explain_cache",
    "format_age",
    "host_platform",
    "media_kind",
    "parse_platform",
    "short_digest",
    "table",
]

_COMPONENT: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# platform.machine() spellings -> (GOARCH, variant), as container runtimes name them.
_MACHINES: Final = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
}


# -- formatting --------------------------------------------------------------------------------


def short_digest(digest: object) -> str:
    """`sha256:` and the first 12 hex digits: enough to tell blobs apart in a listing."""
    algorithm, _, hexpart = str(digest).partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def media_kind(media_type: str | None) -> str:
    """The short name `cache ls` shows: layer, config, manifest, index, or the subtype."""
    from fwdproxy.proto.manifest import INDEX_TYPES, MANIFEST_TYPES

    if not media_type:
        return "?"  # a file recovery re-adopted without its row
    mt = media_type.partition(";")[0].strip().lower()
    if mt in INDEX_TYPES:
        return "index"
    if mt in MANIFEST_TYPES:
        return "manifest"
    if mt == "application/vnd.docker.container.image.v1+json" or ".config." in mt:
        return "config"
    if ".layer." in mt or ".rootfs." in mt:
        return "layer"
    return mt.rpartition("/")[2][:24]


def format_age(seconds: float) -> str:
    """`45s`, `12m`, `3h`, `5d`: how long ago, coarse on purpose."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def ago(ts: float, now: float) -> str:
    return f"{format_age(now - ts)} ago"


def table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Columns padded to their widest cell; `right` ones right-aligned; the last one free."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r[:-1], widths, strict=True))
        ]
        out.append("  ".join([*cells, r[-1]]).rstrip())
    return out


# -- platforms --------------------------------------------------------------------------------


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]` (`linux/arm64`, `linux/arm/v7`) -> Platform; ValueError otherwise."""
    from fwdproxy.proto.manifest import Platform

    parts = text.strip().lower().split("/")
    if not 2 <= len(parts) <= 3 or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise ValueError(f"not a platform: {text[:80]!r} (os/arch[/variant], e.g. linux/arm64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def host_platform() -> Platform:
    """What `docker pull` on this host would pick: linux and this machine's architecture."""
    from fwdproxy.proto.manifest import Platform

    machine = host.machine().lower()
    arch, variant = _MACHINES.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


# -- explain -----------------------------------------------------------------------------------


def explain_cache(
    cache_dir: str | Path, ref: ImageRef, platform_text: str | None
) -> tuple[str, dict[str, Any]]:
    """The cache section of `fwdproxy explain`: text and JSON for one parsed image reference.

    ValueError for a bad `platform_text`; an unreadable cache is reported in the section.
    """
    root = Path(cache_dir).expanduser().resolve()
    from fwdproxy.cache import CacheError, ReadOnlyStore
    from fwdproxy.cache.image import format_platform, image_status
    from fwdproxy.core.units import format_size
    from fwdproxy.proto.digest import parse_digest
    from fwdproxy.proto.oci import OCIError, parse_registry

    platform = parse_platform(platform_text) if platform_text else host_platform()
    try:
        registry = parse_registry(ref.registry).name
    except OCIError as e:
        return f"cache:    {e.message}\n", {"dir": str(root), "error": e.message}
    try:
        with ReadOnlyStore(root) as view:
            st = image_status(
                view,
                registry,
                ref.repository,
                tag=ref.tag,
                digest=parse_digest(ref.digest) if ref.digest else None,
                platform=platform,
            )
    except CacheError as e:
        return f"cache:    not readable: {e}\n", {"dir": str(root), "error": str(e)}
    now = time.time()
    lines = [f"cache:    {root} (platform {format_platform(platform)})"]
    if st.tag is not None:
        lines.append(
            f"  tag:      {ref.tag} -> {st.tag.digest} ({media_kind(st.tag.media_type)}, "
            f"fetched {ago(st.tag.fetched_at, now)})"
        )
    if st.platform is not None and st.manifest is not None:
        lines.append(f"  platform: {st.platform} -> {st.manifest}")
    if st.blobs:
        rows = [
            (
                "  " + b.role,
                short_digest(b.digest),
                format_size(b.size),
                "cached" if b.cached else "-",
            )
            for b in st.blobs
        ]
        lines += table(rows, right=frozenset({2}))
        lines.append(
            f"  {st.layers_cached} of {len(st.layers)} layers cached "
            f"({format_size(st.layer_bytes_cached)} of {format_size(st.layer_bytes)})"
            + ("" if not st.blobs[0].cached else "; config cached")
        )
    if st.problem:
        lines.append(f"  {st.problem}")
    body = {
        "dir": str(root),
        "platform": format_platform(platform),
        "registry": registry,
        "repository": ref.repository,
        "reference": st.reference,
        "tag_digest": str(st.tag.digest) if st.tag else None,
        "tag_fetched_at": st.tag.fetched_at if st.tag else None,
        "digest": str(st.top) if st.top else None,
        "media_type": st.top_media_type,
        "manifest": str(st.manifest) if st.manifest else None,
        "blobs": [
            {
                "role": b.role,
                "digest": str(b.digest),
                "size": b.size,
                "media_type": b.media_type,
                "cached": b.cached,
            }
            for b in st.blobs
        ],
        "layers": len(st.layers),
        "layers_cached": st.layers_cached,
        "layer_bytes": st.layer_bytes,
        "layer_bytes_cached": st.layer_bytes_cached,
        "problem": st.problem,
    }
    return "\n".join(lines) + "\n", body
