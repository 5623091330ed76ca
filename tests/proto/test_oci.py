"""Mirror request routing, names and errors, checked against what runtimes send (mirrors.md)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.proto.digest import Digest, parse_digest
from fwdproxy.proto.oci import (
    ERROR_STATUS,
    NAME_RE,
    TAG_RE,
    Addressing,
    MirrorRequest,
    OCIError,
    Registry,
    RequestKind,
    Tag,
    error_body,
    parse_mirror_request,
    parse_reference,
    parse_registry,
    parse_tag,
    validate_name,
)
from fwdproxy.routing.imageref import REPOSITORY_RE, parse_image_ref

HEX = "0123456789abcdef" * 4
DGST = f"sha256:{HEX}"
HUB = Registry("docker.io", "registry-1.docker.io")
PREFIXES = {"dockerhub": "docker.io", "mirrors/ghcr": "ghcr.io"}

# (id, method, path, query, prefixes, kind, registry, api_host, repository, reference, addressing)
FLAVOURS = [
    # containerd hosts.toml (certs.d/<registry> or _default): ?ns= on every manifest/blob request
    ("ctrd-hub-resolve", "HEAD", "/v2/library/alpine/manifests/latest", "ns=docker.io", None,
     RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "latest", "ns"),
    ("ctrd-hub-blob", "GET", f"/v2/library/alpine/blobs/{DGST}", "ns=docker.io", None,
     RequestKind.BLOB, "docker.io", "registry-1.docker.io", "library/alpine", DGST, "ns"),
    ("ctrd-hub-manifest-digest", "GET", f"/v2/library/alpine/manifests/{DGST}", "ns=docker.io",
     None, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", DGST, "ns"),
    ("ctrd-quay", "HEAD", "/v2/kiwigrid/k8s-sidecar/manifests/1.25.1", "ns=quay.io", None,
     RequestKind.MANIFEST, "quay.io", "quay.io", "kiwigrid/k8s-sidecar", "1.25.1", "ns"),
    ("ctrd-ghcr", "GET", f"/v2/org/tool/blobs/{DGST}", "ns=ghcr.io", None,
     RequestKind.BLOB, "ghcr.io", "ghcr.io", "org/tool", DGST, "ns"),
    ("ctrd-k8s", "HEAD", "/v2/pause/manifests/3.9", "ns=registry.k8s.io", None,
     RequestKind.MANIFEST, "registry.k8s.io", "registry.k8s.io", "pause", "3.9", "ns"),
    ("ctrd-port-encoded", "HEAD", "/v2/app/manifests/1", "ns=myreg.io%3A5000", None,
     RequestKind.MANIFEST, "myreg.io:5000", "myreg.io:5000", "app", "1", "ns"),
    ("ctrd-port-plain", "HEAD", "/v2/app/manifests/1", "ns=myreg.io:5000", None,
     RequestKind.MANIFEST, "myreg.io:5000", "myreg.io:5000", "app", "1", "ns"),
    ("ctrd-localhost", "HEAD", "/v2/app/manifests/1", "ns=localhost%3A5000", None,
     RequestKind.MANIFEST, "localhost:5000", "localhost:5000", "app", "1", "ns"),
    ("ctrd-existing-query", "HEAD", "/v2/library/alpine/manifests/latest", "aaa=123&ns=docker.io",
     None, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "latest",
     "ns"),
    ("ctrd-index-alias", "HEAD", "/v2/library/alpine/manifests/latest", "ns=index.docker.io",
     None, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "latest",
     "ns"),
    ("ctrd-host-path", "HEAD", "/dockerhub/v2/library/alpine/manifests/latest", "ns=docker.io",
     PREFIXES, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine",
     "latest", "ns"),
    ("ctrd-override-path", "HEAD", "/v2/dockerhub/library/alpine/manifests/latest",
     "ns=docker.io", PREFIXES, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io",
     "library/alpine", "latest", "ns"),
    # k3s registries.yaml: plain endpoints are containerd's; endpoints with a path: no /v2
    ("k3s-star", "HEAD", "/v2/org/app/manifests/v1", "ns=quay.io", None,
     RequestKind.MANIFEST, "quay.io", "quay.io", "org/app", "v1", "ns"),
    ("k3s-path-endpoint", "HEAD", "/dockerhub/library/alpine/manifests/latest", "ns=docker.io",
     PREFIXES, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine",
     "latest", "ns"),
    ("k3s-path-endpoint-v2", "GET", f"/dockerhub/v2/library/alpine/blobs/{DGST}", "ns=docker.io",
     PREFIXES, RequestKind.BLOB, "docker.io", "registry-1.docker.io", "library/alpine", DGST,
     "ns"),
    # Docker registry-mirrors (classic store): no ns, Docker Hub only, library/ already there
    ("docker-ping", "GET", "/v2/", "", None,
     RequestKind.PING, "docker.io", "registry-1.docker.io", None, None, "default"),
    ("docker-manifest", "HEAD", "/v2/library/alpine/manifests/latest", "", None,
     RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "latest",
     "default"),
    ("docker-user-repo", "GET", "/v2/bitnami/redis/manifests/7.2", "", None,
     RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "bitnami/redis", "7.2",
     "default"),
    ("docker-blob", "GET", f"/v2/library/alpine/blobs/{DGST}", "", None,
     RequestKind.BLOB, "docker.io", "registry-1.docker.io", "library/alpine", DGST, "default"),
    ("docker25-path-ping", "GET", "/dockerhub/v2/", "", PREFIXES,
     RequestKind.PING, "docker.io", "registry-1.docker.io", None, None, "prefix"),
    ("docker25-path", "HEAD", "/dockerhub/v2/library/alpine/manifests/latest", "", PREFIXES,
     RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "latest",
     "prefix"),
    ("buildkit-path", "HEAD", "/v2/dockerhub/library/alpine/manifests/latest", "ns=docker.io",
     PREFIXES, RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine",
     "latest", "ns"),
    # podman / CRI-O / skopeo registries.conf: the registry is the first path component
    ("podman-ping", "GET", "/v2/", "", None,
     RequestKind.PING, "docker.io", "registry-1.docker.io", None, None, "default"),
    ("podman-hub", "GET", "/v2/docker.io/library/alpine/manifests/3", "", None,
     RequestKind.MANIFEST, "docker.io", "registry-1.docker.io", "library/alpine", "3",
     "path-registry"),
    ("podman-quay", "GET", "/v2/quay.io/org/app/manifests/1", "", None,
     RequestKind.MANIFEST, "quay.io", "quay.io", "org/app", "1", "path-registry"),
    ("podman-k8s-blob", "GET", f"/v2/registry.k8s.io/pause/blobs/{DGST}", "", None,
     RequestKind.BLOB, "registry.k8s.io", "registry.k8s.io", "pause", DGST, "path-registry"),
    ("podman-port", "GET", "/v2/localhost:5000/app/manifests/1", "", None,
     RequestKind.MANIFEST, "localhost:5000", "localhost:5000", "app", "1", "path-registry"),
    ("podman-localhost", "GET", "/v2/localhost/app/manifests/1", "", None,
     RequestKind.MANIFEST, "localhost", "localhost", "app", "1", "path-registry"),
    ("podman-ipv6", "GET", "/v2/[::1]:5000/app/manifests/1", "", None,
     RequestKind.MANIFEST, "[::1]:5000", "[::1]:5000", "app", "1", "path-registry"),
    ("podman-configured-prefix", "GET", "/v2/mirrors/ghcr/org/tool/manifests/1", "", PREFIXES,
     RequestKind.MANIFEST, "ghcr.io", "ghcr.io", "org/tool", "1", "prefix"),
    ("podman-encoded-colon", "GET", "/v2/library/alpine/blobs/sha256%3A" + HEX, "", None,
     RequestKind.BLOB, "docker.io", "registry-1.docker.io", "library/alpine", DGST, "default"),
    # ns and a registry-host first component together
    ("ns-and-same-host", "GET", "/v2/quay.io/org/app/manifests/1", "ns=quay.io", None,
     RequestKind.MANIFEST, "quay.io", "quay.io", "org/app", "1", "ns"),
    ("ns-and-other-dotted", "GET", "/v2/team.a/app/manifests/1", "ns=harbor.example", None,
     RequestKind.MANIFEST, "harbor.example", "harbor.example", "team.a/app", "1", "ns"),
    # tags list
    ("tags-list", "GET", "/v2/library/alpine/tags/list", "ns=docker.io", None,
     RequestKind.TAGS_LIST, "docker.io", "registry-1.docker.io", "library/alpine", None, "ns"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "query", "prefixes", "kind", "registry", "api_host", "repository",
     "reference", "addressing"),
    [case[1:] for case in FLAVOURS],
    ids=[case[0] for case in FLAVOURS],
)  # fmt: skip
def test_parse_mirror_request_client_flavours(
    method: str,
    path: str,
    query: str,
    prefixes: dict[str, str] | None,
    kind: RequestKind,
    registry: str,
    api_host: str,
    repository: str | None,
    reference: str | None,
    addressing: str,
) -> None:
    req = parse_mirror_request(method, path, query, prefixes=prefixes)
    assert req.kind is kind
    assert req.method == method
    assert req.registry == Registry(registry, api_host)
    assert req.repository == repository
    assert (None if req.reference is None else str(req.reference)) == reference
    assert req.addressing is Addressing(addressing)


def test_mirror_request_upstream_path_and_name() -> None:
    req = parse_mirror_request("HEAD", "/v2/library/alpine/manifests/latest", "ns=docker.io")
    assert req.upstream_path == "/v2/library/alpine/manifests/latest"
    assert req.name == "docker.io/library/alpine"
    assert isinstance(req.reference, Tag)
    assert req.describe() == "manifest docker.io/library/alpine:latest via ns"
    blob = parse_mirror_request("GET", f"/v2/quay.io/a/b/blobs/{DGST}")
    assert blob.upstream_path == f"/v2/a/b/blobs/{DGST}"
    assert isinstance(blob.reference, Digest)
    assert blob.describe() == f"blob quay.io/a/b@{DGST} via path-registry"
    ping = parse_mirror_request("GET", "/dockerhub/v2/", prefixes=PREFIXES)
    assert ping.upstream_path == "/v2/"
    assert ping.name is None
    assert ping.describe() == "ping docker.io via prefix /dockerhub"
    both = parse_mirror_request(
        "GET", "/v2/dockerhub/library/alpine/manifests/3", "ns=docker.io", prefixes=PREFIXES
    )
    assert both.describe() == "manifest docker.io/library/alpine:3 via ns, prefix /dockerhub"


def test_mirror_request_forwards_only_validated_query() -> None:
    tags = parse_mirror_request("GET", "/v2/a/tags/list", "n=010&last=v1.2&x=y&ns=quay.io")
    assert tags.upstream_query == "n=10&last=v1.2"
    assert tags.upstream_path == "/v2/a/tags/list"
    ref = parse_mirror_request(
        "GET", f"/v2/a/referrers/{DGST}", "artifactType=application%2Fvnd.x%2Bjson"
    )
    assert ref.kind is RequestKind.REFERRERS
    assert ref.upstream_query == "artifactType=application%2Fvnd.x%2Bjson"
    manifest = parse_mirror_request("GET", "/v2/a/manifests/1", "ns=quay.io&foo=bar")
    assert manifest.upstream_query == ""


def test_default_registry_is_configurable() -> None:
    req = parse_mirror_request("GET", "/v2/team/app/manifests/1", default_registry="Harbor.Example")
    assert req.registry == Registry("harbor.example", "harbor.example")
    assert req.addressing is Addressing.DEFAULT


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "X\r\n"])
def test_write_and_unknown_methods_are_405_pull_only(method: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_mirror_request(method, "/v2/library/alpine/blobs/uploads/", "")
    err = info.value
    assert (err.code, err.status) == ("UNSUPPORTED", 405)
    assert ("Allow", "GET, HEAD") in err.headers
    assert "pull-only" in json.loads(error_body(err))["errors"][0]["message"]


@pytest.mark.parametrize(
    "path",
    ["/v2/a/blobs/uploads/", "/v2/a/blobs/uploads", "/v2/a/b/blobs/uploads/0b6b-uuid"],
    ids=["start", "no-slash", "session"],
)
def test_upload_paths_are_405_even_for_get(path: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_mirror_request("GET", path)
    assert info.value.status == 405


HOSTILE = [
    ("dotdot", "/v2/../v2/a/manifests/1", "", "NAME_INVALID"),
    ("dotdot-encoded", "/v2/%2e%2e/a/manifests/1", "", "NAME_INVALID"),
    ("dotdot-mixed", "/v2/a/.%2E/manifests/1", "", "NAME_INVALID"),
    ("dot", "/v2/./a/manifests/1", "", "NAME_INVALID"),
    ("slash-encoded", "/v2/a%2Fb/manifests/1", "", "NAME_INVALID"),
    ("slash-lower", "/v2/a%2fb/manifests/1", "", "NAME_INVALID"),
    ("double-encoded", "/v2/a%252Fb/manifests/1", "", "NAME_INVALID"),
    ("bad-escape", "/v2/a%zz/manifests/1", "", "NAME_INVALID"),
    ("truncated-escape", "/v2/a/manifests/1%", "", "NAME_INVALID"),
    ("double-slash", "/v2//library/alpine/manifests/1", "", "NAME_INVALID"),
    ("inner-double-slash", "/v2/library//alpine/manifests/1", "", "NAME_INVALID"),
    ("nul", "/v2/a\x00/manifests/1", "", "NAME_INVALID"),
    ("nul-encoded", "/v2/a%00/manifests/1", "", "NAME_INVALID"),
    ("non-ascii", "/v2/caf\u00e9/manifests/1", "", "NAME_INVALID"),
    ("non-ascii-encoded", "/v2/caf%C3%A9/manifests/1", "", "NAME_INVALID"),
    ("space", "/v2/a b/manifests/1", "", "NAME_INVALID"),
    ("query-in-path", "/v2/a/manifests/1?ns=x", "", "NAME_INVALID"),
    ("relative", "v2/a/manifests/1", "", "NAME_INVALID"),
    ("upper-name", "/v2/library/Alpine/manifests/1", "", "NAME_INVALID"),
    ("too-long-name", "/v2/" + "a/" * 128 + "manifests/1", "", "NAME_INVALID"),
    ("too-long-path", "/v2/" + "a" * 3000 + "/manifests/1", "", "NAME_INVALID"),
    ("bad-tag", "/v2/a/manifests/-x", "", "TAG_INVALID"),
    ("long-tag", "/v2/a/manifests/" + "t" * 129, "", "TAG_INVALID"),
    ("empty-ref", "/v2/a/manifests/", "", "TAG_INVALID"),
    ("bad-digest", "/v2/a/manifests/sha256:abc", "", "DIGEST_INVALID"),
    ("upper-digest", f"/v2/a/blobs/sha256:{HEX.upper()}", "", "DIGEST_INVALID"),
    ("blob-tag", "/v2/a/blobs/latest", "", "DIGEST_INVALID"),
    ("sha384", "/v2/a/blobs/sha384:" + "a" * 96, "", "DIGEST_INVALID"),
    ("ns-path", "/v2/a/manifests/1", "ns=evil.com/x", "NAME_INVALID"),
    ("ns-userinfo", "/v2/a/manifests/1", "ns=u%40evil.com", "NAME_INVALID"),
    ("ns-url", "/v2/a/manifests/1", "ns=http%3A%2F%2Fevil.com", "NAME_INVALID"),
    ("ns-empty", "/v2/a/manifests/1", "ns=", "NAME_INVALID"),
    ("ns-space", "/v2/a/manifests/1", "ns=+quay.io", "NAME_INVALID"),
    ("ns-crlf", "/v2/a/manifests/1", "ns=quay.io%0D%0AX:1", "NAME_INVALID"),
    ("ns-underscore", "/v2/a/manifests/1", "ns=my_reg.io", "NAME_INVALID"),
    ("ns-wildcard", "/v2/a/manifests/1", "ns=*.io", "NAME_INVALID"),
    ("ns-trailing-dot", "/v2/a/manifests/1", "ns=quay.io.", "NAME_INVALID"),
    ("ns-inet-aton", "/v2/a/manifests/1", "ns=2130706433", "NAME_INVALID"),
    ("ns-short-ipv4", "/v2/a/manifests/1", "ns=127.1", "NAME_INVALID"),
    ("ns-port-zero", "/v2/a/manifests/1", "ns=quay.io:0", "NAME_INVALID"),
    ("ns-port-big", "/v2/a/manifests/1", "ns=quay.io:65536", "NAME_INVALID"),
    ("ns-port-empty", "/v2/a/manifests/1", "ns=quay.io:", "NAME_INVALID"),
    ("ns-ipv6-unbracketed", "/v2/a/manifests/1", "ns=::1", "NAME_INVALID"),
    ("ns-ipv6-zone", "/v2/a/manifests/1", "ns=[fe80::1%25eth0]:5000", "NAME_INVALID"),
    ("ns-non-utf8", "/v2/a/manifests/1", "ns=%ff", "NAME_INVALID"),
    ("ns-idn", "/v2/a/manifests/1", "ns=b%C3%BCcher.example", "NAME_INVALID"),
    ("ns-conflict", "/v2/a/manifests/1", "ns=quay.io&ns=ghcr.io", "NAME_INVALID"),
    ("ns-long-label", "/v2/a/manifests/1", "ns=" + "a" * 64 + ".io", "NAME_INVALID"),
    ("query-too-long", "/v2/a/manifests/1", "x=" + "a" * 3000, "NAME_INVALID"),
    ("query-too-many", "/v2/a/manifests/1", "&".join(["x=1"] * 40), "NAME_INVALID"),
    ("path-host-invalid", "/v2/my_reg.io/a/manifests/1", "", "NAME_INVALID"),
    ("tags-bad-n", "/v2/a/tags/list", "n=-1", "PAGINATION_NUMBER_INVALID"),
    ("tags-bad-last", "/v2/a/tags/list", "last=%2F", "TAG_INVALID"),
    ("referrers-bad-type", f"/v2/a/referrers/{DGST}", "artifactType=x", "UNSUPPORTED"),
    ("catalog", "/v2/_catalog", "", "UNSUPPORTED"),
    ("not-api", "/healthz", "", "UNSUPPORTED"),
    ("unknown-endpoint", "/v2/a/foo/bar", "", "UNSUPPORTED"),
    ("unknown-prefix", "/elsewhere/v2/a/manifests/1", "", "UNSUPPORTED"),
]


@pytest.mark.parametrize(
    ("path", "query", "code"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_requests_raise_typed_errors(path: str, query: str, code: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_mirror_request("GET", path, query, prefixes=PREFIXES)
    assert info.value.code == code
    assert 400 <= info.value.status < 500
    assert "\x00" not in info.value.message and "\r" not in info.value.message


def test_prefix_and_ns_must_agree() -> None:
    with pytest.raises(OCIError) as info:
        parse_mirror_request("GET", "/dockerhub/v2/x/manifests/1", "ns=quay.io", prefixes=PREFIXES)
    # 404 makes containerd try its next host instead of pulling quay.io content from Hub.
    assert (info.value.code, info.value.status) == ("NAME_UNKNOWN", 404)


def test_registry_plus_name_limit_is_255() -> None:
    repo = "a" * 245  # 245 + len("quay.io/") = 253: fine; a longer registry is not
    assert parse_mirror_request("GET", f"/v2/{repo}/manifests/1", "ns=quay.io").repository == repo
    with pytest.raises(OCIError, match="longer than 255"):
        parse_mirror_request("GET", f"/v2/{repo}/manifests/1", "ns=registry.k8s.io")


# ---------------------------------------------------------------------------------------------
# Registries


@pytest.mark.parametrize(
    ("text", "name", "api_host"),
    [
        ("docker.io", "docker.io", "registry-1.docker.io"),
        ("index.docker.io", "docker.io", "registry-1.docker.io"),
        ("registry-1.docker.io", "docker.io", "registry-1.docker.io"),
        ("Docker.IO", "docker.io", "registry-1.docker.io"),
        ("docker.io:443", "docker.io", "registry-1.docker.io"),
        ("docker.io:5000", "docker.io:5000", "docker.io:5000"),
        ("quay.io", "quay.io", "quay.io"),
        ("localhost", "localhost", "localhost"),
        ("10.0.0.5:5000", "10.0.0.5:5000", "10.0.0.5:5000"),
        ("[0:0::1]:5000", "[::1]:5000", "[::1]:5000"),
        ("[::1]", "[::1]", "[::1]"),
        ("a-b.c9", "a-b.c9", "a-b.c9"),
    ],
)
def test_parse_registry_normalises(text: str, name: str, api_host: str) -> None:
    assert parse_registry(text) == Registry(name, api_host)
    assert parse_registry(name) == Registry(name, api_host)  # idempotent


@given(st.text(max_size=300))
def test_parse_registry_raises_only_oci_errors(text: str) -> None:
    try:
        registry = parse_registry(text)
    except OCIError as e:
        assert e.code == "NAME_INVALID"
    else:
        assert parse_registry(registry.name) == registry
        assert registry.name.isascii() and "/" not in registry.name and "@" not in registry.name


# ---------------------------------------------------------------------------------------------
# Grammar, compared with the spec's regexes

SPEC_NAME = re.compile(
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
)  # distribution-spec "Pulling manifests"
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
NAME_ALPHABET = st.text(alphabet="ab09._-/A\u00e9", max_size=40)


@given(NAME_ALPHABET)
def test_name_grammar_equals_spec_regex(text: str) -> None:
    expected = SPEC_NAME.fullmatch(text) is not None
    assert (NAME_RE.fullmatch(text) is not None) == expected
    assert (REPOSITORY_RE.fullmatch(text) is not None) == expected  # same as fwdproxy.imageref
    try:
        validate_name(text)
    except OCIError as e:
        assert e.code == "NAME_INVALID"
        assert not expected
    else:
        assert expected


@given(st.from_regex(SPEC_NAME, fullmatch=True))
def test_spec_names_are_accepted(name: str) -> None:
    if len(name) <= 255:
        assert validate_name(name) == name


@given(st.text(alphabet="aZ09._-:+/\u0660", max_size=140))
def test_tag_grammar_equals_spec_regex(text: str) -> None:
    expected = SPEC_TAG.fullmatch(text) is not None
    assert (TAG_RE.fullmatch(text) is not None) == expected
    try:
        assert parse_tag(text) == Tag(text)
    except OCIError as e:
        assert e.code == "TAG_INVALID"
        assert not expected
    else:
        assert expected


def test_parse_reference_tag_or_digest() -> None:
    assert parse_reference("v1.2") == Tag("v1.2")
    assert parse_reference(DGST) == parse_digest(DGST)
    with pytest.raises(OCIError, match="sha256"):
        parse_reference("sha256:xyz")


# ---------------------------------------------------------------------------------------------
# Properties: only typed errors; round trips through every addressing style

ANY_PIECE = st.sampled_from(
    ["/", "v2", "manifests", "blobs", "uploads", "tags", "list", "_catalog", "..", ".", "%2F",
     "%2e", "%", "%00", "dockerhub", "quay.io", "localhost:5000", "[::1]", "library", "a", "A",
     "sha256:", HEX, "?", "#", "\x00", "\u00e9", "//", ":", "@", "-"]
)  # fmt: skip


@given(
    st.sampled_from(["GET", "HEAD", "POST", "", "G\x00"]),
    st.one_of(st.text(max_size=200), st.lists(ANY_PIECE, max_size=14).map("".join)),
    st.one_of(
        st.text(max_size=100),
        st.lists(st.sampled_from(["ns=", "quay.io", "%3A", "&", "=", "%", "+", "n=", "5"])).map(
            "".join
        ),
    ),
)
def test_parse_mirror_request_raises_only_oci_errors(method: str, path: str, query: str) -> None:
    try:
        req = parse_mirror_request(method, path, query, prefixes=PREFIXES)
    except OCIError as e:
        assert e.code in ERROR_STATUS
        json.loads(error_body(e))
    else:
        assert isinstance(req, MirrorRequest)
        assert req.upstream_path.startswith("/v2/")
        assert ".." not in req.upstream_path and "//" not in req.upstream_path


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOSTNAME = (
    st.lists(LABEL, min_size=2, max_size=3)
    .map(".".join)
    .filter(lambda h: not h.rpartition(".")[2].isdigit())
)
REGISTRY = st.one_of(
    st.sampled_from(["docker.io", "quay.io", "ghcr.io", "registry.k8s.io", "localhost:5000"]),
    st.tuples(HOSTNAME, st.one_of(st.none(), st.integers(1, 65535))).map(
        lambda hp: hp[0] if hp[1] is None else f"{hp[0]}:{hp[1]}"
    ),
)
COMPONENT = st.from_regex(r"[a-z0-9]{1,6}((\.|_|__|-+)[a-z0-9]{1,6}){0,2}", fullmatch=True)
REPOSITORY = (
    st.lists(COMPONENT, min_size=1, max_size=4).map("/".join).filter(lambda n: len(n) < 150)
)
REFERENCE = st.one_of(
    st.from_regex(SPEC_TAG, fullmatch=True).map(Tag),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(
        lambda h: parse_digest(f"sha256:{h}")
    ),
)


@given(REGISTRY, REPOSITORY, REFERENCE, st.sampled_from(["ns", "ns-encoded", "podman", "prefix"]))
def test_format_then_parse_round_trips(
    registry: str, repository: str, reference: Tag | Digest, style: str
) -> None:
    reg = parse_registry(registry)
    if style == "podman" and not any(c in repository.split("/")[0] for c in ".:"):
        path, query = f"/v2/{registry}/{repository}/manifests/{reference}", ""
        how = Addressing.PATH_REGISTRY
    elif style == "prefix":
        path, query = f"/up/v2/{repository}/manifests/{reference}", ""
        how = Addressing.PREFIX
    else:
        ns = registry.replace(":", "%3A") if style == "ns-encoded" else registry
        path, query = f"/v2/{repository}/manifests/{reference}", f"ns={ns}"
        how = Addressing.NS
        if repository.split("/")[0] in (registry, reg.name) and "/" in repository:
            return  # the documented ns ambiguity: a first component naming ns is stripped
    req = parse_mirror_request("HEAD", path, query, prefixes={"up": registry})
    assert (req.kind, req.registry, req.repository, req.reference, req.addressing) == (
        RequestKind.MANIFEST, reg, repository, reference, how
    )  # fmt: skip
    assert req.upstream_path == f"/v2/{repository}/manifests/{reference}"
    again = parse_mirror_request("HEAD", req.upstream_path, f"ns={req.registry.name}")
    assert (again.registry, again.repository, again.reference) == (reg, repository, reference)


# ---------------------------------------------------------------------------------------------
# Errors


def test_error_body_shape_and_statuses() -> None:
    body = error_body(
        OCIError("MANIFEST_UNKNOWN", "manifest unknown", detail={"tag": "x"}),
        OCIError("TOOMANYREQUESTS", "slow down"),
    )
    assert json.loads(body) == {
        "errors": [
            {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"tag": "x"}},
            {"code": "TOOMANYREQUESTS", "message": "slow down"},
        ]
    }
    expected = {"NAME_UNKNOWN": 404, "UNAUTHORIZED": 401, "DENIED": 403, "UNSUPPORTED": 405,
                "TOOMANYREQUESTS": 429, "UNAVAILABLE": 503, "NAME_INVALID": 400,
                "RANGE_INVALID": 416, "BLOB_UNKNOWN": 404, "DIGEST_INVALID": 400}  # fmt: skip
    assert {code: OCIError(code, "m").status for code in expected} == expected
    assert OCIError("UNSUPPORTED", "m", 404).status == 404
    with pytest.raises(ValueError, match="unknown distribution error code"):
        OCIError("NOPE", "m")


def test_error_body_never_fails_on_odd_detail() -> None:
    body = error_body(OCIError("UNKNOWN", "x\u00e9\x00", detail=object()))
    assert json.loads(body)["errors"][0]["message"] == "x\u00e9\x00"


# ---------------------------------------------------------------------------------------------
# Image references (CLI): fwdproxy.imageref parses them; proto.oci resolves the registry


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference"),
    [
        ("nginx", HUB, "library/nginx", "latest"),
        ("index.docker.io/bitnami/redis:7", HUB, "bitnami/redis", "7"),
        ("quay.io/org/app@" + DGST, Registry("quay.io", "quay.io"), "org/app", DGST),
        ("localhost:5000/app:v1", Registry("localhost:5000", "localhost:5000"), "app", "v1"),
    ],
)
def test_image_refs_compose_with_imageref(
    text: str, registry: Registry, repository: str, reference: str
) -> None:
    ref = parse_image_ref(text)
    reg = parse_registry(ref.registry)
    ref_text = ref.digest if ref.digest is not None else ref.tag
    assert ref_text is not None
    assert (reg, validate_name(ref.repository), str(parse_reference(ref_text))) == (
        registry, repository, reference
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Layering

MODULES = ["oci.py", "manifest.py", "byterange.py", "www_auth.py", "digest.py"]
FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "aiohttp", "time", "h11"}


@pytest.mark.parametrize("name", MODULES)
def test_mirror_proto_modules_are_pure(name: str) -> None:
    path = Path(__file__).parents[2] / "fwdproxy" / "proto" / name
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
    assert "__future__" in imported
    assert not {m.split(".")[0] for m in imported} & FORBIDDEN
    ours = {m for m in imported if m.split(".")[0] == "fwdproxy"}
    assert all(m.startswith("fwdproxy.proto.") or m == "fwdproxy.addr" for m in ours), ours
