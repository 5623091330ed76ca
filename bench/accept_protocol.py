"""Prototype: a protocol-level accept path for HTTP CONNECT and SOCKS5 (bench only).

`--patch protocol` (bench/fwdproxy_serve.py) replaces the listener's StreamReader/Writer +
Session task with one asyncio.Protocol per connection that runs the same sans-IO machines
from `data_received`, dials with a short task, replies, and hands both transports to
`relay_fast.start_relay` (no task, no coroutine frames while the tunnel is open). It measures
what moving session.py to this shape would buy.

Covered: sniffing, SOCKS5 without auth and HTTP CONNECT, the allow-list, the rule decision
with the target checks of `Session.decide` (deny-list, loops, loopback, overload, reject
rules), direct and upstream dials, the replies, ConnInfo bookkeeping and the access log line.
Everything else (plain HTTP forwarding, SOCKS4, configs with auth, TLS-SNI routing of IP
targets) is handed, untouched, to the existing stream Session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import types
from typing import Any

from fwdproxy import server
from fwdproxy.core.addr import format_host_port
from fwdproxy.core.errors import (
    FwdProxyError,
    ProtocolError,
    Socks5Reply,
    http_error_response,
    http_status,
    socks_reply,
)
from fwdproxy.net import relay_fast
from fwdproxy.proto._need import NEED_DATA
from fwdproxy.proto.http1 import connect_target, parse_request_head
from fwdproxy.proto.sniff import Protocol as Proto
from fwdproxy.proto.sniff import sniff
from fwdproxy.proto.socks import Socks5Greeting, Socks5Server
from fwdproxy.proxy import session


class _Pending(asyncio.Protocol):
    """Holds what a freshly dialled target sends before the relay takes it over."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.error: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionResetError("target closed before the relay started")


class HandshakeProtocol(asyncio.Protocol):
    def __init__(self, srv: server.Server, listener: Any) -> None:
        self.srv = srv
        self.state = srv.state
        self.listener = listener
        self.buf = b""
        self.kind: Proto | None = None
        self.socks: Socks5Server | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.dialing = False
        self.closed = False

    # -- accept ------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.cfg = self.state.config
        self.peer_ip = str(peer[0])
        self.info = session.ConnInfo(
            client=format_host_port(self.peer_ip, int(peer[1])), listener=self.listener.address
        )
        self.state.opened(self.info)
        if not self.state.accepting:
            self.end("closed-by-server")
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.cfg.limits.handshake_timeout_s, self.on_timeout)

    def on_timeout(self) -> None:
        self.end("handshake-timeout", "client too slow")

    def data_received(self, data: bytes) -> None:
        if self.dialing or self.closed:
            self.buf += data  # pipelined tunnel bytes: they go first once the relay starts
            return
        self.buf += data
        try:
            if self.kind is None:
                self.kind = sniff(self.buf[:1])
                if self.kind is None:
                    return
                if self.kind is Proto.SOCKS4 or self.cfg.auth_required:
                    self.fallback()
                    return
            if self.kind is Proto.SOCKS5:
                self.on_socks5(data)
            else:
                self.on_http()
        except ProtocolError as e:
            self.info.protocol = self.info.protocol if self.info.protocol != "?" else "unknown"
            if self.kind is not Proto.SOCKS5 and self.buf[:1] != b"\x16":
                self.transport.write(http_error_response(e.status_hint, str(e)))
            self.end("bad-request", str(e))

    def eof_received(self) -> bool:
        if not self.dialing:
            self.end("client-reset" if self.buf else "empty")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and not self.dialing:
            self.end("client-reset")

    # -- protocols ---------------------------------------------------------------------------

    def on_socks5(self, data: bytes) -> None:
        self.info.protocol = "socks5"
        if self.socks is None:
            self.socks = Socks5Server(require_auth=False)
            self.socks.receive_data(self.buf)
        else:
            self.socks.receive_data(data)
        m = self.socks
        while True:
            try:
                ev = m.next_event()
            except ProtocolError:
                if m.reply_expected:
                    self.transport.write(m.reply(Socks5Reply.GENERAL_FAILURE))
                raise
            if ev is NEED_DATA:
                return
            if isinstance(ev, Socks5Greeting):
                self.transport.write(m.choose_method())
                continue
            self.begin(ev.host, ev.port, m.trailing_data, self.reply_socks5)
            return

    def on_http(self) -> None:
        head = parse_request_head(self.buf, self.cfg.limits.max_head_bytes)
        if head is None:
            return
        if head.method != "CONNECT":
            self.fallback()
            return
        self.info.protocol = "connect"
        target = connect_target(head.target)
        self.begin(target.host, target.port, head.trailing, self.reply_connect)

    # -- decide, dial, reply, relay -------------------------------------------------------------

    def begin(self, host: str, port: int, trailing: bytes, reply: Any) -> None:
        sn = self.cfg.sniff_tls
        if sn.enabled and port in sn.ports and session.ip_of(host) is not None:
            self.fallback()  # TLS-SNI routing of an IP target: the stream Session does it
            return
        self.buf = trailing
        self.info.target = format_host_port(host, port)
        self.dialing = True
        self.transport.pause_reading()
        if self.timer is not None:
            self.timer.cancel()
        task = asyncio.get_running_loop().create_task(self.dial(host, port, reply))
        self.info.task = task

    async def dial(self, host: str, port: int, reply: Any) -> None:
        try:
            d = self.decide(host, port)
            start = time.monotonic()
            try:
                if d.action == "via" and d.upstream:
                    deadline = session.Deadline(self.cfg.limits.dial_timeout_s)
                    r, w = await self.state.pool.open(d.upstream, host, port, deadline)
                    transport = w.transport
                    left = relay_fast._leftover(relay_fast.Endpoint(r, w))
                else:
                    transport, left = await self.dial_direct(host, port)
            finally:
                self.info.dial_s = time.monotonic() - start
                self.state.dialed(d.route, self.info.dial_s)
        except FwdProxyError as e:
            reply(e, None)
            self.end(session._outcome_of(e), str(e))
            return
        except asyncio.CancelledError:
            self.end("closed-by-server")
            raise
        reply(None, transport.get_extra_info("sockname"))
        self.info.task = None
        relay_fast.start_relay(
            self.transport,
            transport,
            client_leftover=relay_fast.Leftover(self.buf),
            target_leftover=left,
            idle_timeout_s=self.cfg.limits.idle_timeout_s,
            counters=self.info.counters,
            on_done=self.relayed,
        )

    async def dial_direct(self, host: str, port: int) -> tuple[Any, relay_fast.Leftover]:
        from fwdproxy.core.errors import DialError, DialTimeout
        from fwdproxy.net.dial import classify_os_error

        loop = asyncio.get_running_loop()
        addr = self.cfg.hosts.get(host, host)
        timeout = self.cfg.limits.dial_timeout_s
        try:
            transport, pending = await asyncio.wait_for(
                loop.create_connection(_Pending, addr, port), timeout
            )
        except asyncio.TimeoutError:
            raise DialTimeout(
                f"connecting to {host}:{port} timed out after {timeout:g}s", hop="direct"
            ) from None
        except OSError as e:
            reply_code, kind = classify_os_error(e)
            raise DialError(
                f"cannot connect to {host}:{port} (direct): {e.strerror or e}",
                hop="direct",
                status=502,
                socks_reply=reply_code,
                kind=kind,
            ) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport, relay_fast.Leftover(pending.data, pending.eof, pending.error)

    def decide(self, host: str, port: int) -> Any:
        fake = types.SimpleNamespace(
            state=self.state,
            config=self.cfg,
            info=self.info,
            peer_ip=self.peer_ip,
            listener=self.listener,
        )
        refuse = session.Session._client_allowed(fake)  # type: ignore[arg-type]
        if refuse:
            from fwdproxy.core.errors import Rejected

            raise Rejected(refuse)
        fake._check_target = lambda h, p: session.Session._check_target(fake, h, p)
        return session.Session.decide(fake, host, port)  # type: ignore[arg-type]

    def reply_socks5(self, err: BaseException | None, sockname: Any) -> None:
        assert self.socks is not None
        if err is None:
            bound = (str(sockname[0]), int(sockname[1])) if sockname else None
            self.transport.write(self.socks.reply(Socks5Reply.SUCCEEDED, bound))
        else:
            self.transport.write(self.socks.reply(socks_reply(err)))

    def reply_connect(self, err: BaseException | None, sockname: Any) -> None:
        if err is None:
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            self.transport.write(http_error_response(http_status(err), str(err)))

    def relayed(self, res: relay_fast.RelayResult) -> None:
        self.finish("ok" if res.error is None else res.closed_by, res.error)
        self.closed = True
        self.state.closed(self.info)
        session.Session._log(types.SimpleNamespace(info=self.info))  # type: ignore[arg-type]

    # -- endings -------------------------------------------------------------------------------

    def finish(self, outcome: str, error: str | None = None) -> None:
        if self.info.outcome == "open":
            self.info.outcome = outcome
            self.info.error = error

    def end(self, outcome: str, error: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.finish(outcome, error)
        self.transport.close()
        self.state.closed(self.info)
        session.Session._log(types.SimpleNamespace(info=self.info))  # type: ignore[arg-type]

    def fallback(self) -> None:
        """Hand the connection, with the bytes read so far, to the stream Session."""
        if self.timer is not None:
            self.timer.cancel()
        self.closed = True
        self.state.closed(self.info)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=256 * 1024)
        proto = asyncio.StreamReaderProtocol(reader)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        writer = asyncio.StreamWriter(self.transport, proto, reader, loop)
        reader.feed_data(self.buf)
        self.srv._spawn(reader, writer, self.listener)


async def _bind(self: server.Server, lst: Any) -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: HandshakeProtocol(self, lst), lst.host, lst.port, backlog=1024, reuse_address=True
    )
    self._servers[(lst.host, lst.port)] = srv
    self._listeners[(lst.host, lst.port)] = lst


def apply() -> None:
    import functools

    from fwdproxy.core import addr

    session.ip_of = functools.lru_cache(maxsize=4096)(addr.ip_of)  # type: ignore[attr-defined]
    session.is_loopback = functools.lru_cache(maxsize=4096)(addr.is_loopback)  # type: ignore[attr-defined]
    server.Server._bind = _bind  # type: ignore[method-assign]
