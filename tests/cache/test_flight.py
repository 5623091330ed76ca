"""Single-flight fetches: followers read the growing file, and never get an unverified tail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwdproxy.cache import (
    BlobStore,
    CacheError,
    DigestMismatch,
    Flight,
    FlightFailed,
    FlightReader,
    Flights,
)
from fwdproxy.proto.digest import Digest, parse_digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
YIELDS = 50  # loop turns granted to followers when checking that they are (still) blocked


def digest_of(data: bytes) -> Digest:
    return parse_digest(f"sha256:{hashlib.sha256(data).hexdigest()}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    s = BlobStore(tmp_path / "cache", 0)
    yield s
    s.close()


@pytest.fixture
def flights(store: BlobStore) -> Flights:
    return Flights(store, chunk_bytes=1000)


async def settle() -> None:
    """Let every runnable task run until it blocks (bounded: no wall-clock waiting)."""
    for _ in range(YIELDS):
        await asyncio.sleep(0)


async def read_all(reader: FlightReader) -> bytes:
    async with reader:
        return b"".join([chunk async for chunk in reader])


async def drain_available(reader: FlightReader, flight: Flight, end: int | None = None) -> bytes:
    """Read what a follower may have right now, without waiting for more."""
    out = b""
    while reader.position < flight.readable(end):
        out += await reader.__anext__()
    return out


async def fetch(flight: Flight, data: bytes, chunk: int = 4096, size: int | None = -1) -> None:
    """The fetcher's side for a well-behaved upstream."""
    async with flight:
        await flight.start(len(data) if size == -1 else size, LAYER)
        for i in range(0, len(data), chunk):
            await flight.write(data[i : i + chunk])
        await flight.commit()


async def test_flight_claim_once_join_until_committed(flights: Flights, store: BlobStore) -> None:
    data = os.urandom(10_000)
    digest = digest_of(data)
    flight = flights.claim(digest)
    assert flight is not None
    assert flights.claim(digest) is None
    assert flights.join(digest) is flight and len(flights) == 1
    await fetch(flight, data)
    assert flights.join(digest) is None and len(flights) == 0
    assert store.lookup(digest) == flight.info
    assert flights.claim(digest) is not None  # a later miss (after eviction) fetches again


async def test_flight_followers_get_exactly_the_bytes(flights: Flights) -> None:
    data = os.urandom(50_000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    readers = [flight.reader(start) for start in (0, 1, 12_345, 49_999, 50_000)]
    tasks = [asyncio.ensure_future(read_all(r)) for r in readers]
    await fetch(flight, data, chunk=3000)
    results = await asyncio.gather(*tasks)
    assert results == [data[s:] for s in (0, 1, 12_345, 49_999, 50_000)]


async def test_flight_holds_back_the_tail_until_verified(flights: Flights) -> None:
    data = os.urandom(8000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    reader = flight.reader(100)
    task = asyncio.ensure_future(read_all(flight.reader()))
    await flight.start(len(data), LAYER)
    await flight.write(data[:5000])
    assert await drain_available(reader, flight) == data[100:5000]
    await flight.write(data[5000:])
    assert flight.readable() == len(data) - 1
    assert await drain_available(reader, flight) == data[5000:-1]
    await settle()
    assert not task.done()  # the follower that wants it all is still waiting for the tail
    await flight.commit()
    assert await read_all(reader) == data[-1:]
    assert await task == data


async def test_flight_mismatch_fails_followers_short(flights: Flights, store: BlobStore) -> None:
    data = os.urandom(6000)
    wrong = data[:-1] + bytes([data[-1] ^ 0xFF])
    flight = flights.claim(digest_of(data))
    assert flight is not None
    got: list[bytes] = []

    async def follow() -> None:
        async with flight.reader() as reader:
            async for chunk in reader:
                got.append(chunk)

    task = asyncio.ensure_future(follow())
    with pytest.raises(DigestMismatch):
        await fetch(flight, wrong, chunk=1000)
    with pytest.raises(FlightFailed) as failed:
        await task
    assert isinstance(failed.value.__cause__, DigestMismatch)
    assert len(b"".join(got)) < len(data)  # never a complete body
    assert store.lookup(digest_of(data)) is None
    assert list((store.root / "tmp").iterdir()) == []
    assert flights.join(digest_of(data)) is None
    with pytest.raises(FlightFailed):
        await flight.wait_started()


async def test_flight_upstream_error_reaches_every_follower(flights: Flights) -> None:
    flight = flights.claim(digest_of(b"never arrives"))
    assert flight is not None
    early = asyncio.ensure_future(flight.wait_started())
    late = asyncio.ensure_future(read_all(flight.reader(3)))
    with pytest.raises(ConnectionResetError):
        async with flight:
            await flight.start(13, LAYER)
            await flight.write(b"never")
            raise ConnectionResetError("upstream went away")
    assert (await early).expected_size == 13
    with pytest.raises(FlightFailed) as failed:
        await late
    assert isinstance(failed.value.__cause__, ConnectionResetError)


async def test_flight_failure_before_start_tells_waiters(flights: Flights) -> None:
    flight = flights.claim(digest_of(b"404"))
    assert flight is not None
    waiter = asyncio.ensure_future(flight.wait_started())
    await settle()
    flight.fail(LookupError("upstream 404"))
    with pytest.raises(FlightFailed) as failed:
        await waiter
    assert isinstance(failed.value.__cause__, LookupError)


async def test_flight_fetcher_that_forgets_to_commit_fails_it(flights: Flights) -> None:
    flight = flights.claim(digest_of(b"x"))
    assert flight is not None
    async with flight:
        await flight.start(1, LAYER)
    with pytest.raises(FlightFailed):
        flight.raise_if_failed()
    with pytest.raises(FlightFailed):
        await flight.write(b"x")


async def test_flight_range_reads_hold_back_the_range_end(flights: Flights) -> None:
    data = os.urandom(10_000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    ranged = flight.reader(2000, 3000)
    await flight.start(len(data), LAYER)
    await flight.write(data[:6000])
    assert flight.readable(3000) == 2999
    assert await drain_available(ranged, flight, 3000) == data[2000:2999]
    late = asyncio.ensure_future(read_all(flight.reader(9000, 9500)))
    await flight.write(data[6000:])
    await flight.commit()
    assert await read_all(ranged) == data[2999:3000]
    assert await late == data[9000:9500]
    assert await read_all(flight.reader(9990, 20_000)) == data[9990:]
    with pytest.raises(ValueError):
        flight.reader(5, 4)


async def test_flight_unknown_size_lags_by_the_holdback(store: BlobStore) -> None:
    flights = Flights(store, holdback_bytes=100)
    data = os.urandom(3000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    reader = flight.reader()
    await flight.start(None, LAYER)
    await flight.write(data[:1000])
    assert flight.readable() == 900
    assert await drain_available(reader, flight) == data[:900]
    await flight.write(data[1000:])
    await flight.commit()
    assert await read_all(reader) == data[900:]


async def test_flight_resume_continues_from_offset(flights: Flights) -> None:
    data = os.urandom(20_000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    follower = asyncio.ensure_future(read_all(flight.reader()))
    async with flight:
        await flight.start(len(data), LAYER)
        await flight.write(data[:7777])
        # The upstream body broke off; the fetcher asks again with Range: bytes=<offset>-.
        assert flight.offset == 7777
        await flight.write(data[flight.offset :])
        info = await flight.commit()
    assert info.path.read_bytes() == data
    assert await follower == data


async def test_flight_reader_after_commit_reads_the_store(flights: Flights) -> None:
    data = os.urandom(5000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    await fetch(flight, data)
    assert await read_all(flight.reader(4000)) == data[4000:]


async def test_flight_followers_pin_the_blob(tmp_path: Path) -> None:
    with BlobStore(tmp_path, 6000) as store:
        flights = Flights(store)
        data = os.urandom(5000)
        flight = flights.claim(digest_of(data))
        assert flight is not None
        reader = flight.reader()
        await fetch(flight, data)
        other = os.urandom(5000)
        other_flight = flights.claim(digest_of(other))
        assert other_flight is not None
        await fetch(other_flight, other)  # would evict `data` if it could
        assert store.lookup(digest_of(data)) is not None
        assert await read_all(reader) == data
        assert store.usage().bytes == 10_000  # over the bound while pinned...
        assert len(store.evict()) == 1  # ...and back under it once the follower is done
        assert store.usage().bytes == 5000


async def test_flight_cancelled_fetch_cleans_up(flights: Flights, store: BlobStore) -> None:
    data = os.urandom(4000)
    flight = flights.claim(digest_of(data))
    assert flight is not None
    follower = asyncio.ensure_future(read_all(flight.reader()))
    started = asyncio.Event()
    blocked = asyncio.Event()

    async def fetcher() -> None:
        async with flight:
            await flight.start(len(data), LAYER)
            await flight.write(data[:100])
            started.set()
            await blocked.wait()  # an upstream that stalls until the client goes away

    task = asyncio.ensure_future(fetcher())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(FlightFailed):
        await follower
    assert list((store.root / "tmp").iterdir()) == []
    with pytest.raises(CacheError):
        await flight.start(1, LAYER)


def test_flight_holdback_must_be_positive(store: BlobStore) -> None:
    with pytest.raises(ValueError):
        Flights(store, holdback_bytes=0)


# -- property: any chunking, any follower ranges, any join time ------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3000),
    chunk=st.integers(1, 700),
    corrupt=st.booleans(),
    followers=st.lists(
        st.tuples(
            st.integers(0, 3100), st.one_of(st.none(), st.integers(0, 400)), st.integers(0, 8)
        ),
        max_size=5,
    ),
)
def test_flight_followers_get_committed_bytes_or_an_error(
    data: bytes,
    chunk: int,
    corrupt: bool,
    followers: list[tuple[int, int | None, int]],
) -> None:
    """Each follower (start, length, joins after n chunks) gets exactly its slice of a good
    blob; of a bad one, an error and never its whole slice."""
    body = (bytes([data[0] ^ 1]) + data[1:] if data else b"!") if corrupt else data

    async def scenario(root: Path) -> None:
        with BlobStore(root, 0) as store:
            flights = Flights(store, chunk_bytes=97)
            flight = flights.claim(digest_of(data))
            assert flight is not None
            joined: list[tuple[bytes, list[bytes], asyncio.Future[None]]] = []

            async def follow(start: int, end: int | None, parts: list[bytes]) -> None:
                async with flight.reader(start, end) as reader:
                    async for part in reader:
                        parts.append(part)

            def join_due(step: int) -> None:
                for start, length, at in followers:
                    if at == step:
                        end = None if length is None else start + length
                        parts: list[bytes] = []
                        task = asyncio.ensure_future(follow(start, end, parts))
                        joined.append((data[start:end], parts, task))

            join_due(0)
            with pytest.raises(DigestMismatch) if corrupt else contextlib.nullcontext():
                async with flight:
                    await flight.start(len(data), LAYER)
                    for step, i in enumerate(range(0, len(body), chunk), 1):
                        await flight.write(body[i : i + chunk])
                        join_due(step)
                        await asyncio.sleep(0)  # let followers interleave with the fetch
                    await flight.commit()
            join_due(10**6)  # followers due after the fetch ended join a finished flight
            for want, parts, task in joined:
                if corrupt:
                    with pytest.raises(FlightFailed):
                        await task
                    assert len(b"".join(parts)) < len(want) or not want
                else:
                    await task
                    assert b"".join(parts) == want
            assert list((root / "tmp").iterdir()) == []

    with tempfile.TemporaryDirectory() as root:
        asyncio.run(scenario(Path(root)))
