"""A byte progress bar for long cache operations (`cache verify`, `cache warm`).

On a terminal it redraws one line in place (bytes done of total, percent, rate, ETA). Anywhere
else (systemd journal, CI logs, a pipe) carriage returns would pile up into one huge line, so
it prints a plain line every `interval_s` seconds and one at the end instead. The total may
grow while the work runs (warm learns sizes as it reads manifests) and may shrink (a failed
blob's remainder is never fetched), so ETA and percent follow both.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Final, Protocol, TextIO

from fwdproxy.core.units import format_size

__all__ = ["Progress", "ProgressSink", "format_duration", "format_progress"]

TTY_REDRAW_S: Final = 0.1  # redraws beyond ~10 per second only cost CPU
PLAIN_INTERVAL_S: Final = 10.0
MIN_BAR: Final = 10


class ProgressSink(Protocol):
    """What the workers report to; `Progress` implements it, tests and embedders may too."""

    def add_total(self, n: int) -> None: ...

    def advance(self, n: int) -> None: ...


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: ETA and elapsed times at the precision a human wants."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_progress(
    done: int, total: int, elapsed: float, *, label: str = "", width: int | None = None
) -> str:
    """One status line; with `width`, a bar fills what the text leaves of it (terminal mode)."""
    pct = 100.0 * done / total if total else 100.0
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{format_size(done)} / {format_size(total)}", f"{pct:3.0f}%"]
    if rate > 0:
        parts.append(f"{format_size(rate)}/s")
        if total > done:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
    text = "  ".join(parts)
    if width is None:
        return f"{label}: {text}" if label else text
    prefix = f"{label} " if label else ""
    room = width - len(prefix) - len(text) - 5  # and one column free: no wrap
    if room >= MIN_BAR:
        filled = min(room, int(room * done / total)) if total else room
        return f"{prefix}[{'#' * filled}{'.' * (room - filled)}]  {text}"
    return (prefix + text)[: max(width - 1, 0)]


class Progress:
    """Progress of a byte count; call `advance` as bytes are processed, `close` at the end."""

    def __init__(
        self,
        total: int = 0,
        label: str = "",
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = TTY_REDRAW_S if self.tty else interval_s
        self._clock = clock
        self._started = clock()
        self._last_draw = self._started
        self._drawn = False  # a bar is on screen (tty): a note must clear it first
        self._lines = 0  # plain lines printed (not a tty)
        self._closed = False

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def add_total(self, n: int) -> None:
        self.total = max(self.total + n, 0)
        self._maybe_draw()

    def advance(self, n: int) -> None:
        self.done += n
        self._maybe_draw()

    def update(self, done: int) -> None:
        """Set the absolute count (for callers that only know how far they are)."""
        self.done = done
        self._maybe_draw()

    def note(self, text: str) -> None:
        """Print a line of its own without garbling the bar (which is redrawn below it)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self._drawn = False
        if self.tty and not self._closed:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        """Final state: the bar at its last value on a terminal; elsewhere one last plain line,
        if any was printed (a run shorter than `interval_s` leaves the log to its summary)."""
        if self._closed:
            return
        self._closed = True
        if self.tty or self._lines:
            self._draw()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _maybe_draw(self) -> None:
        if self._closed:
            return
        now = self._clock()
        if now - self._last_draw >= self.interval_s:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns
            line = format_progress(
                self.done, self.total, self.elapsed, label=self.label, width=width
            )
            self.stream.write("\r\x1b[K" + line)
            self._drawn = True
        else:
            line = format_progress(self.done, self.total, self.elapsed, label=self.label)
            self.stream.write(line + "\n")
            self._lines += 1
        self.stream.flush()
