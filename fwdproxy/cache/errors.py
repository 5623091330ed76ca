"""Errors of the layer cache, one hierarchy so the mirror can map each to a response."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "DigestMismatch",
    "FlightFailed",
    "SizeMismatch",
    "StoreFull",
    "StoreLocked",
    "StoreUnreadable",
    "WriterClosed",
]


class CacheError(Exception):
    """Base of every error the cache raises on purpose."""


class DigestMismatch(CacheError):
    """The bytes written do not hash to the digest they were stored under; nothing was kept."""


class SizeMismatch(DigestMismatch):
    """The bytes written are longer or shorter than the size the upstream announced.

    A subclass of DigestMismatch: either way the upstream sent the wrong blob.
    """


class StoreFull(CacheError):
    """The blob cannot fit in the store even with everything evictable evicted."""


class StoreLocked(CacheError):
    """Another BlobStore already owns this directory (its recovery would delete our writes).

    `pid` is the owner's process id as it wrote it into the lock file, when it could be read:
    an operator needs to know which process to ask (or stop) instead.
    """

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class StoreUnreadable(CacheError):
    """A read-only view cannot be opened: no index there, or not one of ours."""


class WriterClosed(CacheError):
    """The writer was committed, aborted, or failed earlier; it takes no more calls."""


class FlightFailed(CacheError):
    """The fetch a reader was following failed or did not verify; the cause is `__cause__`."""
