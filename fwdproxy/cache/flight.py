"""Single-flight fetches: one upstream download per missing digest, any number of readers.

The first requester of a missing digest `claim`s a Flight and fetches; everyone else `join`s
it and reads the temp file as it grows, so N concurrent pulls of one layer cost one transfer
over the tunnel (distribution#1334 is what happens otherwise).

Verification rule: a reader never receives the last `holdback_bytes` of what it asked for
until `commit()` has verified the digest. If the fetch fails or the digest is wrong, readers
get FlightFailed instead of that tail, so a client that was promised a Content-Length sees a
short body (an error it retries) and never a complete, wrong blob. Readers follow the fetcher
through a notification event, never by polling.

Use from the event loop only; disk writes and the commit run in worker threads. To avoid a
duplicate download, check `BlobStore.lookup()` and call `claim()` with no `await` between them:
a flight leaves the registry only after its blob is indexed.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from fwdproxy.cache.errors import CacheError, FlightFailed
from fwdproxy.cache.handle import BlobHandle
from fwdproxy.cache.index import BlobInfo
from fwdproxy.cache.store import BlobStore
from fwdproxy.cache.writer import BlobWriter
from fwdproxy.proto.digest import Digest

__all__ = ["Flight", "FlightHead", "FlightReader", "Flights"]

HOLDBACK_BYTES: Final = 1  # one withheld byte is enough to make a failed body visibly short
READ_CHUNK: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class FlightHead:
    """What followers need for their response headers once the upstream answered."""

    expected_size: int | None
    media_type: str | None


class Flights:
    """The registry of in-progress fetches, keyed by digest."""

    def __init__(
        self,
        store: BlobStore,
        *,
        holdback_bytes: int = HOLDBACK_BYTES,
        chunk_bytes: int = READ_CHUNK,
    ) -> None:
        if holdback_bytes < 1:
            raise ValueError("holdback_bytes must be at least 1: readers must never see it all")
        self._store = store
        self._holdback = holdback_bytes
        self._chunk = chunk_bytes
        self._flights: dict[str, Flight] = {}

    def claim(self, digest: Digest) -> Flight | None:
        """Become the fetcher of `digest`, or None if a fetch is already under way."""
        key = str(digest)
        if key in self._flights:
            return None
        flight = Flight(self, self._store, digest, self._holdback, self._chunk)
        self._flights[key] = flight
        return flight

    def join(self, digest: Digest) -> Flight | None:
        """The fetch under way for `digest`, to follow with `reader()`; None if there is none."""
        return self._flights.get(str(digest))

    def __len__(self) -> int:
        return len(self._flights)

    def _finished(self, flight: Flight) -> None:
        key = str(flight.digest)
        if self._flights.get(key) is flight:
            del self._flights[key]


class Flight:
    """One fetch. The fetcher drives `start` → `write`… → `commit` (or `fail`), ideally as
    `async with flight:` so an exception or cancellation fails it for every follower."""

    def __init__(
        self, owner: Flights, store: BlobStore, digest: Digest, holdback: int, chunk: int
    ) -> None:
        self.digest = digest
        self._owner = owner
        self._store = store
        self._holdback = holdback
        self.chunk_bytes = chunk
        self._pin = store.pin(digest)  # the commit's own eviction must not take it away
        self._writer: BlobWriter | None = None
        self._head: FlightHead | None = None
        self._fd = -1  # read side of the temp file, shared with readers through dup()
        self._written = 0
        self._info: BlobInfo | None = None
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    # -- fetcher side ----------------------------------------------------------------------

    async def start(self, expected_size: int | None, media_type: str | None) -> None:
        """Open the temp file once the upstream said what it is sending."""
        if self._writer is not None or self.done:
            raise CacheError(f"{self.digest}: flight already started or finished")
        writer = await self._begin(expected_size, media_type)
        if self._error is not None:  # failed while begin() ran in its thread
            writer.abort()
            raise FlightFailed(f"{self.digest}: flight failed while starting") from self._error
        try:
            self._fd = os.open(writer.tmp_path, os.O_RDONLY)
        except OSError:
            writer.abort()
            raise
        self._writer = writer
        self._head = FlightHead(expected_size, media_type)
        self._notify()

    async def _begin(self, expected_size: int | None, media_type: str | None) -> BlobWriter:
        """`store.begin` in a thread; if we are cancelled meanwhile, the writer it still
        returns is aborted, so its reservation and temp file do not leak."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._store.begin, self.digest, expected_size, media_type)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_abort_result)
            raise

    @property
    def offset(self) -> int:
        """Bytes fetched so far; a broken upstream read resumes with `Range: bytes=<offset>-`."""
        return self._written

    async def write(self, data: bytes) -> None:
        writer = self._started_writer()
        await asyncio.to_thread(writer.write, data)
        self._written = writer.offset
        self._notify()

    async def commit(self) -> BlobInfo:
        """Verify and publish; followers then get the held-back tail (or FlightFailed)."""
        writer = self._started_writer()
        try:
            info = await asyncio.to_thread(writer.commit)
        except BaseException as e:
            self.fail(e)
            raise
        self._info = info
        self._finish()
        return info

    def fail(self, exc: BaseException) -> None:
        """End the flight for everyone with `exc` as the cause (no-op once finished)."""
        if self.done:
            return
        self._error = exc
        if self._writer is not None:
            self._writer.abort()
        self._finish()

    async def __aenter__(self) -> Flight:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.fail(exc)
        elif not self.done:
            self.fail(FlightFailed(f"{self.digest}: fetch ended without a commit"))

    # -- follower side ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._info is not None or self._error is not None

    @property
    def info(self) -> BlobInfo | None:
        """The committed blob, once verified."""
        return self._info

    async def wait_started(self) -> FlightHead:
        """Wait until the upstream's size and media type are known."""
        while True:
            self.raise_if_failed()
            if self._head is not None:
                return self._head
            await self._changed.wait()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise FlightFailed(f"{self.digest}: fetch failed") from self._error

    def readable(self, end: int | None = None) -> int:
        """How far a reader of `[.., end)` may read now: everything once committed, otherwise
        what is written minus the held-back tail of the range (or of the written bytes, while
        the total size is unknown, since any byte could turn out to be the last)."""
        if self._info is not None:
            return self._info.size if end is None else min(end, self._info.size)
        expected = self._head.expected_size if self._head is not None else None
        cap = (self._written if expected is None else expected) - self._holdback
        if end is not None:
            cap = min(cap, end - self._holdback)
        return max(0, min(self._written, cap))

    def reader(self, start: int = 0, end: int | None = None) -> FlightReader:
        """Bytes `[start, end)` of the blob (to the end if `end` is None) as they arrive."""
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad range {start}-{end}")
        return FlightReader(self, start, end)

    # -- internals -------------------------------------------------------------------------

    def _started_writer(self) -> BlobWriter:
        self.raise_if_failed()
        if self._writer is None or self._info is not None:
            raise CacheError(f"{self.digest}: flight not started or already committed")
        return self._writer

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _finish(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pin.release()
        self._owner._finished(self)
        self._notify()

    def _open_fd(self) -> tuple[int, BlobHandle | None] | None:
        """A private fd for a reader: a dup of the temp file's (it survives the rename at
        commit), or the committed blob once the temp fd is gone; None before start."""
        if self._fd >= 0:
            return os.dup(self._fd), None
        if self._info is not None:
            handle = self._store.open_blob(self.digest)
            if handle is None:
                raise FlightFailed(f"{self.digest}: committed blob is no longer in the cache")
            return handle.fileno(), handle
        return None


def _abort_result(fut: asyncio.Future[BlobWriter]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().abort()


class FlightReader:
    """An async iterator over a flight's bytes. It pins the digest while open; use it as
    `async with flight.reader(start) as r: async for chunk in r: ...`."""

    def __init__(self, flight: Flight, start: int, end: int | None) -> None:
        self._flight = flight
        self._pos = start
        self._end = end
        self._pin = flight._store.pin(flight.digest)
        self._fd = -1
        self._handle: BlobHandle | None = None
        self._closed = False

    @property
    def position(self) -> int:
        return self._pos

    def __aiter__(self) -> FlightReader:
        return self

    async def __anext__(self) -> bytes:
        flight = self._flight
        while True:
            if self._closed:
                raise StopAsyncIteration
            flight.raise_if_failed()
            if self._fd < 0:
                opened = flight._open_fd()
                if opened is None:
                    await flight._changed.wait()
                    continue
                self._fd, self._handle = opened
            limit = flight.readable(self._end)
            if self._pos < limit:
                # A pread of bytes the fetcher has just written: served from the page cache,
                # cheap enough for the loop, and no worker-thread hop per chunk.
                data = os.pread(self._fd, min(flight.chunk_bytes, limit - self._pos), self._pos)
                if not data:
                    raise FlightFailed(f"{flight.digest}: temp file shorter than written")
                self._pos += len(data)
                return data
            if flight.info is not None:
                raise StopAsyncIteration
            await flight._changed.wait()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._handle is not None:
            self._handle.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._pin.release()

    async def __aenter__(self) -> FlightReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
