"""Read the SNI host name out of the first TLS record a client sends through a tunnel, sans-IO.

The proxy uses SNI only as a routing/logging hint, never for security, so anything that is not
a well-formed ClientHello returns None ("no hint") instead of raising: a client speaking some
other protocol, or a hello we cannot read, must still get its bytes relayed untouched.

Only the first TLS record is parsed. A ClientHello fragmented over several records (rare; some
censorship-evasion tools do it on purpose) also returns None. The record may arrive in any
number of TCP reads: NEED_DATA asks for more, and no more than 5 + 16 KiB is ever waited for,
since that is the largest legal TLS plaintext record (RFC 8446 §5.1).
"""

from __future__ import annotations

from typing import Final

from fwdproxy.proto.need import NEED_DATA, NeedData

__all__ = ["MAX_RECORD_BYTES", "NEED_DATA", "NeedData", "parse_client_hello_sni"]

MAX_RECORD_BYTES: Final = 5 + 2**14  # record header + largest TLSPlaintext.fragment

_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_EXT_SERVER_NAME: Final = 0x0000
_NAME_TYPE_HOST: Final = 0x00


class _Malformed(Exception):
    """Internal: the bytes are not a ClientHello we can read."""


class _Reader:
    """Bounds-checked big-endian reads over a bytes slice."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def done(self) -> bool:
        return self._pos >= len(self._data)

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise _Malformed
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> _Reader:
        """A length-prefixed sub-structure (TLS `opaque x<a..b>`)."""
        return _Reader(self.take(self.uint(len_bytes)))


def parse_client_hello_sni(data: bytes) -> str | NeedData | None:
    """The lower-cased SNI host_name in `data` (the tunnel's first client bytes).

    Returns None when there is no SNI or `data` is not a (readable) TLS ClientHello, and
    NEED_DATA when the first record is still incomplete. Never raises on peer input.
    """
    if not data:
        return NEED_DATA
    if data[0] != _HANDSHAKE or (len(data) >= 2 and data[1] != 0x03):
        return None
    if len(data) < 5:
        return NEED_DATA
    length = int.from_bytes(data[3:5], "big")
    if not 4 <= length <= MAX_RECORD_BYTES - 5:
        return None
    if data[5:6] not in (b"", bytes([_CLIENT_HELLO])):
        return None
    if len(data) < 5 + length:
        return NEED_DATA
    try:
        return _sni_from_handshake(_Reader(data[5 : 5 + length]))
    except _Malformed:
        return None


def _sni_from_handshake(record: _Reader) -> str | None:
    if record.uint(1) != _CLIENT_HELLO:
        return None
    hello = record.vector(3)  # a hello longer than this record (fragmented) is _Malformed
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.done:
        return None  # no extensions at all (legal before TLS 1.3)
    extensions = hello.vector(2)
    while not extensions.done:
        ext_type = extensions.uint(2)
        body = extensions.vector(2)
        if ext_type == _EXT_SERVER_NAME:
            return _host_name(body)
    return None


def _host_name(ext: _Reader) -> str | None:
    """The host_name entry of a server_name extension (RFC 6066 §3), validated."""
    names = ext.vector(2)
    while not names.done:
        name_type = names.uint(1)
        name = names.take(names.uint(2))
        if name_type == _NAME_TYPE_HOST:
            return _valid_host(name)
    return None


def _valid_host(raw: bytes) -> str | None:
    # RFC 6066: ASCII, no trailing dot. Control bytes or spaces mean garbage, not a name.
    if not raw or not raw.isascii() or any(b <= 0x20 or b == 0x7F for b in raw):
        return None
    return raw.decode("ascii").lower()
