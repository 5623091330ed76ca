"""HTTP/1.x proxy request heads (pure): CONNECT authority, absolute-form URLs, hop-by-hop headers.

The first request on a connection is parsed here (cheaply, without building an h11 machine)
to decide between a CONNECT tunnel and plain forwarding. Forwarded requests and all body
framing then go through h11; this module only supplies the proxy-specific pieces h11 leaves to
its caller: where the request goes and which headers must not be forwarded.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fwdproxy.core.addr import AddressError, split_host_port
from fwdproxy.core.errors import ProtocolError

_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
_VERSION: Final = re.compile(rb"HTTP/1\.[01]")
_VERSION_ANY: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
_HEADER_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_OK: Final = re.compile(rb"[\x21-\x7e]+")

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head. `trailing` holds the bytes after the head (body or tunnel data)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    head_bytes: bytes
    trailing: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: normalised host, port, and the origin-form path for forwarding."""

    host: str
    port: int
    path: str = "/"
    scheme: str = "http"


def find_head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending the head, or -1."""
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    if i < 0 and j < 0:
        return -1
    if i < 0:
        return j + 2
    if j < 0:
        return i + 4
    return min(i + 4, j + 2)


def parse_request_head(buf: bytes, max_head_bytes: int = 16384) -> RequestHead | None:
    """Parse the request head at the start of `buf`; None while incomplete.

    Raises ProtocolError(400) on malformed input and ProtocolError(431) once the head exceeds
    `max_head_bytes` without ending.
    """
    end = find_head_end(buf)
    if end < 0:
        if len(buf) > max_head_bytes:
            raise ProtocolError(f"request head larger than {max_head_bytes} bytes", status_hint=431)
        return None
    if end > max_head_bytes:
        raise ProtocolError(f"request head larger than {max_head_bytes} bytes", status_hint=431)
    head = bytes(buf[:end])
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ProtocolError("malformed request line (expected 'METHOD TARGET HTTP/1.1')")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise ProtocolError("malformed request method")
    if not _TARGET_OK.fullmatch(target):
        raise ProtocolError("malformed request target")
    if not _VERSION.fullmatch(version):
        if version.startswith(b"HTTP/2"):
            raise ProtocolError("HTTP/2 is not supported on the proxy port", status_hint=505)
        if _VERSION_ANY.fullmatch(version):
            raise ProtocolError(
                f"HTTP version {version.decode('ascii')} is not supported", status_hint=505
            )
        # Not a version at all: a malformed request line (RFC 9112 §2.3), not an unsupported one.
        raise ProtocolError("malformed HTTP version in the request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("obsolete header line folding is not allowed")
        name, sep, value = line.partition(b":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise ProtocolError("malformed header line")
        headers.append((name, value.strip(b" \t")))
    return RequestHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version.decode("ascii")[5:],
        headers=tuple(headers),
        head_bytes=head,
        trailing=bytes(buf[end:]),
    )


def connect_target(authority: str) -> Target:
    """The target of `CONNECT host:port`; the port is required (RFC 9110 §9.3.6)."""
    try:
        host, port = split_host_port(authority)
    except AddressError as e:
        raise ProtocolError(f"bad CONNECT target {authority!r}: {e}") from None
    return Target(host, port, "", "tunnel")


def absolute_target(url: str) -> Target:
    """Split an absolute-form `http://host[:port]/path?q` URL into host, port and origin-form.

    Only `http://` is forwarded: an `https://` URL in absolute form would mean the proxy does
    the TLS, which a forward proxy must not do silently.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ProtocolError(
            "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port"
        )
    scheme = scheme.lower()
    if scheme != "http":
        raise ProtocolError(f"unsupported URL scheme {scheme!r}: use CONNECT for https")
    cut = len(rest)
    for ch in "/?#":
        k = rest.find(ch)
        if 0 <= k < cut:
            cut = k
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise ProtocolError("user info in the request URL is not allowed")
    if "#" in path:
        path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    try:
        host, port = split_host_port(authority, 80)
    except AddressError as e:
        raise ProtocolError(f"bad URL host {authority!r}: {e}") from None
    return Target(host, port, path, "http")


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers and every header named in `Connection` (RFC 9110 §7.6.1)."""
    named: set[bytes] = set()
    keep = []
    for h in headers:
        low = h[0].lower()
        if low in HOP_BY_HOP:
            if low == b"connection" or low == b"proxy-connection":
                named.update(t for tok in h[1].split(b",") if (t := tok.strip().lower()))
        else:
            keep.append((low, h))
    if named:  # (a header named in Connection may come before it)
        return [h for low, h in keep if low not in named]
    return [h for _, h in keep]


def framing_problem(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's body framing is ambiguous, or None (RFC 9112 §6.1, §6.3).

    h11 accepts a request with both Transfer-Encoding and Content-Length and frames it by
    Transfer-Encoding; an origin or another proxy may frame it by Content-Length. Whatever the
    two disagree about becomes a second, smuggled request, so such a request is refused.
    Differing Content-Length values and codings other than a final `chunked` are refused by
    h11 itself. Header names must be lower-case (as h11 gives them).
    """
    te = cl = False
    for name, _ in headers:
        if name == b"transfer-encoding":
            te = True
        elif name == b"content-length":
            cl = True
    if te and cl:
        return "request has both Transfer-Encoding and Content-Length (RFC 9112 §6.1)"
    return None


def parse_basic_credentials(value: bytes | None) -> tuple[str, str] | None:
    """`Basic base64(user:pass)` -> (user, pass); None when absent or not Basic."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.decode("utf-8", "replace").partition(":")
    if not sep:
        return None
    return user, password
