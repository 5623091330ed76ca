"""Opening the outgoing connection: directly (Happy Eyeballs) or through an upstream proxy.

Every failure becomes a DialError naming the hop that failed, so the client's 502/504 body or
SOCKS reply code and the access log say *where* it broke (the target, or the tunnel).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohappyeyeballs

from fwdproxy.config import UpstreamSpec
from fwdproxy.core.addr import ip_of
from fwdproxy.core.errors import DialError, DialTimeout, Socks5Reply

_T = TypeVar("_T")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HAPPY_EYEBALLS_DELAY_S = 0.25
STREAM_LIMIT = 256 * 1024
EARLY_LIMIT = 256 * 1024  # bytes a target may send before the relay starts, then we pause it

_ERRNO_REPLY = {
    errno.ECONNREFUSED: (Socks5Reply.CONNECTION_REFUSED, "refused"),
    errno.ENETUNREACH: (Socks5Reply.NETWORK_UNREACHABLE, "unreachable"),
    errno.EHOSTUNREACH: (Socks5Reply.HOST_UNREACHABLE, "unreachable"),
    errno.ETIMEDOUT: (Socks5Reply.TTL_EXPIRED, "timeout"),
}


class Inbound(asyncio.Protocol):
    """A dialled target's protocol until a relay takes its transport over.

    Keeps what the target sends early (servers that speak first: SSH, SMTP banners), its EOF
    and its error, so nothing is lost between the dial and the relay; reading pauses once
    EARLY_LIMIT bytes are held.
    """

    __slots__ = ("data", "eof", "error", "lost", "transport")

    def __init__(self) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= EARLY_LIMIT:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep our side open: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc


class Dialed:
    """An open connection to a target: its transport and what arrived before anyone read it."""

    __slots__ = ("inbound", "transport")

    def __init__(self, transport: Any, inbound: Inbound) -> None:
        self.transport = transport
        self.inbound = inbound

    def sockname(self) -> tuple[str, int] | None:
        name = self.transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1])) if name else None

    def close(self) -> None:
        self.transport.abort()

    def streams(self) -> Streams:
        """The same connection as asyncio streams, for code that reads with coroutines."""
        ib = self.inbound
        return streams_over(
            self.transport, bytes(ib.data), eof=ib.eof or ib.lost, error=ib.error
        )

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Give the transport to `protocol`, replaying what Inbound held, in order.

        The new protocol sees `connection_made`, then the early bytes, then the EOF or the loss
        that Inbound saw, exactly as if it had owned the transport from the start; reading is
        resumed in case Inbound paused it at EARLY_LIMIT. The callbacks may run before this
        returns, so the caller sets up its side first (e.g. writes the request).
        """
        ib, t = self.inbound, self.transport
        t.set_protocol(protocol)
        protocol.connection_made(t)
        if ib.data:
            data = bytes(ib.data)
            ib.data.clear()
            protocol.data_received(data)
        if ib.lost:
            protocol.connection_lost(ib.error)
            return
        if ib.eof and not protocol.eof_received():
            t.close()
            return
        if not t.is_closing():
            t.resume_reading()


def streams_over(
    transport: Any, data: bytes = b"", *, eof: bool = False, error: Exception | None = None
) -> Streams:
    """Asyncio streams over a transport another protocol owned until now.

    What that protocol had already received (`data`, then EOF or an error) is fed to the new
    reader first, and reading is resumed in case it was paused for the hand-over.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    proto = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if data:
        reader.feed_data(data)
    if error is not None:
        reader.set_exception(error)
    elif eof:
        reader.feed_eof()
    if not transport.is_closing():
        transport.resume_reading()
    return reader, asyncio.StreamWriter(transport, proto, reader, loop)


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


async def dial_direct(
    host: str, port: int, *, timeout_s: float, hosts: Mapping[str, str] | None = None
) -> Dialed:
    """Connect straight to host:port (a `hosts:` override wins over DNS).

    Happy Eyeballs (RFC 8305) on every event loop: names with several addresses are raced
    with aiohappyeyeballs; an IP literal is one plain connect.
    """
    addr = (hosts or {}).get(host, host)
    loop = asyncio.get_running_loop()
    try:
        transport, inbound = await within(timeout_s, _connect(loop, addr, port))
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
    return Dialed(transport, inbound)  # the loop set TCP_NODELAY on the transport


async def within(seconds: float, aw: Awaitable[_T]) -> _T:
    """`aw` with a deadline; asyncio.timeout where it exists (no extra Task per dial)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)  # pragma: no cover - Python 3.10


async def _connect(loop: asyncio.AbstractEventLoop, addr: str, port: int) -> tuple[Any, Inbound]:
    if ip_of(addr) is not None:
        return await loop.create_connection(Inbound, addr, port)
    infos = await loop.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, f"no addresses for {addr}")
    sock = await aiohappyeyeballs.start_connection(
        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1
    )
    return await loop.create_connection(Inbound, sock=sock)


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


async def dial_via(spec: UpstreamSpec, host: str, port: int, *, timeout_s: float) -> Dialed:
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
        transport, inbound = await asyncio.get_running_loop().create_connection(
            Inbound, sock=sock
        )
    except OSError as e:
        sock.close()
        raise _upstream_error(spec, host, port, e) from None
    return Dialed(transport, inbound)


class Deadline:
    """A monotonic deadline shared by the retries of one dial."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())
