"""Per-registry usage (`cache du`) and the offline image view (`explain` with a cache)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oci_images import OCI_LAYER, digest_of, make_image, store_blob

from fwdproxy.cache import BlobRow, BlobStore, ReadOnlyStore
from fwdproxy.cache.image import image_status
from fwdproxy.cache.summary import percent_full, registry_of, summarize
from fwdproxy.proto.manifest import OCI_INDEX, OCI_MANIFEST, Platform

AMD64 = Platform("linux", "amd64")


def row(n: int, size: int, *refs: str) -> BlobRow:
    return BlobRow(digest_of(bytes([n])), size, OCI_LAYER, 0.0, 0.0, 0, tuple(refs))


def test_summary_counts_a_shared_blob_once_in_total_and_under_each_registry() -> None:
    s = summarize(
        [
            row(1, 1000, "docker.io/library/alpine", "ghcr.io/org/app"),
            row(2, 500, "docker.io/library/alpine", "docker.io/library/nginx"),
            row(3, 70, "[::1]:5000/x/y"),
            row(4, 7),
        ]
    )
    assert (s.count, s.bytes) == (4, 1577)
    by = {r.registry: (r.count, r.bytes) for r in s.registries}
    assert by == {"docker.io": (2, 1500), "ghcr.io": (1, 1000), "[::1]:5000": (1, 70)}
    assert [r.registry for r in s.registries] == ["docker.io", "ghcr.io", "[::1]:5000"]
    assert (s.unreferenced.count, s.unreferenced.bytes) == (1, 7)
    assert s.shared
    body = s.as_json(3154)
    assert body["percent_full"] == 50.0 and body["registries"]["ghcr.io"]["bytes"] == 1000
    assert not summarize([row(1, 5, "a.io/x")]).shared


@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**9),
            st.lists(st.sampled_from(["docker.io/a", "docker.io/b", "quay.io/c", "l:5/d"])),
        ),
        max_size=30,
    )
)
def test_summary_properties(items: list[tuple[int, list[str]]]) -> None:
    rows = [row(i % 256, size, *refs) for i, (size, refs) in enumerate(items)]
    s = summarize(rows)
    assert s.bytes == sum(r.size for r in rows) and s.count == len(rows)
    for r in s.registries:
        mine = [x for x in rows if any(registry_of(ref) == r.registry for ref in x.refs)]
        assert (r.count, r.bytes) == (len(mine), sum(x.size for x in mine))
        assert r.bytes <= s.bytes
    assert s.unreferenced.count == sum(1 for x in rows if not x.refs)


def test_percent_full() -> None:
    assert percent_full(5, None) is None and percent_full(5, 0) is None
    assert percent_full(1, 3) == 33.3


# -- image status ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    with BlobStore(tmp_path, 0) as s:
        yield s


def test_image_status_walks_tag_index_platform_and_blobs(store: BlobStore) -> None:
    img = make_image("alpine")
    amd = img.platforms["linux/amd64"]
    store_blob(store, img.index, OCI_INDEX)
    store_blob(store, amd.manifest, OCI_MANIFEST)
    store_blob(store, amd.config, "application/vnd.oci.image.config.v1+json")
    store_blob(store, amd.layers[1], OCI_LAYER)
    store.put_tag("docker.io", "library/alpine", "3", img.digest, OCI_INDEX, 100.0)
    with ReadOnlyStore(store.root) as view:
        st_ = image_status(
            view, "docker.io", "library/alpine", tag="3", digest=None, platform=AMD64
        )
    assert st_.problem is None
    assert st_.tag is not None and st_.tag.fetched_at == 100.0
    assert (st_.top, st_.top_media_type, st_.top_cached) == (img.digest, OCI_INDEX, True)
    assert (st_.platform, st_.manifest, st_.manifest_cached) == ("linux/amd64", amd.digest, True)
    assert [(b.role, b.cached) for b in st_.blobs] == [
        ("config", True),
        ("layer", False),
        ("layer", True),
    ]
    assert (st_.layers_cached, len(st_.layers)) == (1, 2)
    assert (st_.layer_bytes_cached, st_.layer_bytes) == (1500, 4500)


def test_image_status_says_which_step_is_missing(store: BlobStore) -> None:
    img = make_image("app", platforms=("linux/arm64",))
    with ReadOnlyStore(store.root) as view:
        st_ = image_status(view, "ghcr.io", "o/app", tag="1", digest=None, platform=AMD64)
        assert st_.problem is not None and "tag not cached" in st_.problem
        store.put_tag("ghcr.io", "o/app", "1", img.digest, OCI_INDEX)
        st_ = image_status(view, "ghcr.io", "o/app", tag="1", digest=None, platform=AMD64)
        assert st_.problem == f"manifest {img.digest} not cached" and not st_.top_cached
        store_blob(store, img.index, OCI_INDEX)
        st_ = image_status(view, "ghcr.io", "o/app", tag="1", digest=None, platform=AMD64)
        assert st_.problem == "the index has no linux/amd64 manifest (has: linux/arm64)"
        arm = Platform("linux", "arm64")
        st_ = image_status(view, "ghcr.io", "o/app", tag="1", digest=None, platform=arm)
        assert st_.problem == f"manifest {img.platforms['linux/arm64'].digest} not cached"
        assert st_.top_cached and not st_.manifest_cached
        # A digest reference skips the tag table altogether.
        man = img.platforms["linux/arm64"]
        store_blob(store, man.manifest, OCI_MANIFEST)
        st_ = image_status(view, "ghcr.io", "o/app", tag=None, digest=man.digest, platform=arm)
        assert st_.problem is None and st_.platform is None and st_.tag is None
        assert st_.manifest == man.digest and st_.layers_cached == 0
        # A corrupted manifest file is reported, not parsed.
        store.path_of(man.digest).write_bytes(man.manifest.replace(b"2", b"3", 1))
        st_ = image_status(view, "ghcr.io", "o/app", tag=None, digest=man.digest, platform=arm)
        assert st_.problem is not None and "corrupt" in st_.problem


def test_image_status_reports_an_unparsable_manifest(store: BlobStore) -> None:
    bad = json.dumps({"schemaVersion": 1, "name": "x"}).encode()
    d = store_blob(store, bad, OCI_MANIFEST)
    with ReadOnlyStore(store.root) as view:
        st_ = image_status(view, "docker.io", "x/y", tag=None, digest=d, platform=AMD64)
    assert st_.problem is not None and "does not parse" in st_.problem
