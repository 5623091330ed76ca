"""The SQLite metadata of the blob store: which blobs are committed, how they are used, tags.

The index is a description of the files, never the other way round: the store writes a file
first and its row second, and deletes the row before the file, so after a crash the only
disagreement possible is a file without a row or a row without a file, and both are repaired
when the store opens. This class holds no lock: the store serialises every call with its own,
because a row change and the file operation it describes must happen under the same lock.

A second process may read the index while the owner writes it (`readonly=True`: the `cache`
CLI beside a running proxy). WAL lets that reader see only committed transactions, and both
sides wait out a busy database instead of failing at once.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fwdproxy.proto.digest import Digest, parse_digest

__all__ = ["BUSY_TIMEOUT_S", "BlobInfo", "BlobRow", "Index", "TagInfo", "TagRow", "Usage"]

SCHEMA_VERSION: Final = 1
# How long a statement waits for another connection's lock before failing with "database is
# locked". WAL readers never block the writer, but opening a WAL database (its -shm recovery)
# and checkpoints briefly take locks that a reader in another process can run into.
BUSY_TIMEOUT_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,
    created     REAL NOT NULL,
    last_access REAL NOT NULL,
    hits        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs (last_access, digest);
CREATE TABLE IF NOT EXISTS refs (
    digest   TEXT NOT NULL,
    registry TEXT NOT NULL,
    repo     TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repo)
);
CREATE TABLE IF NOT EXISTS tags (
    registry   TEXT NOT NULL,
    repo       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    media_type TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (registry, repo, tag)
);
"""


@dataclass(frozen=True, slots=True)
class Usage:
    count: int
    bytes: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A committed blob: where its bytes are and what to say about them in headers."""

    digest: Digest
    path: Path
    size: int
    media_type: str | None  # None only for a file adopted by recovery without its row


@dataclass(frozen=True, slots=True)
class BlobRow:
    """One committed blob as `cache ls` shows it."""

    digest: Digest
    size: int
    media_type: str | None
    created: float
    last_access: float
    hits: int
    refs: tuple[str, ...] = ()  # "registry/repo" names that asked for it


@dataclass(frozen=True, slots=True)
class TagInfo:
    """A cached tag answer; `fetched_at` lets the mirror decide if it is fresh or stale-usable."""

    digest: Digest
    media_type: str
    fetched_at: float


@dataclass(frozen=True, slots=True)
class TagRow:
    """One cached tag answer as `cache tags` shows it."""

    registry: str
    repo: str
    tag: str
    digest: Digest
    media_type: str
    fetched_at: float


class Index:
    """Rows of blobs, refs and tags in one WAL database; every method is one transaction.

    `readonly=True` opens the file with SQLite's `mode=ro`: no schema setup, no pragma that
    writes, and any write method fails in SQLite itself, so a viewer cannot change a store
    another process owns even by mistake.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        if readonly:
            # No check_same_thread relaxation needed: a viewer lives in one thread.
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_S,
            )
            self._check_version(path)
            return
        # One connection shared by the event loop and worker threads: the store's lock
        # serialises it, so sqlite's own same-thread check would only get in the way.
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power cut may lose the last commits' rows, which recovery turns into
        # files without rows and re-verifies, so the cheaper sync level loses nothing.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._check_version(path)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _check_version(self, path: Path) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise sqlite3.DatabaseError(f"{path}: schema version {version} is newer than ours")

    def close(self) -> None:
        self._db.close()

    # -- blobs -----------------------------------------------------------------------------

    def get(self, key: str) -> tuple[int, str | None] | None:
        """(size, media_type) of a committed blob, or None."""
        row = self._db.execute(
            "SELECT size, media_type FROM blobs WHERE digest = ?", (key,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def insert(self, key: str, size: int, media_type: str | None, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO blobs (digest, size, media_type, created, last_access, hits)"
            " VALUES (?, ?, ?, ?, ?, 0)",
            (key, size, media_type, now, now),
        )

    def touch(self, key: str, now: float, hit: bool) -> None:
        """Record a use: LRU order always, the hit counter only for a served read."""
        self._db.execute(
            "UPDATE blobs SET last_access = ?, hits = hits + ? WHERE digest = ?",
            (now, int(hit), key),
        )

    def set_media_type(self, key: str, media_type: str) -> None:
        self._db.execute("UPDATE blobs SET media_type = ? WHERE digest = ?", (media_type, key))

    def delete(self, key: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blobs WHERE digest = ?", (key,))
            self._db.execute("DELETE FROM refs WHERE digest = ?", (key,))

    def sizes(self) -> list[tuple[str, int]]:
        """(key, size) of every blob, least recently used first (the eviction order)."""
        return self._db.execute(
            "SELECT digest, size FROM blobs ORDER BY last_access, digest"
        ).fetchall()

    def totals(self) -> Usage:
        """Count and bytes of committed blobs, summed by the database itself."""
        count, total = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
        ).fetchone()
        return Usage(int(count), int(total))

    def older_than(self, cutoff: float) -> list[tuple[str, int]]:
        return self._db.execute(
            "SELECT digest, size FROM blobs WHERE last_access < ? ORDER BY last_access, digest",
            (cutoff,),
        ).fetchall()

    def rows(self) -> list[BlobRow]:
        """Every blob with its refs, most recently used first."""
        refs: dict[str, list[str]] = {}
        for key, registry, repo in self._db.execute(
            "SELECT digest, registry, repo FROM refs ORDER BY registry, repo"
        ):
            refs.setdefault(key, []).append(f"{registry}/{repo}")
        return [
            BlobRow(parse_digest(key), size, mt, created, last, hits, tuple(refs.get(key, ())))
            for key, size, mt, created, last, hits in self._db.execute(
                "SELECT digest, size, media_type, created, last_access, hits FROM blobs"
                " ORDER BY last_access DESC, digest"
            )
        ]

    def add_ref(self, key: str, registry: str, repo: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO refs (digest, registry, repo) VALUES (?, ?, ?)",
            (key, registry, repo),
        )

    # -- tags ------------------------------------------------------------------------------

    def put_tag(
        self, registry: str, repo: str, tag: str, key: str, media_type: str, now: float
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tags (registry, repo, tag, digest, media_type, fetched_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (registry, repo, tag, key, media_type, now),
        )

    def get_tag(self, registry: str, repo: str, tag: str) -> TagInfo | None:
        row = self._db.execute(
            "SELECT digest, media_type, fetched_at FROM tags"
            " WHERE registry = ? AND repo = ? AND tag = ?",
            (registry, repo, tag),
        ).fetchone()
        return None if row is None else TagInfo(parse_digest(row[0]), row[1], row[2])

    def tags(self) -> list[TagRow]:
        """Every cached tag answer, by registry, repository and tag."""
        return [
            TagRow(registry, repo, tag, parse_digest(key), media_type, fetched_at)
            for registry, repo, tag, key, media_type, fetched_at in self._db.execute(
                "SELECT registry, repo, tag, digest, media_type, fetched_at FROM tags"
                " ORDER BY registry, repo, tag"
            )
        ]

    def delete_tags_before(self, cutoff: float) -> int:
        cur = self._db.execute("DELETE FROM tags WHERE fetched_at < ?", (cutoff,))
        return cur.rowcount
