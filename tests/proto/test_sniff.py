"""First-byte protocol sniffing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.errors import ProtocolError
from fwdproxy.proto.sniff import Protocol, sniff


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        pytest.param(b"", None, id="empty-needs-data"),
        pytest.param(b"\x05", Protocol.SOCKS5, id="socks5-one-byte"),
        pytest.param(b"\x05\x02\x00\x02", Protocol.SOCKS5, id="socks5-greeting"),
        pytest.param(b"\x04\x01\x00\x50", Protocol.SOCKS4, id="socks4"),
        pytest.param(b"CONNECT ghcr.io:443 HTTP/1.1\r\n", Protocol.HTTP, id="http-connect"),
        pytest.param(b"GET http://example.org/ HTTP/1.1\r\n", Protocol.HTTP, id="http-get"),
        pytest.param(b"A", Protocol.HTTP, id="first-uppercase"),
        pytest.param(b"Z", Protocol.HTTP, id="last-uppercase"),
    ],
)
def test_sniff_recognises(first: bytes, expected: Protocol | None) -> None:
    assert sniff(first) is expected


@pytest.mark.parametrize(
    ("first", "fragment"),
    [
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01",
            "TLS ClientHello sent to a plain proxy port: use http:// not https:// in the proxy URL",
            id="tls-clienthello",
        ),
        pytest.param(b"get / HTTP/1.1", "lowercase b'get / HT'", id="lowercase-method"),
        pytest.param(b"\x00\x01", "unrecognised first byte 0x00", id="nul"),
        pytest.param(b"\x06", "unrecognised first byte 0x06", id="socks6"),
        pytest.param(b"@", "unrecognised first byte 0x40", id="before-A"),
        pytest.param(b"[", "unrecognised first byte 0x5b", id="after-Z"),
        pytest.param(b"\xff\xfe", "expected SOCKS5 (0x05), SOCKS4 (0x04)", id="binary"),
    ],
)
def test_sniff_rejects_with_a_useful_message(first: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        sniff(first)
    assert fragment in str(excinfo.value)
    assert excinfo.value.status_hint == 400


@given(st.binary(min_size=1), st.binary())
def test_sniff_only_looks_at_the_first_byte(first: bytes, rest: bytes) -> None:
    def outcome(data: bytes) -> Protocol | str:
        try:
            result = sniff(data)
        except ProtocolError:
            return "error"
        assert isinstance(result, Protocol)
        return result

    assert outcome(first[:1]) == outcome(first + rest)


PURE_MODULES = ["need.py", "sniff.py", "socks.py", "tls.py"]
FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "aiohttp", "time"}


@pytest.mark.parametrize("name", PURE_MODULES)
def test_proto_module_imports_nothing_that_does_io(name: str) -> None:
    path = Path(__file__).parents[2] / "fwdproxy" / "proto" / name
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert "__future__" in imported  # the walk really saw the import statements
    assert not imported & FORBIDDEN
