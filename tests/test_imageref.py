"""Image references normalise as docker/containerd do, and bad ones fail with a clear reason."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fwdproxy.routing.imageref import ImageRef, ImageRefError, normalise, parse_image_ref

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "f" * 128
HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"

# (input, str(result), host, port)
VALID = [
    ("nginx", "docker.io/library/nginx:latest", "registry-1.docker.io", 443),
    ("nginx:1.27", "docker.io/library/nginx:1.27", "registry-1.docker.io", 443),
    ("user/app", "docker.io/user/app:latest", "registry-1.docker.io", 443),
    ("docker.io/nginx", "docker.io/library/nginx:latest", "registry-1.docker.io", 443),
    ("index.docker.io/nginx", "docker.io/library/nginx:latest", "registry-1.docker.io", 443),
    (
        "index.docker.io/library/nginx",
        "docker.io/library/nginx:latest",
        "registry-1.docker.io",
        443,
    ),
    ("docker.io/library/foo/bar", "docker.io/library/foo/bar:latest", "registry-1.docker.io", 443),
    (
        "registry-1.docker.io/nginx",
        "registry-1.docker.io/nginx:latest",
        "registry-1.docker.io",
        443,
    ),
    (f"ghcr.io/org/app@{SHA256}", f"ghcr.io/org/app@{SHA256}", "ghcr.io", 443),
    (f"nginx:1.27@{SHA256}", f"docker.io/library/nginx:1.27@{SHA256}", "registry-1.docker.io", 443),
    (f"nginx@{SHA512}", f"docker.io/library/nginx@{SHA512}", "registry-1.docker.io", 443),
    ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10", "registry.k8s.io", 443),
    ("localhost:5000/x", "localhost:5000/x:latest", "localhost", 5000),
    ("localhost/x", "localhost/x:latest", "localhost", 443),
    ("[::1]:5000/x", "[::1]:5000/x:latest", "::1", 5000),
    (
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
        "fc00:1:2:3:4:5:6:7",
        5000,
    ),
    ("[FC00::1]:5000/docker", "[FC00::1]:5000/docker:latest", "fc00::1", 5000),
    ("127.0.0.1:5000/docker/docker", "127.0.0.1:5000/docker/docker:latest", "127.0.0.1", 5000),
    (
        "example.com:8000/private/moonbase",
        "example.com:8000/private/moonbase:latest",
        "example.com",
        8000,
    ),
    ("test-com:8080/foo", "test-com:8080/foo:latest", "test-com", 8080),
    ("xn--n3h.com/foo", "xn--n3h.com/foo:latest", "xn--n3h.com", 443),
    ("Foo/bar", "Foo/bar:latest", "foo", 443),
    ("GHCR.IO/org/app:V1", "GHCR.IO/org/app:V1", "ghcr.io", 443),
    ("test_com/foo", "docker.io/test_com/foo:latest", "registry-1.docker.io", 443),
    ("192.168.0.1", "docker.io/library/192.168.0.1:latest", "registry-1.docker.io", 443),
    ("localhost:5000", "docker.io/library/localhost:5000", "registry-1.docker.io", 443),
    (
        "docker---rules/docker",
        "docker.io/docker---rules/docker:latest",
        "registry-1.docker.io",
        443,
    ),
    ("dock__er/docker", "docker.io/dock__er/docker:latest", "registry-1.docker.io", 443),
    (f"docker.io/{HEX64}", f"docker.io/library/{HEX64}:latest", "registry-1.docker.io", 443),
    (
        "nginx:Latest_1.0-rc.2",
        "docker.io/library/nginx:Latest_1.0-rc.2",
        "registry-1.docker.io",
        443,
    ),
    ("nginx:" + "t" * 128, "docker.io/library/nginx:" + "t" * 128, "registry-1.docker.io", 443),
    (
        "us-central1-docker.pkg.dev/p/r/i:v",
        "us-central1-docker.pkg.dev/p/r/i:v",
        "us-central1-docker.pkg.dev",
        443,
    ),
    ("quay.io/a/" + "b" * 250, "quay.io/a/" + "b" * 250 + ":latest", "quay.io", 443),
]


@pytest.mark.parametrize(
    ("text", "expected", "host", "port"), VALID, ids=[v[0][:40] for v in VALID]
)
def test_imageref_normalises_like_docker(text: str, expected: str, host: str, port: int) -> None:
    ref = parse_image_ref(text)
    assert str(ref) == expected
    assert (ref.host, ref.port) == (host, port)
    assert parse_image_ref(str(ref)) == ref


def test_imageref_fields() -> None:
    ref = parse_image_ref(f"ghcr.io:8443/org/app:v1@{SHA256}")
    assert ref == ImageRef("ghcr.io:8443", "ghcr.io", 8443, "org/app", "v1", SHA256)
    assert ref.name == "ghcr.io:8443/org/app"
    digest_only = parse_image_ref(f"ghcr.io/org/app@{SHA256}")
    assert digest_only.tag is None and digest_only.digest == SHA256
    assert normalise is parse_image_ref
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "x"  # type: ignore[misc]


# (input, fragment of the error message)
INVALID = [
    ("", "empty"),
    (" nginx", "invalid repository"),
    ("nginx\n", "invalid repository"),
    ("Nginx", "must be lowercase"),
    ("docker/Docker", "must be lowercase"),
    ("ghcr.io/Org/app", "must be lowercase"),
    ("-docker", "invalid repository"),
    ("docker-/docker", "invalid repository"),
    ("-docker-/docker", "invalid repository"),
    ("dock..er/docker", "invalid registry"),
    ("dock_.er/docker", "invalid registry"),
    ("dock-.er/docker", "invalid registry"),
    ("____/____", "invalid repository"),
    ("_docker/_docker", "invalid repository"),
    ("docker///docker", "invalid repository"),
    ("docker/", "invalid repository"),
    ("/nginx", "invalid repository"),
    ("nginé", "invalid repository"),
    ("https://github.com/docker/docker", "invalid registry"),
    ("[fc00::1]", "invalid repository"),
    ("[fc00::1]:5000", "invalid repository"),
    ("fc00::1:5000/debian", "invalid registry"),
    ("[fe80::1%eth0]:5000/debian", "invalid registry"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry"),
    ("[1:2:3:4:5:6:7:8:9]:5000/x", "not an IPv6 address"),
    ("my_reg.com/x", "invalid registry"),
    ("example.com:0/x", "out of range"),
    ("example.com:65536/x", "out of range"),
    ("example.com:port/x", "invalid registry"),
    ("a" * 64 + ".com/x", "too long"),
    (HEX64, "image ID"),
    ("nginx:", "empty tag"),
    ("nginx:-tag", "invalid tag"),
    ("nginx:.tag", "invalid tag"),
    ("nginx:" + "t" * 129, "invalid tag"),
    ("nginx:1.0:2.0", "invalid tag"),
    ("nginx@sha256:abc", "invalid digest"),
    ("nginx@sha256", "invalid digest"),
    ("nginx@", "invalid digest"),
    ("nginx@sha256:" + "A" * 64, "lowercase hex"),
    ("nginx@sha256:" + "a" * 63 + "g", "invalid digest"),
    ("nginx@sha256:" + "a" * 65, "exactly 64"),
    ("nginx@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("nginx@SHA256:" + "a" * 64, "unsupported digest algorithm"),
    (f"nginx@{SHA256}@x", "invalid digest"),
    (f"nginx@{SHA256}:tag", "invalid digest"),
    ("a" * 256, "at most 255"),
    ("quay.io/" + "a" * 256, "at most 255"),
    ("x" * 2000, "too long"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID, ids=[repr(v[0][:40]) for v in INVALID])
def test_imageref_rejects_with_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(ImageRefError) as info:
        parse_image_ref(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_imageref_rejects_non_string() -> None:
    with pytest.raises(ImageRefError, match="must be a string"):
        parse_image_ref(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

ALNUM = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
SEPARATOR = st.sampled_from([".", "_", "__", "-", "---"])
COMPONENT = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    ALNUM,
    st.lists(st.tuples(SEPARATOR, ALNUM), max_size=3),
)
PATH = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
PORT = st.integers(1, 65535).map(lambda p: f":{p}")
DOMAIN = st.lists(LABEL, min_size=2, max_size=4).map(".".join)
IPV6 = st.ip_addresses(v=6).map(lambda a: f"[{a.compressed}]")
REGISTRY = st.one_of(
    st.none(),
    st.sampled_from(["docker.io", "index.docker.io", "localhost", "localhost:5000", "Foo"]),
    DOMAIN,
    st.builds(str.__add__, DOMAIN, PORT),
    st.builds(str.__add__, st.ip_addresses(v=4).map(str), PORT),
    st.builds(str.__add__, IPV6, PORT),
)
TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
DIGEST = st.sampled_from([("sha256", 64), ("sha384", 96), ("sha512", 128)]).flatmap(
    lambda alg: st.text("0123456789abcdef", min_size=alg[1], max_size=alg[1]).map(
        lambda hex_: f"{alg[0]}:{hex_}"
    )
)


@given(registry=REGISTRY, path=PATH, tag=st.none() | TAG, digest=st.none() | DIGEST)
def test_imageref_roundtrips_generated_references(
    registry: str | None, path: str, tag: str | None, digest: str | None
) -> None:
    text = (f"{registry}/" if registry else "") + path
    text += f":{tag}" if tag else ""
    text += f"@{digest}" if digest else ""
    try:
        ref = parse_image_ref(text)
    except ImageRefError:
        # Without a registry, a first component with a '.' is read as a registry (docker does
        # the same), and `a_b.c` is not a valid host; everything else generated here is valid.
        assume(not (registry is None and "." in path.split("/")[0]))
        raise
    assert parse_image_ref(str(ref)) == ref
    assert ref.digest == digest
    assert ref.tag == (tag if tag or digest else "latest")
    if registry is not None:
        hub = registry in ("docker.io", "index.docker.io")
        assert ref.registry == ("docker.io" if hub else registry)
        assert ref.repository == (f"library/{path}" if hub and "/" not in path else path)
        assert ref.port == expected_port(registry)
    if ref.registry == "docker.io":
        assert ref.host == "registry-1.docker.io"
        assert "/" in ref.repository


def expected_port(registry: str) -> int:
    after_host = registry.rsplit("]", 1)[-1]
    return int(after_host.rsplit(":", 1)[1]) if ":" in after_host else 443


REFERENCE_ALPHABET = "abcAB019._-/:@[]"


@given(st.text(max_size=60) | st.text(REFERENCE_ALPHABET, max_size=60))
def test_imageref_arbitrary_text_is_parsed_or_rejected(text: str) -> None:
    try:
        ref = parse_image_ref(text)
    except ImageRefError as err:
        assert str(err)
        return
    assert isinstance(ref, ImageRef)
    assert parse_image_ref(str(ref)) == ref
    assert 1 <= ref.port <= 65535
    assert ref.host == ref.host.lower()
