"""Plain HTTP forwarding (absolute-form requests), framed by h11 on both sides.

Each request on a keep-alive client connection is routed on its own host, so one connection
may alternate between direct and tunnelled origins. The origin connection is reused while the
next request goes to the same host:port and route. Bodies stream through in both directions
with h11 doing Content-Length / chunked framing; hop-by-hop headers are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol

import h11

from fwdproxy.core.addr import format_host_port
from fwdproxy.core.errors import (
    FwdProxyError,
    HandshakeTimeout,
    ProtocolError,
    Rejected,
    http_error_response,
    http_status,
)
from fwdproxy.core.outcome import Outcome, outcome_of
from fwdproxy.proto.http1 import absolute_target, framing_problem, strip_hop_by_hop

if TYPE_CHECKING:
    from fwdproxy.config import Config
    from fwdproxy.net.dial import Streams
    from fwdproxy.proxy.state import ConnInfo
    from fwdproxy.routing.rules import Decision

CHUNK = 64 * 1024


class Context(Protocol):
    """What the forwarder needs of its client connection (fwdproxy.proxy.connection)."""

    @property
    def config(self) -> Config: ...
    @property
    def info(self) -> ConnInfo: ...
    @property
    def reader(self) -> asyncio.StreamReader: ...
    @property
    def writer(self) -> asyncio.StreamWriter: ...

    def admit(self, proxy_authorization: bytes | None) -> None:
        """Allow-list, then Basic auth; raise Rejected (403/407)."""

    def decide(self, host: str, port: int) -> Decision:
        """Admission checks and the rules; raise Rejected/Overloaded."""

    async def dial(self, d: Decision, host: str, port: int) -> Streams:
        """Open the origin connection `d` says; raise DialError."""


class _Origin:
    """An open origin connection with its h11 client machine."""

    def __init__(self, key: tuple[str, int, str], reader: Any, writer: Any) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    def usable(self, key: tuple[str, int, str]) -> bool:
        return (
            self.key == key
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.close()


class _Forwarder:
    def __init__(self, session: Context, first: bytes) -> None:
        self.s = session
        self.client = h11.Connection(
            h11.SERVER, max_incomplete_event_size=session.config.limits.max_head_bytes
        )
        self.client.receive_data(first)
        self.origin: _Origin | None = None
        self.idle_s = session.config.limits.idle_timeout_s
        self.head_s = session.config.limits.handshake_timeout_s
        # Set when the first byte of a request head arrives: the whole head must follow by then.
        self.head_deadline: float | None = None
        # A 407 challenge (no credentials) on this connection; the connection ends as
        # auth-failed unless a later request was let through.
        self.challenged: Rejected | None = None
        self.admitted = False

    async def _client_event(self) -> Any:
        while True:
            ev = self.client.next_event()
            if ev is not h11.NEED_DATA:
                if isinstance(ev, h11.Request):
                    self.head_deadline = None
                    self.s.info.idle = False
                return ev
            timeout = self.idle_s
            between = self.client.their_state is h11.IDLE
            # Between requests with nothing in flight: shutdown may close this connection at once.
            self.s.info.idle = between and not self.client.trailing_data[0]
            if between and self.client.trailing_data[0]:
                # Part of the next request head is here: a keep-alive connection may idle
                # between requests, but a head that drips in is bounded as a handshake is.
                now = time.monotonic()
                if self.head_deadline is None:
                    self.head_deadline = now + self.head_s
                timeout = self.head_deadline - now
                if timeout <= 0:
                    self._head_timeout()
            try:
                data = await asyncio.wait_for(self.s.reader.read(CHUNK), timeout)
            except asyncio.TimeoutError:
                if self.head_deadline is not None:
                    self._head_timeout()
                raise
            self.client.receive_data(data)

    async def _origin_event(self, o: _Origin) -> Any:
        while True:
            ev = o.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            data = await asyncio.wait_for(o.reader.read(CHUNK), self.idle_s)
            o.conn.receive_data(data)

    def _head_timeout(self) -> None:
        # h11 has no request to answer yet, so the 408 goes out as raw bytes; we close anyway.
        msg = "request head not received in time"
        self.s.writer.write(http_error_response(408, msg))
        raise HandshakeTimeout(msg)

    async def _send_client(self, ev: Any) -> None:
        data = self.client.send(ev)
        if data:
            self.s.writer.write(data)
            await self.s.writer.drain()

    async def _error(self, status: int, message: str, extra: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        """Answer the current request with an error, if the response has not started."""
        if self.client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (message.rstrip("\n") + "\n").encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Proxy-Agent", "fwdproxy"),
            *extra,
        ]
        await self._send_client(h11.Response(status_code=status, headers=headers))
        await self._send_client(h11.Data(data=body))
        await self._send_client(h11.EndOfMessage())

    async def run(self) -> None:
        try:
            while True:
                try:
                    ev = await self._client_event()
                except h11.RemoteProtocolError as e:
                    # h11 hints 501 for a Transfer-Encoding it does not implement; a request
                    # whose body length cannot be determined is malformed (RFC 9112 §6.3): 400.
                    status = 431 if e.error_status_hint == 431 else 400
                    await self._error(status, f"malformed request: {e}")
                    raise ProtocolError(f"malformed request: {e}", status_hint=status) from None
                if isinstance(ev, h11.ConnectionClosed):
                    return
                if not isinstance(ev, h11.Request):
                    return
                if ev.method == b"CONNECT":
                    await self._error(
                        405,
                        "CONNECT after a forwarded request is not supported "
                        "on the same connection; open a new one",
                    )
                    return
                self.s.info.requests += 1
                problem = framing_problem(ev.headers)
                if problem:
                    # RFC 9112 §6.1: answer and close, or the rest of the stream is a request
                    # the origin and this proxy would disagree about (request smuggling).
                    await self._error(400, problem)
                    raise ProtocolError(problem)
                await self._one(ev)
                if self.client.our_state is h11.MUST_CLOSE or self.client.their_state in (
                    h11.MUST_CLOSE,
                    h11.CLOSED,
                ):
                    return
                if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
                    self.client.start_next_cycle()
                else:
                    return
        finally:
            if self.origin is not None:
                self.origin.close()

    async def _one(self, req: h11.Request) -> None:
        s = self.s
        try:
            s.admit(dict(req.headers).get(b"proxy-authorization"))  # h11 lower-cases names
            target = absolute_target(req.target.decode("ascii", "replace"))
        except (Rejected, ProtocolError) as e:
            extra = (
                [("Proxy-Authenticate", 'Basic realm="fwdproxy"')] if http_status(e) == 407 else []
            )
            await self._error(http_status(e), str(e), extra)
            if isinstance(e, Rejected) and e.status == 407 and not e.credentials_given:
                # A challenge: the client may answer it on this connection.
                await self._discard_body()
                self.challenged = e
                return
            raise  # wrong credentials end the connection, as on CONNECT and SOCKS5
        self.admitted = True
        s.info.target = format_host_port(target.host, target.port)
        try:
            d = s.decide(target.host, target.port)
            origin = await self._origin_for(d, target.host, target.port)
        except FwdProxyError as e:
            await self._error(http_status(e), str(e))
            await self._discard_body()
            s.info.finish(outcome_of(e), str(e))
            return
        await self._exchange(req, origin, target)

    async def _origin_for(self, d: Any, host: str, port: int) -> _Origin:
        key = (host, port, d.route)
        if self.origin is not None and self.origin.usable(key):
            return self.origin
        if self.origin is not None:
            self.origin.close()
            self.origin = None
        r, w = await self.s.dial(d, host, port)
        self.origin = _Origin(key, r, w)
        return self.origin

    async def _exchange(self, req: h11.Request, o: _Origin, target: Any) -> None:
        headers = strip_hop_by_hop(list(req.headers.raw_items()))
        expect = [v for k, v in headers if k.lower() == b"expect"]
        if expect and expect[0].lower() == b"100-continue":
            headers = [(k, v) for k, v in headers if k.lower() != b"expect"]
            if self.client.their_http_version != b"1.0":
                await self._send_client(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces any Host header.
        host = format_host_port(target.host, target.port) if target.port != 80 else target.host
        headers = [(k, v) for k, v in headers if k.lower() != b"host"]
        headers.insert(0, (b"Host", host.encode()))
        if any(k.lower() == b"transfer-encoding" for k, _ in headers):
            # Never forward both framings (RFC 9112 §6.1): that is a request-smuggling vector.
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        out = h11.Request(method=req.method, target=target.path.encode(), headers=headers)
        counters = self.s.info.counters
        o.writer.write(o.conn.send(out))
        while True:
            ev = await self._client_event()
            if isinstance(ev, h11.Data):
                counters.up += len(ev.data)
                counters.last_activity = time.monotonic()
                o.writer.write(o.conn.send(h11.Data(data=ev.data)))
                await o.writer.drain()
            elif isinstance(ev, h11.EndOfMessage):
                o.writer.write(o.conn.send(h11.EndOfMessage()))
                await o.writer.drain()
                break
            else:
                raise ProtocolError("client closed in the middle of a request body")
        await self._relay_response(o, counters)

    async def _relay_response(self, o: _Origin, counters: Any) -> None:
        try:
            while True:
                ev = await self._origin_event(o)
                if isinstance(ev, h11.InformationalResponse):
                    if ev.status_code != 101:
                        await self._send_client(
                            h11.InformationalResponse(
                                status_code=ev.status_code,
                                headers=strip_hop_by_hop(list(ev.headers.raw_items())),
                            )
                        )
                    continue
                if isinstance(ev, h11.Response):
                    headers = strip_hop_by_hop(list(ev.headers.raw_items()))
                    if any(k.lower() == b"transfer-encoding" for k, _ in headers):
                        # h11 framed the body by chunked; a Content-Length beside it would
                        # let the client frame it differently.
                        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                    await self._send_client(
                        h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)
                    )
                elif isinstance(ev, h11.Data):
                    counters.down += len(ev.data)
                    counters.last_activity = time.monotonic()
                    await self._send_client(h11.Data(data=ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    await self._send_client(h11.EndOfMessage())
                    break
                else:
                    raise h11.RemoteProtocolError("origin closed before the response ended")
        except (h11.RemoteProtocolError, ConnectionError, asyncio.TimeoutError) as e:
            o.close()
            self.origin = None
            if self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._error(502, f"bad response from {o.key[0]}:{o.key[1]}: {e}")
                return
            raise ConnectionResetError(f"origin failed mid-response: {e}") from None
        if o.conn.our_state is h11.DONE and o.conn.their_state is h11.DONE:
            o.conn.start_next_cycle()
        else:
            o.close()
            self.origin = None

    async def _discard_body(self) -> None:
        """Read the rest of a refused request so the connection can be reused."""
        if self.client.their_state is not h11.SEND_BODY:
            return
        while True:
            ev = await self._client_event()
            if not isinstance(ev, h11.Data):
                return


async def forward_http(session: Context, first: bytes) -> None:
    """Serve absolute-form HTTP requests on this connection until it closes."""
    fw = _Forwarder(session, first)
    await fw.run()
    if fw.challenged is not None and not fw.admitted:
        session.info.finish(Outcome.AUTH_FAILED, str(fw.challenged))
    session.info.finish(Outcome.OK)
