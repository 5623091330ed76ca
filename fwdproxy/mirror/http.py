"""The mirror's HTTP/1.1 client for registries, token services and blob CDNs.

Why not aiohttp's client: every connection must be opened by fwdproxy's own dial layer, so the
rules, upstream groups with failover, the deny-list and the own-port check decide each host a
fetch touches (registry API, token realm, every redirect target) — one router, not a second
one. h11 frames the exchange; TLS runs over the dialled transport (`loop.start_tls`) and is
verified against the system trust store (`SSL_CERT_FILE` honoured) or a per-registry CA file.

Idle connections are kept per (scheme, host, port, route) for a short while: a pull asks one
registry for a token, a manifest and several blobs, and each new TLS handshake through a thin
tunnel costs round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import h11

from fwdproxy.core.addr import AddressError, format_host_port, normalise_host
from fwdproxy.net.dial import Dialed, within

__all__ = ["URL", "FetchError", "HTTPClient", "Opener", "Response"]

READ_CHUNK: Final = 256 * 1024
MAX_HEAD_BYTES: Final = 64 * 1024
IDLE_KEEP_S: Final = 30.0
MAX_IDLE_PER_KEY: Final = 4


class FetchError(Exception):
    """An upstream exchange failed before or during the body. `retryable` says whether a new
    attempt (a resume) may help; `status` is the HTTP status to answer the mirror's client."""

    def __init__(self, message: str, *, retryable: bool = True, status: int = 502) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True, slots=True)
class URL:
    """An absolute http(s) URL, split and with its host normalised the way the router sees it."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, what goes on the request line

    @classmethod
    def parse(cls, text: str) -> URL:
        if len(text) > 8192 or not text.isascii() or any(c in text for c in " \r\n\t"):
            raise FetchError(f"not a usable URL: {text[:80]!r}", retryable=False)
        try:
            u = urllib.parse.urlsplit(text)
            port = u.port
        except ValueError as e:
            raise FetchError(f"bad URL {text[:80]!r}: {e}", retryable=False) from None
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
            raise FetchError(f"not an absolute http(s) URL: {text[:80]!r}", retryable=False)
        try:
            host = normalise_host(u.hostname)
        except AddressError as e:
            raise FetchError(f"bad host in {text[:80]!r}: {e}", retryable=False) from None
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return cls(u.scheme, host, port or (443 if u.scheme == "https" else 80), target)

    def join(self, location: str) -> URL:
        """A redirect's Location, relative or absolute, against this URL."""
        return URL.parse(urllib.parse.urljoin(str(self), location))

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return format_host_port(self.host, self.port) if self.port != default else (
            f"[{self.host}]" if ":" in self.host else self.host
        )

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"

    def redacted(self) -> str:
        """For logs: signed CDN URLs carry credentials in their query."""
        path = self.target.split("?", 1)[0]
        return f"{self.scheme}://{self.authority}{path}" + ("?…" if "?" in self.target else "")


# Opens a connection to host:port the way the rules say; returns it and the route's name.
Opener = Callable[[str, int], Awaitable[tuple[Dialed, str]]]


class _Conn:
    """One upstream connection: streams, an h11 client state machine, and where it goes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: tuple[str, str, int], route: str) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.route = route
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def next_event(self, timeout_s: float) -> Any:
        while True:
            in_body = self.h11.their_state is h11.SEND_BODY
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                if in_body and self.reader.at_eof():
                    # h11 reports an EOF before the announced end as a protocol error; it is
                    # a dropped connection (a tunnel cut), which a resume is made for.
                    raise FetchError(f"upstream closed the connection before the end of the "
                                     f"body ({e})") from None
                raise FetchError(f"upstream sent malformed HTTP: {e}", retryable=True) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await within(timeout_s, self.reader.read(READ_CHUNK))
            except asyncio.TimeoutError:
                raise FetchError(f"no data from upstream for {timeout_s:g}s") from None
            except (OSError, ssl.SSLError) as e:
                raise FetchError(f"upstream connection broke: {_why(e)}") from None
            self.h11.receive_data(data)


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class Response:
    """Status, headers and a streaming body; `release()` (or reading to the end) returns the
    connection to the pool, `close()` drops it."""

    def __init__(self, client: HTTPClient, conn: _Conn, url: URL, event: h11.Response,
                 method: str, timeout_s: float) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.url = url
        self.route = conn.route
        self.status = event.status_code
        self.reason = event.reason.decode("latin-1", "replace")
        self.headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self.header_lists: list[tuple[str, str]] = [
            (n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in event.headers
        ]
        self._timeout = timeout_s
        self._done = method == "HEAD" or self.status in (204, 304)
        self.received = 0

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.header_lists if n == name]

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None or not value.isdigit():
            return None
        return int(value)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; FetchError if the connection breaks before its end."""
        conn = self._conn
        if conn is None or self._done:
            return
        while True:
            event = await conn.next_event(self._timeout)
            if isinstance(event, h11.Data):
                self.received += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self.release()
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise FetchError(
                    f"upstream closed the connection after {self.received} body bytes"
                )

    async def read(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (manifests, tokens, error bodies)."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > limit:
                self.close()
                raise FetchError(f"upstream body larger than {limit} bytes", retryable=False)
        return bytes(out)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            self._client.checkin(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class HTTPClient:
    """Requests over connections from `opener`; TLS contexts from `ssl_for(host)`."""

    def __init__(self, opener: Opener, ssl_for: Callable[[str], ssl.SSLContext],
                 user_agent: str = "fwdproxy-mirror") -> None:
        self._open = opener
        self._ssl_for = ssl_for
        self._ua = user_agent.encode()
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False

    async def request(self, method: str, url: URL, headers: Iterable[tuple[str, str]] = (), *,
                      timeout_s: float = 30.0) -> Response:
        """Send a request without a body and return once the response head arrived. A kept-
        alive connection that turns out dead is retried once on a fresh one."""
        for attempt in (0, 1):
            conn, reused = await self._checkout(url, timeout_s)
            try:
                return await self._exchange(conn, method, url, headers, timeout_s)
            except FetchError:
                conn.close()
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Conn, method: str, url: URL,
                        headers: Iterable[tuple[str, str]], timeout_s: float) -> Response:
        hdrs = [("Host", url.authority), ("User-Agent", self._ua.decode())]
        hdrs += [(k, v) for k, v in headers if k.lower() not in ("host", "user-agent")]
        try:
            data = conn.h11.send(h11.Request(method=method, target=url.target, headers=hdrs))
            data = (data or b"") + (conn.h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as e:
            raise FetchError(f"cannot send request: {e}", retryable=False) from None
        try:
            conn.writer.write(data)
            await within(timeout_s, conn.writer.drain())
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
            raise FetchError(f"cannot send to {url.authority}: {_why(e)}") from None
        while True:
            event = await conn.next_event(timeout_s)
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                # h11's own bound only applies while a head is incomplete; a head that
                # arrived in one read is measured here.
                if sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEAD_BYTES:
                    raise FetchError(f"{url.authority} sent a response head larger than "
                                     f"{MAX_HEAD_BYTES} bytes", retryable=False)
                return Response(self, conn, url, event, method, timeout_s)
            raise FetchError(f"{url.authority} closed the connection without a response")

    async def _checkout(self, url: URL, timeout_s: float) -> tuple[_Conn, bool]:
        key = (url.scheme, url.host, url.port)
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_KEEP_S and not conn.writer.transport.is_closing() \
                    and not conn.reader.at_eof():
                return conn, True
            conn.close()
        dialed, route = await self._open(url.host, url.port)
        reader, writer = dialed.streams()
        if url.scheme == "https":
            try:
                reader, writer = await within(
                    timeout_s, _start_tls(reader, writer, self._ssl_for(url.host), url.host)
                )
            except asyncio.TimeoutError:
                writer.transport.abort()
                raise FetchError(f"TLS handshake with {url.authority} timed out") from None
            except ssl.SSLCertVerificationError as e:
                writer.transport.abort()
                raise FetchError(
                    f"TLS certificate of {url.authority} not trusted: {e.verify_message} "
                    "(system trust store, SSL_CERT_FILE, or mirror.registries.<name>.ca_file)",
                    retryable=False,
                ) from None
            except (OSError, ssl.SSLError) as e:
                writer.transport.abort()
                raise FetchError(f"TLS handshake with {url.authority} failed: {_why(e)}") from None
        return _Conn(reader, writer, key, route), False

    def checkin(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.key, [])
        idle.append(conn)
        while len(idle) > MAX_IDLE_PER_KEY:
            idle.pop(0).close()

    def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


async def _start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     ctx: ssl.SSLContext, hostname: str
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS over an open stream pair (StreamWriter.start_tls exists from Python 3.11 only)."""
    if hasattr(writer, "start_tls"):
        await writer.start_tls(ctx, server_hostname=hostname)
        return reader, writer
    loop = asyncio.get_running_loop()  # pragma: no cover - Python 3.10
    protocol = writer.transport.get_protocol()
    transport = await loop.start_tls(writer.transport, protocol, ctx, server_hostname=hostname)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
