"""Image manifests and indexes as a pull-through mirror needs them (pure).

The mirror serves manifest bytes unmodified (the digest covers them, spec "Pulling manifests");
it parses them only to learn which blobs an image needs (so it never serves a manifest whose
blobs it cannot serve) and which child manifest a platform pulls. Parsing is strict about
what decides those answers (digests, sizes, media types) and ignores every other field, since
registries add annotations, `urls`, `subject` and `artifactType` freely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from fwdproxy.proto.digest import Digest, DigestError, parse_digest
from fwdproxy.proto.oci import OCIError

__all__ = [
    "DEFAULT_ACCEPT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "SCHEMA1_TYPES",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "accept_header",
    "accepts",
    "parse_accept",
    "parse_manifest",
    "select_platform",
]

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
SCHEMA1_TYPES: Final = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
MANIFEST_TYPES: Final = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES: Final = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
# What a mirror asks upstream for when the client sent no Accept: containerd's resolve list
# without `*/*`, which would let an old registry fall back to schema1 (content-negotiation.md).
DEFAULT_ACCEPT: Final = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
# containerd's MaxManifestSize is 4 MiB; a bigger "manifest" is a mistake or an attack.
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
MAX_SIZE: Final = 2**63 - 1  # descriptor sizes are int64 (image-spec descriptor.md)
# Content-Types that say nothing about which manifest this is; decide from the JSON instead.
_UNINFORMATIVE: Final = frozenset(
    {"", "application/json", "application/octet-stream", "text/plain", "binary/octet-stream"}
)
_MEDIA_TYPE_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def _invalid(message: str) -> OCIError:
    return OCIError("MANIFEST_INVALID", message)


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""


@dataclass(frozen=True, slots=True)
class Descriptor:
    """image-spec descriptor.md: what to fetch (`digest`), how big (`size`), as what type."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (Docker schema2 or OCI)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob a pull of this manifest fetches: config first, then layers."""
        return (self.config, *self.layers)


@dataclass(frozen=True, slots=True)
class Index:
    """A Docker manifest list or OCI image index."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_manifest(body: bytes, media_type: str | None = None) -> Manifest | Index:
    """Bytes and Content-Type -> Manifest or Index; OCIError MANIFEST_INVALID / UNSUPPORTED.

    `media_type` may carry parameters and may be uninformative (`application/json`); when it
    names a manifest type, the JSON `mediaType` must agree (spec: Content-Type must match).
    """
    if len(body) > MAX_MANIFEST_BYTES:
        raise _invalid(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    header_type = _bare_type(media_type)
    if header_type in SCHEMA1_TYPES:
        raise _schema1()
    doc = _load_json(body)
    json_type = doc.get("mediaType")
    if json_type is not None and not isinstance(json_type, str):
        raise _invalid("mediaType must be a string")
    version = doc.get("schemaVersion")
    if (type(version) is int and version == 1) or json_type in SCHEMA1_TYPES:
        raise _schema1()
    if type(version) is not int or version != 2:  # not bool, not 2.0
        raise _invalid("schemaVersion must be 2")
    kind = _manifest_kind(header_type, json_type, doc)
    if kind in INDEX_TYPES:
        entries = _list(doc, "manifests")
        return Index(
            kind, tuple(_descriptor(e, f"manifests[{i}]", True) for i, e in enumerate(entries))
        )
    layers = _list(doc, "layers")
    return Manifest(
        kind,
        _descriptor(doc.get("config"), "config", False),
        tuple(_descriptor(e, f"layers[{i}]", False) for i, e in enumerate(layers)),
    )


def _schema1() -> OCIError:
    return OCIError(
        "UNSUPPORTED",
        "Docker schema1 manifests are not supported (deprecated; current Docker, containerd "
        "and podman refuse them too); ask for a schema2 or OCI manifest",
        400,
    )


def _bare_type(media_type: str | None) -> str:
    return (media_type or "").partition(";")[0].strip().lower()


def _load_json(body: bytes) -> dict[str, object]:
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int size
        raise _invalid(f"manifest is not JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest must be a JSON object")
    return doc


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Duplicate keys make a manifest mean different things to different parsers: refuse it."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return doc


def _manifest_kind(header_type: str, json_type: str | None, doc: dict[str, object]) -> str:
    if header_type not in _UNINFORMATIVE:
        _check_known(header_type)
        if json_type is not None and json_type != header_type:
            raise _invalid(
                f"Content-Type {header_type[:100]!r} does not match mediaType {json_type[:100]!r}"
            )
        return header_type
    if json_type is not None:
        _check_known(json_type)
        return json_type
    # OCI made mediaType optional (image-spec v1.0); tell the two shapes apart by their fields.
    if "manifests" in doc and "layers" not in doc:
        return OCI_INDEX
    if "config" in doc and "manifests" not in doc:
        return OCI_MANIFEST
    raise _invalid("cannot tell a manifest from an index: no mediaType, ambiguous fields")


def _check_known(media_type: str) -> None:
    if media_type not in MANIFEST_TYPES | INDEX_TYPES:
        raise OCIError("UNSUPPORTED", f"unsupported manifest media type {media_type[:100]!r}", 400)


def _list(doc: dict[str, object], key: str) -> list[object]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise _invalid(f"{key} must be a list")
    return value


def _descriptor(obj: object, where: str, with_platform: bool) -> Descriptor:
    if not isinstance(obj, dict):
        raise _invalid(f"{where} must be an object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not _MEDIA_TYPE_RE.fullmatch(media_type):
        raise _invalid(f"{where}.mediaType must be a media type")
    digest_text = obj.get("digest")
    if not isinstance(digest_text, str):
        raise _invalid(f"{where}.digest must be a string")
    try:
        digest = parse_digest(digest_text)
    except DigestError as e:
        raise OCIError("DIGEST_INVALID", f"{where}.digest: {e}") from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise OCIError("SIZE_INVALID", f"{where}.size must be an integer 0..2^63-1")
    platform = _platform(obj.get("platform"), where) if with_platform else None
    return Descriptor(media_type, digest, size, platform)


def _platform(obj: object, where: str) -> Platform | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise _invalid(f"{where}.platform must be an object")
    fields = []
    for key in ("os", "architecture", "variant", "os.version"):
        value = obj.get(key, "" if key in _OPTIONAL_PLATFORM_KEYS else None)
        if not isinstance(value, str) or len(value) > 128:
            raise _invalid(f"{where}.platform.{key} must be a string")
        fields.append(value)
    return Platform(*fields)


# ---------------------------------------------------------------------------------------------
# Platform selection


_OPTIONAL_PLATFORM_KEYS: Final = frozenset({"variant", "os.version"})
_ARCH_ALIASES: Final = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "i386": "386",
}


def _normalise_platform(os: str, arch: str, variant: str) -> tuple[str, str, str]:
    """containerd `platforms.Normalize`: arch aliases and the default variants of ARM."""
    os, arch, variant = os.lower(), arch.lower(), variant.lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "arm64" and variant in ("8", "v8"):
        variant = ""
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "arm" and variant in ("5", "6"):
        variant = "v" + variant
    return os, arch, variant


def select_platform(
    index: Index, os: str, architecture: str, variant: str = ""
) -> Descriptor | None:
    """The child manifest a runtime on this platform pulls, or None.

    Exact (normalised) match first, in index order; 32-bit ARM then falls back to older
    variants it can run (v7 runs v6 and v5), as containerd's platform matcher does.
    Entries without a platform (attestations, artifacts) never match.
    """
    want = _normalise_platform(os, architecture, variant)
    candidates = [want]
    if want[1] == "arm" and want[2] in ("v7", "v6"):
        older = ["v6", "v5"] if want[2] == "v7" else ["v5"]
        candidates += [(want[0], want[1], v) for v in older]
    for candidate in candidates:
        for desc in index.manifests:
            p = desc.platform
            if p is not None and _normalise_platform(p.os, p.architecture, p.variant) == candidate:
                return desc
    return None


# ---------------------------------------------------------------------------------------------
# Accept negotiation (spec "Pulling manifests": clients SHOULD send Accept)


def parse_accept(values: Iterable[str]) -> frozenset[str]:
    """Every media type in one or more Accept header lines, lower-cased, parameters and q=0 dropped.

    Docker sends one line per type in random order, containerd one comma-joined line: a cache
    must key on this set, never on the raw header.
    """
    types: set[str] = set()
    for value in values:
        for item in value.split(","):
            media_type, *params = (part.strip() for part in item.split(";"))
            if not media_type or any(_is_q_zero(p) for p in params):
                continue
            types.add(media_type.lower())
    return frozenset(types)


def _is_q_zero(param: str) -> bool:
    name, _, value = param.partition("=")
    return name.strip().lower() == "q" and value.strip() in ("0", "0.", "0.0", "0.00", "0.000")


def accepts(accepted: frozenset[str], media_type: str) -> bool:
    """True if a client with this Accept set takes `media_type` (no Accept means anything)."""
    if not accepted:
        return True
    media_type = media_type.lower()
    major = media_type.partition("/")[0]
    return bool({media_type, f"{major}/*", "*/*"} & accepted)


def accept_header(accepted: Sequence[str] | frozenset[str] = ()) -> str:
    """The Accept value to send upstream: the client's types, or DEFAULT_ACCEPT if it sent none."""
    return ", ".join(sorted(accepted) if accepted else DEFAULT_ACCEPT)
