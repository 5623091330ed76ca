"""SOCKS5/SOCKS4 server machines: every input fed whole, byte by byte and with trailing bytes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from python_socks._protocols import socks4 as ps4
from python_socks._protocols import socks5 as ps5
from python_socks._protocols.errors import ReplyError

from fwdproxy.core.errors import ProtocolError, Socks5Reply
from fwdproxy.proto import need, tls
from fwdproxy.proto.socks import (
    MAX_HOSTNAME_BYTES,
    MAX_PENDING_BYTES,
    MAX_USERID_BYTES,
    NEED_DATA,
    NeedData,
    Socks4Server,
    Socks5Credentials,
    Socks5Greeting,
    Socks5Server,
    SocksConnect,
)

GREETING_NOAUTH = b"\x05\x01\x00"
GREETING_BOTH = b"\x05\x02\x00\x02"
REQ_V4 = b"\x05\x01\x00\x01\xc0\x00\x02\x07\x01\xbb"  # 192.0.2.7:443
REQ_V6 = b"\x05\x01\x00\x04" + bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x00\x50"
REQ_DOMAIN = b"\x05\x01\x00\x03\x14registry-1.docker.io\x01\xbb"
AUTH_ALICE = b"\x01\x05alice\x06s3cr3t"
OPTIMISTIC = b"\x16\x03\x01\x00\x05hello"

Event = object


@dataclass
class Transcript:
    """What a well-behaved session sees and writes while driving a machine to its end."""

    events: list[Event] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    error: tuple[str, int, int] | None = None  # (message, socks_reply, status_hint)
    trailing: bytes = b""


def drive5(
    chunks: Sequence[bytes], *, require_auth: bool = False, auth_ok: bool = True
) -> Transcript:
    """Feed `chunks` (then EOF) into a Socks5Server, answering greeting and credentials."""
    m = Socks5Server(require_auth=require_auth)

    def answer(ev: Event) -> bytes | None:
        if isinstance(ev, Socks5Greeting):
            return m.choose_method()
        if isinstance(ev, Socks5Credentials):
            return m.auth_reply(auth_ok)
        return None

    return _drive(m, chunks, answer)


def drive4(chunks: Sequence[bytes]) -> Transcript:
    return _drive(Socks4Server(), chunks, lambda ev: None)


def _drive(
    m: Socks5Server | Socks4Server,
    chunks: Sequence[bytes],
    answer: Callable[[Event], bytes | None],
) -> Transcript:
    out = Transcript()
    pending = list(chunks)
    try:
        while True:
            ev = m.next_event()
            if ev is NEED_DATA:
                m.receive_data(pending.pop(0) if pending else b"")
                continue
            out.events.append(ev)
            if isinstance(ev, SocksConnect):
                break
            written = answer(ev)
            assert written is not None
            out.written.append(written)
    except ProtocolError as err:
        out.error = (str(err), err.socks_reply, err.status_hint)
        return out
    for chunk in pending:  # what the session reads after the handshake, before relaying
        m.receive_data(chunk)
    out.trailing = m.trailing_data
    return out


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


FEEDS = [pytest.param(whole, id="whole"), pytest.param(bytewise, id="bytewise")]
TRAILING = [pytest.param(b"", id="bare"), pytest.param(OPTIMISTIC, id="trailing")]


def expect_error(
    out: Transcript, fragment: str, reply: Socks5Reply = Socks5Reply.GENERAL_FAILURE
) -> None:
    assert out.error is not None, out
    message, got_reply, _status = out.error
    assert fragment in message
    assert got_reply == reply


# ---------------------------------------------------------------------------------- SOCKS5


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        pytest.param(REQ_V4, SocksConnect("192.0.2.7", 443, 5, "ipv4"), id="ipv4"),
        pytest.param(REQ_V6, SocksConnect("2001:db8::1", 80, 5, "ipv6"), id="ipv6"),
        pytest.param(
            REQ_DOMAIN, SocksConnect("registry-1.docker.io", 443, 5, "domain"), id="domain"
        ),
        pytest.param(
            b"\x05\x01\x00\x03\x0ab\xc3\xbccher.de\x00\x50",
            SocksConnect("xn--bcher-kva.de", 80, 5, "domain"),
            id="utf8-domain-as-idna",
        ),
        pytest.param(
            b"\x05\x01\x00\x03\x08GHCR.io.\xff\xff",
            SocksConnect("GHCR.io.", 0xFFFF, 5, "domain"),
            id="domain-kept-verbatim",
        ),
    ],
)
def test_socks5_server_connect_targets(
    feed: Callable[[bytes], list[bytes]],
    trailing: bytes,
    request_bytes: bytes,
    expected: SocksConnect,
) -> None:
    out = drive5(feed(GREETING_NOAUTH + request_bytes + trailing))
    assert out.error is None
    assert out.events == [Socks5Greeting((0,)), expected]
    assert out.written == [b"\x05\x00"]
    assert out.trailing == trailing


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
def test_socks5_server_username_password(
    feed: Callable[[bytes], list[bytes]], trailing: bytes
) -> None:
    out = drive5(feed(GREETING_BOTH + AUTH_ALICE + REQ_DOMAIN + trailing), require_auth=True)
    assert out.error is None
    assert out.events == [
        Socks5Greeting((0, 2)),
        Socks5Credentials("alice", "s3cr3t"),
        SocksConnect("registry-1.docker.io", 443, 5, "domain"),
    ]
    assert out.written == [b"\x05\x02", b"\x01\x00"]
    assert out.trailing == trailing


def test_socks5_server_credentials_keep_non_utf8_bytes() -> None:
    out = drive5([GREETING_BOTH + b"\x01\x02\xffu\x03p\xc3\xa4" + REQ_V4], require_auth=True)
    creds = out.events[1]
    assert isinstance(creds, Socks5Credentials)
    assert creds.password == "pä"
    assert creds.username.encode("utf-8", "surrogateescape") == b"\xffu"


def test_socks5_server_credentials_repr_hides_password() -> None:
    assert "s3cr3t" not in repr(Socks5Credentials("alice", "s3cr3t"))


def test_socks5_server_empty_credentials_are_events() -> None:
    out = drive5([GREETING_BOTH + b"\x01\x00\x00" + REQ_V4], require_auth=True)
    assert out.events[1] == Socks5Credentials("", "")


def test_socks5_server_auth_rejected_enters_error() -> None:
    out = drive5([GREETING_BOTH + AUTH_ALICE + REQ_V4], require_auth=True, auth_ok=False)
    assert out.written == [b"\x05\x02", b"\x01\x01"]
    expect_error(out, "rejected", Socks5Reply.NOT_ALLOWED)


SOCKS5_ERRORS = [
    # (id, input, require_auth, message fragment, socks reply)
    ("bind", GREETING_NOAUTH + b"\x05\x02\x00\x01" + bytes(6), False, "BIND",
     Socks5Reply.COMMAND_NOT_SUPPORTED),
    ("udp-associate", GREETING_NOAUTH + b"\x05\x03\x00\x01" + bytes(6), False, "UDP ASSOCIATE",
     Socks5Reply.COMMAND_NOT_SUPPORTED),
    ("unknown-command", GREETING_NOAUTH + b"\x05\x09\x00\x01" + bytes(6), False, "0x09",
     Socks5Reply.COMMAND_NOT_SUPPORTED),
    ("greeting-version", b"\x04\x01\x00", False, "version byte 0x04",
     Socks5Reply.GENERAL_FAILURE),
    ("request-version", GREETING_NOAUTH + b"\x04\x01\x00\x01" + bytes(6), False,
     "request version 0x04", Socks5Reply.GENERAL_FAILURE),
    ("bad-atyp", GREETING_NOAUTH + b"\x05\x01\x00\x02" + bytes(6), False, "address type 0x02",
     Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ("zero-length-domain", GREETING_NOAUTH + b"\x05\x01\x00\x03\x00\x00\x50", False,
     "empty host name", Socks5Reply.GENERAL_FAILURE),
    ("nul-in-domain", GREETING_NOAUTH + b"\x05\x01\x00\x03\x03a\x00b\x00\x50", False,
     "control", Socks5Reply.GENERAL_FAILURE),
    ("space-in-domain", GREETING_NOAUTH + b"\x05\x01\x00\x03\x03a b\x00\x50", False,
     "control", Socks5Reply.GENERAL_FAILURE),
    ("non-utf8-domain", GREETING_NOAUTH + b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", False,
     "neither ASCII nor UTF-8", Socks5Reply.GENERAL_FAILURE),
    ("no-acceptable-method", b"\x05\x01\x02", False, "no acceptable",
     Socks5Reply.NOT_ALLOWED),
    ("auth-required-not-offered", GREETING_NOAUTH, True, "server requires 0x02",
     Socks5Reply.NOT_ALLOWED),
    ("empty-method-list", b"\x05\x00", False, "offered [none]", Socks5Reply.NOT_ALLOWED),
    ("rfc1929-version", GREETING_BOTH + b"\x05\x05alice\x06s3cr3t", True,
     "RFC 1929 auth version 0x05", Socks5Reply.GENERAL_FAILURE),
    ("eof-in-greeting", b"\x05\x02\x00", False, "middle of the SOCKS5 greeting",
     Socks5Reply.GENERAL_FAILURE),
    ("eof-in-auth", GREETING_BOTH + b"\x01\x05ali", True, "middle of the SOCKS5 username",
     Socks5Reply.GENERAL_FAILURE),
    ("eof-in-request", GREETING_NOAUTH + REQ_DOMAIN[:-1], False, "middle of the SOCKS5 request",
     Socks5Reply.GENERAL_FAILURE),
    ("eof-before-greeting", b"", False, "middle of the SOCKS5 greeting",
     Socks5Reply.GENERAL_FAILURE),
]  # fmt: skip


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize(
    ("data", "require_auth", "fragment", "reply"),
    [pytest.param(*case[1:], id=case[0]) for case in SOCKS5_ERRORS],
)
def test_socks5_server_errors(
    feed: Callable[[bytes], list[bytes]],
    data: bytes,
    require_auth: bool,
    fragment: str,
    reply: Socks5Reply,
) -> None:
    out = drive5(feed(data), require_auth=require_auth)
    expect_error(out, fragment, reply)
    assert not any(isinstance(ev, SocksConnect) for ev in out.events)


def test_socks5_server_error_is_sticky_but_reply_still_works() -> None:
    m = Socks5Server()
    m.receive_data(GREETING_NOAUTH + b"\x05\x02\x00\x01" + bytes(6))
    assert m.next_event() == Socks5Greeting((0,))
    assert m.choose_method() == b"\x05\x00"
    with pytest.raises(ProtocolError) as excinfo:
        m.next_event()
    err = excinfo.value
    assert err.socks_reply == Socks5Reply.COMMAND_NOT_SUPPORTED
    assert m.reply_expected
    assert m.reply(err.socks_reply) == b"\x05\x07\x00\x01" + bytes(6)
    for call in (m.next_event, lambda: m.receive_data(b"x"), m.choose_method):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value.socks_reply == Socks5Reply.COMMAND_NOT_SUPPORTED
    assert m.trailing_data == b""


def test_socks5_server_no_reply_expected_before_method_chosen() -> None:
    m = Socks5Server()
    m.receive_data(b"\x06")
    with pytest.raises(ProtocolError):
        m.next_event()
    assert not m.reply_expected


def test_socks5_server_no_acceptable_method_closes() -> None:
    m = Socks5Server(require_auth=True)
    m.receive_data(GREETING_NOAUTH)
    assert m.next_event() == Socks5Greeting((0,))
    assert m.choose_method() == b"\x05\xff"
    with pytest.raises(ProtocolError) as excinfo:
        m.next_event()
    assert excinfo.value.status_hint == 407


def test_socks5_server_oversize_buffer() -> None:
    m = Socks5Server()
    m.receive_data(GREETING_NOAUTH + bytes(MAX_PENDING_BYTES))
    with pytest.raises(ProtocolError) as excinfo:
        m.next_event()
    assert excinfo.value.status_hint == 431


def test_socks5_server_optimistic_data_up_to_cap_survives() -> None:
    data = GREETING_NOAUTH + REQ_V4
    payload = b"p" * (MAX_PENDING_BYTES - len(data))
    out = drive5([data + payload])
    assert out.error is None
    assert out.trailing == payload


@pytest.mark.parametrize(
    ("setup", "call"),
    [
        pytest.param(b"", lambda m: m.choose_method(), id="choose-before-greeting"),
        pytest.param(GREETING_NOAUTH, lambda m: m.auth_reply(True), id="auth-without-creds"),
        pytest.param(GREETING_NOAUTH, lambda m: m.next_event(), id="next-before-choose"),
    ],
)
def test_socks5_server_misuse_is_runtime_error(
    setup: bytes, call: Callable[[Socks5Server], object]
) -> None:
    m = Socks5Server()
    if setup:
        m.receive_data(setup)
        assert isinstance(m.next_event(), Socks5Greeting)
    with pytest.raises(RuntimeError):
        call(m)


def test_socks5_server_next_event_after_connect_is_runtime_error() -> None:
    m = Socks5Server()
    m.receive_data(GREETING_NOAUTH + REQ_V4)
    m.next_event()
    m.choose_method()
    assert isinstance(m.next_event(), SocksConnect)
    with pytest.raises(RuntimeError):
        m.next_event()


def test_socks5_server_data_after_eof_is_runtime_error() -> None:
    m = Socks5Server()
    m.receive_data(b"")
    with pytest.raises(RuntimeError):
        m.receive_data(b"\x05")


@pytest.mark.parametrize(
    ("code", "bound", "expected"),
    [
        pytest.param(Socks5Reply.SUCCEEDED, None, b"\x05\x00\x00\x01" + bytes(6), id="default"),
        pytest.param(
            Socks5Reply.SUCCEEDED,
            ("10.1.2.3", 40000),
            b"\x05\x00\x00\x01\x0a\x01\x02\x03\x9c\x40",
            id="ipv4",
        ),
        pytest.param(
            Socks5Reply.SUCCEEDED,
            ("2001:db8::1", 443),
            b"\x05\x00\x00\x04" + bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x01\xbb",
            id="ipv6",
        ),
        pytest.param(
            Socks5Reply.HOST_UNREACHABLE,
            ("::", 0),
            b"\x05\x04\x00\x04" + bytes(18),
            id="ipv6-unspecified",
        ),
        pytest.param(6, ("example.org", 1), b"\x05\x06\x00\x03\x0bexample.org\x00\x01", id="name"),
    ],
)
def test_socks5_server_reply_encoding(
    code: int, bound: tuple[str, int] | None, expected: bytes
) -> None:
    assert Socks5Server().reply(code, bound) == expected


def test_socks5_server_reply_rejects_bad_code() -> None:
    with pytest.raises(ValueError, match="out of range"):
        Socks5Server().reply(256)


# ---------------------------------------------------------------------------------- SOCKS4

S4_IPV4 = b"\x04\x01\x01\xbb\xc0\x00\x02\x07alice\x00"
S4A = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00quay.io\x00"


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(S4_IPV4, SocksConnect("192.0.2.7", 443, 4, "ipv4", "alice"), id="ipv4"),
        pytest.param(S4A, SocksConnect("quay.io", 80, 4, "domain"), id="socks4a"),
        pytest.param(
            b"\x04\x01\x00\x16\x00\x00\x00\x00\x00",
            SocksConnect("0.0.0.0", 22, 4, "ipv4"),
            id="zero-ip-is-not-4a",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\xff" + b"u" * MAX_USERID_BYTES + b"\x00"
            + b"h" * MAX_HOSTNAME_BYTES + b"\x00",
            SocksConnect("h" * MAX_HOSTNAME_BYTES, 80, 4, "domain", "u" * MAX_USERID_BYTES),
            id="fields-at-cap",
        ),
    ],
)  # fmt: skip
def test_socks4_server_connect(
    feed: Callable[[bytes], list[bytes]], trailing: bytes, data: bytes, expected: SocksConnect
) -> None:
    out = drive4(feed(data + trailing))
    assert out.error is None
    assert out.events == [expected]
    assert out.trailing == trailing


SOCKS4_ERRORS = [
    ("bad-version", b"\x05\x01\x00\x50\x01\x02\x03\x04\x00", "version 0x05"),
    ("bind", b"\x04\x02\x00\x50\x01\x02\x03\x04\x00", "BIND"),
    ("unknown-command", b"\x04\x07\x00\x50\x01\x02\x03\x04\x00", "0x07"),
    ("userid-oversize", b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 256, "USERID longer"),
    ("hostname-oversize", S4A[:9] + b"h" * 256 + b"\x00", "hostname longer"),
    ("empty-hostname", S4A[:9] + b"\x00", "empty host name"),
    ("control-in-hostname", S4A[:9] + b"a\tb\x00", "control"),
    ("eof-in-userid", S4_IPV4[:-1], "middle of the SOCKS4 request"),
    ("eof-in-hostname", S4A[:-1], "middle of the SOCKS4a request"),
]


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize(
    ("data", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in SOCKS4_ERRORS]
)
def test_socks4_server_errors(
    feed: Callable[[bytes], list[bytes]], data: bytes, fragment: str
) -> None:
    out = drive4(feed(data))
    assert out.events == []
    assert out.error is not None
    assert fragment in out.error[0]


def test_socks4_server_error_is_sticky_but_reply_still_works() -> None:
    m = Socks4Server()
    m.receive_data(b"\x04\x02")
    with pytest.raises(ProtocolError):
        m.next_event()
    with pytest.raises(ProtocolError):
        m.next_event()
    assert m.reply(False) == b"\x00\x5b" + bytes(6)


@pytest.mark.parametrize(
    ("granted", "bound", "expected"),
    [
        pytest.param(True, None, b"\x00\x5a" + bytes(6), id="granted"),
        pytest.param(False, None, b"\x00\x5b" + bytes(6), id="rejected"),
        pytest.param(True, ("10.0.0.1", 1080), b"\x00\x5a\x04\x38\x0a\x00\x00\x01", id="ipv4"),
        pytest.param(True, ("::1", 1080), b"\x00\x5a\x04\x38" + bytes(4), id="ipv6-as-zero"),
    ],
)
def test_socks4_server_reply_encoding(
    granted: bool, bound: tuple[str, int] | None, expected: bytes
) -> None:
    assert Socks4Server().reply(granted, bound) == expected


# --------------------------------------------------------------- pair tests (python-socks)


@pytest.mark.parametrize("host", ["registry-1.docker.io", "192.0.2.7", "2001:db8::1"])
@pytest.mark.parametrize("with_auth", [False, True], ids=["noauth", "userpass"])
def test_socks5_server_pair_with_python_socks_client(host: str, with_auth: bool) -> None:
    client = ps5.Connection()
    server = Socks5Server(require_auth=with_auth)
    user, password = ("alice", "s3cr3t") if with_auth else (None, None)

    server.receive_data(client.send(ps5.AuthMethodsRequest(username=user, password=password)))
    assert isinstance(server.next_event(), Socks5Greeting)
    method = client.receive(server.choose_method())
    if with_auth:
        assert method.method == ps5.AuthMethod.USERNAME_PASSWORD
        server.receive_data(client.send(ps5.AuthRequest(username="alice", password="s3cr3t")))
        assert server.next_event() == Socks5Credentials("alice", "s3cr3t")
        client.receive(server.auth_reply(True))
    server.receive_data(client.send(ps5.ConnectRequest(host=host, port=5000)))
    event = server.next_event()
    assert isinstance(event, SocksConnect)
    assert (event.host, event.port) == (host, 5000)

    reply = client.receive(server.reply(Socks5Reply.SUCCEEDED, ("2001:db8::9", 61000)))
    assert (reply.bound_host, reply.bound_port) == ("2001:db8::9", 61000)


def test_socks5_server_pair_failure_reply_seen_by_python_socks() -> None:
    client = ps5.Connection()
    server = Socks5Server()
    server.receive_data(client.send(ps5.AuthMethodsRequest(username=None, password=None)))
    server.next_event()
    client.receive(server.choose_method())
    server.receive_data(client.send(ps5.ConnectRequest(host="gcr.io", port=443)))
    server.next_event()
    with pytest.raises(ReplyError) as excinfo:
        client.receive(server.reply(Socks5Reply.HOST_UNREACHABLE))
    assert excinfo.value.error_code == Socks5Reply.HOST_UNREACHABLE


@pytest.mark.parametrize("host", ["ghcr.io", "192.0.2.7"])
def test_socks4_server_pair_with_python_socks_client(host: str) -> None:
    server = Socks4Server()
    server.receive_data(ps4.ConnectRequest(host=host, port=443, user_id="bob").dumps())
    event = server.next_event()
    assert isinstance(event, SocksConnect)
    assert (event.host, event.port, event.user_id) == (host, 443, "bob")
    reply = ps4.ConnectReply.loads(server.reply(True, ("192.0.2.1", 8080)))
    assert (reply.host, reply.port) == ("192.0.2.1", 8080)


# ------------------------------------------------------------------------------ properties


def test_need_data_is_one_shared_singleton() -> None:
    assert NEED_DATA is need.NEED_DATA is tls.NEED_DATA
    assert NeedData() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


@st.composite
def split(draw: st.DrawFn, prefixes: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Random bytes behind a plausible prefix, and the same bytes cut at random points."""
    data = draw(st.sampled_from(prefixes)) + draw(st.binary(max_size=600))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=8)))
    bounds = [0, *(c for c in cuts if c < len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return data, chunks


S5_PREFIXES = [
    b"",
    GREETING_NOAUTH,
    GREETING_BOTH,
    GREETING_BOTH + b"\x01",
    GREETING_NOAUTH + b"\x05\x01\x00",
    GREETING_NOAUTH + b"\x05\x01\x00\x03",
    GREETING_BOTH + AUTH_ALICE + b"\x05\x01\x00\x03",
    GREETING_NOAUTH + REQ_V4,  # whatever follows is trailing data
    GREETING_BOTH + AUTH_ALICE + REQ_V6,
]
S4_PREFIXES = [b"", b"\x04\x01", b"\x04\x01\x00\x50\x01\x02\x03\x04", S4A[:9], S4_IPV4, S4A]


@settings(deadline=None)
@given(split(S5_PREFIXES), st.booleans(), st.booleans())
def test_socks5_server_fuzz_only_events_or_protocol_error(
    case: tuple[bytes, list[bytes]], require_auth: bool, auth_ok: bool
) -> None:
    data, chunks = case
    # Anything but ProtocolError escaping from the machine fails the test right here.
    at_once = drive5([data] if data else [], require_auth=require_auth, auth_ok=auth_ok)
    in_pieces = drive5(chunks, require_auth=require_auth, auth_ok=auth_ok)
    assert at_once == in_pieces
    if at_once.error is None:
        assert isinstance(at_once.events[-1], SocksConnect)
        assert data.endswith(at_once.trailing)


@settings(deadline=None)
@given(split(S4_PREFIXES))
def test_socks4_server_fuzz_only_events_or_protocol_error(
    case: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = case
    at_once = drive4([data] if data else [])
    assert at_once == drive4(chunks)
    if at_once.error is None:
        assert [type(ev) for ev in at_once.events] == [SocksConnect]
        assert data.endswith(at_once.trailing)
