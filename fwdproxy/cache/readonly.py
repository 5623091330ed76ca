"""ReadOnlyStore: look into a blob store that another process (the running proxy) owns.

`BlobStore` takes the directory's lock and repairs the directory when it opens, which a second
process must never do to a live store. This view does neither: it opens `index.sqlite` with
SQLite's `mode=ro`, reads blob files, and takes no lock, so `fwdproxy cache ls` and `explain`
work beside the proxy. What it sees is the owner's last committed state; a blob evicted
between a row read and a file read simply reads as absent.

Nothing here writes the index or a blob. (SQLite may create the empty `-wal`/`-shm` side files
of a WAL database when no owner has them open; they hold no data and the owner reuses them.)
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fwdproxy.cache.errors import DigestMismatch, StoreUnreadable
from fwdproxy.cache.files import blob_path
from fwdproxy.cache.index import BlobInfo, BlobRow, Index, TagInfo, TagRow, Usage
from fwdproxy.proto.digest import Digest

__all__ = ["ReadOnlyStore"]


@contextmanager
def _reading(what: Path) -> Iterator[None]:
    """SQLite errors as StoreUnreadable, so callers handle one exception with a path in it."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreUnreadable(f"{what}: {e}") from None


class ReadOnlyStore:
    """Metadata and bytes of a store, without owning it. Single-threaded; close when done."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._path = self.root / "index.sqlite"
        if not self._path.is_file():
            raise StoreUnreadable(f"{self.root}: no cache here (no index.sqlite)")
        with _reading(self._path):
            self._index = Index(self._path, readonly=True)
            try:
                self._index.totals()  # not our schema: fail now, not halfway through a listing
            except BaseException:
                self._index.close()
                raise

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> ReadOnlyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path_of(self, digest: Digest) -> Path:
        return blob_path(self.root, digest)

    def lookup(self, digest: Digest) -> BlobInfo | None:
        """A committed blob whose file is present; unlike the owner, never repairs a stale row."""
        with _reading(self._path):
            row = self._index.get(str(digest))
        if row is None:
            return None
        path = self.path_of(digest)
        return BlobInfo(digest, path, row[0], row[1]) if path.is_file() else None

    def read_bytes(self, digest: Digest, limit: int) -> bytes | None:
        """A small blob's bytes (a manifest), checked against its digest; None if not cached.

        DigestMismatch if the file is longer than `limit` or does not hash to its name: a
        corrupt manifest must not be parsed as if it described the image.
        """
        info = self.lookup(digest)
        if info is None:
            return None
        try:
            with info.path.open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None  # evicted since the row was read
        if len(data) > limit:
            raise DigestMismatch(f"{digest}: larger than {limit} bytes, not a manifest")
        h = digest.hasher()
        h.update(data)
        if not digest.matches(h.hexdigest()):
            raise DigestMismatch(f"{digest}: the cached file does not match its digest")
        return data

    def get_tag(self, registry: str, repo: str, tag: str) -> TagInfo | None:
        with _reading(self._path):
            return self._index.get_tag(registry, repo, tag)

    def tags(self) -> builtins.list[TagRow]:
        with _reading(self._path):
            return self._index.tags()

    def usage(self) -> Usage:
        with _reading(self._path):
            return self._index.totals()

    # Last in the class: below this name, `list` would mean the method to a type checker.
    def list(self) -> builtins.list[BlobRow]:
        """Every blob with its use and refs, most recently used first (as `BlobStore.list`)."""
        with _reading(self._path):
            return self._index.rows()
