"""A blob streamed to one client without a cache, verified before its last bytes leave.

Without a cache directory there is no file to hold a blob until its digest is checked, so the
last chunk is held back: the client gets every byte but that chunk while the blob streams, and
the chunk only once the digest matched. A mismatch ends the response short (the client sees an
error and retries), never with a complete, wrong blob. A bounded queue makes a slow client slow
down the upstream fetch instead of filling memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from fwdproxy.cache.errors import DigestMismatch, FlightFailed
from fwdproxy.proto.digest import Digest

__all__ = ["PassThrough"]

QUEUE_CHUNKS: Final = 16
_END: Final = b""


class PassThrough:
    """A BlobSink (see mirror.upstream) that one reader consumes with `chunks()`."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self._hash = digest.hasher()
        self._offset = 0
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_CHUNKS)
        self._started = asyncio.get_running_loop().create_future()
        self._error: BaseException | None = None
        self.expected_size: int | None = None

    @property
    def offset(self) -> int:
        return self._offset

    async def start(self, expected_size: int | None, media_type: str | None) -> None:
        self.expected_size = expected_size
        if not self._started.done():
            self._started.set_result(expected_size)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self._offset += len(data)
        await self._queue.put(data)

    async def finish(self) -> None:
        """The upstream is done: verify, then release the held-back tail."""
        if not self.digest.matches(self._hash.hexdigest()):
            self.fail(DigestMismatch(f"{self.digest}: upstream bytes do not match the digest"))
            return
        await self._queue.put(_END)

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self._started.done():
            self._started.set_exception(FlightFailed(str(exc)))
            self._started.exception()  # retrieved here; the reader gets it again
        # Wake a waiting reader; if the queue is full it will see the error after a get().
        if not self._queue.full():
            self._queue.put_nowait(_END)

    async def wait_started(self) -> int | None:
        """The upstream's size once it answered; FlightFailed if it never did."""
        if self._error is not None and not self._started.done():
            raise FlightFailed(str(self._error)) from self._error
        try:
            return await asyncio.shield(self._started)
        except FlightFailed as e:
            raise FlightFailed(str(e)) from self._error

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def chunks(self) -> AsyncIterator[bytes]:
        held: bytes | None = None
        while True:
            chunk = await self._queue.get()
            if self._error is not None:
                raise FlightFailed(f"{self.digest}: {self._error}") from self._error
            if not chunk:
                if held is not None:
                    yield held
                return
            if held is not None:
                yield held
            held = chunk
