"""ReadOnlyStore: a view of a store that another process owns; it must never change it."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fwdproxy.cache import (
    BlobStore,
    DigestMismatch,
    ReadOnlyStore,
    StoreLocked,
    StoreUnreadable,
)
from fwdproxy.cache.index import BUSY_TIMEOUT_S, Index
from fwdproxy.proto.digest import Digest, parse_digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> Digest:
    return parse_digest(f"sha256:{hashlib.sha256(data).hexdigest()}")


def put(store: BlobStore, data: bytes, media_type: str = LAYER) -> Digest:
    digest = digest_of(data)
    w = store.begin(digest, len(data), media_type)
    w.write(data)
    w.commit()
    return digest


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[BlobStore]:
    s = BlobStore(tmp_path / "cache", 0, clock=Clock())
    yield s
    s.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """(inode, mtime_ns, size, sha256) of every file but SQLite's shared-memory index."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith("-shm"):
            st_ = path.stat()
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (st_.st_ino, st_.st_mtime_ns, st_.st_size, sha)
    return out


def read_everything(view: ReadOnlyStore) -> None:
    for row in view.list():
        view.lookup(row.digest)
        view.read_bytes(row.digest, 1 << 20)
    view.usage()
    view.tags()
    view.get_tag("docker.io", "library/alpine", "latest")


def test_readonly_works_while_the_owner_holds_the_lock(owner: BlobStore) -> None:
    manifest = b'{"schemaVersion":2}'
    layer = put(owner, b"layer bytes")
    man = put(owner, manifest, MANIFEST)
    owner.add_ref(layer, "docker.io", "library/alpine")
    owner.put_tag("docker.io", "library/alpine", "latest", man, MANIFEST, 123.0)
    with pytest.raises(StoreLocked):
        BlobStore(owner.root, 0)  # the owner really holds it
    with ReadOnlyStore(owner.root) as view:
        assert view.list() == owner.list()
        assert view.usage() == owner.usage()
        assert view.tags() == owner.tags()
        assert view.get_tag("docker.io", "library/alpine", "latest") == owner.get_tag(
            "docker.io", "library/alpine", "latest"
        )
        assert view.lookup(layer) == owner.lookup(layer)
        assert view.lookup(digest_of(b"never stored")) is None
        assert view.read_bytes(man, 1000) == manifest
        # A live view: what the owner commits later is visible without reopening.
        later = put(owner, b"committed after the view opened")
        assert view.lookup(later) is not None
        assert view.list() == owner.list()
        owner.prune()
        assert view.list() == [] and view.usage().count == 0


def test_readonly_never_writes_beside_a_live_owner(owner: BlobStore) -> None:
    for i in range(5):
        put(owner, bytes([i]) * 100)
    owner.put_tag("docker.io", "library/alpine", "latest", digest_of(bytes([0]) * 100), MANIFEST)
    before = snapshot(owner.root)
    with ReadOnlyStore(owner.root) as view:
        read_everything(view)
    assert snapshot(owner.root) == before


def test_readonly_never_writes_a_closed_store(tmp_path: Path) -> None:
    with BlobStore(tmp_path, 0) as s:
        put(s, b"one")
        put(s, b"two", MANIFEST)
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.endswith("-wal")}
    with ReadOnlyStore(tmp_path) as view:
        read_everything(view)
        assert view.usage().count == 2
    after = snapshot(tmp_path)
    # SQLite may create an empty -wal beside a WAL database nobody has open; nothing else.
    assert all(v[2] == 0 for k, v in after.items() if k.endswith("-wal"))
    assert {k: v for k, v in after.items() if not k.endswith("-wal")} == before
    with BlobStore(tmp_path, 0) as s:  # and the owner opens it as before
        assert s.usage().count == 2


def test_readonly_index_refuses_writes(owner: BlobStore) -> None:
    index = Index(owner.root / "index.sqlite", readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            index.insert("sha256:" + "0" * 64, 1, LAYER, 1.0)
    finally:
        index.close()


def test_readonly_and_owner_wait_out_a_busy_database(owner: BlobStore) -> None:
    view = Index(owner.root / "index.sqlite", readonly=True)
    try:
        for db in (view._db, owner._index._db):
            assert db.execute("PRAGMA busy_timeout").fetchone()[0] == int(BUSY_TIMEOUT_S * 1000)
    finally:
        view.close()


def test_readonly_reads_while_another_thread_writes(owner: BlobStore) -> None:
    """A writer committing as fast as it can never makes the viewer fail or see half a row."""
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(200):
                d = put(owner, i.to_bytes(4, "big") * 50)
                owner.add_ref(d, "docker.io", f"r/{i % 3}")
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    with ReadOnlyStore(owner.root) as view:
        while not done.is_set():
            rows = view.list()
            assert all(r.size == 200 for r in rows)
            assert view.usage().count >= len(rows)
    t.join(timeout=60)
    assert errors == []
    with ReadOnlyStore(owner.root) as view:
        assert view.list() == owner.list()


def test_readonly_read_bytes_checks_the_digest_and_limit(owner: BlobStore) -> None:
    good = put(owner, b'{"a": 1}', MANIFEST)
    big = put(owner, b"x" * 5000)
    with ReadOnlyStore(owner.root) as view:
        assert view.read_bytes(good, 100) == b'{"a": 1}'
        with pytest.raises(DigestMismatch):
            view.read_bytes(big, 1000)
        owner.path_of(good).write_bytes(b'{"a": 2}')
        with pytest.raises(DigestMismatch):
            view.read_bytes(good, 100)
        owner.path_of(good).unlink()
        assert view.lookup(good) is None and view.read_bytes(good, 100) is None
    assert owner.lookup(big) is not None  # the view repaired nothing, reported nothing back


def test_readonly_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreUnreadable, match=r"no index\.sqlite"):
        ReadOnlyStore(tmp_path / "nowhere")
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database, just text" * 10)
    with pytest.raises(StoreUnreadable):
        ReadOnlyStore(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "index.sqlite").execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(StoreUnreadable, match="no such table"):
        ReadOnlyStore(other)
    assert not (tmp_path / "nowhere").exists()


def test_lock_file_names_the_owner(owner: BlobStore) -> None:
    assert (owner.root / "lock").read_text().strip() == str(os.getpid())
    with pytest.raises(StoreLocked) as info:
        BlobStore(owner.root, 0)
    assert info.value.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(info.value)
    # The refused opener did not clear the owner's pid.
    assert (owner.root / "lock").read_text().strip() == str(os.getpid())


# -- property: the view lists exactly what the owner lists, after any sequence ---------------


class ViewMachine(RuleBasedStateMachine):
    """Random commits, failed writes, refs, tags, reads, prunes and reopenings of the owner,
    with one view open throughout: after every step it agrees with the owner."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="view-machine-"))
        self.clock = Clock()
        self.store = BlobStore(self.dir, 2000, clock=self.clock)
        self.view = ReadOnlyStore(self.dir)
        self.committed: list[Digest] = []

    def teardown(self) -> None:
        self.view.close()
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(data=st.binary(max_size=400), media=st.sampled_from([LAYER, MANIFEST, None]))
    def put(self, data: bytes, media: str | None) -> None:
        self.clock.now += 1
        digest = digest_of(data)
        w = self.store.begin(digest, len(data), media)
        w.write(data)
        w.commit()
        self.committed.append(digest)

    @rule(data=st.binary(min_size=1, max_size=100))
    def failed_write(self, data: bytes) -> None:
        w = self.store.begin(digest_of(data), len(data), LAYER)
        w.write(bytes([data[0] ^ 1]) + data[1:])
        with pytest.raises(DigestMismatch):
            w.commit()

    @precondition(lambda self: self.committed)
    @rule(data=st.data(), registry=st.sampled_from(["docker.io", "ghcr.io", "[::1]:5000"]))
    def ref(self, data: st.DataObject, registry: str) -> None:
        digest = data.draw(st.sampled_from(self.committed))
        self.store.add_ref(digest, registry, data.draw(st.sampled_from(["a/b", "library/x"])))

    @precondition(lambda self: self.committed)
    @rule(data=st.data(), tag=st.sampled_from(["latest", "1", "2.0"]))
    def tag(self, data: st.DataObject, tag: str) -> None:
        self.clock.now += 1
        digest = data.draw(st.sampled_from(self.committed))
        self.store.put_tag("docker.io", "library/x", tag, digest, MANIFEST)

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        self.clock.now += 1
        handle = self.store.open_blob(data.draw(st.sampled_from(self.committed)))
        if handle is not None:
            handle.close()

    @rule(age=st.sampled_from([None, 0.5, 3.0, 100.0]))
    def prune(self, age: float | None) -> None:
        self.store.prune(older_than_s=age)

    @rule()
    def reopen_owner(self) -> None:
        self.store.close()
        self.store = BlobStore(self.dir, 2000, clock=self.clock)

    @invariant()
    def view_agrees_with_owner(self) -> None:
        assert self.view.list() == self.store.list()
        assert self.view.usage() == self.store.usage()
        assert self.view.tags() == self.store.tags()
        for digest in self.committed[-5:]:
            assert self.view.lookup(digest) == self.store.lookup(digest)


ViewMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_view_machine = ViewMachine.TestCase
