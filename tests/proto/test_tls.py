"""SNI extraction from the first TLS record, checked against ClientHellos OpenSSL really sends."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwdproxy.proto.tls import MAX_RECORD_BYTES, NEED_DATA, parse_client_hello_sni


def openssl_client_hello(
    server_hostname: str, maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> bytes:
    """The bytes a stdlib TLS client sends first, captured through a memory BIO (no socket)."""
    ctx = ssl.create_default_context()
    ctx.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def vec(len_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(len_bytes, "big") + body


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([name_type]) + vec(2, name) for name_type, name in names)
    return b"\x00\x00" + vec(2, vec(2, entries))


def hand_made_hello(extensions: bytes | None, *, handshake_type: int = 1) -> bytes:
    """A minimal TLS 1.2-style ClientHello record; `extensions=None` omits the block entirely."""
    body = b"\x03\x03" + bytes(32) + vec(1, b"") + vec(2, b"\x00\x2f") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, extensions)
    return b"\x16\x03\x01" + vec(2, bytes([handshake_type]) + vec(3, body))


OTHER_EXT = b"\x00\x0b" + vec(2, b"\x01\x00")  # ec_point_formats: uncompressed


@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        pytest.param("registry-1.docker.io", "registry-1.docker.io", id="docker-hub"),
        pytest.param("Quay.IO", "quay.io", id="lower-cased"),
        pytest.param("a" * 60 + ".example.org", "a" * 60 + ".example.org", id="long-name"),
    ],
)
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"]
)
def test_tls_sni_from_openssl_client_hello(
    server_hostname: str, expected: str, version: ssl.TLSVersion
) -> None:
    hello = openssl_client_hello(server_hostname, version)
    assert parse_client_hello_sni(hello) == expected
    assert parse_client_hello_sni(hello + b"\x17\x03\x03\x00\x10" + bytes(16)) == expected


def test_tls_every_prefix_of_a_real_hello_needs_data() -> None:
    hello = openssl_client_hello("ghcr.io")
    for n in range(len(hello)):
        assert parse_client_hello_sni(hello[:n]) is NEED_DATA, n
    assert parse_client_hello_sni(hello) == "ghcr.io"


@pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::1"])
def test_tls_client_hello_to_ip_literal_has_no_sni(address: str) -> None:
    hello = openssl_client_hello(address)
    assert hello[0] == 0x16
    assert parse_client_hello_sni(hello) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(hand_made_hello(None), None, id="no-extensions"),
        pytest.param(hand_made_hello(b""), None, id="empty-extensions"),
        pytest.param(hand_made_hello(OTHER_EXT), None, id="no-sni-extension"),
        pytest.param(
            hand_made_hello(OTHER_EXT + sni_ext((0, b"GCR.io"))), "gcr.io", id="sni-not-first"
        ),
        pytest.param(
            hand_made_hello(sni_ext((7, b"other"), (0, b"k8s.gcr.io"))),
            "k8s.gcr.io",
            id="host-name-after-unknown-type",
        ),
        pytest.param(hand_made_hello(sni_ext((7, b"other"))), None, id="no-host-name-entry"),
        pytest.param(hand_made_hello(sni_ext((0, b""))), None, id="empty-host-name"),
        pytest.param(hand_made_hello(sni_ext((0, b"a\x00b"))), None, id="nul-in-host-name"),
        pytest.param(hand_made_hello(sni_ext((0, b"b\xc3\xbcch"))), None, id="non-ascii"),
        pytest.param(
            hand_made_hello(sni_ext((0, b"x.io")), handshake_type=2), None, id="server-hello"
        ),
        pytest.param(b"GET / HTTP/1.1\r\n", None, id="plain-http"),
        pytest.param(b"\x16", NEED_DATA, id="one-byte"),
        pytest.param(b"\x16\x02", None, id="not-tls-major-version"),
        pytest.param(b"\x17\x03\x03\x00\x10", None, id="application-data"),
        pytest.param(b"\x16\x03\x01\x00\x00", None, id="empty-record"),
        pytest.param(b"\x16\x03\x01\x40\x01", None, id="record-over-16k"),
        pytest.param(b"\x16\x03\x01\x40\x00\x02", None, id="not-client-hello-early"),
        pytest.param(b"\x16\x03\x01\x40\x00\x01", NEED_DATA, id="max-record-waits"),
        pytest.param(b"", NEED_DATA, id="empty"),
    ],
)  # fmt: skip
def test_tls_hand_made_records(data: bytes, expected: object) -> None:
    assert parse_client_hello_sni(data) == expected


def test_tls_truncated_extension_is_none() -> None:
    hello = hand_made_hello(sni_ext((0, b"quay.io")))
    body = hello[5:-3]  # drop the name's tail but keep the (now lying) length fields
    record = b"\x16\x03\x01" + vec(2, body)
    assert parse_client_hello_sni(record) is None


def test_tls_hello_fragmented_over_two_records_is_none() -> None:
    hello = openssl_client_hello("registry.k8s.io")
    handshake = hello[5:]
    first = b"\x16\x03\x01" + vec(2, handshake[:40])
    second = b"\x16\x03\x01" + vec(2, handshake[40:])
    assert parse_client_hello_sni(first + second) is None


def test_tls_never_waits_beyond_one_max_record() -> None:
    header = b"\x16\x03\x01\x40\x00"  # a 16384-byte record
    assert parse_client_hello_sni(header + b"\x01" + bytes(MAX_RECORD_BYTES - 7)) is NEED_DATA
    assert parse_client_hello_sni(header + b"\x01" + bytes(MAX_RECORD_BYTES - 6)) is None


@given(st.sampled_from([b"", b"\x16", b"\x16\x03\x01", b"\x16\x03\x03\x00\x40\x01"]), st.binary())
def test_tls_fuzz_random_bytes(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    result = parse_client_hello_sni(data)
    assert result is None or result is NEED_DATA or isinstance(result, str)
    if result is NEED_DATA:
        assert len(data) < MAX_RECORD_BYTES


REAL_HELLO = openssl_client_hello("index.docker.io")


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(REAL_HELLO) - 1), st.integers(0, 255)), max_size=6))
def test_tls_fuzz_mutated_real_hello(flips: list[tuple[int, int]]) -> None:
    data = bytearray(REAL_HELLO)
    for pos, value in flips:
        data[pos] = value
    result = parse_client_hello_sni(bytes(data))
    assert result is None or result is NEED_DATA or isinstance(result, str)
    if not flips:
        assert result == "index.docker.io"
