"""File-system steps the store builds on: hashing a file, a durable rename, a directory lock."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Final

from fwdproxy.cache.errors import StoreLocked
from fwdproxy.proto.digest import Digest

__all__ = ["blob_path", "fsync_dir", "hash_file", "lock_dir", "lock_owner", "remove_path"]

HASH_CHUNK: Final = 1024 * 1024


def blob_path(root: Path, digest: Digest) -> Path:
    """Where a committed blob lives: one definition for the owner and read-only views."""
    return root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def hash_file(path: Path, digest: Digest) -> bool:
    """Whether the file's content still hashes to `digest` (reads it all: use a thread)."""
    h = digest.hasher()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return digest.matches(h.hexdigest())


def remove_path(path: Path) -> None:
    """Delete a stray file or tree found where only our own files belong."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry is what a crash would otherwise lose."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_dir(path: Path) -> BinaryIO:
    """Take the store's directory lock: a second owner would delete our temp files at open.

    The owner writes its pid into the file (after taking the lock, so a loser never truncates
    it), so a refused second opener can say which process holds the directory.
    """
    f = path.open("ab")  # append: opening must not clear the current owner's pid
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        pid = lock_owner(path)
        who = f" (pid {pid})" if pid is not None else ""
        raise StoreLocked(f"{path.parent} is in use by another cache store{who}", pid) from None
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
    except OSError:
        pass  # the pid is only a hint for error messages; the flock is what protects us
    return f


def lock_owner(path: Path) -> int | None:
    """The pid the last owner wrote into the lock file (stale once it released the lock)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None
