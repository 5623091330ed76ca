"""One accepted client connection, as an asyncio.Protocol: sniff, handshake, decide, dial,
reply, then hand both transports to the relay.

The handshake parsers are sans-IO (fwdproxy.proto) and are fed from `data_received`; nothing
here reads with a coroutine, and the only Task a tunnel costs is its dial. The success reply
(`200 Connection established`, SOCKS 0x00) is sent only after the dial succeeded, so a client
always learns *why* a tunnel failed. The one exception is TLS-SNI routing of IP-literal
targets: the client sends its ClientHello only after the reply (a documented trade-off,
limited to configured TLS ports, and never for a target the rules reject).

Plain HTTP forwarding (absolute-form requests) is handed to fwdproxy.proxy.forward: from
then on this protocol passes its transport callbacks to the Forwarder, a state machine of its
own (no streams, no Task but a dial's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fwdproxy.core.addr import AddressError, format_host_port, ip_of, normalise_host
from fwdproxy.core.errors import (
    FwdProxyError,
    ProtocolError,
    Rejected,
    Socks5Reply,
    http_error_response,
    http_status,
    socks_reply,
)
from fwdproxy.core.outcome import Outcome, outcome_of
from fwdproxy.net.dial import Deadline, Dialed, dial_direct
from fwdproxy.net.relay_fast import Leftover, Tunnel, start_relay
from fwdproxy.proto.http1 import connect_target, parse_request_head
from fwdproxy.proto.need import NEED_DATA
from fwdproxy.proto.sniff import Protocol, sniff
from fwdproxy.proto.socks import (
    Socks4Server,
    Socks5Credentials,
    Socks5Greeting,
    Socks5Server,
    SocksConnect,
)
from fwdproxy.proto.tls import parse_client_hello_sni
from fwdproxy.proxy import admission
from fwdproxy.proxy.accesslog import ACCESS
from fwdproxy.proxy.forward import Forwarder
from fwdproxy.proxy.state import ConnInfo

if TYPE_CHECKING:
    from fwdproxy.config import Config, Listener
    from fwdproxy.proxy.state import ServerState
    from fwdproxy.routing.rules import Decision

logger = logging.getLogger("fwdproxy.session")

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
MAX_SNI_HELLO = 16 * 1024  # a ClientHello larger than this is routed by the address
Reply = Callable[[FwdProxyError | None, "tuple[str, int] | None"], None]


class ClientConnection(asyncio.Protocol):
    """Handles one client connection from accept to close (see the module docstring)."""

    __slots__ = (
        "buf",
        "by_ip",
        "client_eof",
        "config",
        "deadline",
        "feed",
        "finished",
        "forwarder",
        "info",
        "listener",
        "machine",
        "peer_ip",
        "refusal",
        "reply",
        "sni_target",
        "state",
        "task",
        "transport",
        "tunnel",
    )

    def __init__(self, state: ServerState, listener: Listener) -> None:
        self.state = state
        self.config: Config = state.config  # one snapshot: a reload never changes a connection
        self.listener = listener
        self.transport: Any = None
        self.buf = bytearray()
        self.feed: Callable[[], None] = self._feed_sniff
        self.machine: Any = None
        self.reply: Reply | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.tunnel: Tunnel | None = None
        self.forwarder: Forwarder | None = None
        self.client_eof = False
        self.finished = False
        self.refusal: str | None = None
        self.by_ip: Decision | None = None
        self.sni_target: tuple[str, int] = ("", 0)
        self.peer_ip = "?"
        self.info: ConnInfo = None  # type: ignore[assignment]  # set in connection_made

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # asyncio and uvloop both set TCP_NODELAY on it
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip = str(peer[0])
        self.info = info = ConnInfo(
            client=format_host_port(self.peer_ip, int(peer[1])), listener=self.listener.address
        )
        info.closer = self.close
        if not self.state.accepting:
            info.finish(Outcome.CLOSED_BY_SERVER, "shutting down")
            transport.abort()
            self.finished = True
            return
        self.state.opened(info)
        # The whole handshake must be done by then, however the client paces its bytes: a
        # per-read timeout would let a client that drips one byte at a time hold a slot.
        self.deadline = asyncio.get_running_loop().call_later(
            self.config.limits.handshake_timeout_s, self._handshake_timeout
        )
        self.refusal = admission.client_refusal(self.listener, self.peer_ip)

    def data_received(self, data: bytes) -> None:
        fw = self.forwarder
        if fw is not None:
            fw.client_data(data)
            return
        self.buf += data
        try:
            self.feed()
        except FwdProxyError as e:
            self._fail(e)
        except Exception as e:  # the one catch-all, at the connection boundary
            logger.exception("conn %d: internal error", self.info.id)
            self._end(Outcome.INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.forwarder is not None:
            self.forwarder.client_eof()
        elif self.feed == self._feed_sni:
            self._sni_done()  # route by what the client sent; it may be half-closing
        elif self.feed == self._feed_sniff and not self.buf:
            self._end(Outcome.EMPTY)
        elif self.task is None:
            self._end(Outcome.CLIENT_RESET, "client closed during the handshake")
        return True  # a client that half-closes after its request still gets the answer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            if self.forwarder is not None:
                self.forwarder.client_lost()  # closes its origin, cancels its dial
            self._end(Outcome.CLIENT_RESET, str(exc) if exc else None)
            if self.task is not None:
                self.task.cancel()  # the dial's result has nowhere to go

    def pause_writing(self) -> None:
        if self.forwarder is not None:
            self.forwarder.client_full(True)  # (a tunnel installs protocols of its own)

    def resume_writing(self) -> None:
        if self.forwarder is not None:
            self.forwarder.client_full(False)

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """End the connection now (shutdown, the admin API): outcome closed-by-server."""
        self.info.finish(Outcome.CLOSED_BY_SERVER)
        if self.tunnel is not None:
            self.tunnel.finish("cancelled")  # closes both sides, then reports: _relay_done
        elif self.forwarder is not None:
            self.forwarder.close()
        elif self.task is not None:
            self.task.cancel()  # _task_done ends it
        else:
            self._end(Outcome.CLOSED_BY_SERVER)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before it ran has not ended its connection: do it here."""
        if task is self.task:
            self.task = None
        if not self.finished and task.cancelled():
            self._end(Outcome.CLOSED_BY_SERVER)

    def _fail(self, e: FwdProxyError) -> None:
        """End with the outcome of `e`; the caller has written the client's answer."""
        self._end(outcome_of(e), str(e))

    def end(self, outcome: Outcome, error: str | None = None) -> None:
        """Record the outcome (the first one wins) and close: the forwarder's way out."""
        self._end(outcome, error)

    @property
    def stopping(self) -> bool:
        """The server is shutting down (a forwarder closes once its exchange is done)."""
        return not self.state.accepting

    def _end(self, outcome: Outcome, error: str | None = None) -> None:
        self.info.finish(outcome, error)
        if self.finished:
            return
        self.finished = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.tunnel is None and not self.transport.is_closing():
            self.transport.close()  # flushes the error reply first
        self.state.closed(self.info)
        ACCESS.write(self.info)

    def _handshake_timeout(self) -> None:
        self.deadline = None
        if self.finished or self.task is not None or self.tunnel is not None or self.forwarder:
            return
        if self.feed == self._feed_http:
            self.transport.write(http_error_response(408, "request head not received in time"))
        self._end(Outcome.HANDSHAKE_TIMEOUT, "client too slow")

    # -- sniff ----------------------------------------------------------------------------------

    def _feed_sniff(self) -> None:
        try:
            proto = sniff(bytes(self.buf[:1]))
        except ProtocolError as e:
            self.info.protocol = "unknown"
            if self.buf[:1] != b"\x16":  # a TLS client would not understand an HTTP answer
                self.transport.write(http_error_response(400, str(e)))
            raise
        if proto is None:
            return
        if proto is Protocol.SOCKS5:
            self.info.protocol = "socks5"
            self.machine = Socks5Server(require_auth=self.config.auth_required)
            self.feed = self._feed_socks5
        elif proto is Protocol.SOCKS4:
            self.info.protocol = "socks4"
            self.machine = Socks4Server()
            self.feed = self._feed_socks4
        else:
            self.feed = self._feed_http
        self.feed()

    # -- SOCKS5 -------------------------------------------------------------------------------

    def _feed_socks5(self) -> None:
        m: Socks5Server = self.machine
        m.receive_data(bytes(self.buf))
        self.buf.clear()
        write = self.transport.write
        while True:
            try:
                ev = m.next_event()
            except ProtocolError as e:
                if m.reply_expected:
                    write(m.reply(e.socks_reply))
                raise
            if ev is NEED_DATA:
                return
            if isinstance(ev, Socks5Greeting):
                choice = m.choose_method()
                write(choice)
                if choice[1] == 0xFF:
                    raise ProtocolError(
                        "no acceptable SOCKS5 auth method"
                        + (" (username/password required)" if self.config.auth_required else "")
                    )
            elif isinstance(ev, Socks5Credentials):
                if self.refusal is not None:
                    # Outside the allow-list: the same answer whatever the password, so the
                    # client learns nothing about it.
                    write(m.auth_reply(False))
                    raise Rejected(self.refusal)
                ok = admission.check_password(self.config.users, ev.username, ev.password)
                write(m.auth_reply(ok))
                if not ok:
                    raise Rejected(
                        f"SOCKS5 authentication failed for user {ev.username!r}", status=407
                    )
                self.info.user = ev.username
            else:
                assert isinstance(ev, SocksConnect)
                if self.refusal is not None:
                    write(m.reply(Socks5Reply.NOT_ALLOWED))
                    raise Rejected(self.refusal)
                self.reply = self._socks5_reply
                self._tunnel(ev.host, ev.port, m.trailing_data)
                return

    def _socks5_reply(self, err: FwdProxyError | None, bound: tuple[str, int] | None) -> None:
        m: Socks5Server = self.machine
        if err is None:
            self.transport.write(m.reply(Socks5Reply.SUCCEEDED, bound))
        else:
            self.transport.write(m.reply(socks_reply(err)))

    # -- SOCKS4 -------------------------------------------------------------------------------

    def _feed_socks4(self) -> None:
        m: Socks4Server = self.machine
        m.receive_data(bytes(self.buf))
        self.buf.clear()
        try:
            ev = m.next_event()
        except ProtocolError:
            self.transport.write(m.reply(False))
            raise
        if ev is NEED_DATA:
            return
        assert isinstance(ev, SocksConnect)
        refusal = self.refusal
        if refusal is None and self.config.auth_required:
            refusal = "SOCKS4 has no password authentication; use SOCKS5 or HTTP with credentials"
        if refusal is not None:
            self.transport.write(m.reply(False))
            raise Rejected(refusal)
        self.reply = self._socks4_reply
        self._tunnel(ev.host, ev.port, m.trailing_data)

    def _socks4_reply(self, err: FwdProxyError | None, bound: tuple[str, int] | None) -> None:
        self.transport.write(self.machine.reply(err is None))

    # -- HTTP ---------------------------------------------------------------------------------

    def _feed_http(self) -> None:
        try:
            head = parse_request_head(bytes(self.buf), self.config.limits.max_head_bytes)
        except ProtocolError as e:
            self.info.protocol = "http"
            self.transport.write(http_error_response(e.status_hint, str(e)))
            raise
        if head is None:
            return
        if head.method != "CONNECT":
            self.info.protocol = "http"
            self._forward()
            return
        self.info.protocol = "connect"
        self.reply = self._connect_reply
        try:
            self.admit_http(head.header(b"proxy-authorization"))
            target = connect_target(head.target)
        except (ProtocolError, Rejected) as e:
            self._connect_reply(e, None)
            raise
        self._tunnel(target.host, target.port, head.trailing)

    def admit_http(self, proxy_authorization: bytes | None) -> None:
        """Allow-list, then Basic auth, for an HTTP request; raise Rejected (403/407)."""
        if self.refusal is not None:
            raise Rejected(self.refusal)
        user = admission.basic_auth(self.config, proxy_authorization)
        if user is not None:
            self.info.user = user

    def _connect_reply(self, err: FwdProxyError | None, bound: tuple[str, int] | None) -> None:
        if err is None:
            self.transport.write(CONNECT_OK)
            return
        status = http_status(err)
        extra = 'Proxy-Authenticate: Basic realm="fwdproxy"\r\n' if status == 407 else ""
        self.transport.write(http_error_response(status, str(err), extra))

    # -- plain HTTP forwarding ------------------------------------------------------------------

    def _forward(self) -> None:
        """Hand the connection to the forwarder with what was read (h11 parses it again)."""
        self._stop_handshake()
        first = bytes(self.buf)
        self.buf.clear()
        self.forwarder = fw = Forwarder(self, first, self.client_eof)
        fw.start()

    # -- decide, dial, reply, relay -------------------------------------------------------------

    def _stop_handshake(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _tunnel(self, host: str, port: int, trailing: bytes) -> None:
        """The client asked for host:port: decide, then dial (or sniff the SNI first)."""
        self._stop_handshake()
        self.transport.pause_reading()  # bounded: nothing more is read until the relay runs
        self.buf[:] = trailing
        self.feed = self._feed_held
        try:  # one normalisation for every protocol: rules and deny-list compare strings
            host = normalise_host(host)
        except AddressError as e:
            self.info.target = f"{host}:{port}"
            raise self._refuse(
                ProtocolError(
                    f"invalid target host {host!r}: {e}", socks_reply=Socks5Reply.HOST_UNREACHABLE
                )
            ) from None
        self.info.target = format_host_port(host, port)
        sn = self.config.sniff_tls
        try:
            d = self.decide(host, port)
        except FwdProxyError as e:
            raise self._refuse(e) from None
        if sn.enabled and port in sn.ports and ip_of(host) is not None:
            # The address's own decision came first and bounds what the SNI may do: a target
            # the rules reject was refused above, before the early success reply.
            self.by_ip = d
            self.sni_target = (host, port)
            self._answer(None, None)
            self.feed = self._feed_sni
            self.deadline = asyncio.get_running_loop().call_later(sn.timeout_s, self._sni_done)
            self.transport.resume_reading()
            self._feed_sni()
            return
        self._start_dial(d, host, port)

    def _refuse(self, e: FwdProxyError) -> FwdProxyError:
        self._answer(e, None)
        return e

    def _answer(self, err: FwdProxyError | None, bound: tuple[str, int] | None) -> None:
        if self.reply is not None:
            self.reply(err, bound)
            self.reply = None  # one answer per handshake

    def _feed_held(self) -> None:
        """Bytes that arrive while the dial runs are kept for the target, in order."""

    def decide(self, host: str, port: int) -> Decision:
        """Route host:port after the admission checks; Rejected for a reject rule."""
        admission.check_target(
            self.config,
            host,
            port,
            self.peer_ip,
            overloaded=self.state.overloaded,
            is_own=self.state.is_own_address,
        )
        d = self.config.router.decide(host, port)
        self.info.decision = d
        admission.check_decision(d, host, port)
        return d

    def _start_dial(self, d: Decision, host: str, port: int) -> None:
        self.task = asyncio.get_running_loop().create_task(self._dial_and_relay(d, host, port))
        self.task.add_done_callback(self._task_done)

    async def dial(self, d: Decision, host: str, port: int) -> Dialed:
        """Open the connection `d` says, directly or through its upstream group."""
        deadline = Deadline(self.config.limits.dial_timeout_s)
        start = time.monotonic()
        try:
            if d.action == "via" and d.upstream:
                return await self.state.pool.open(d.upstream, host, port, deadline)
            return await dial_direct(
                host, port, timeout_s=deadline.left(), hosts=self.config.hosts
            )
        finally:
            self.info.dial_s = time.monotonic() - start
            self.state.dialed(d.route, self.info.dial_s)

    async def _dial_and_relay(self, d: Decision, host: str, port: int) -> None:
        try:
            dialed = await self.dial(d, host, port)
        except FwdProxyError as e:
            self._answer(e, None)
            self._fail(e)
            return
        except asyncio.CancelledError:
            self._end(Outcome.CLOSED_BY_SERVER)
            return
        except Exception as e:
            logger.exception("conn %d: internal error", self.info.id)
            self._end(Outcome.INTERNAL_ERROR, f"{type(e).__name__}: {e}")
            return
        if self.finished:  # the client left (or was closed) while we dialled
            dialed.close()
            return
        # Only SOCKS5 reports the bound address; fetching it costs a syscall on uvloop.
        self._answer(None, dialed.sockname() if self.info.protocol == "socks5" else None)
        self._relay(dialed)

    def _relay(self, dialed: Dialed) -> None:
        self.info.idle = False
        ib = dialed.inbound
        self.tunnel = start_relay(
            self.transport,
            dialed.transport,
            client_leftover=Leftover(bytes(self.buf), self.client_eof),
            target_leftover=Leftover(bytes(ib.data), ib.eof, ib.error),
            idle_timeout_s=self.config.limits.idle_timeout_s,
            counters=self.info.counters,
            on_done=self._relay_done,
        )
        self.buf.clear()

    def _relay_done(self, result: Any) -> None:
        self._end(Outcome.of_relay(result.closed_by, result.error), result.error)

    # -- TLS SNI for IP-literal targets ---------------------------------------------------------

    def _feed_sni(self) -> None:
        name = parse_client_hello_sni(bytes(self.buf))
        if name is NEED_DATA and len(self.buf) < MAX_SNI_HELLO:
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.transport.pause_reading()
        self._route_by_sni(name if isinstance(name, str) else None)

    def _sni_done(self) -> None:
        """The sniff timed out (or the client half-closed): route by what we have."""
        self.deadline = None
        if self.finished or self.feed != self._feed_sni:
            return
        self.transport.pause_reading()
        name = parse_client_hello_sni(bytes(self.buf)) if self.buf else None
        self._route_by_sni(name if isinstance(name, str) else None)

    def _route_by_sni(self, name: str | None) -> None:
        self.feed = self._feed_held
        by_ip = self.by_ip
        assert by_ip is not None
        host, port = self.sni_target
        if self.client_eof and not self.buf:
            self._end(Outcome.CLIENT_CLOSED)
            return
        if name is not None:
            try:
                self.info.sni = normalise_host(name)
            except AddressError:
                self.info.sni = None
        d, route_host = by_ip, host
        if self.info.sni:
            logger.debug("conn %d: %s sniffed SNI %s", self.info.id, host, self.info.sni)
            try:
                by_sni = self.decide(self.info.sni, port)  # a reject rule for the name refuses
            except FwdProxyError as e:
                self._fail(e)
                return
            # The client chose the name: it may send the connection through a tunnel, but
            # never turn the address's decision into a direct dial it would not otherwise get.
            if by_sni.action == "via":
                d = by_sni
                if self.config.sniff_tls.dial_name:
                    route_host = self.info.sni
            else:
                self.info.decision = by_ip
        self._start_dial(d, route_host, port)
