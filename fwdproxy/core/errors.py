"""Error hierarchy and the pure mapping from an error to what the client is told.

Every failure a client can see is one of these types, so the session code never matches on
message text: it asks `http_status()` / `socks_reply()` what to answer.
"""

from __future__ import annotations

import enum


class Socks5Reply(enum.IntEnum):
    """RFC 1928 §6 reply codes."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class FwdProxyError(Exception):
    """Base of every error fwdproxy raises on purpose."""


class ProtocolError(FwdProxyError):
    """The client sent something we cannot parse or will not serve.

    `status_hint` is the HTTP status to answer with (h11's convention); `socks_reply` the
    SOCKS5 reply code when the error happened after a SOCKS5 greeting.
    """

    def __init__(
        self,
        message: str,
        *,
        status_hint: int = 400,
        socks_reply: Socks5Reply = Socks5Reply.GENERAL_FAILURE,
    ) -> None:
        super().__init__(message)
        self.status_hint = status_hint
        self.socks_reply = socks_reply


class ConfigError(FwdProxyError, ValueError):
    """A configuration file is invalid. `problems` holds every problem, each with file:line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DialError(FwdProxyError, OSError):
    """Dialling the target (directly or through an upstream) failed.

    `hop` names the hop that failed ("direct", or the upstream's name) so that the client and
    the log can say which one; `status` and `socks_reply` say what the client is answered.
    """

    def __init__(
        self,
        message: str,
        *,
        hop: str,
        status: int = 502,
        socks_reply: Socks5Reply = Socks5Reply.GENERAL_FAILURE,
        kind: str = "error",
    ) -> None:
        super().__init__(message)
        self.hop = hop
        self.status = status
        self.socks_reply = socks_reply
        self.kind = kind


class DialTimeout(DialError, TimeoutError):
    """The dial did not finish within its deadline (HTTP 504, SOCKS 0x06)."""

    def __init__(self, message: str, *, hop: str) -> None:
        super().__init__(
            message, hop=hop, status=504, socks_reply=Socks5Reply.TTL_EXPIRED, kind="timeout"
        )


class Rejected(FwdProxyError):
    """A rule, the target deny-list or the client allow-list refused the connection."""

    def __init__(self, message: str, *, status: int = 403, credentials_given: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # A 407 for wrong credentials (a guess) rather than for missing ones (a challenge).
        self.credentials_given = credentials_given


class HandshakeTimeout(FwdProxyError):
    """The client did not finish its handshake or request head in time (HTTP 408)."""


class Overloaded(FwdProxyError):
    """Too many concurrent connections: refuse politely (HTTP 503, SOCKS 0x01), keep serving."""


HTTP_REASONS: dict[int, str] = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Payload Too Large",
    414: "URI Too Long",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def http_status(err: BaseException) -> int:
    """The HTTP status a proxy client is answered with for `err`."""
    if isinstance(err, DialError):
        return err.status
    if isinstance(err, Rejected):
        return err.status
    if isinstance(err, Overloaded):
        return 503
    if isinstance(err, HandshakeTimeout):
        return 408
    if isinstance(err, ProtocolError):
        return err.status_hint
    if isinstance(err, TimeoutError):
        return 504
    return 502


def socks_reply(err: BaseException) -> Socks5Reply:
    """The SOCKS5 reply code for `err` (RFC 1928 §6)."""
    if isinstance(err, DialError):
        return err.socks_reply
    if isinstance(err, Rejected):
        return Socks5Reply.NOT_ALLOWED
    if isinstance(err, ProtocolError):
        return err.socks_reply
    if isinstance(err, TimeoutError):
        return Socks5Reply.TTL_EXPIRED
    return Socks5Reply.GENERAL_FAILURE


def http_error_response(status: int, message: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 error response with a one-line plain-text body naming the reason."""
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    reason = HTTP_REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra_headers}"
        "Connection: close\r\n"
        "Proxy-Agent: fwdproxy\r\n\r\n"
    )
    return head.encode("latin-1") + body
