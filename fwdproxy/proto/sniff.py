"""Tell the protocol of a new client connection from its first byte.

One listening port serves SOCKS5, SOCKS4 and HTTP; the first byte is enough to tell them apart
(version byte 0x05 / 0x04, or the first letter of an HTTP method token). Anything else is a
client misconfiguration, and the error message names the likely mistake so that the log line
is actionable.
"""

from __future__ import annotations

import enum

from fwdproxy.core.errors import ProtocolError

__all__ = ["Protocol", "sniff"]


class Protocol(enum.Enum):
    SOCKS5 = "socks5"
    SOCKS4 = "socks4"
    HTTP = "http"


_BY_VERSION_BYTE = {0x05: Protocol.SOCKS5, 0x04: Protocol.SOCKS4}


def sniff(first: bytes) -> Protocol | None:
    """The protocol the client speaks, or None if `first` is empty (read more first).

    Only `first[0]` is looked at. Raises ProtocolError for anything that is not SOCKS5, SOCKS4
    or the start of an HTTP request line.
    """
    if not first:
        return None
    byte = first[0]
    proto = _BY_VERSION_BYTE.get(byte)
    if proto is not None:
        return proto
    if 0x41 <= byte <= 0x5A:  # A-Z: every HTTP method token (GET, CONNECT, ...) starts so
        return Protocol.HTTP
    raise ProtocolError(_describe(first))


def _describe(first: bytes) -> str:
    byte = first[0]
    if byte == 0x16:
        return (
            "TLS ClientHello sent to a plain proxy port: use http:// not https:// in the proxy URL"
        )
    if 0x61 <= byte <= 0x7A:
        return (
            f"request starts with lowercase {first[:8]!r}: HTTP methods are uppercase "
            "(is this an HTTP client at all?)"
        )
    return (
        f"unrecognised first byte 0x{byte:02x} ({first[:8]!r}): expected SOCKS5 (0x05), "
        "SOCKS4 (0x04) or an HTTP request line"
    )
