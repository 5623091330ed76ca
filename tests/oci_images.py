"""Small OCI images with real sha256 digests, for cache, explain and warm tests.

An `Image` is an index over one manifest per platform, each with a config and a few layers; all
of it as bytes keyed by digest, ready to be written into a BlobStore or served by a fake mirror.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fwdproxy.cache import BlobStore
from fwdproxy.proto.digest import Digest, parse_digest
from fwdproxy.proto.manifest import OCI_INDEX, OCI_MANIFEST

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> Digest:
    return parse_digest(f"sha256:{hashlib.sha256(data).hexdigest()}")


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data), **extra}


@dataclass
class PlatformImage:
    platform: str  # "linux/amd64"
    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def digest(self) -> Digest:
        return digest_of(self.manifest)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


@dataclass
class Image:
    index: bytes
    platforms: dict[str, PlatformImage]
    blobs: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest -> bytes, type

    @property
    def digest(self) -> Digest:
        return digest_of(self.index)


def make_image(
    name: str,
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64"),
    layer_sizes: tuple[int, ...] = (3000, 1500),
    shared_layer: bytes | None = None,
) -> Image:
    """An index with one manifest per platform; `shared_layer` is the first layer of each."""
    out = Image(b"", {})
    entries = []
    for plat in platforms:
        os_, arch, *variant = plat.split("/")
        config = json.dumps({"architecture": arch, "os": os_, "name": name}).encode()
        layers = [
            hashlib.sha256(f"{name}/{plat}/{i}".encode()).digest() * (size // 32 + 1)
            for i, size in enumerate(layer_sizes)
        ]
        layers = [layer[:size] for layer, size in zip(layers, layer_sizes, strict=True)]
        if shared_layer is not None:
            layers[0] = shared_layer
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
            }
        ).encode()
        platform: dict[str, str] = {"os": os_, "architecture": arch}
        if variant:
            platform["variant"] = variant[0]
        entries.append(descriptor(OCI_MANIFEST, manifest, platform=platform))
        out.platforms[plat] = PlatformImage(plat, manifest, config, layers)
        out.blobs[str(digest_of(manifest))] = (manifest, OCI_MANIFEST)
        out.blobs[str(digest_of(config))] = (config, OCI_CONFIG)
        for layer in layers:
            out.blobs[str(digest_of(layer))] = (layer, OCI_LAYER)
    out.index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    ).encode()
    out.blobs[str(digest_of(out.index))] = (out.index, OCI_INDEX)
    return out


def store_blob(
    store: BlobStore, data: bytes, media_type: str, ref: tuple[str, str] | None = None
) -> Digest:
    digest = digest_of(data)
    w = store.begin(digest, len(data), media_type)
    w.write(data)
    w.commit()
    if ref is not None:
        store.add_ref(digest, *ref)
    return digest
