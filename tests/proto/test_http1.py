"""proto.http1: request heads fed whole, byte by byte and with trailing bytes; proxy helpers."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.errors import ProtocolError
from fwdproxy.proto.http1 import (
    HOP_BY_HOP,
    RequestHead,
    Target,
    absolute_target,
    connect_target,
    find_head_end,
    framing_problem,
    parse_basic_credentials,
    parse_request_head,
    strip_hop_by_hop,
)

CONNECT = b"CONNECT registry-1.docker.io:443 HTTP/1.1\r\nHost: registry-1.docker.io:443\r\n\r\n"
GET = (
    b"GET http://example.com/v2/?q=1 HTTP/1.1\r\nHost: example.com\r\n"
    b"User-Agent: t\r\nProxy-Authorization: Basic YTpi\r\n\r\n"
)
BARE_LF = b"GET http://example.com/ HTTP/1.0\nHost: example.com\n\n"


def parse_whole(data: bytes, limit: int = 16384) -> RequestHead | None:
    return parse_request_head(data, limit)


def parse_bytewise(data: bytes, limit: int = 16384) -> RequestHead | None:
    """Grow the buffer one byte at a time, as a session does with tiny reads."""
    head = None
    for i in range(1, len(data) + 1):
        head = parse_request_head(data[:i], limit)
        if head is not None:
            assert i == len(head.head_bytes), "parsed before the head was complete"
            return head
    return head


@pytest.mark.parametrize("feed", [parse_whole, parse_bytewise], ids=["whole", "bytewise"])
@pytest.mark.parametrize("data", [CONNECT, GET, BARE_LF], ids=["connect", "get", "bare-lf"])
def test_parse_request_head_whole_and_bytewise(feed: object, data: bytes) -> None:
    head = feed(data)  # type: ignore[operator]
    assert head is not None
    assert head.head_bytes == data
    assert head.trailing == b""
    assert head == parse_whole(data)


def test_parse_request_head_fields() -> None:
    head = parse_whole(GET)
    assert head is not None
    assert (head.method, head.target, head.version) == ("GET", "http://example.com/v2/?q=1", "1.1")
    assert head.headers[0] == (b"Host", b"example.com")
    assert head.header(b"proxy-authorization") == b"Basic YTpi"
    assert head.header(b"user-agent") == b"t"
    assert head.header(b"missing") is None


@pytest.mark.parametrize(
    "trailing",
    [b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n", b"x" * 70000],
    ids=["tls-hello", "pipelined", "blank-lines", "large"],
)
def test_parse_request_head_keeps_trailing_bytes(trailing: bytes) -> None:
    head = parse_whole(CONNECT + trailing)
    assert head is not None
    assert head.head_bytes == CONNECT
    assert head.trailing == trailing


def test_parse_request_head_incomplete_is_none() -> None:
    for i in range(len(CONNECT)):
        assert parse_whole(CONNECT[:i]) is None


def test_parse_request_head_431_when_unterminated_head_exceeds_limit() -> None:
    big = b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 200
    assert parse_request_head(big[:100], 128) is None
    with pytest.raises(ProtocolError) as e:
        parse_request_head(big, 128)
    assert e.value.status_hint == 431


def test_parse_request_head_431_when_complete_head_exceeds_limit() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request_head(GET, len(GET) - 1)
    assert e.value.status_hint == 431
    assert parse_request_head(GET, len(GET)) is not None


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET\r\n\r\n", 400),
        (b"GET  http://a/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1 x\r\n\r\n", 400),
        (b"G(T http://a/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a/\x7f HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\nNo-Colon\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\n: empty\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n", 400),
        (b"GET http://a/ HTTP/2.0\r\n\r\n", 505),
        (b"GET http://a/ HTTP/1.2\r\n\r\n", 505),
        (b"GET http://a/ FTP/1.1\r\n\r\n", 400),  # not a version: malformed
        (b"M" * 40 + b" http://a/ HTTP/1.1\r\n\r\n", 400),
    ],
    ids=[
        "no-target",
        "double-space",
        "four-parts",
        "bad-method-char",
        "ctl-in-target",
        "header-no-colon",
        "space-in-name",
        "empty-name",
        "obs-fold",
        "http2",
        "http1.2",
        "not-http",
        "method-too-long",
    ],
)
def test_parse_request_head_bad_lines(data: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_whole(data)
    assert e.value.status_hint == status


def test_find_head_end() -> None:
    assert find_head_end(b"abc") == -1
    assert find_head_end(b"a\r\n\r\nb") == 5
    assert find_head_end(b"a\n\nb") == 3
    assert find_head_end(b"a\n\n\r\n\r\n") == 3


@given(st.binary(max_size=600), st.integers(16, 1024))
def test_parse_request_head_random_bytes_never_crash(data: bytes, limit: int) -> None:
    try:
        head = parse_request_head(data, limit)
    except ProtocolError as e:
        assert e.status_hint in (400, 431, 505)
        return
    if head is not None:
        assert isinstance(head, RequestHead)
        assert head.head_bytes + head.trailing == data
        assert len(head.head_bytes) <= limit


TCHARS = "ABCXYZabcxyz0189!#$%&'*+.^_`|~-"
VCHARS = "".join(chr(c) for c in range(0x21, 0x7F))
TOKEN = st.text(TCHARS, min_size=1, max_size=12)
VALUE = st.text(VCHARS + " ", min_size=1, max_size=20).map(str.strip).filter(bool)


@given(
    TOKEN,
    st.text(VCHARS, min_size=1, max_size=40),
    st.lists(st.tuples(TOKEN, VALUE), max_size=6),
    st.binary(max_size=40),
    st.integers(1, 30),
)
def test_parse_request_head_valid_heads_split_anywhere(
    method: str, target: str, headers: list[tuple[str, str]], trailing: bytes, step: int
) -> None:
    head_bytes = (
        f"{method} {target} HTTP/1.1\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
        + b"\r\n"
    )
    data = head_bytes + trailing
    got = None
    for end in range(step, len(data) + step, step):
        got = parse_request_head(data[:end])
        if got is not None:
            break
    assert got is not None
    assert (got.method, got.target, got.version) == (method, target, "1.1")
    assert [(k.decode(), v.decode()) for k, v in got.headers] == headers
    assert got.head_bytes == head_bytes
    assert head_bytes + got.trailing == data[: len(head_bytes) + len(got.trailing)]


# -- targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://example.com/v2/?q=1", Target("example.com", 80, "/v2/?q=1")),
        ("http://Example.COM:8080", Target("example.com", 8080, "/")),
        ("HTTP://example.com?x=1", Target("example.com", 80, "/?x=1")),
        ("http://example.com#frag", Target("example.com", 80, "/")),
        ("http://example.com/a#frag", Target("example.com", 80, "/a")),
        ("http://[::1]:8080/x", Target("::1", 8080, "/x")),
        ("http://[::1]/x", Target("::1", 80, "/x")),
        ("http://10.1.2.3/", Target("10.1.2.3", 80, "/")),
        ("http://bücher.de/", Target("xn--bcher-kva.de", 80, "/")),
        ("http://example.com/a/../b;p?q#f", Target("example.com", 80, "/a/../b;p?q")),
    ],
)
def test_absolute_target(url: str, expected: Target) -> None:
    assert absolute_target(url) == expected


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("/just/a/path", "absolute URL"),
        ("https://example.com/", "CONNECT"),
        ("ftp://example.com/", "unsupported URL scheme"),
        ("http://user:pw@example.com/", "user info"),
        ("http:///path", "bad URL host"),
        ("http://example.com:99999/", "bad URL host"),
        ("http://exa mple.com/", "bad URL host"),
    ],
)
def test_absolute_target_rejects(url: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        absolute_target(url)
    assert fragment in str(e.value)
    assert e.value.status_hint == 400


@pytest.mark.parametrize(
    "authority, expected",
    [
        ("registry-1.docker.io:443", ("registry-1.docker.io", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("10.0.0.1:22", ("10.0.0.1", 22)),
    ],
)
def test_connect_target(authority: str, expected: tuple[str, int]) -> None:
    t = connect_target(authority)
    assert (t.host, t.port) == expected


@pytest.mark.parametrize("authority", ["example.com", "example.com:0", "[::1", "http://x:1", ""])
def test_connect_target_rejects(authority: str) -> None:
    with pytest.raises(ProtocolError):
        connect_target(authority)


# -- hop-by-hop ----------------------------------------------------------------------------


def test_strip_hop_by_hop_drops_listed_and_named_headers() -> None:
    headers = [
        (b"Host", b"example.com"),
        (b"Connection", b"keep-alive, X-Named"),
        (b"X-Named", b"1"),
        (b"Proxy-Connection", b"close, X-Other"),
        (b"X-Other", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Authorization", b"Bearer e2e"),
        (b"x-named", b"lowercase too"),
        (b"Content-Length", b"3"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"Host", b"example.com"),
        (b"Authorization", b"Bearer e2e"),
        (b"Content-Length", b"3"),
    ]


def test_strip_hop_by_hop_keeps_order_and_case() -> None:
    headers = [(b"X-B", b"2"), (b"x-a", b"1"), (b"X-B", b"3")]
    assert strip_hop_by_hop(headers) == headers


@given(st.lists(st.tuples(TOKEN.map(str.encode), VALUE.map(str.encode)), max_size=12))
def test_strip_hop_by_hop_properties(headers: list[tuple[bytes, bytes]]) -> None:
    out = strip_hop_by_hop(headers)
    named = {
        t.strip().lower()
        for k, v in headers
        if k.lower() in (b"connection", b"proxy-connection")
        for t in v.split(b",")
    }
    assert all(k.lower() not in HOP_BY_HOP and k.lower() not in named for k, _ in out)
    kept = [h for h in headers if h[0].lower() not in HOP_BY_HOP and h[0].lower() not in named]
    assert out == kept
    assert strip_hop_by_hop(out) == out


# -- Basic credentials ---------------------------------------------------------------------


def basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize(
    "value, expected",
    [
        (basic(b"alice:secret"), ("alice", "secret")),
        (basic(b"alice:se:cr:et"), ("alice", "se:cr:et")),
        (basic(b"alice:"), ("alice", "")),
        (basic(b":pw"), ("", "pw")),
        (b"basic " + base64.b64encode(b"a:b"), ("a", "b")),
        (b"  Basic   " + base64.b64encode(b"a:b") + b"  ", ("a", "b")),
        (basic("jörg:pässword".encode()), ("jörg", "pässword")),
        (None, None),
        (b"", None),
        (b"Bearer abc", None),
        (b"Basic", None),
        (b"Basic !!!notbase64", None),
        (basic(b"no-colon"), None),
    ],
)
def test_parse_basic_credentials(value: bytes | None, expected: tuple[str, str] | None) -> None:
    assert parse_basic_credentials(value) == expected


@given(st.text(max_size=20).filter(lambda u: ":" not in u), st.text(max_size=20))
def test_parse_basic_credentials_round_trip(user: str, password: str) -> None:
    raw = f"{user}:{password}".encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert parse_basic_credentials(basic(raw)) == (user, password)


@given(st.binary(max_size=80))
def test_parse_basic_credentials_random_bytes(value: bytes) -> None:
    got = parse_basic_credentials(value)
    assert got is None or (isinstance(got[0], str) and isinstance(got[1], str))


FRAMING = st.sampled_from(
    [
        (b"content-length", b"4"),
        (b"transfer-encoding", b"chunked"),
        (b"host", b"a"),
        (b"x-other", b"1"),
    ]
)


@given(st.lists(FRAMING, max_size=6))
def test_framing_problem_refuses_exactly_both_framings(headers: list[tuple[bytes, bytes]]) -> None:
    names = {k for k, _ in headers}
    both = {b"content-length", b"transfer-encoding"} <= names
    assert (framing_problem(headers) is not None) == both


@given(
    st.lists(st.sampled_from(["Content-Length: 4", "Transfer-Encoding: chunked", "X: y"])),
    st.binary(max_size=30),
)
def test_request_heads_with_framing_headers_parse_or_fail_typed(
    lines: list[str], trailing: bytes
) -> None:
    """The head parser accepts framing headers in any order; the forwarder's check decides."""
    raw = ("POST http://a/ HTTP/1.1\r\n" + "".join(x + "\r\n" for x in lines) + "\r\n").encode()
    head = parse_request_head(raw + trailing)
    assert head is not None
    lowered = [(k.lower(), v) for k, v in head.headers]
    assert (framing_problem(lowered) is not None) == (
        "Content-Length: 4" in lines and "Transfer-Encoding: chunked" in lines
    )
