"""`fwdproxy cache warm`: pre-pull images into the layer cache through a running mirror.

The mirror caches what it serves, so warming is just a pull over the mirror's HTTP API with
the bytes thrown away: manifest (by tag or digest), the platform manifests of an index, then
every config and layer blob. Going through the mirror rather than writing the store directly
keeps one owner of the store (the proxy) and exercises exactly the path clients will take.

Blobs are checked here too (size and sha256): a mirror serving wrong bytes is the failure a
warm-up run exists to find. `warm()` is the reusable core; the mirror's standalone mode calls
it against an in-process mirror on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from fwdproxy.cache.image import format_platform
from fwdproxy.cli.cacheview import host_platform, parse_platform
from fwdproxy.cli.progress import ProgressSink
from fwdproxy.core.units import format_size
from fwdproxy.proto.digest import Digest, DigestError, parse_digest
from fwdproxy.proto.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    accept_header,
    parse_manifest,
    select_platform,
)
from fwdproxy.proto.oci import OCIError, parse_registry
from fwdproxy.routing.imageref import ImageRefError, parse_image_ref

__all__ = [
    "ALL_PLATFORMS",
    "ImageResult",
    "PlatformChoice",
    "WarmReport",
    "format_platform",
    "host_platform",
    "parse_platform",
    "warm",
]

ALL_PLATFORMS: Final = "all"
PlatformChoice = Sequence[Platform] | Literal["all"] | None
DEFAULT_CONCURRENCY: Final = 4
CHUNK: Final = 256 * 1024
CONNECT_TIMEOUT_S: Final = 10.0
# A cold mirror fetches each blob from upstream while it streams it to us; give it the time a
# slow upstream needs between two chunks, not a total (layers of GiBs are normal).
READ_TIMEOUT_S: Final = 300.0


class WarmError(Exception):
    """One step of one image failed; the message is what the report shows for it."""


# -- report -----------------------------------------------------------------------------------


@dataclass
class ImageResult:
    image: str  # as given
    reference: str = ""  # normalised: docker.io/library/alpine:latest
    digest: str | None = None  # what the reference resolved to (manifest or index)
    platforms: list[str] = field(default_factory=list)  # warmed platforms of an index
    blobs: int = 0  # distinct config and layer blobs this image needs
    bytes: int = 0  # their size, from the manifests
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "reference": self.reference,
            "digest": self.digest,
            "platforms": self.platforms,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "ok": self.ok,
            "errors": self.errors,
        }


@dataclass
class WarmReport:
    images: list[ImageResult]
    manifests: int = 0  # manifest and index documents fetched
    blobs: int = 0  # distinct blobs fetched (each once per run, however many images share it)
    bytes: int = 0  # blob bytes received
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.images)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "images": [r.as_json() for r in self.images],
        }

    def summary(self) -> str:
        failed = sum(1 for r in self.images if not r.ok)
        rate = f", {format_size(self.bytes / self.seconds)}/s" if self.seconds > 0 else ""
        head = (
            f"warmed {len(self.images) - failed} of {len(self.images)} image(s): "
            f"{self.blobs} blob(s), {format_size(self.bytes)} in {self.seconds:.1f}s{rate}"
        )
        return head + (f"; {failed} failed" if failed else "")


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Plan:
    result: ImageResult
    registry: str = ""  # ns= value
    repo: str = ""
    blobs: dict[str, Descriptor] = field(default_factory=dict)


async def warm(
    mirror_url: str,
    images: Sequence[str],
    platforms: PlatformChoice = None,
    progress: ProgressSink | None = None,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    session: aiohttp.ClientSession | None = None,
) -> WarmReport:
    """Pull `images` through the mirror at `mirror_url` (http://host:port[/prefix]).

    `platforms`: None for the host's platform, a list, or ALL_PLATFORMS for every platform an
    index lists. All manifests are resolved first, so `progress` gets the whole byte total
    before the first blob; then blobs are fetched `concurrency` at a time, each digest once.
    Never raises for a failed image: each ImageResult carries its errors.
    """
    started = time.monotonic()
    wanted: Sequence[Platform] | Literal["all"] = platforms or [host_platform()]
    base = mirror_url.rstrip("/")
    own = session is None
    if session is None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        )
        session = aiohttp.ClientSession(timeout=timeout)
    report = WarmReport([])
    try:
        plans = [await _resolve(session, base, image, wanted, report) for image in images]
        report.images = [p.result for p in plans]
        todo: dict[str, tuple[Descriptor, _Plan]] = {}
        users: dict[str, list[ImageResult]] = {}
        for plan in plans:
            for key, desc in plan.blobs.items():
                todo.setdefault(key, (desc, plan))
                users.setdefault(key, []).append(plan.result)
        if progress is not None:
            progress.add_total(sum(desc.size for desc, _ in todo.values()))
        gate = asyncio.Semaphore(max(1, concurrency))

        async def fetch(key: str, desc: Descriptor, plan: _Plan) -> None:
            async with gate:
                try:
                    await _fetch_blob(session, base, plan, desc, progress, report)
                except WarmError as e:
                    for result in users[key]:
                        result.errors.append(f"blob {_short(desc.digest)}: {e}")

        await asyncio.gather(*(fetch(key, desc, plan) for key, (desc, plan) in todo.items()))
    finally:
        if own:
            await session.close()
    report.seconds = time.monotonic() - started
    return report


async def _resolve(
    session: aiohttp.ClientSession,
    base: str,
    image: str,
    wanted: Sequence[Platform] | Literal["all"],
    report: WarmReport,
) -> _Plan:
    """Image reference -> the blobs to fetch, through manifest, index and platform manifests."""
    plan = _Plan(ImageResult(image))
    result = plan.result
    try:
        ref = parse_image_ref(image)
        plan.registry = parse_registry(ref.registry).name
    except ImageRefError as e:
        result.errors.append(str(e))
        return plan
    except OCIError as e:
        result.errors.append(e.message)
        return plan
    plan.repo = ref.repository
    result.reference = str(ref)
    expect = parse_digest(ref.digest) if ref.digest else None
    reference = ref.digest or ref.tag or "latest"
    try:
        top, digest = await _get_manifest(session, base, plan, reference, expect, None, report)
        result.digest = str(digest)
        if isinstance(top, Manifest):
            _add_blobs(plan, top)
            return plan
        for label, child in _children(top, wanted, result):
            try:
                sub, _ = await _get_manifest(
                    session, base, plan, str(child.digest), child.digest, child, report
                )
            except WarmError as e:
                result.errors.append(f"{label}: {e}")
                continue
            if not isinstance(sub, Manifest):
                result.errors.append(f"{label}: {child.digest} is an index inside an index")
                continue
            result.platforms.append(label)
            _add_blobs(plan, sub)
    except WarmError as e:
        result.errors.append(str(e))
    return plan


def _children(
    index: Index, wanted: Sequence[Platform] | Literal["all"], result: ImageResult
) -> list[tuple[str, Descriptor]]:
    """The index entries to warm; a requested platform the index lacks is an error."""
    runnable = [
        d for d in index.manifests if d.platform is not None and d.platform.os != "unknown"
    ]  # os "unknown": BuildKit attestations, which a pull never fetches
    out: dict[str, tuple[str, Descriptor]] = {}
    if wanted == ALL_PLATFORMS:
        for d in runnable:
            assert d.platform is not None
            out.setdefault(str(d.digest), (format_platform(d.platform), d))
        if not out:
            result.errors.append("the index lists no platform images")
        return list(out.values())
    have = ", ".join(sorted({format_platform(d.platform) for d in runnable if d.platform}))
    for p in wanted:
        child = select_platform(index, p.os, p.architecture, p.variant)
        if child is None:
            result.errors.append(
                f"no {format_platform(p)} image in the index (has: {have or 'none'})"
            )
            continue
        out.setdefault(str(child.digest), (format_platform(p), child))
    return list(out.values())


def _add_blobs(plan: _Plan, manifest: Manifest) -> None:
    for desc in manifest.blobs():
        key = str(desc.digest)
        if key not in plan.blobs:
            plan.blobs[key] = desc
            plan.result.blobs += 1
            plan.result.bytes += desc.size


async def _get_manifest(
    session: aiohttp.ClientSession,
    base: str,
    plan: _Plan,
    reference: str,
    expect: Digest | None,
    desc: Descriptor | None,
    report: WarmReport,
) -> tuple[Manifest | Index, Digest]:
    """GET a manifest; check its digest (and the index's size) before parsing it."""
    url = f"{base}/v2/{plan.repo}/manifests/{reference}"
    headers = {"Accept": accept_header()}
    try:
        async with session.get(url, params={"ns": plan.registry}, headers=headers) as resp:
            if resp.status != 200:
                raise WarmError(await _mirror_error(resp))
            body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            media_type = resp.headers.get("Content-Type")
            header_digest = resp.headers.get("Docker-Content-Digest")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        raise WarmError(_unreachable(base, e)) from None
    report.manifests += 1
    if len(body) > MAX_MANIFEST_BYTES:
        raise WarmError(f"manifest {reference} is larger than {format_size(MAX_MANIFEST_BYTES)}")
    digest = _hash_as(body, expect or Digest("sha256", ""))
    for claimed, source in ((expect, "the reference"), (_digest_or_none(header_digest), None)):
        if claimed is not None and _hash_as(body, claimed) != claimed:
            said = source or f"the mirror's Docker-Content-Digest {claimed}"
            raise WarmError(f"manifest {reference} hashes to {_hash_as(body, claimed)}, not {said}")
    if desc is not None and len(body) != desc.size:
        raise WarmError(f"manifest {reference} is {len(body)} bytes, the index says {desc.size}")
    try:
        return parse_manifest(body, media_type or (desc.media_type if desc else None)), digest
    except OCIError as e:
        raise WarmError(f"manifest {reference}: {e.code}: {e.message}") from None


async def _fetch_blob(
    session: aiohttp.ClientSession,
    base: str,
    plan: _Plan,
    desc: Descriptor,
    progress: ProgressSink | None,
    report: WarmReport,
) -> None:
    """GET one blob, counting and hashing the bytes as they arrive, keeping none of them."""
    url = f"{base}/v2/{plan.repo}/blobs/{desc.digest}"
    got = 0
    try:
        try:
            async with session.get(url, params={"ns": plan.registry}) as resp:
                if resp.status != 200:
                    raise WarmError(await _mirror_error(resp))
                h = desc.digest.hasher()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if got + len(chunk) > desc.size:
                        raise WarmError(f"the mirror sent more than the {desc.size} bytes")
                    h.update(chunk)
                    got += len(chunk)
                    report.bytes += len(chunk)
                    if progress is not None:
                        progress.advance(len(chunk))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise WarmError(_unreachable(base, e)) from None
        if got != desc.size:
            raise WarmError(f"got {got} bytes, the manifest says {desc.size}")
        if not desc.digest.matches(h.hexdigest()):
            got_digest = Digest(desc.digest.algorithm, h.hexdigest())
            raise WarmError(
                f"content hashes to {_short(got_digest)}..., not to its digest "
                "(the mirror served corrupt bytes)"
            )
        report.blobs += 1
    except WarmError:
        if progress is not None:
            progress.add_total(-(desc.size - got))  # the rest will never arrive
        raise


async def _mirror_error(resp: aiohttp.ClientResponse) -> str:
    """The mirror's OCI error body as `CODE: message`, or the HTTP status if it has none."""
    status = f"{resp.status} {resp.reason or ''}".strip()
    try:
        raw = await resp.content.read(64 * 1024)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        raw = b""
    messages = []
    try:
        doc = json.loads(raw)
        for err in doc.get("errors", []) if isinstance(doc, dict) else []:
            if isinstance(err, dict):
                messages.append(f"{err.get('code', '?')}: {err.get('message', '')}".strip())
    except ValueError:
        pass
    if messages:
        return f"mirror answered {status}: " + "; ".join(messages)
    text = raw.decode("utf-8", "replace").strip().splitlines()
    return f"mirror answered {status}" + (f": {text[0][:200]}" if text else "")


def _unreachable(base: str, e: BaseException) -> str:
    what = str(e) or type(e).__name__
    return f"cannot talk to the mirror at {base}: {what}"


def _hash_as(body: bytes, like: Digest) -> Digest:
    """The digest of `body` in `like`'s algorithm (a sha512 reference is checked as sha512)."""
    return Digest(like.algorithm, hashlib.new(like.algorithm, body).hexdigest())


def _digest_or_none(text: str | None) -> Digest | None:
    if not text:
        return None
    try:
        return parse_digest(text.strip())
    except DigestError:
        return None


def _short(digest: Digest) -> str:
    return f"{digest.algorithm}:{digest.hex[:12]}"
