"""Pins and open blobs: what keeps a committed blob on disk while someone is using it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from fwdproxy.cache.index import BlobInfo

__all__ = ["BlobHandle", "Pin"]


class Pin:
    """Keeps one digest from being evicted or pruned until released (idempotent)."""

    def __init__(self, unpin: Callable[[], None]) -> None:
        self._unpin: Callable[[], None] | None = unpin

    def release(self) -> None:
        unpin, self._unpin = self._unpin, None
        if unpin is not None:
            unpin()

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BlobHandle:
    """An open committed blob. It pins the blob, so eviction cannot pull it away mid-read."""

    def __init__(self, info: BlobInfo, file: BinaryIO, pin: Pin) -> None:
        self.info = info
        self.file = file
        self._pin = pin

    def fileno(self) -> int:
        """For `loop.sendfile`/`os.sendfile`."""
        return self.file.fileno()

    def pread(self, size: int, offset: int) -> bytes:
        """Positional read: safe to share one handle between Range responses."""
        return os.pread(self.file.fileno(), size, offset)

    def close(self) -> None:
        self.file.close()
        self._pin.release()

    def __enter__(self) -> BlobHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
