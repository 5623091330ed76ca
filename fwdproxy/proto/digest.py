"""Content digests (`algorithm:encoded`) as the OCI image and distribution specs define them.

One parser for every place a digest arrives from outside (a mirror URL, a manifest, a registry's
`Docker-Content-Digest` header, a cache file name): a digest names a file on disk and decides
what bytes are served, so anything that is not exactly a registered algorithm with its exact
lower-case hex encoding is refused here, not later.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

__all__ = ["ALGORITHMS", "Digest", "DigestError", "parse_digest"]

# Registered algorithms (image-spec descriptor.md): name -> hex length. Both hashes are in
# hashlib, so a digest we accept is a digest we can verify.
ALGORITHMS: Final[dict[str, int]] = {"sha256": 64, "sha512": 128}
_HEX: Final = re.compile(r"[0-9a-f]+")


class DigestError(ValueError):
    """Not a digest we accept; the message says why, for an error body."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated digest. `str(d)` is its canonical `algorithm:hex` spelling."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, hexdigest: str) -> bool:
        return hexdigest == self.hex


def parse_digest(text: str) -> Digest:
    """`sha256:<64 lower-case hex>` (or sha512) -> Digest; DigestError for anything else."""
    algorithm, sep, encoded = text.partition(":")
    if not sep:
        raise DigestError(f"digest {text[:80]!r} has no 'algorithm:' prefix")
    want = ALGORITHMS.get(algorithm)
    if want is None:
        raise DigestError(f"unsupported digest algorithm {algorithm[:20]!r} (sha256, sha512)")
    if len(encoded) != want or not _HEX.fullmatch(encoded):
        raise DigestError(f"{algorithm} digest must be {want} lower-case hex characters")
    return Digest(algorithm, encoded)
