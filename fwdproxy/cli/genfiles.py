"""File plumbing shared by the `gen` targets (proxy and mirror): one error type, reading under
`--root`, atomic writes that keep a `.bak`, and the daemon.json reader both daemon.json
generators merge into. Kept apart so the proxy and mirror generators need not import each other.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class GenError(Exception):
    """A problem reported as one clear line; `code` is the exit status (2 usage, 1 runtime)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def root_path(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise GenError(f"{path}: cannot read: {e.strerror or e}") from None


def _atomic_write(path: Path, content: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_file(path: Path, content: str, new_mode: int = 0o644) -> str:
    """ "created" | "updated" | "unchanged"; a different old file is kept as PATH.bak."""
    if path.is_symlink():
        path = path.resolve()
    old = read_text(path)
    if old == content:
        return "unchanged"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = new_mode
        if old is not None:
            mode = path.stat().st_mode & 0o7777
            _atomic_write(path.with_name(path.name + ".bak"), old, mode)
        _atomic_write(path, content, mode)
    except OSError as e:
        raise GenError(f"{path}: cannot write: {e.strerror or e}") from None
    return "created" if old is None else "updated"


def load_json_object(existing: str | None, path: str) -> dict[str, Any]:
    """A JSON object (key order kept) from a file's text; a bad file is left alone, loudly:
    dockerd refuses to start on invalid daemon.json, so guessing would take Docker down."""
    if existing is None or not existing.strip():
        return {}
    try:
        data = json.loads(existing, object_pairs_hook=dict)
    except json.JSONDecodeError as e:
        raise GenError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
            "file left untouched"
        ) from None
    if not isinstance(data, dict):
        raise GenError(f"{path}: top level is not a JSON object; file left untouched")
    return data
