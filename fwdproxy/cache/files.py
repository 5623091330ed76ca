"""File-system steps the store builds on: hashing a file, a durable rename, a directory lock."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Final

from fwdproxy.cache.errors import StoreLocked
from fwdproxy.proto.digest import Digest

__all__ = ["fsync_dir", "hash_file", "lock_dir", "remove_path"]

HASH_CHUNK: Final = 1024 * 1024


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
    """Take the store's directory lock: a second owner would delete our temp files at open."""
    f = path.open("ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreLocked(f"{path.parent} is in use by another cache store") from None
    return f
