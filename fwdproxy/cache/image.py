"""Which blobs of one image a store holds, answered offline from the store alone.

`fwdproxy explain IMAGE` uses it to say what a pull through the mirror would get from the
cache: the tag's cached answer names a manifest or index digest, manifests are stored as blobs
by that digest, an index is narrowed to one platform, and the manifest lists the config and
layers, each of which is either in the store or not. Every step can be missing (a tag never
pulled, an index whose platform child was never fetched); the result says which step and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fwdproxy.cache.errors import DigestMismatch
from fwdproxy.cache.index import TagInfo
from fwdproxy.cache.readonly import ReadOnlyStore
from fwdproxy.proto.digest import Digest
from fwdproxy.proto.manifest import (
    MAX_MANIFEST_BYTES,
    Index,
    Manifest,
    Platform,
    parse_manifest,
    select_platform,
)
from fwdproxy.proto.oci import OCIError

__all__ = ["BlobStatus", "ImageStatus", "format_platform", "image_status"]


@dataclass(frozen=True, slots=True)
class BlobStatus:
    role: str  # "config" or "layer"
    digest: Digest
    size: int
    media_type: str
    cached: bool


@dataclass(slots=True)
class ImageStatus:
    """How far the store can answer a pull of `registry/repo` at `reference`."""

    registry: str
    repo: str
    reference: str  # the tag, or the digest when the reference has one
    tag: TagInfo | None = None  # the cached tag answer (None for a digest reference)
    top: Digest | None = None  # what the reference resolves to: a manifest or an index
    top_media_type: str | None = None
    top_cached: bool = False
    platform: str | None = None  # the platform picked from an index
    manifest: Digest | None = None  # the image manifest whose blobs are listed
    manifest_cached: bool = False
    blobs: list[BlobStatus] = field(default_factory=list)
    problem: str | None = None  # why the listing is missing, e.g. "tag not cached"

    @property
    def layers(self) -> list[BlobStatus]:
        return [b for b in self.blobs if b.role == "layer"]

    @property
    def layers_cached(self) -> int:
        return sum(1 for b in self.layers if b.cached)

    @property
    def layer_bytes(self) -> int:
        return sum(b.size for b in self.layers)

    @property
    def layer_bytes_cached(self) -> int:
        return sum(b.size for b in self.layers if b.cached)


def format_platform(p: Platform) -> str:
    return "/".join(x for x in (p.os, p.architecture, p.variant) if x)


def image_status(
    store: ReadOnlyStore,
    registry: str,
    repo: str,
    *,
    tag: str | None,
    digest: Digest | None,
    platform: Platform,
) -> ImageStatus:
    """Resolve tag -> manifest or index -> platform manifest -> blobs, from the store only.

    `registry` and `repo` must be spelled as the mirror keys its tags (`docker.io`,
    `library/alpine`); a digest reference wins over a tag, as it does for `docker pull`.
    """
    status = ImageStatus(registry, repo, str(digest) if digest else (tag or "latest"))
    if digest is None:
        info = store.get_tag(registry, repo, tag or "latest")
        if info is None:
            status.problem = "tag not cached (never pulled through the mirror, or pruned)"
            return status
        status.tag, digest = info, info.digest
        status.top_media_type = info.media_type
    status.top = digest
    parsed = _read_manifest(store, digest, status.top_media_type, status)
    if parsed is None:
        return status
    status.top_cached = True
    status.top_media_type = parsed.media_type
    if isinstance(parsed, Index):
        child = select_platform(parsed, platform.os, platform.architecture, platform.variant)
        status.platform = format_platform(platform)
        if child is None:
            have = sorted({format_platform(d.platform) for d in parsed.manifests if d.platform})
            status.problem = (
                f"the index has no {status.platform} manifest (has: {', '.join(have) or 'none'})"
            )
            return status
        status.manifest = child.digest
        parsed = _read_manifest(store, child.digest, child.media_type, status)
        if parsed is None:
            return status
        if isinstance(parsed, Index):
            status.problem = f"{child.digest} is an index inside an index; not followed"
            return status
    else:
        status.manifest = digest
    status.manifest_cached = True
    status.blobs = _blobs(store, parsed)
    return status


def _read_manifest(
    store: ReadOnlyStore, digest: Digest, media_type: str | None, status: ImageStatus
) -> Manifest | Index | None:
    """The parsed manifest stored under `digest`, or None with `status.problem` set."""
    try:
        body = store.read_bytes(digest, MAX_MANIFEST_BYTES)
    except DigestMismatch as e:
        status.problem = f"cached manifest is corrupt ({e}); run `fwdproxy cache verify`"
        return None
    if body is None:
        status.problem = f"manifest {digest} not cached"
        return None
    info = store.lookup(digest)
    try:
        return parse_manifest(body, media_type or (info.media_type if info else None))
    except OCIError as e:
        status.problem = f"cached manifest {digest} does not parse: {e.message}"
        return None


def _blobs(store: ReadOnlyStore, manifest: Manifest) -> list[BlobStatus]:
    roles = ["config"] + ["layer"] * len(manifest.layers)
    return [
        BlobStatus(role, d.digest, d.size, d.media_type, store.lookup(d.digest) is not None)
        for role, d in zip(roles, manifest.blobs(), strict=True)
    ]
