"""Deterministic test images: a tiny rootfs tar per image, written as an OCI image layout.

Each image carries one file with content unique to it, so no client can answer a pull from a
cache filled by another test. Tars and gzip streams have fixed mtimes/owners, so the same name
always gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
          "s390x": "s390x"}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rootfs_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of `files` (path -> content) with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 0
            tar.addfile(info)
        for path in sorted(files):
            data = files[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Layer:
    """One layer as stored (`blob`, maybe gzip) plus the uncompressed tar's digest."""

    blob: bytes
    media_type: str
    diff_id: str

    @property
    def digest(self) -> str:
        return "sha256:" + sha256_hex(self.blob)


@dataclass
class TestImage:
    """An image to push: its layers, and after the push the manifest digest per registry."""

    __test__ = False

    name: str
    marker: bytes
    layers: list[Layer]
    config: bytes
    manifest: bytes
    pushed_digests: dict[str, str] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        return "sha256:" + sha256_hex(self.config)

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]


def make_layer(files: dict[str, bytes], *, level: int = 6) -> Layer:
    """A gzip layer: registries clients push to get gzip anyway (skopeo compresses plain tars),
    so only gzip keeps the digests we compute equal to the pushed ones."""
    tar = rootfs_tar(files)
    diff_id = "sha256:" + sha256_hex(tar)
    return Layer(gzip.compress(tar, compresslevel=level, mtime=0), OCI_LAYER_GZIP, diff_id)


def make_image(name: str, *, extra_layers: list[Layer] | None = None) -> TestImage:
    """A one-file image whose file names the image, so every image differs."""
    marker = f"fwdproxy e2e image {name}\n".encode()
    layers = [make_layer({"etc/e2e-image": marker, "hello.txt": b"hello from " + marker},
                         )]
    layers += extra_layers or []
    arch = GOARCH.get(platform.machine(), "amd64")
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello.txt"], "Labels": {"org.fwdproxy.e2e": name}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"fwdproxy e2e builder ({name})"} for _ in layers],
    }
    config_bytes = _canonical(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + sha256_hex(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                    "size": len(layer.blob)} for layer in layers],
    }
    return TestImage(name=name, marker=marker, layers=layers, config=config_bytes,
                     manifest=_canonical(manifest))


def bulk_layers(count: int, size: int, seed: str) -> list[Layer]:
    """`count` incompressible layers of a bit more than `size` bytes each."""
    layers = []
    for i in range(count):
        rng = random.Random(f"{seed}-{i}")
        layers.append(make_layer({f"bulk/{i}.bin": rng.randbytes(size)}, level=1))
    return layers


def write_oci_layout(image: TestImage, directory: Path, tag: str) -> None:
    """Write `image` as an OCI image layout that `skopeo copy oci:DIR:TAG` can read."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for blob in [image.config, image.manifest, *(layer.blob for layer in image.layers)]:
        (blobs / sha256_hex(blob)).write_bytes(blob)
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + sha256_hex(image.manifest),
            "size": len(image.manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (directory / "index.json").write_bytes(_canonical(index))


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
