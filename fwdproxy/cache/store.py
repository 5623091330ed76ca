"""BlobStore: a content-addressed, size-bounded store of registry blobs and manifests.

Keyed by digest only, so a layer shared by many repositories or registries is kept once and
never deleted on behalf of one of them (distribution#2367). Layout under `root`:

    blobs/<alg>/<hex[:2]>/<hex>   committed, verified content (the file name is its hash)
    tmp/                          in-progress writes; emptied whenever the store opens
    quarantine/<alg>-<hex>        files that failed `verify()`, kept for inspection
    index.sqlite                  metadata (WAL): sizes, media types, use, refs, tags
    lock                          flock held while open: one owner per directory; holds its pid

Other processes may look without owning: `ReadOnlyStore` (readonly.py) reads the index and
the blob files and never takes the lock or writes.

Threads: metadata calls are cheap and may run on the event loop; hashing, fsync and
`verify()` belong in a worker thread. Every index access, pin and reservation change happens
under one lock, together with the rename or unlink it describes.
"""

from __future__ import annotations

import builtins
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fwdproxy.cache.errors import StoreFull
from fwdproxy.cache.files import blob_path, fsync_dir, hash_file, lock_dir, remove_path
from fwdproxy.cache.handle import BlobHandle, Pin
from fwdproxy.cache.index import BlobInfo, BlobRow, Index, TagInfo, TagRow, Usage
from fwdproxy.cache.writer import BlobWriter
from fwdproxy.proto.digest import ALGORITHMS, Digest, DigestError, parse_digest

__all__ = ["BlobStore", "Usage", "VerifyReport"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class VerifyReport:
    """What `verify()` found; `bad` files were moved to quarantine/, `missing` rows dropped."""

    checked: int = 0
    bytes: int = 0
    bad: list[Digest] = field(default_factory=list)
    missing: list[Digest] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing


class BlobStore:
    """Digest-keyed blob cache with LRU eviction down to `max_size` bytes (0/None: no bound)."""

    def __init__(
        self, root: Path, max_size: int | None, *, clock: Callable[[], float] = time.time
    ) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError(f"negative max_size {max_size}")
        self.root = Path(root)
        self.max_size = max_size or None
        self._clock = clock
        self._lock = threading.RLock()
        self._pins: dict[str, int] = {}
        self._reserved = 0
        self._count = 0
        self._bytes = 0
        self._tmp = self.root / "tmp"
        self._blobs = self.root / "blobs"
        for d in (self.root, self._tmp, self._blobs):
            d.mkdir(parents=True, exist_ok=True)
        self._lockfile = lock_dir(self.root / "lock")
        try:
            self._index = Index(self.root / "index.sqlite")
            self._recover()
        except BaseException:
            self._lockfile.close()
            raise

    def close(self) -> None:
        """Release the directory. Open writers are left as they are, as after a crash."""
        with self._lock:
            self._index.close()
            self._lockfile.close()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path_of(self, digest: Digest) -> Path:
        return blob_path(self.root, digest)

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, digest: Digest) -> BlobInfo | None:
        """Metadata of a committed blob, for HEAD answers. Does not count as a use."""
        key = str(digest)
        with self._lock:
            row = self._index.get(key)
            if row is None:
                return None
            path = self.path_of(digest)
            if not path.exists():
                self._forget(key, row[0])
                return None
            return BlobInfo(digest, path, row[0], row[1])

    def open_blob(self, digest: Digest) -> BlobHandle | None:
        """Open, pin and mark used a committed blob; close the handle to unpin it."""
        key = str(digest)
        with self._lock:
            row = self._index.get(key)
            if row is None:
                return None
            path = self.path_of(digest)
            try:
                file = path.open("rb")
            except FileNotFoundError:
                self._forget(key, row[0])
                return None
            self._index.touch(key, self._clock(), hit=True)
            pin = self.pin(digest)
        return BlobHandle(BlobInfo(digest, path, row[0], row[1]), file, pin)

    def pin(self, digest: Digest) -> Pin:
        """Protect a digest from eviction, whether or not it is committed yet."""
        key = str(digest)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        return Pin(lambda: self._unpin(key))

    def _unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins[key] - 1
            if left:
                self._pins[key] = left
            else:
                del self._pins[key]

    # -- writing ---------------------------------------------------------------------------

    def begin(
        self, digest: Digest, expected_size: int | None, media_type: str | None
    ) -> BlobWriter:
        """Start writing a blob. A known size is reserved first, so a big layer evicts
        before it downloads rather than overshooting the bound while it streams."""
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"negative expected_size {expected_size}")
        if self.max_size is not None and (expected_size or 0) > self.max_size:
            raise StoreFull(f"{digest}: {expected_size} bytes exceed the cache ({self.max_size})")
        reservation = expected_size or 0
        with self._lock:
            self._reserved += reservation
            try:
                self._evict_locked()
                fd, name = tempfile.mkstemp(prefix=f"{digest.algorithm}-", dir=self._tmp)
            except BaseException:
                self._reserved -= reservation
                raise
        return BlobWriter(
            self,
            digest,
            expected_size,
            media_type,
            Path(name),
            fd,
            max_bytes=self.max_size,
            reservation=reservation,
        )

    def _install(self, writer: BlobWriter) -> BlobInfo:
        """Publish a verified, synced temp file (called by `BlobWriter.commit`)."""
        digest, key = writer.digest, str(writer.digest)
        path = self.path_of(digest)
        size = writer.offset
        with self._lock:
            self._release(writer)
            row = self._index.get(key)
            if row is not None and path.exists():
                # Same bytes arrived twice (no flight coalesced them): keep the first copy.
                writer.tmp_path.unlink()
                self._index.touch(key, self._clock(), hit=False)
                media_type = row[1]
                if media_type is None and writer.media_type is not None:
                    # A copy adopted by recovery lost its media type; this fetch knows it.
                    media_type = writer.media_type
                    self._index.set_media_type(key, media_type)
                info = BlobInfo(digest, path, row[0], media_type)
            else:
                if row is not None:
                    self._forget(key, row[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(writer.tmp_path, path)
                self._index.insert(key, size, writer.media_type, self._clock())
                self._count += 1
                self._bytes += size
                info = BlobInfo(digest, path, size, writer.media_type)
            self._evict_locked()
        fsync_dir(path.parent)
        return info

    def _release(self, writer: BlobWriter) -> None:
        """Give back a writer's reservation (idempotent: commit and abort both end here)."""
        with self._lock:
            self._reserved -= writer.reservation
            writer.reservation = 0

    def add_ref(self, digest: Digest, registry: str, repo: str) -> None:
        """Note that `registry/repo` asked for this digest (shown by `cache ls`)."""
        with self._lock:
            self._index.add_ref(str(digest), registry, repo)

    # -- tags ------------------------------------------------------------------------------

    def put_tag(
        self,
        registry: str,
        repo: str,
        tag: str,
        digest: Digest,
        media_type: str,
        now: float | None = None,
    ) -> None:
        with self._lock:
            when = self._clock() if now is None else now
            self._index.put_tag(registry, repo, tag, str(digest), media_type, when)

    def get_tag(self, registry: str, repo: str, tag: str) -> TagInfo | None:
        with self._lock:
            return self._index.get_tag(registry, repo, tag)

    def tags(self) -> builtins.list[TagRow]:
        """Every cached tag answer (for `cache tags` and the admin API)."""
        with self._lock:
            return self._index.tags()

    # -- space -----------------------------------------------------------------------------

    def usage(self) -> Usage:
        with self._lock:
            return Usage(self._count, self._bytes)

    def evict(self) -> list[Digest]:
        """Evict least recently used, unpinned blobs until the store fits `max_size`."""
        with self._lock:
            return self._evict_locked()

    def prune(self, older_than_s: float | None = None, now: float | None = None) -> list[Digest]:
        """Delete unpinned blobs unused for `older_than_s` seconds (None: every unpinned blob),
        and tag answers fetched before that cutoff."""
        with self._lock:
            if older_than_s is None:
                victims = self._index.sizes()
                self._index.delete_tags_before(float("inf"))
            else:
                cutoff = (self._clock() if now is None else now) - older_than_s
                victims = self._index.older_than(cutoff)
                self._index.delete_tags_before(cutoff)
            return [self._remove(key, size) for key, size in victims if key not in self._pins]

    def _evict_locked(self) -> list[Digest]:
        if self.max_size is None or self._bytes + self._reserved <= self.max_size:
            return []
        gone: list[Digest] = []
        for key, size in self._index.sizes():
            if self._bytes + self._reserved <= self.max_size:
                break
            if key not in self._pins:
                gone.append(self._remove(key, size))
        if gone:
            logger.info("cache: evicted %d blobs, %d bytes left", len(gone), self._bytes)
        return gone

    def _remove(self, key: str, size: int) -> Digest:
        """Row first, then file: a crash in between leaves a file that recovery re-adopts."""
        digest = parse_digest(key)
        self._forget(key, size)
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            pass
        return digest

    def _forget(self, key: str, size: int) -> None:
        self._index.delete(key)
        self._count -= 1
        self._bytes -= size

    # -- integrity -------------------------------------------------------------------------

    def verify(self, progress: Callable[[int, int, Digest], None] | None = None) -> VerifyReport:
        """Re-hash every committed blob; quarantine those that no longer match their name.

        Hashing runs outside the lock (it reads whole layers); a file replaced while it was
        being hashed is left alone, since the new copy was verified when it was committed.
        """
        report = VerifyReport()
        with self._lock:
            todo = self._index.sizes()
        for n, (key, size) in enumerate(todo, 1):
            digest = parse_digest(key)
            if progress is not None:
                progress(n, len(todo), digest)
            path = self.path_of(digest)
            try:
                before = path.stat()
                good = before.st_size == size and hash_file(path, digest)
            except FileNotFoundError:
                self._drop_missing(key, size, report)
                continue
            report.checked += 1
            report.bytes += before.st_size
            if not good:
                self._quarantine(key, size, path, before.st_ino, report)
        return report

    def _drop_missing(self, key: str, size: int, report: VerifyReport) -> None:
        with self._lock:
            if self._index.get(key) is not None and not self.path_of(parse_digest(key)).exists():
                self._forget(key, size)
                report.missing.append(parse_digest(key))

    def _quarantine(self, key: str, size: int, path: Path, ino: int, report: VerifyReport) -> None:
        with self._lock:
            try:
                if self._index.get(key) is None or path.stat().st_ino != ino:
                    return
            except FileNotFoundError:
                return
            digest = parse_digest(key)
            qdir = self.root / "quarantine"
            qdir.mkdir(exist_ok=True)
            os.replace(path, qdir / f"{digest.algorithm}-{digest.hex}")
            self._forget(key, size)
            report.bad.append(digest)
        logger.warning("cache: %s does not match its content; moved to %s", key, qdir)

    def _recover(self) -> None:
        """Bring files and rows back into agreement after any kind of stop."""
        for leftover in self._tmp.iterdir():
            remove_path(leftover)
        on_disk = self._scan_blobs()
        rows = dict(self._index.sizes())
        for key, size in rows.items():
            st_size = on_disk.pop(key, None)
            if st_size is None or st_size != size:
                self._index.delete(key)
                if st_size is not None:
                    self.path_of(parse_digest(key)).unlink()
                continue
            self._count += 1
            self._bytes += size
        for key, st_size in on_disk.items():
            self._adopt(parse_digest(key), st_size)
        self._evict_locked()

    def _scan_blobs(self) -> dict[str, int]:
        """Committed files by key; anything that is not a well-placed digest name is deleted."""
        found: dict[str, int] = {}
        for alg_dir in self._blobs.iterdir():
            if alg_dir.name not in ALGORITHMS or not alg_dir.is_dir():
                remove_path(alg_dir)
                continue
            for sub in alg_dir.iterdir():
                for path in sub.iterdir() if sub.is_dir() else [sub]:
                    try:
                        digest = parse_digest(f"{alg_dir.name}:{path.name}")
                    except DigestError:
                        digest = None
                    if digest is None or path.parent.name != digest.hex[:2] or not path.is_file():
                        remove_path(path)
                        continue
                    found[str(digest)] = path.stat().st_size
        return found

    def _adopt(self, digest: Digest, size: int) -> None:
        """A file renamed into place whose row was lost: keep it only if it still verifies."""
        path = self.path_of(digest)
        if not hash_file(path, digest):
            logger.warning("cache: dropping %s, its content does not match", digest)
            path.unlink()
            return
        mtime = path.stat().st_mtime
        self._index.insert(str(digest), size, None, mtime)
        self._count += 1
        self._bytes += size

    # Last in the class: below this name, `list` would mean the method to a type checker.
    def list(self) -> builtins.list[BlobRow]:
        """Every blob with its use and refs, most recently used first (for `cache ls`)."""
        with self._lock:
            return self._index.rows()
