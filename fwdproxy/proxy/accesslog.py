"""The access log: one line per connection, cheap enough to leave on.

Going through `logging` costs ~200 µs a line (a LogRecord, handler locks, a formatter, a write
and flush per line), more than the rest of a short tunnel. When serving, the CLI points this log
at a stream (`direct()`): each line is formatted once, appended to a buffer and written in one
call when a short timer fires, when the buffer is large, and at shutdown. Without `direct()`
(the library, the tests) lines go through the `fwdproxy.access` logger as records whose
`fields` attribute carries the same data, so `logging` configuration still applies.
The line format is the CLI's: `TS LEVEL access k=v ...` or a JSON object with
`"event":"access"` (cli/logsetup.py renders the logging path the same way).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fwdproxy.proxy.state import ConnInfo

logger = logging.getLogger("fwdproxy.access")

FLUSH_AFTER_S = 0.2  # a line reaches the stream at most this late
FLUSH_BYTES = 64 * 1024  # ...or once this much is buffered


def fields_of(info: ConnInfo) -> dict[str, Any]:
    """The documented per-connection fields, in their documented order."""
    d = info.decision
    fields: dict[str, Any] = {
        "conn": info.id,
        "client": info.client,
        "proto": info.protocol,
        "target": info.target or "-",
        "rule": d.rule if d else "-",
        "route": d.route if d else "-",
        "up": info.counters.up,
        "down": info.counters.down,
        "dur": round(time.time() - info.started, 3),
        "outcome": info.outcome.value,
    }
    if d is not None and d.registry:
        fields["registry"] = f"{d.registry}/{d.role}"
    if info.sni:
        fields["sni"] = info.sni
    if info.user:
        fields["user"] = info.user
    if info.requests:
        fields["requests"] = info.requests
    if info.error:
        fields["error"] = info.error
    return fields


def quote(v: Any) -> str:
    """A `key=value` value: bare when safe, JSON-quoted when it has a space, quote or '='."""
    s = str(v)
    if not s or " " in s or '"' in s or "=" in s:
        return json.dumps(s)
    return s


class AccessLog:
    """Writes access lines; see the module docstring for the two paths."""

    def __init__(self) -> None:
        self.stream: IO[str] | None = None
        self.json = False
        self.min_level = logging.INFO
        self._buf: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._ts_second = -1
        self._ts_text = ""

    def direct(self, stream: IO[str] | None, fmt: str = "text", level: str = "info") -> None:
        """Write straight to `stream` (None: back to `logging`); flushes what is buffered."""
        self.flush()
        self.stream = stream
        self.json = fmt == "json"
        self.min_level = getattr(logging, level.upper(), logging.INFO)

    def set_level(self, level: str) -> None:
        """A reload changed `log: level`."""
        self.min_level = getattr(logging, level.upper(), logging.INFO)

    def write(self, info: ConnInfo) -> None:
        level = logging.WARNING if info.outcome.is_error else logging.INFO
        if self.stream is None:
            if logger.isEnabledFor(level):
                logger.log(level, "", extra={"fields": fields_of(info)})
            return
        if level < self.min_level:
            return
        now = time.time()
        if self.json:
            out = {"ts": round(now, 3), "level": "warning" if level > 20 else "info"}
            out["logger"] = "fwdproxy.access"
            out["event"] = "access"
            out.update(fields_of(info))
            line = json.dumps(out, separators=(",", ":"))
        else:
            second = int(now)
            if second != self._ts_second:
                self._ts_second = second
                self._ts_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            body = " ".join(f"{k}={quote(v)}" for k, v in fields_of(info).items())
            line = f"{self._ts_text} {'warning' if level > 20 else 'info'} access {body}"
        self._buf.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        """Write out everything buffered (the timer, a full buffer and shutdown call this)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf or self.stream is None:
            self._buf.clear()
            self._size = 0
            return
        data = "\n".join(self._buf) + "\n"
        self._buf.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take the proxy down


ACCESS = AccessLog()
