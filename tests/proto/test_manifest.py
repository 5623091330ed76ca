"""Manifest and index parsing, platform selection and Accept negotiation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.proto.digest import parse_digest
from fwdproxy.proto.manifest import (
    DEFAULT_ACCEPT,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    accept_header,
    accepts,
    parse_accept,
    parse_manifest,
    select_platform,
)
from fwdproxy.proto.oci import OCIError


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def desc(media_type: str, n: int, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": dg(n), "size": size, **extra}


DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

SCHEMA2 = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": desc(DOCKER_CONFIG, 1, 1472),
    "layers": [desc(DOCKER_LAYER, 2, 3623807), desc(DOCKER_LAYER, 3, 100)],
}
OCI_IMAGE = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "artifactType": "application/vnd.example+type",
    "config": desc(OCI_CONFIG, 4, 2, annotations={"a": "b"}),
    "layers": [desc(OCI_LAYER, 5, 10, urls=["https://example.com/layer"])],
    "subject": desc(OCI_MANIFEST, 6, 7),
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    "x-unknown-field": [1, {"nested": True}],
}
PLATFORMS = [
    ("amd64", "linux", ""),
    ("arm", "linux", "v6"),
    ("arm", "linux", "v7"),
    ("arm64", "linux", "v8"),
    ("ppc64le", "linux", ""),
    ("amd64", "windows", ""),
]
OCI_INDEX_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        desc(OCI_MANIFEST, 10 + i, 500, platform={"architecture": a, "os": o, "variant": v})
        for i, (a, o, v) in enumerate(PLATFORMS)
    ]
    + [desc(OCI_MANIFEST, 99, 840, platform={"architecture": "unknown", "os": "unknown"})],
}
DOCKER_LIST = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST_LIST,
    "manifests": [
        desc(DOCKER_MANIFEST, 20, 528, platform={"architecture": "amd64", "os": "linux"}),
        desc(
            DOCKER_MANIFEST,
            21,
            528,
            platform={"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1"},
        ),
    ],
}


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_docker_schema2_manifest() -> None:
    m = parse_manifest(body(SCHEMA2), DOCKER_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.media_type == DOCKER_MANIFEST
    assert m.config == Descriptor(DOCKER_CONFIG, parse_digest(dg(1)), 1472)
    assert [d.size for d in m.layers] == [3623807, 100]
    assert [str(d.digest) for d in m.blobs()] == [dg(1), dg(2), dg(3)]


def test_oci_manifest_tolerates_unknown_fields_and_annotations() -> None:
    m = parse_manifest(body(OCI_IMAGE), f"{OCI_MANIFEST}; charset=utf-8")
    assert isinstance(m, Manifest)
    assert [str(d.digest) for d in m.blobs()] == [dg(4), dg(5)]


def test_oci_index_with_platforms() -> None:
    idx = parse_manifest(body(OCI_INDEX_DOC), OCI_INDEX)
    assert isinstance(idx, Index)
    assert len(idx.manifests) == 7
    assert idx.manifests[2].platform == Platform("linux", "arm", "v7")


def test_docker_manifest_list_with_os_version() -> None:
    idx = parse_manifest(body(DOCKER_LIST), DOCKER_MANIFEST_LIST)
    assert isinstance(idx, Index)
    assert idx.manifests[1].platform == Platform("windows", "amd64", "", "10.0.17763.1")


@pytest.mark.parametrize(
    ("doc", "header", "expected"),
    [
        ({k: v for k, v in OCI_IMAGE.items() if k != "mediaType"}, OCI_MANIFEST, OCI_MANIFEST),
        ({k: v for k, v in OCI_IMAGE.items() if k != "mediaType"}, None, OCI_MANIFEST),
        ({k: v for k, v in OCI_INDEX_DOC.items() if k != "mediaType"}, None, OCI_INDEX),
        (SCHEMA2, "application/json", DOCKER_MANIFEST),
        (SCHEMA2, None, DOCKER_MANIFEST),
        (DOCKER_LIST, "application/octet-stream", DOCKER_MANIFEST_LIST),
    ],
    ids=["oci-no-mediatype", "oci-no-types", "index-no-types", "json-header", "no-header", "octet"],
)
def test_media_type_from_header_or_body(doc: object, header: str | None, expected: str) -> None:
    assert parse_manifest(body(doc), header).media_type == expected


BAD = [
    ("mismatch", SCHEMA2, OCI_MANIFEST, "MANIFEST_INVALID"),
    ("unknown-type", SCHEMA2, "application/vnd.foo+json", "UNSUPPORTED"),
    ("unknown-json-type", {**SCHEMA2, "mediaType": "text/x"}, None, "UNSUPPORTED"),
    ("schema1-header", SCHEMA2, "application/vnd.docker.distribution.manifest.v1+prettyjws",
     "UNSUPPORTED"),
    ("schema1-body", {"schemaVersion": 1, "name": "x", "fsLayers": []}, "application/json",
     "UNSUPPORTED"),
    ("schema-3", {**SCHEMA2, "schemaVersion": 3}, None, "MANIFEST_INVALID"),
    ("schema-float", {**SCHEMA2, "schemaVersion": 2.0}, None, "MANIFEST_INVALID"),
    ("schema-true", {**SCHEMA2, "schemaVersion": True}, None, "MANIFEST_INVALID"),
    ("no-schema", {k: v for k, v in SCHEMA2.items() if k != "schemaVersion"}, None,
     "MANIFEST_INVALID"),
    ("not-object", [1, 2], None, "MANIFEST_INVALID"),
    ("no-config", {k: v for k, v in SCHEMA2.items() if k != "config"}, None, "MANIFEST_INVALID"),
    ("layers-not-list", {**SCHEMA2, "layers": {}}, None, "MANIFEST_INVALID"),
    ("layer-not-object", {**SCHEMA2, "layers": ["x"]}, None, "MANIFEST_INVALID"),
    ("bad-digest", {**SCHEMA2, "config": {**desc(DOCKER_CONFIG, 1, 1), "digest": "sha256:AB"}},
     None, "DIGEST_INVALID"),
    ("digest-not-str", {**SCHEMA2, "config": {**desc(DOCKER_CONFIG, 1, 1), "digest": 5}}, None,
     "MANIFEST_INVALID"),
    ("size-negative", {**SCHEMA2, "config": desc(DOCKER_CONFIG, 1, -1)}, None, "SIZE_INVALID"),
    ("size-float", {**SCHEMA2, "config": desc(DOCKER_CONFIG, 1, 1.5)}, None, "SIZE_INVALID"),
    ("size-bool", {**SCHEMA2, "config": desc(DOCKER_CONFIG, 1, True)}, None, "SIZE_INVALID"),
    ("size-huge", {**SCHEMA2, "config": desc(DOCKER_CONFIG, 1, 2**63)}, None, "SIZE_INVALID"),
    ("size-missing", {**SCHEMA2, "config": {"mediaType": DOCKER_CONFIG, "digest": dg(1)}}, None,
     "SIZE_INVALID"),
    ("bad-media-type", {**SCHEMA2, "config": desc("no slash", 1, 1)}, None, "MANIFEST_INVALID"),
    ("platform-not-object", {**DOCKER_LIST, "manifests": [desc(DOCKER_MANIFEST, 1, 1,
     platform=[])]}, None, "MANIFEST_INVALID"),
    ("platform-no-os", {**DOCKER_LIST, "manifests": [desc(DOCKER_MANIFEST, 1, 1,
     platform={"architecture": "amd64"})]}, None, "MANIFEST_INVALID"),
    ("ambiguous", {"schemaVersion": 2, "manifests": [], "layers": []}, None, "MANIFEST_INVALID"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "header", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifests_raise_typed_errors(doc: object, header: str | None, code: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_manifest(body(doc), header)
    assert info.value.code == code


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe{}",
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"schemaVersion": 2, "schemaVersion": 2}',
        b'{"schemaVersion": 2, "size": ' + b"9" * 5000 + b"}",
        b"NaN",
    ],
    ids=["empty", "utf16-bom", "deep-open", "deep", "duplicate-key", "huge-int", "nan"],
)
def test_malformed_json_is_manifest_invalid(raw: bytes) -> None:
    with pytest.raises(OCIError) as info:
        parse_manifest(raw, DOCKER_MANIFEST)
    assert info.value.code == "MANIFEST_INVALID"


def test_size_bound() -> None:
    padded = body({**SCHEMA2, "pad": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(OCIError, match="larger than"):
        parse_manifest(padded, DOCKER_MANIFEST)


@given(st.binary(max_size=600), st.one_of(st.none(), st.text(max_size=60)))
def test_parse_manifest_raises_only_oci_errors_on_bytes(raw: bytes, header: str | None) -> None:
    try:
        parse_manifest(raw, header)
    except OCIError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.sampled_from([1, 2, 2.0, "2", None]),
        "mediaType": st.sampled_from([DOCKER_MANIFEST, OCI_INDEX, "x", 3]),
        "config": st.one_of(JSON, st.just(desc(OCI_CONFIG, 1, 1))),
        "layers": st.one_of(JSON, st.lists(st.just(desc(OCI_LAYER, 2, 2)), max_size=2)),
        "manifests": st.one_of(JSON, st.lists(st.just(desc(OCI_MANIFEST, 3, 3)), max_size=2)),
    },
)


@given(FIELDS, st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, "application/json"]))
def test_parse_manifest_raises_only_oci_errors_on_json(
    doc: dict[str, Any], header: str | None
) -> None:
    try:
        result = parse_manifest(body(doc), header)
    except OCIError:
        return
    assert isinstance(result, (Manifest, Index))


# ---------------------------------------------------------------------------------------------
# Platform selection

INDEX = parse_manifest(body(OCI_INDEX_DOC), OCI_INDEX)
assert isinstance(INDEX, Index)


@pytest.mark.parametrize(
    ("os", "arch", "variant", "digest_n"),
    [
        ("linux", "amd64", "", 10),
        ("linux", "x86_64", "", 10),
        ("Linux", "AMD64", "", 10),
        ("linux", "arm64", "", 13),
        ("linux", "aarch64", "v8", 13),
        ("linux", "arm", "", 12),
        ("linux", "arm", "v7", 12),
        ("linux", "arm", "v6", 11),
        ("linux", "arm", "v5", None),
        ("windows", "amd64", "", 15),
        ("linux", "s390x", "", None),
        ("unknown", "unknown", "", 99),
    ],
)
def test_select_platform(os: str, arch: str, variant: str, digest_n: int | None) -> None:
    got = select_platform(INDEX, os, arch, variant)
    assert (None if got is None else str(got.digest)) == (
        None if digest_n is None else dg(digest_n)
    )


def test_select_platform_arm_v7_falls_back_to_v6() -> None:
    only_v6 = Index(
        OCI_INDEX, tuple(d for d in INDEX.manifests if d.platform != Platform("linux", "arm", "v7"))
    )
    got = select_platform(only_v6, "linux", "arm", "v7")
    assert got is not None and got.platform == Platform("linux", "arm", "v6")


def test_select_platform_skips_entries_without_platform() -> None:
    bare = parse_manifest(body({"schemaVersion": 2, "manifests": [desc(OCI_MANIFEST, 1, 1)]}))
    assert isinstance(bare, Index)
    assert select_platform(bare, "linux", "amd64") is None


# ---------------------------------------------------------------------------------------------
# Accept


def test_parse_accept_merges_lines_and_drops_params_and_q0() -> None:
    docker_lines = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST]
    containerd = [", ".join([*DEFAULT_ACCEPT, "*/*"])]
    assert parse_accept(docker_lines) == frozenset(DEFAULT_ACCEPT)
    assert parse_accept(containerd) == frozenset([*DEFAULT_ACCEPT, "*/*"])
    assert parse_accept([f"{OCI_INDEX}; q=0", f"{OCI_MANIFEST};q=0.5", ", ,"]) == {OCI_MANIFEST}
    assert parse_accept([]) == frozenset()


def test_accepts_wildcards() -> None:
    assert accepts(frozenset(), OCI_INDEX)
    assert accepts(frozenset({"*/*"}), OCI_INDEX)
    assert accepts(frozenset({"application/*"}), OCI_INDEX)
    assert accepts(frozenset({OCI_INDEX}), OCI_INDEX.upper())
    assert not accepts(frozenset({DOCKER_MANIFEST}), OCI_INDEX)


def test_accept_header_defaults_when_client_sent_none() -> None:
    assert accept_header() == ", ".join(DEFAULT_ACCEPT)
    assert "*/*" not in accept_header()
    assert accept_header(frozenset({OCI_MANIFEST})) == OCI_MANIFEST


@given(st.lists(st.text(max_size=40), max_size=5))
def test_parse_accept_never_raises(values: list[str]) -> None:
    for media_type in parse_accept(values):
        assert media_type == media_type.strip().lower() and ";" not in media_type
