"""Logging to stderr (journald collects it): text `key=value` lines or JSON lines.

Access lines carry their fields in `record.fields`, so both formats render the same data.
Secrets never reach a record: upstream URLs are logged redacted and passwords not at all.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


def _quote(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "='):
        return json.dumps(s)
    return s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None)
        if fields is not None:
            body = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
            return f"{ts} {record.levelname.lower()} access {body}"
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{ts} {record.levelname.lower()} {record.name}: {msg}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            out["event"] = "access"
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """(Re)configure the root logger; called at start and after a reload changed `log:`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
