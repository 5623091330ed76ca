"""BlobStore: verified writes, resume, recovery after a crash, LRU eviction with pins, upkeep."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fwdproxy.cache import (
    BlobHandle,
    BlobStore,
    BlobWriter,
    DigestMismatch,
    SizeMismatch,
    StoreFull,
    StoreLocked,
    WriterClosed,
)
from fwdproxy.proto.digest import Digest, parse_digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return parse_digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


class Clock:
    """A settable time source, so LRU order and prune ages do not depend on the real clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[BlobStore]:
    s = BlobStore(tmp_path / "cache", 0, clock=clock)
    yield s
    s.close()


def put(store: BlobStore, data: bytes, media_type: str = LAYER) -> Digest:
    digest = digest_of(data)
    w = store.begin(digest, len(data), media_type)
    w.write(data)
    w.commit()
    return digest


def opened(store: BlobStore, digest: Digest) -> BlobHandle:
    handle = store.open_blob(digest)
    assert handle is not None
    return handle


def files_in(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# -- writing -------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"], ids=["sha256", "sha512"])
def test_store_commit_publishes_at_digest_path(store: BlobStore, algorithm: str) -> None:
    data = os.urandom(5000)
    digest = digest_of(data, algorithm)
    w = store.begin(digest, len(data), LAYER)
    w.write(data)
    info = w.commit()
    assert info.path == store.root / "blobs" / algorithm / digest.hex[:2] / digest.hex
    assert info.path.read_bytes() == data
    assert store.lookup(digest) == info
    assert (info.size, info.media_type) == (5000, LAYER)
    assert store.usage().count == 1 and store.usage().bytes == 5000
    assert files_in(store.root / "tmp") == []


def test_store_lookup_never_sees_a_blob_being_written(store: BlobStore) -> None:
    data = b"a" * 100
    w = store.begin(digest_of(data), 100, LAYER)
    w.write(data)
    assert store.lookup(digest_of(data)) is None
    assert store.open_blob(digest_of(data)) is None
    w.commit()
    assert store.lookup(digest_of(data)) is not None


def test_store_resume_from_offset_continues_the_hash(store: BlobStore) -> None:
    data = os.urandom(10_000)
    w = store.begin(digest_of(data), len(data), LAYER)
    w.write(data[:3333])
    # The upstream connection broke here; the fetch resumes with Range: bytes=<offset>-.
    resume_at = w.offset
    assert resume_at == 3333
    for i in range(resume_at, len(data), 1000):
        w.write(data[i : i + 1000])
    assert w.commit().path.read_bytes() == data


def test_store_digest_mismatch_leaves_nothing(store: BlobStore) -> None:
    data = b"the blob the manifest promised"
    w = store.begin(digest_of(data), len(data), LAYER)
    w.write(b"THE blob the manifest promised")
    with pytest.raises(DigestMismatch):
        w.commit()
    assert store.lookup(digest_of(data)) is None
    assert files_in(store.root / "blobs") == [] and files_in(store.root / "tmp") == []
    assert store.usage().count == 0
    with pytest.raises(WriterClosed):
        w.write(b"x")


def test_store_short_body_is_a_size_mismatch(store: BlobStore) -> None:
    data = b"0123456789"
    w = store.begin(digest_of(data), 20, LAYER)
    w.write(data)
    with pytest.raises(SizeMismatch):
        w.commit()
    assert files_in(store.root / "tmp") == []


def test_store_refuses_bytes_beyond_expected_size_at_once(store: BlobStore) -> None:
    data = b"0123456789"
    w = store.begin(digest_of(data), 10, LAYER)
    w.write(data[:6])
    with pytest.raises(SizeMismatch):
        w.write(data[6:] + b"!")
    assert w.closed
    assert files_in(store.root / "tmp") == []
    with pytest.raises(WriterClosed):
        w.commit()


def test_store_abort_and_context_exit_discard(store: BlobStore) -> None:
    data = b"partial"
    w = store.begin(digest_of(data), None, LAYER)
    w.write(data)
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(RuntimeError), store.begin(digest_of(data), None, LAYER) as w2:
        w2.write(data)
        raise RuntimeError("upstream reset")
    assert files_in(store.root / "tmp") == []
    assert store.lookup(digest_of(data)) is None


def test_store_same_blob_twice_keeps_one_copy(store: BlobStore) -> None:
    data = b"shared layer"
    first = put(store, data)
    put(store, data)
    assert store.usage().count == 1
    assert files_in(store.root / "blobs") == [store.path_of(first)]


def test_store_manifest_keeps_media_type_and_refs(store: BlobStore) -> None:
    digest = put(store, b'{"schemaVersion":2}', MANIFEST)
    store.add_ref(digest, "docker.io", "library/alpine")
    store.add_ref(digest, "docker.io", "library/alpine")
    store.add_ref(digest, "ghcr.io", "org/app")
    (row,) = store.list()
    assert row.media_type == MANIFEST
    assert row.refs == ("docker.io/library/alpine", "ghcr.io/org/app")


def test_store_open_blob_reads_and_counts_a_hit(store: BlobStore, clock: Clock) -> None:
    data = os.urandom(3000)
    digest = put(store, data)
    clock.tick(60)
    with opened(store, digest) as handle:
        assert handle.file.read() == data
        assert handle.pread(10, 100) == data[100:110]
    (row,) = store.list()
    assert row.hits == 1 and row.last_access == clock.now and row.created == clock.now - 60


# -- tags ----------------------------------------------------------------------------------


def test_store_tags_round_trip_and_overwrite(store: BlobStore) -> None:
    one, two = digest_of(b"1"), digest_of(b"2")
    assert store.get_tag("docker.io", "library/alpine", "latest") is None
    store.put_tag("docker.io", "library/alpine", "latest", one, MANIFEST, 100.0)
    store.put_tag("docker.io", "library/alpine", "latest", two, MANIFEST, 200.0)
    tag = store.get_tag("docker.io", "library/alpine", "latest")
    assert tag is not None and (tag.digest, tag.media_type, tag.fetched_at) == (two, MANIFEST, 200)
    assert store.get_tag("quay.io", "library/alpine", "latest") is None


# -- crash and recovery --------------------------------------------------------------------


def test_store_crash_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    data = os.urandom(4000)
    store = BlobStore(tmp_path, 0)
    w = store.begin(digest_of(data), len(data), LAYER)
    w.write(data[:2000])
    store.close()  # the process dies: the writer is never committed nor aborted
    store = BlobStore(tmp_path, 0)
    try:
        assert store.lookup(digest_of(data)) is None
        assert files_in(tmp_path / "tmp") == [] and files_in(tmp_path / "blobs") == []
    finally:
        store.close()
        w.abort()


def test_store_recovery_adopts_verified_orphans_and_drops_the_rest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 0)
    kept, lost, bad = (put(store, d) for d in (b"kept", b"row without file", b"corrupt"))
    store.close()
    orphan = b"renamed into place, row lost in the crash"
    path = tmp_path / "blobs" / "sha256" / digest_of(orphan).hex[:2] / digest_of(orphan).hex
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orphan)
    wrong = b"not what the name says"
    wpath = tmp_path / "blobs" / "sha256" / digest_of(b"x").hex[:2] / digest_of(b"x").hex
    wpath.parent.mkdir(parents=True, exist_ok=True)
    wpath.write_bytes(wrong)
    (tmp_path / "blobs" / "sha256" / "zz").mkdir()
    (tmp_path / "blobs" / "sha256" / "zz" / "junk").write_bytes(b"?")
    (tmp_path / "blobs" / "md5").mkdir()
    (tmp_path / "tmp" / "leftover.part").write_bytes(b"half")
    BlobStore.path_of(store, lost).unlink()
    BlobStore.path_of(store, bad).write_bytes(b"corrupt, and longer than before")

    store = BlobStore(tmp_path, 0)
    try:
        assert store.lookup(kept) is not None
        assert store.lookup(lost) is None and store.lookup(bad) is None
        adopted = store.lookup(digest_of(orphan))
        assert adopted is not None and adopted.media_type is None
        assert store.lookup(digest_of(b"x")) is None
        assert files_in(tmp_path / "blobs") == sorted([store.path_of(kept), path])
        assert files_in(tmp_path / "tmp") == []
        assert store.usage().count == 2
    finally:
        store.close()


def test_store_refetch_restores_an_adopted_media_type(tmp_path: Path) -> None:
    manifest = b'{"schemaVersion":2}'
    path = tmp_path / "blobs" / "sha256" / digest_of(manifest).hex[:2] / digest_of(manifest).hex
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest)
    with BlobStore(tmp_path, 0) as store:
        info = store.lookup(digest_of(manifest))
        assert info is not None and info.media_type is None
        put(store, manifest, MANIFEST)
        info = store.lookup(digest_of(manifest))
        assert info is not None and info.media_type == MANIFEST


def test_store_rejects_a_negative_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path, -1)


def test_store_second_owner_is_refused(tmp_path: Path) -> None:
    with BlobStore(tmp_path, 0), pytest.raises(StoreLocked):
        BlobStore(tmp_path, 0)
    BlobStore(tmp_path, 0).close()  # the lock went with the first owner


# -- eviction ------------------------------------------------------------------------------


def make_full(store: BlobStore, clock: Clock, n: int, size: int) -> list[Digest]:
    out = []
    for i in range(n):
        clock.tick()
        out.append(put(store, bytes([i]) * size))
    return out


def test_store_evicts_least_recently_used(tmp_path: Path, clock: Clock) -> None:
    with BlobStore(tmp_path, 3000, clock=clock) as store:
        a, b, c = make_full(store, clock, 3, 1000)
        clock.tick()
        opened(store, a).close()  # a is now the most recently used
        clock.tick()
        d = put(store, b"d" * 1000)
        assert [store.lookup(x) is not None for x in (a, b, c, d)] == [True, False, True, True]
        assert store.usage().bytes == 3000


def test_store_never_evicts_a_pinned_blob(tmp_path: Path, clock: Clock) -> None:
    with BlobStore(tmp_path, 2000, clock=clock) as store:
        a, b = make_full(store, clock, 2, 1000)
        clock.tick()
        with opened(store, a) as handle, store.pin(b):  # opening a makes b the LRU one
            clock.tick()
            c = put(store, b"c" * 1000)  # nothing evictable but c itself
            assert store.lookup(a) is not None and store.lookup(b) is not None
            assert store.lookup(c) is None
            assert handle.file.read() == bytes([0]) * 1000
        clock.tick()
        c = put(store, b"c" * 1000)
        assert store.lookup(b) is None and store.lookup(a) is not None
        assert store.lookup(c) is not None


def test_store_over_bound_while_pinned_shrinks_on_demand(tmp_path: Path, clock: Clock) -> None:
    with BlobStore(tmp_path, 1000, clock=clock) as store:
        a = put(store, b"a" * 1000)
        with opened(store, a):
            b = put(store, b"b" * 500)
            assert store.lookup(b) is None  # evicted right away: a was pinned
            with store.pin(digest_of(b"c" * 400)):
                c = put(store, b"c" * 400)  # pinned before it even existed
                assert store.usage().bytes == 1400
        assert store.evict() == [a]
        assert store.lookup(c) is not None and store.usage().bytes == 400


def test_store_reserves_expected_size_before_the_first_byte(tmp_path: Path, clock: Clock) -> None:
    with BlobStore(tmp_path, 3000, clock=clock) as store:
        a, b, c = make_full(store, clock, 3, 1000)
        w = store.begin(digest_of(b"big" * 600), 1800, LAYER)
        assert [store.lookup(x) is not None for x in (a, b, c)] == [False, False, True]
        w.abort()


def test_store_refuses_what_can_never_fit(tmp_path: Path) -> None:
    with BlobStore(tmp_path, 1000) as store:
        with pytest.raises(StoreFull):
            store.begin(digest_of(b"x"), 1001, LAYER)
        w = store.begin(digest_of(b"y" * 1001), None, LAYER)
        w.write(b"y" * 1000)
        with pytest.raises(StoreFull):
            w.write(b"y")
        assert files_in(tmp_path / "tmp") == []


@pytest.mark.parametrize("unlimited", [0, None], ids=["zero", "none"])
def test_store_unlimited_never_evicts(tmp_path: Path, unlimited: int | None) -> None:
    with BlobStore(tmp_path, unlimited) as store:
        for i in range(20):
            put(store, bytes([i]) * 10_000)
        assert store.evict() == [] and store.usage().count == 20


def test_store_shrunk_bound_applies_at_open(tmp_path: Path, clock: Clock) -> None:
    with BlobStore(tmp_path, 0, clock=clock) as store:
        make_full(store, clock, 5, 1000)
    with BlobStore(tmp_path, 2500, clock=clock) as store:
        assert store.usage().bytes == 2000


# -- upkeep --------------------------------------------------------------------------------


def test_store_verify_quarantines_corrupted_and_drops_missing(store: BlobStore) -> None:
    good, rotten, gone = (put(store, d) for d in (b"good", b"rotten", b"gone"))
    store.path_of(rotten).write_bytes(b"rotteN")  # same size, different bytes
    store.path_of(gone).unlink()
    seen: list[tuple[int, int]] = []
    report = store.verify(lambda done, total, _d: seen.append((done, total)))
    assert report.bad == [rotten] and report.missing == [gone] and not report.ok
    assert report.checked == 2
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert (store.root / "quarantine" / f"sha256-{rotten.hex}").read_bytes() == b"rotteN"
    assert store.lookup(rotten) is None and store.lookup(good) is not None
    assert store.verify().ok


def test_store_prune_by_age_spares_pinned_and_recent(store: BlobStore, clock: Clock) -> None:
    old, pinned = put(store, b"old"), put(store, b"pinned")
    store.put_tag("docker.io", "library/alpine", "3", old, MANIFEST, clock.now)
    clock.tick(3600)
    recent = put(store, b"recent")
    with store.pin(pinned):
        assert sorted(map(str, store.prune(older_than_s=600))) == [str(old)]
    assert store.lookup(pinned) is not None and store.lookup(recent) is not None
    assert store.get_tag("docker.io", "library/alpine", "3") is None
    assert sorted(map(str, store.prune())) == sorted([str(pinned), str(recent)])
    assert store.usage().count == 0 and files_in(store.root / "blobs") == []


def test_store_is_safe_across_threads(tmp_path: Path) -> None:
    blobs = [os.urandom(2000 + i) for i in range(24)]
    errors: list[BaseException] = []

    def work(chunk: list[bytes]) -> None:
        try:
            for data in chunk:
                digest = put(store, data)
                handle = store.open_blob(digest)
                if handle is not None:
                    with handle:
                        assert handle.file.read() == data
                store.usage()
        except BaseException as e:  # collected and re-raised in the test thread
            errors.append(e)

    with BlobStore(tmp_path, 20_000) as store:
        threads = [threading.Thread(target=work, args=(blobs[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert store.usage().bytes <= 20_000
        assert store.usage().bytes == sum(f.stat().st_size for f in files_in(tmp_path / "blobs"))
        assert store.verify().ok


# -- properties: random sequences of operations keep the store's invariants ---------------

MAX_SIZE = 600


class _PendingWrite:
    """A writer and what the test feeds it: `payload` may differ from the digest's `truth`."""

    def __init__(self, writer: BlobWriter, truth: bytes, payload: bytes, declared: int | None):
        self.writer, self.truth, self.payload, self.declared = writer, truth, payload, declared
        self.pos = 0

    def should_verify(self) -> bool:
        written = self.payload[: self.pos]
        return written == self.truth and self.declared in (None, len(self.truth))


class StoreMachine(RuleBasedStateMachine):
    """Random begin/write/commit/abort/open/close/evict/crash-and-reopen sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="store-machine-"))
        self.clock = Clock()
        self.store = BlobStore(self.dir, MAX_SIZE, clock=self.clock)
        self.writes: list[_PendingWrite] = []
        self.handles: list[tuple[BlobHandle, bytes]] = []
        self.truth: dict[str, bytes] = {}  # every digest ever committed, with its bytes

    def teardown(self) -> None:
        self._crash()
        self.store.close()
        shutil.rmtree(self.dir)

    def _crash(self) -> None:
        """What dies with the process: open files and in-memory writers, never disk state."""
        for handle, _ in self.handles:
            handle.file.close()
        for pending in self.writes:
            os.close(pending.writer._fd)  # no abort: the temp file stays, as after a kill
        self.handles, self.writes = [], []

    @rule(
        truth=st.binary(max_size=300),
        corrupt=st.booleans(),
        declared=st.sampled_from(["exact", "unknown", "too_big", "too_small"]),
    )
    def begin(self, truth: bytes, corrupt: bool, declared: str) -> None:
        payload = truth
        if corrupt:
            payload = bytes([truth[0] ^ 1]) + truth[1:] if truth else b"?"
        size = {"exact": len(truth), "unknown": None, "too_big": len(truth) + 1}.get(
            declared, max(len(truth) - 1, 0)
        )
        writer = self.store.begin(digest_of(truth), size, LAYER)
        self.writes.append(_PendingWrite(writer, truth, payload, size))

    @rule(fill=st.integers(0, 255), size=st.integers(50, 300))
    def put(self, fill: int, size: int) -> None:
        """A whole write in one step, of a size that fills the store and makes it evict."""
        truth = bytes([fill]) * size
        self.clock.tick()
        self.truth[str(put(self.store, truth))] = truth
        self._check_bound()

    @precondition(lambda self: self.writes)
    @rule(data=st.data(), n=st.integers(1, 400))
    def write(self, data: st.DataObject, n: int) -> None:
        pending = data.draw(st.sampled_from(self.writes))
        chunk = pending.payload[pending.pos : pending.pos + n]
        over = pending.declared is not None and pending.pos + len(chunk) > pending.declared
        if over:
            with pytest.raises(SizeMismatch):
                pending.writer.write(chunk)
            self.writes.remove(pending)
            return
        pending.writer.write(chunk)
        pending.pos += len(chunk)

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        pending = data.draw(st.sampled_from(self.writes))
        self.writes.remove(pending)
        if pending.should_verify():
            info = pending.writer.commit()
            self.truth[str(info.digest)] = pending.truth
            self._check_bound()
        else:
            with pytest.raises(DigestMismatch):
                pending.writer.commit()

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        pending = data.draw(st.sampled_from(self.writes))
        self.writes.remove(pending)
        pending.writer.abort()

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def open(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.truth)))
        self.clock.tick()
        handle = self.store.open_blob(parse_digest(key))
        if handle is not None:
            assert handle.file.read() == self.truth[key]
            self.handles.append((handle, self.truth[key]))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.handles) - 1))
        handle, content = self.handles.pop(i)
        handle.file.seek(0)
        assert handle.file.read() == content  # a pinned blob is still readable at the end
        handle.close()

    @rule()
    def evict(self) -> None:
        self.store.evict()
        self._check_bound()

    @rule()
    def crash_and_reopen(self) -> None:
        self._crash()
        self.store.close()
        self.store = BlobStore(self.dir, MAX_SIZE, clock=self.clock)
        assert files_in(self.dir / "tmp") == []

    def _check_bound(self) -> None:
        """After eviction the store fits, unless only pinned blobs are left to evict."""
        reserved = sum(p.declared or 0 for p in self.writes)
        pinned = {str(h.info.digest) for h, _ in self.handles}
        unpinned = [r for r in self.store.list() if str(r.digest) not in pinned]
        assert self.store.usage().bytes + reserved <= MAX_SIZE or not unpinned

    @invariant()
    def files_match_their_names_and_the_index(self) -> None:
        on_disk = {}
        for path in files_in(self.dir / "blobs"):
            digest = parse_digest(f"{path.parent.parent.name}:{path.name}")
            assert digest_of(path.read_bytes(), digest.algorithm) == digest
            on_disk[str(digest)] = path.stat().st_size
        rows = {str(r.digest): r.size for r in self.store.list()}
        assert rows == on_disk
        assert self.store.usage().bytes == sum(on_disk.values())
        assert self.store.usage().count == len(on_disk)

    @invariant()
    def lookups_return_only_whole_committed_blobs(self) -> None:
        for pending in self.writes:
            key = str(pending.writer.digest)
            if key not in self.truth:
                assert self.store.lookup(pending.writer.digest) is None
        for row in self.store.list():
            info = self.store.lookup(row.digest)
            assert info is not None and info.path.read_bytes() == self.truth[str(row.digest)]

    @invariant()
    def pinned_blobs_stay(self) -> None:
        for handle, _ in self.handles:
            assert self.store.lookup(handle.info.digest) is not None

    @invariant()
    def temp_files_belong_to_open_writers(self) -> None:
        live = {p.writer.tmp_path for p in self.writes}
        assert set(files_in(self.dir / "tmp")) == live


StoreMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_store_machine = StoreMachine.TestCase
