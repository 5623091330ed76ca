"""BlobWriter: stream one blob into a temp file while hashing it, then verify and publish it.

The hash is updated as bytes arrive, so a fetch that broke half way can continue: the caller
asks the upstream for `Range: bytes=<writer.offset>-` and keeps writing into the same writer;
the hash state simply carries on. (If the upstream ignores the Range and answers 200, the caller
skips the first `offset` bytes of that body.) Nothing a reader can see exists until `commit()`
has checked size and digest, synced the file and renamed it into place.
"""

from __future__ import annotations

import enum
import os
import threading
from pathlib import Path
from typing import Protocol

from fwdproxy.cache.errors import CacheError, DigestMismatch, SizeMismatch, StoreFull, WriterClosed
from fwdproxy.cache.index import BlobInfo
from fwdproxy.proto.digest import Digest

__all__ = ["BlobWriter", "WriterOwner"]


class WriterOwner(Protocol):
    """The store side of a writer: publish a verified temp file, or drop its reservation."""

    def _install(self, writer: BlobWriter) -> BlobInfo: ...

    def _release(self, writer: BlobWriter) -> None: ...


class _State(enum.Enum):
    WRITING = "writing"
    COMMITTED = "committed"
    ABORTED = "aborted"


class BlobWriter:
    """One in-progress blob. Thread-safe: a `write` running in a worker thread and an `abort`
    from the event loop are serialised, so an abort never races a half-done write."""

    def __init__(
        self,
        owner: WriterOwner,
        digest: Digest,
        expected_size: int | None,
        media_type: str | None,
        tmp_path: Path,
        fd: int,
        *,
        max_bytes: int | None,
        reservation: int,
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.media_type = media_type
        self.tmp_path = tmp_path
        self.reservation = reservation  # bytes the store set aside for us in begin()
        self._owner = owner
        self._fd = fd
        self._max_bytes = max_bytes
        self._hash = digest.hasher()
        self._offset = 0
        self._state = _State.WRITING
        self._lock = threading.Lock()

    @property
    def offset(self) -> int:
        """Bytes written so far: where a resumed upstream fetch must start (`bytes=<offset>-`)."""
        return self._offset

    @property
    def closed(self) -> bool:
        return self._state is not _State.WRITING

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes. Bytes past `expected_size` (or past the store's size) are refused
        at once and end the writer: such an upstream answer can never verify."""
        with self._lock:
            self._check_open()
            end = self._offset + len(data)
            if self.expected_size is not None and end > self.expected_size:
                self._discard()
                raise SizeMismatch(
                    f"{self.digest}: more than the announced {self.expected_size} bytes"
                )
            if self._max_bytes is not None and end > self._max_bytes:
                self._discard()
                raise StoreFull(f"{self.digest}: larger than the cache ({self._max_bytes} bytes)")
            try:
                _write_all(self._fd, memoryview(data))
            except OSError:
                self._discard()
                raise
            self._hash.update(data)
            self._offset = end

    def commit(self) -> BlobInfo:
        """Verify size and digest, fsync, rename into place and index it.

        On a mismatch the temp file is deleted and DigestMismatch (SizeMismatch for the size)
        is raised: a wrong blob is never stored, not even briefly.
        """
        with self._lock:
            self._check_open()
            try:
                self._verify()
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                info = self._owner._install(self)
            except BaseException:
                self._discard()
                raise
            self._state = _State.COMMITTED
            return info

    def abort(self) -> None:
        """Drop the temp file and the reservation; harmless after commit or a failure."""
        with self._lock:
            if self._state is _State.WRITING:
                self._discard()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _verify(self) -> None:
        if self.expected_size is not None and self._offset != self.expected_size:
            raise SizeMismatch(
                f"{self.digest}: got {self._offset} bytes, announced {self.expected_size}"
            )
        got = self._hash.hexdigest()
        if not self.digest.matches(got):
            raise DigestMismatch(f"{self.digest}: content hashes to {self.digest.algorithm}:{got}")

    def _check_open(self) -> None:
        if self._state is not _State.WRITING:
            raise WriterClosed(f"{self.digest}: writer is {self._state.value}")

    def _discard(self) -> None:
        self._state = _State.ABORTED
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass
        self._owner._release(self)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises rather than returning 0 on files
            raise CacheError("write made no progress")
        view = view[n:]
