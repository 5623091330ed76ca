"""Content-addressed layer cache for the registry mirror: a verified blob store and
single-flight fetches whose readers follow a growing file. No HTTP here."""

from fwdproxy.cache.errors import (
    CacheError,
    DigestMismatch,
    FlightFailed,
    SizeMismatch,
    StoreFull,
    StoreLocked,
    StoreUnreadable,
    WriterClosed,
)
from fwdproxy.cache.flight import Flight, FlightHead, FlightReader, Flights
from fwdproxy.cache.handle import BlobHandle, Pin
from fwdproxy.cache.index import BlobInfo, BlobRow, TagInfo, TagRow, Usage
from fwdproxy.cache.readonly import ReadOnlyStore
from fwdproxy.cache.store import BlobStore, VerifyReport
from fwdproxy.cache.writer import BlobWriter

__all__ = [
    "BlobHandle",
    "BlobInfo",
    "BlobRow",
    "BlobStore",
    "BlobWriter",
    "CacheError",
    "DigestMismatch",
    "Flight",
    "FlightFailed",
    "FlightHead",
    "FlightReader",
    "Flights",
    "Pin",
    "ReadOnlyStore",
    "SizeMismatch",
    "StoreFull",
    "StoreLocked",
    "StoreUnreadable",
    "TagInfo",
    "TagRow",
    "Usage",
    "VerifyReport",
    "WriterClosed",
]
