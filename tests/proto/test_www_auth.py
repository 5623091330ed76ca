"""WWW-Authenticate challenges, token requests and token responses (RFC 9110 §11, RFC 6750)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.proto.oci import OCIError
from fwdproxy.proto.www_auth import (
    MAX_TOKEN_BODY,
    Challenge,
    Token,
    TokenRequest,
    WWWAuthenticateError,
    bearer_token_request,
    parse_token_response,
    parse_www_authenticate,
    repository_scope,
)

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)
HUB_CHALLENGE = Challenge(
    "bearer",
    {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    },
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (HUB, [HUB_CHALLENGE]),
        (HUB.encode(), [HUB_CHALLENGE]),
        ('bearer Realm="r", SERVICE=svc', [Challenge("bearer", {"realm": "r", "service": "svc"})]),
        (
            'Basic realm="registry", Bearer realm="https://a/t",scope="x y"',
            [
                Challenge("basic", {"realm": "registry"}),
                Challenge("bearer", {"realm": "https://a/t", "scope": "x y"}),
            ],
        ),
        ("Negotiate abc+/def==", [Challenge("negotiate", {}, "abc+/def==")]),
        (
            "Negotiate abc==, Basic realm=x",
            [Challenge("negotiate", {}, "abc=="), Challenge("basic", {"realm": "x"})],
        ),
        ("Basic", [Challenge("basic")]),
        ("Basic, Bearer realm=x", [Challenge("basic"), Challenge("bearer", {"realm": "x"})]),
        (
            r'Bearer realm="a\"b\\c", error="insufficient_scope"',
            [Challenge("bearer", {"realm": 'a"b\\c', "error": "insufficient_scope"})],
        ),
        (
            'Bearer realm = "spaced" ,, , scope=""',
            [Challenge("bearer", {"realm": "spaced", "scope": ""})],
        ),
        ('Bearer realm="caf\xe9"', [Challenge("bearer", {"realm": "caf\xe9"})]),
        (b'Bearer realm="caf\xe9"', [Challenge("bearer", {"realm": "caf\xe9"})]),
        ("Bearer realm=", [Challenge("bearer", {}, "realm=")]),  # token68, by the grammar
        ("", []),
        (" , ,", []),
    ],
    ids=[
        "docker-hub",
        "bytes",
        "case",
        "two-challenges",
        "token68",
        "token68-then-challenge",
        "bare-scheme",
        "bare-scheme-comma",
        "escapes",
        "spaces-and-empty-elements",
        "obs-text",
        "obs-text-bytes",
        "token68-not-param",
        "empty",
        "only-commas",
    ],
)
def test_parse_www_authenticate(value: str | bytes, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(value) == expected


def test_parse_www_authenticate_several_field_lines() -> None:
    got = parse_www_authenticate(['Basic realm="r"', HUB])
    assert [c.scheme for c in got] == ["basic", "bearer"]


@pytest.mark.parametrize(
    "value",
    [
        'Bearer realm="unterminated',
        'Bearer realm="ends in backslash\\',
        'Bearer realm="a\x00b"',
        'Bearer realm="a\nb"',
        'Bearer realm="\u0100"',
        'Bearer realm="a" service="b"',  # missing comma
        'Bearer realm="a", realm="b"',  # duplicate
        'Bearer realm=,service="x"',
        '"quoted-scheme"',
        "Bearer@ realm=x",
        'Bearer realm="a", "junk"',
        "Bearer realm=a b=c",
        "Bearer " + "x" * 9000,
    ],
)
def test_malformed_challenges_raise_typed_error(value: str) -> None:
    with pytest.raises(WWWAuthenticateError):
        parse_www_authenticate(value)


@given(st.text(max_size=200))
def test_parse_www_authenticate_raises_only_typed_error_on_text(value: str) -> None:
    try:
        challenges = parse_www_authenticate(value)
    except WWWAuthenticateError:
        return
    for c in challenges:
        assert c.scheme == c.scheme.lower() and all(k == k.lower() for k in c.params)


PIECES = st.sampled_from(
    ["Bearer", "Basic", " ", ",", "=", '"', "\\", "realm", "abc==", "\t", "x", "\x00", "\xe9"]
)


@given(st.one_of(st.binary(max_size=200), st.lists(PIECES, max_size=30).map("".join)))
def test_parse_www_authenticate_raises_only_typed_error_on_pieces(value: str | bytes) -> None:
    try:
        parse_www_authenticate(value)
    except WWWAuthenticateError:
        pass


TOKEN = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,10}", fullmatch=True)
VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20
)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(st.tuples(TOKEN, st.dictionaries(TOKEN.map(str.lower), VALUE, max_size=4)), max_size=4)
)
def test_format_then_parse_round_trips(challenges: list[tuple[str, dict[str, str]]]) -> None:
    header = ", ".join(
        scheme
        + ("" if not params else " " + ", ".join(f"{k}={quote(v)}" for k, v in params.items()))
        for scheme, params in challenges
    )
    expected = [Challenge(scheme.lower(), params) for scheme, params in challenges]
    assert parse_www_authenticate(header) == expected


# ---------------------------------------------------------------------------------------------
# Token request


def test_bearer_token_request_docker_hub() -> None:
    req = bearer_token_request(HUB_CHALLENGE)
    assert req == TokenRequest(
        "https://auth.docker.io/token",
        [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")],
    )
    realm, params = req  # a plain (realm, params) pair too
    assert params == req.params
    assert realm == "https://auth.docker.io/token"
    assert req.url() == (
        "https://auth.docker.io/token?service=registry.docker.io"
        "&scope=repository%3Alibrary%2Falpine%3Apull"
    )


def test_bearer_token_request_scope_override_and_several_scopes() -> None:
    two = Challenge("bearer", {"realm": "https://a.example/t?x=1", "scope": "s1  s2"})
    assert bearer_token_request(two).params == [("scope", "s1"), ("scope", "s2")]
    assert bearer_token_request(two).url() == "https://a.example/t?x=1&scope=s1&scope=s2"
    one = bearer_token_request(two, repository_scope("library/nginx"))
    assert one.params == [("scope", "repository:library/nginx:pull")]
    assert bearer_token_request(two, ["a", "b"]).params == [("scope", "a"), ("scope", "b")]
    bare = bearer_token_request(Challenge("bearer", {"realm": "http://127.0.0.1:5001/auth"}))
    assert bare.url() == "http://127.0.0.1:5001/auth"


@pytest.mark.parametrize(
    ("challenge", "message"),
    [
        (Challenge("basic", {"realm": "https://a/t"}), "not a Bearer"),
        (Challenge("bearer", {}), "without a realm"),
        (Challenge("bearer", {"realm": ""}), "without a realm"),
        (Challenge("bearer", {"realm": "/token"}), "absolute"),
        (Challenge("bearer", {"realm": "ftp://a/t"}), "absolute"),
        (Challenge("bearer", {"realm": "file:///etc/passwd"}), "absolute"),
        (Challenge("bearer", {"realm": "https://"}), "absolute"),
        (Challenge("bearer", {"realm": "https://user:pw@a/t"}), "userinfo"),
        (Challenge("bearer", {"realm": "https://a/t#frag"}), "fragment"),
        (Challenge("bearer", {"realm": "https://a:99999/t"}), "valid URL"),
        (Challenge("bearer", {"realm": "https://[::1/t"}), "valid URL"),
        (Challenge("bearer", {"realm": "https://a/t x"}), "not a URL"),
        (Challenge("bearer", {"realm": "https://caf\xe9/t"}), "not a URL"),
        (Challenge("bearer", {"realm": "https://a/\r\nX: y"}), "not a URL"),
        (Challenge("bearer", {"realm": "https://my_auth.io/t"}), "invalid host"),
        (Challenge("bearer", {"realm": "https://2130706433/t"}), "invalid host"),
        (Challenge("bearer", {"realm": "https://a..b/t"}), "invalid host"),
    ],
)
def test_bearer_token_request_refuses_bad_realms(challenge: Challenge, message: str) -> None:
    with pytest.raises(WWWAuthenticateError, match=message):
        bearer_token_request(challenge)


def test_repository_scope() -> None:
    assert repository_scope("library/alpine") == "repository:library/alpine:pull"
    assert repository_scope("a/b", ("pull", "push")) == "repository:a/b:pull,push"
    for bad in ("a:push", "a b", "A", "a/../b", ""):
        with pytest.raises(OCIError):
            repository_scope(bad)


# ---------------------------------------------------------------------------------------------
# Token response

NOW = 1_700_000_000.0


def tok(**doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "value", "expires_at"),
    [
        (tok(token="t1"), "t1", NOW + 60),
        (tok(access_token="a1"), "a1", NOW + 60),
        (tok(token="t1", access_token="a1"), "a1", NOW + 60),  # Docker's client prefers this
        (tok(token="t1", access_token=""), "t1", NOW + 60),
        (tok(token="t1", expires_in=300), "t1", NOW + 300),
        (tok(token="t1", expires_in=10), "t1", NOW + 60),  # no token lives under 60 s
        (tok(token="t1", expires_in=-5), "t1", NOW + 60),
        (tok(token="t1", expires_in="300"), "t1", NOW + 60),
        (tok(token="t1", expires_in=True), "t1", NOW + 60),
        (tok(token="t1", expires_in=10**30), "t1", NOW + 366 * 86400),
        (b'{"token":"t1","expires_in":NaN}', "t1", NOW + 60),
        # NOW is 2023-11-14T22:13:20Z
        (tok(token="t1", expires_in=300, issued_at="2023-11-14T22:12:20Z"), "t1", NOW + 240),
        (
            tok(token="t1", expires_in=300, issued_at="2023-11-14T22:11:20.123456789Z"),
            "t1",
            NOW - 120 + 0.123456789 + 300,
        ),
        (tok(token="t1", expires_in=300, issued_at="2023-11-14T23:11:20+01:00"), "t1", NOW + 180),
        (tok(token="t1", expires_in=300, issued_at="2023-11-14T21:11:20-01:00"), "t1", NOW + 180),
        (tok(token="t1", expires_in=300, issued_at="2023-11-15T22:13:20Z"), "t1", NOW + 300),
        (tok(token="t1", expires_in=300, issued_at="2020-01-01T00:00:00Z"), "t1", NOW + 300),
        (tok(token="t1", issued_at="not a date"), "t1", NOW + 60),
        (tok(token="t1", issued_at="2023-02-30T00:00:00Z"), "t1", NOW + 60),
        (tok(token="t1", issued_at=12345), "t1", NOW + 60),
        (tok(token="t1", refresh_token="r", scope="x", extra={"a": 1}), "t1", NOW + 60),
    ],
    ids=lambda v: v.decode()[:40] if isinstance(v, bytes) else None,
)
def test_parse_token_response(raw: bytes, value: str, expires_at: float) -> None:
    got = parse_token_response(raw, NOW)
    assert got.value == value
    assert got.expires_at == pytest.approx(expires_at)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'"token"',
        tok(),
        tok(token=""),
        tok(token=5),
        tok(token=None, access_token=None),
        tok(token="a b"),
        tok(token="a\r\nSet-Cookie: x"),
        tok(token="caf\xe9"),
        tok(token="x" * 70_000),
        b"\xff\xfe",
        b"[" * 100_000,
        b" " * (MAX_TOKEN_BODY + 1),
    ],
)
def test_unusable_token_responses_raise_typed_error(raw: bytes) -> None:
    with pytest.raises(WWWAuthenticateError):
        parse_token_response(raw, NOW)


def test_token_repr_hides_the_secret() -> None:
    token = parse_token_response(tok(token="s3cr3t"), NOW)
    assert "s3cr3t" not in repr(token)
    assert token == Token("s3cr3t", NOW + 60)


@given(st.binary(max_size=300))
def test_parse_token_response_raises_only_typed_error_on_bytes(raw: bytes) -> None:
    try:
        parse_token_response(raw, NOW)
    except WWWAuthenticateError:
        pass


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "token": st.one_of(st.text(max_size=20), st.integers(), st.none()),
            "access_token": st.one_of(st.text(max_size=20), st.none()),
            "expires_in": st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none()),
            "issued_at": st.one_of(st.text(max_size=40), st.integers()),
        },
    )
)
def test_parse_token_response_raises_only_typed_error_on_json(doc: dict[str, object]) -> None:
    try:
        token = parse_token_response(json.dumps(doc).encode(), NOW)
    except WWWAuthenticateError:
        return
    assert NOW + 60 <= token.expires_at <= NOW + 366 * 86400
    assert all("!" <= ch <= "~" for ch in token.value)  # safe to put in a header
