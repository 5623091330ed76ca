"""Opening the outgoing connection: directly (Happy Eyeballs) or through an upstream proxy.

Every failure becomes a DialError naming the hop that failed, so the client's 502/504 body or
SOCKS reply code and the access log say *where* it broke (the target, or the tunnel).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from fwdproxy.config import UpstreamSpec
from fwdproxy.core.errors import DialError, DialTimeout, Socks5Reply

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HAPPY_EYEBALLS_DELAY_S = 0.25
STREAM_LIMIT = 256 * 1024

_ERRNO_REPLY = {
    errno.ECONNREFUSED: (Socks5Reply.CONNECTION_REFUSED, "refused"),
    errno.ENETUNREACH: (Socks5Reply.NETWORK_UNREACHABLE, "unreachable"),
    errno.EHOSTUNREACH: (Socks5Reply.HOST_UNREACHABLE, "unreachable"),
    errno.ETIMEDOUT: (Socks5Reply.TTL_EXPIRED, "timeout"),
}


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def classify_os_error(e: OSError) -> tuple[Socks5Reply, str]:
    """Map a connect error to a SOCKS5 reply code and a short kind for logs and metrics."""
    if isinstance(e, socket.gaierror):
        return Socks5Reply.HOST_UNREACHABLE, "dns"
    if e.errno in _ERRNO_REPLY:
        return _ERRNO_REPLY[e.errno]
    # asyncio folds several failed Happy Eyeballs attempts into one OSError without an errno;
    # its text is the only place the individual causes survive.
    text = str(e)
    if "Errno 111" in text or "refused" in text.lower():
        return Socks5Reply.CONNECTION_REFUSED, "refused"
    if "Errno 101" in text or "Errno 113" in text:
        return Socks5Reply.HOST_UNREACHABLE, "unreachable"
    return Socks5Reply.GENERAL_FAILURE, "error"


async def open_direct(
    host: str, port: int, *, timeout_s: float, hosts: Mapping[str, str] | None = None
) -> Streams:
    """Connect straight to host:port (a `hosts:` override wins over DNS)."""
    addr = (hosts or {}).get(host, host)
    kwargs: dict[str, Any] = {"limit": STREAM_LIMIT}
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        # Happy Eyeballs (RFC 8305) on the stdlib loop; uvloop tries addresses in order.
        kwargs.update(happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(addr, port, **kwargs), timeout_s
        )
    except asyncio.TimeoutError:
        raise DialTimeout(
            f"connecting to {host}:{port} timed out after {timeout_s:g}s", hop="direct"
        ) from None
    except OSError as e:
        reply, kind = classify_os_error(e)
        what = "cannot resolve" if kind == "dns" else "cannot connect to"
        reason = _reason(e, kind)
        raise DialError(
            f"{what} {host}:{port} (direct): {reason}",
            hop="direct",
            status=502,
            socks_reply=reply,
            kind=kind,
        ) from None
    _set_nodelay(writer)
    return reader, writer


def _reason(e: OSError, kind: str) -> str:
    """A short human reason: asyncio's strerror ('Connect call failed (...)') hides the errno."""
    if e.errno and not isinstance(e, socket.gaierror):
        return os.strerror(e.errno)
    if kind == "refused":
        return "Connection refused"
    return e.strerror or str(e)


def _proxy_for(spec: UpstreamSpec) -> Any:
    from python_socks import ProxyType
    from python_socks.async_.asyncio import Proxy

    kind = {
        "socks5": ProxyType.SOCKS5,
        "socks5h": ProxyType.SOCKS5,
        "socks4": ProxyType.SOCKS4,
        "socks4a": ProxyType.SOCKS4,
        "http": ProxyType.HTTP,
    }[spec.scheme]
    return Proxy(
        kind, spec.host, spec.port, username=spec.username, password=spec.password, rdns=spec.rdns
    )


def _upstream_error(spec: UpstreamSpec, host: str, port: int, e: Exception) -> DialError:
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

    hop = spec.name
    where = f"upstream {spec.name} ({spec.url})"
    if isinstance(e, ProxyTimeoutError):
        return DialTimeout(f"{where} did not complete the tunnel to {host}:{port} in time", hop=hop)
    if isinstance(e, ProxyConnectionError):
        reason = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
        return DialError(
            f"{where} is unreachable: {reason}",
            hop=hop,
            status=502,
            socks_reply=Socks5Reply.GENERAL_FAILURE,
            kind="upstream_down",
        )
    if isinstance(e, ProxyError):
        code = e.error_code
        reply = Socks5Reply.GENERAL_FAILURE
        status = 502
        if spec.scheme.startswith("socks5") and isinstance(code, int) and 0 < code <= 8:
            reply = Socks5Reply(code)
            if reply is Socks5Reply.TTL_EXPIRED:
                status = 504
        elif spec.scheme == "http" and code == 504:
            status, reply = 504, Socks5Reply.TTL_EXPIRED
        return DialError(
            f"{where} could not reach {host}:{port}: {e}",
            hop=hop,
            status=status,
            socks_reply=reply,
            kind="upstream_refused",
        )
    if isinstance(e, OSError):
        return DialError(
            f"{where} failed: {e.strerror or e}", hop=hop, status=502, kind="upstream_error"
        )
    return DialError(f"{where} failed: {e}", hop=hop, status=502, kind="upstream_error")


async def open_via(spec: UpstreamSpec, host: str, port: int, *, timeout_s: float) -> Streams:
    """Tunnel to host:port through one upstream proxy; the host name is sent unresolved."""
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

    proxy_errors = (ProxyConnectionError, ProxyError, ProxyTimeoutError)
    proxy = _proxy_for(spec)
    try:
        sock = await proxy.connect(dest_host=host, dest_port=port, timeout=timeout_s)
    except (*proxy_errors, OSError, asyncio.TimeoutError) as e:
        if isinstance(e, asyncio.TimeoutError) and not isinstance(e, proxy_errors):
            raise DialTimeout(
                f"upstream {spec.name} ({spec.url}) timed out after {timeout_s:g}s",
                hop=spec.name,
            ) from None
        raise _upstream_error(spec, host, port, e) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    try:
        return await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
    except OSError as e:
        sock.close()
        raise _upstream_error(spec, host, port, e) from None


class Deadline:
    """A monotonic deadline shared by the retries of one dial."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())
