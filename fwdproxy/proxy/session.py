"""One accepted client connection: sniff, handshake, decide, dial, reply, relay, log.

The order matters: the success reply (`200 Connection established`, SOCKS 0x00) is sent only
after the dial succeeded, so a client always learns *why* a tunnel failed. The one exception is
TLS-SNI routing of IP-literal targets, where the client sends its ClientHello only after the
reply (documented trade-off, limited to configured TLS ports).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fwdproxy.core.addr import AddressError, format_host_port, ip_of, is_loopback, normalise_host
from fwdproxy.core.errors import (
    DialError,
    FwdProxyError,
    HandshakeTimeout,
    Overloaded,
    ProtocolError,
    Rejected,
    Socks5Reply,
    http_error_response,
    http_status,
    socks_reply,
)
from fwdproxy.net import relay_fast
from fwdproxy.net.dial import Deadline, open_direct
from fwdproxy.net.relay import Counters, Endpoint, relay
from fwdproxy.proto._need import NEED_DATA
from fwdproxy.proto.http1 import connect_target, parse_basic_credentials, parse_request_head
from fwdproxy.proto.sniff import Protocol, sniff
from fwdproxy.proto.socks import Socks4Server, Socks5Credentials, Socks5Greeting, Socks5Server
from fwdproxy.proto.tls import parse_client_hello_sni
from fwdproxy.rules import Decision

if TYPE_CHECKING:
    from fwdproxy.config import Config, Listener
    from fwdproxy.server import ServerState

logger = logging.getLogger("fwdproxy.session")
access = logging.getLogger("fwdproxy.access")

READ_CHUNK = 64 * 1024
# The transport-level relay (fwdproxy.relay_fast) by default; FWDPROXY_RELAY=streams selects
# the reference implementation. Both pass the same contract suite.
RELAY = relay if os.environ.get("FWDPROXY_RELAY") == "streams" else relay_fast.relay
_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class ConnInfo:
    """A live connection as the admin API and the access log see it."""

    client: str
    listener: str
    id: int = field(default_factory=lambda: next(_ids))
    protocol: str = "?"
    target: str = ""
    sni: str | None = None
    user: str | None = None
    decision: Decision | None = None
    started: float = field(default_factory=time.time)
    counters: Counters = field(default_factory=Counters)
    outcome: str = "open"
    error: str | None = None
    dial_s: float | None = None
    task: asyncio.Task[Any] | None = None
    requests: int = 0

    @property
    def route(self) -> str:
        return self.decision.route if self.decision else "-"

    def as_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "id": self.id,
            "client": self.client,
            "protocol": self.protocol,
            "target": self.target,
            "sni": self.sni,
            "user": self.user,
            "rule": d.rule if d else None,
            "route": self.route,
            "registry": d.registry if d else None,
            "role": d.role if d else None,
            "bytes_up": self.counters.up,
            "bytes_down": self.counters.down,
            "age_s": round(time.time() - self.started, 3),
            "outcome": self.outcome,
        }


def check_password(users: dict[str, str] | Any, user: str, password: str) -> bool:
    """Constant-time check of a user's password against `plain:` or `sha256:` entries."""
    stored = users.get(user)
    if stored is None:
        # Compare anyway so that unknown users take as long as wrong passwords.
        hmac.compare_digest(b"x" * 32, hashlib.sha256(password.encode()).digest())
        return False
    kind, _, value = stored.partition(":")
    if kind == "sha256":
        given = hashlib.sha256(password.encode("utf-8", "surrogateescape")).hexdigest()
        return hmac.compare_digest(given, value)
    return hmac.compare_digest(
        password.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")
    )


class Session:
    """Handles one client connection from accept to close."""

    __slots__ = (
        "buf",
        "config",
        "deadline",
        "info",
        "listener",
        "peer_ip",
        "reader",
        "state",
        "writer",
    )

    def __init__(
        self,
        state: ServerState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: Listener,
    ) -> None:
        self.state = state
        self.config: Config = state.config  # one snapshot: a reload never changes a session
        self.reader = reader
        self.writer = writer
        self.listener = listener
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer_ip = str(peer[0])
        self.info = ConnInfo(
            client=format_host_port(self.peer_ip, int(peer[1])), listener=listener.address
        )
        self.buf = b""
        # The whole handshake must be done by then, however the client paces its bytes: a
        # per-read timeout lets a client that drips one byte at a time hold a slot forever.
        self.deadline = time.monotonic() + self.config.limits.handshake_timeout_s

    # -- entry point ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.state.opened(self.info)
        try:
            await self._run()
        except (ConnectionError, asyncio.IncompleteReadError):
            self._finish("client-reset")
        except asyncio.TimeoutError:
            if self.info.target:  # a keep-alive connection or origin that went quiet
                self._finish("idle-timeout", "no data within idle_timeout_s")
            else:
                self._finish("handshake-timeout", "client too slow")
            if not self.info.target and self.buf[:1].isalpha():
                self.writer.write(http_error_response(408, "request head not received in time"))
        except FwdProxyError as e:
            self._finish(outcome_of(e), str(e))
        except asyncio.CancelledError:
            self._finish("closed-by-server")
            raise
        except Exception as e:  # the one catch-all, at the session boundary
            logger.exception("conn %d: internal error", self.info.id)
            self._finish("internal-error", f"{type(e).__name__}: {e}")
        finally:
            if not self.writer.is_closing():
                self.writer.close()
            self.state.closed(self.info)
            self._log()

    def _finish(self, outcome: str, error: str | None = None) -> None:
        if self.info.outcome == "open":
            self.info.outcome = outcome
            self.info.error = error

    async def _run(self) -> None:
        first = await self._read_handshake()
        if not first:
            self._finish("empty")
            return
        self.buf = first
        try:
            proto = sniff(first[:1])
        except ProtocolError as e:
            self.info.protocol = "unknown"
            if first[:1] != b"\x16":
                self.writer.write(http_error_response(400, str(e)))
            raise
        if proto is Protocol.SOCKS5:
            self.info.protocol = "socks5"
            await self._socks5()
        elif proto is Protocol.SOCKS4:
            self.info.protocol = "socks4"
            await self._socks4()
        else:
            await self._http()

    async def _read_handshake(self) -> bytes:
        """One read, bounded by what is left of the handshake deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self.reader.read(READ_CHUNK), left)

    async def _read_more(self) -> bytes:
        data = await self._read_handshake()
        if not data:
            raise ConnectionResetError("client closed during the handshake")
        return data

    # -- admission -----------------------------------------------------------------------------

    def _client_allowed(self) -> str | None:
        """A reason to refuse this client, or None."""
        allow = self.listener.allow
        if not allow:
            return None
        ip = ip_of(self.peer_ip)
        if ip is not None and any(ip in net for net in allow):
            return None
        return f"client {self.peer_ip} is not in the allow-list of {self.listener.address}"

    def _check_target(self, host: str, port: int) -> None:
        """Refuse the target deny-list, our own ports (loops) and loopback for remote clients."""
        ip = ip_of(host) or ip_of(self.config.hosts.get(host, ""))
        if ip is not None:
            for net in self.config.deny_nets:
                if ip.version == net.version and ip in net:
                    raise Rejected(f"target {host} is on the deny-list ({net})")
        if self.state.is_own_address(host, port):
            raise Rejected(f"target {host}:{port} is this proxy itself (loop refused)")
        if is_loopback(host) and not self.config.loopback_targets and not is_loopback(self.peer_ip):
            raise Rejected(f"loopback target {host} refused for non-loopback client")

    def _admit_target(self, host: str, port: int) -> None:
        """Refusals that need no routing decision: overload, deny-list, loops, loopback."""
        if self.state.overloaded:
            raise Overloaded(
                f"too many connections (limit {self.config.limits.max_connections}); retry later"
            )
        self._check_target(host, port)

    def decide(self, host: str, port: int) -> Decision:
        """Route host:port, raising Rejected for a reject rule (naming the rule)."""
        self._admit_target(host, port)
        d = self.config.router.decide(host, port)
        self.info.decision = d
        if d.action == "reject":
            where = f" (line {d.line})" if d.line else ""
            raise Rejected(f"{host}:{port} rejected by rule {d.rule}{where}")
        return d

    async def dial(self, d: Decision, host: str, port: int) -> tuple[Any, Any]:
        deadline = Deadline(self.config.limits.dial_timeout_s)
        start = time.monotonic()
        try:
            if d.action == "via" and d.upstream:
                streams = await self.state.pool.open(d.upstream, host, port, deadline)
            else:
                streams = await open_direct(
                    host, port, timeout_s=deadline.left(), hosts=self.config.hosts
                )
        finally:
            self.info.dial_s = time.monotonic() - start
            self.state.dialed(d.route, self.info.dial_s)
        return streams

    async def tunnel(self, host: str, port: int, prefetched: bytes, reply: Any) -> None:
        """Decide, dial, reply (via `reply(err_or_none, sockname)`), then relay."""
        try:  # one normalisation for every protocol: rules and deny-list compare strings
            host = normalise_host(host)
        except AddressError as e:
            self.info.target = f"{host}:{port}"
            err = ProtocolError(
                f"invalid target host {host!r}: {e}", socks_reply=Socks5Reply.HOST_UNREACHABLE
            )
            await reply(err, None)
            raise err from None
        self.info.target = format_host_port(host, port)
        sniffed = await self._maybe_sniff(host, port, prefetched, reply)
        if sniffed is not None:
            return
        try:
            d = self.decide(host, port)
            r, w = await self.dial(d, host, port)
        except FwdProxyError as e:
            await reply(e, None)
            raise
        # Only SOCKS5 reports the bound address; fetching it costs a syscall on uvloop.
        await reply(None, w.get_extra_info("sockname") if self.info.protocol == "socks5" else None)
        await self._relay(prefetched, r, w)

    async def _relay(self, prefetched: bytes, r: Any, w: Any) -> None:
        res = await RELAY(
            Endpoint(self.reader, self.writer, prefetched),
            Endpoint(r, w),
            idle_timeout_s=self.config.limits.idle_timeout_s,
            counters=self.info.counters,
        )
        # A reset at the end of an exchange is how many peers close (lingering close, TLS
        # clients without close_notify): the relay calls it `*-reset`, logged at INFO.
        self._finish("ok" if res.error is None else res.closed_by, res.error)

    async def _maybe_sniff(
        self, host: str, port: int, prefetched: bytes, reply: Any
    ) -> bool | None:
        """For IP-literal TLS targets: reply first, read the ClientHello, route by its SNI."""
        sn = self.config.sniff_tls
        if not (sn.enabled and port in sn.ports and ip_of(host) is not None):
            return None
        try:
            # The address's own decision bounds what an SNI may do: a target the rules reject
            # is refused here, before the early success reply, whatever name the client sends.
            by_ip = self.decide(host, port)
        except FwdProxyError as e:
            await reply(e, None)
            raise
        await reply(None, None)
        hello = prefetched
        deadline = time.monotonic() + sn.timeout_s
        name = parse_client_hello_sni(hello) if hello else NEED_DATA
        while name is NEED_DATA and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(
                    self.reader.read(READ_CHUNK), max(0.01, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                break
            if not data:
                self._finish("client-closed")
                return True
            hello += data
            name = parse_client_hello_sni(hello)
        route_host = host
        if isinstance(name, str):
            try:
                self.info.sni = normalise_host(name)
            except AddressError:
                self.info.sni = None
        d = by_ip
        if self.info.sni:
            logger.debug("conn %d: %s sniffed SNI %s", self.info.id, host, self.info.sni)
            by_sni = self.decide(self.info.sni, port)  # a reject rule for the name still refuses
            # The client chose the name: it may send the connection through a tunnel, but never
            # turn the address's decision into a direct dial it would not otherwise get.
            if by_sni.action == "via":
                d = by_sni
                if sn.dial_name:
                    route_host = self.info.sni
            else:
                self.info.decision = by_ip
        r, w = await self.dial(d, route_host, port)
        await self._relay(hello, r, w)
        return True

    # -- SOCKS ---------------------------------------------------------------------------------

    async def _socks5(self) -> None:
        m = Socks5Server(require_auth=self.config.auth_required)
        m.receive_data(self.buf)
        while True:
            try:
                ev = m.next_event()
            except ProtocolError as e:
                if m.reply_expected:
                    self.writer.write(m.reply(e.socks_reply))
                raise
            if ev is NEED_DATA:
                m.receive_data(await self._read_more())
            elif isinstance(ev, Socks5Greeting):
                choice = m.choose_method()
                self.writer.write(choice)
                if choice[1] == 0xFF:
                    raise ProtocolError(
                        "no acceptable SOCKS5 auth method"
                        + (" (username/password required)" if self.config.auth_required else "")
                    )
            elif isinstance(ev, Socks5Credentials):
                ok = check_password(self.config.users, ev.username, ev.password)
                self.writer.write(m.auth_reply(ok))
                if not ok:
                    raise Rejected(
                        f"SOCKS5 authentication failed for user {ev.username!r}", status=407
                    )
                self.info.user = ev.username
            else:
                break
        refuse = self._client_allowed()
        if refuse:
            self.writer.write(m.reply(Socks5Reply.NOT_ALLOWED))
            raise Rejected(refuse)

        async def reply(err: BaseException | None, sockname: Any) -> None:
            if err is None:
                bound = (str(sockname[0]), int(sockname[1])) if sockname else None
                self.writer.write(m.reply(Socks5Reply.SUCCEEDED, bound))
            else:
                self.writer.write(m.reply(socks_reply(err)))
            await self.writer.drain()

        await self.tunnel(ev.host, ev.port, m.trailing_data, reply)

    async def _socks4(self) -> None:
        m = Socks4Server()
        m.receive_data(self.buf)
        while True:
            try:
                ev = m.next_event()
            except ProtocolError:
                self.writer.write(m.reply(False))
                raise
            if ev is not NEED_DATA:
                break
            m.receive_data(await self._read_more())
        refuse = self._client_allowed()
        if refuse is None and self.config.auth_required:
            refuse = "SOCKS4 has no password authentication; use SOCKS5 or HTTP with credentials"
        if refuse:
            self.writer.write(m.reply(False))
            raise Rejected(refuse)

        async def reply(err: BaseException | None, sockname: Any) -> None:
            self.writer.write(m.reply(err is None))
            await self.writer.drain()

        await self.tunnel(ev.host, ev.port, m.trailing_data, reply)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _http(self) -> None:
        limit = self.config.limits.max_head_bytes
        while True:
            try:
                head = parse_request_head(self.buf, limit)
            except ProtocolError as e:
                self.info.protocol = "http"
                self.writer.write(http_error_response(e.status_hint, str(e)))
                raise
            if head is not None:
                break
            self.buf += await self._read_more()
        if head.method != "CONNECT":
            self.info.protocol = "http"
            from fwdproxy.proxy.forward import forward_http

            await forward_http(self, self.buf)
            return
        self.info.protocol = "connect"
        try:
            self.http_admit(head.header(b"proxy-authorization"))
            target = connect_target(head.target)
        except (ProtocolError, Rejected) as e:
            await self.http_refuse(e)
            raise

        async def reply(err: BaseException | None, sockname: Any) -> None:
            if err is None:
                self.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                self.writer.write(http_error_response(http_status(err), str(err)))
            await self.writer.drain()

        await self.tunnel(target.host, target.port, head.trailing, reply)

    def http_admit(self, proxy_authorization: bytes | None) -> None:
        """Allow-list and Basic auth for an HTTP request; raise Rejected (403/407)."""
        refuse = self._client_allowed()
        if refuse:
            raise Rejected(refuse)
        if not self.config.auth_required:
            return
        cred = parse_basic_credentials(proxy_authorization)
        if cred is None:
            raise Rejected("proxy authentication required", status=407)
        if not check_password(self.config.users, cred[0], cred[1]):
            raise Rejected(
                f"proxy authentication failed for user {cred[0]!r}",
                status=407,
                credentials_given=True,
            )
        self.info.user = cred[0]

    async def http_refuse(self, e: FwdProxyError) -> None:
        status = http_status(e)
        extra = 'Proxy-Authenticate: Basic realm="fwdproxy"\r\n' if status == 407 else ""
        self.writer.write(http_error_response(status, str(e), extra))
        await self.writer.drain()

    # -- logging -------------------------------------------------------------------------------

    def _log(self) -> None:
        i = self.info
        d = i.decision
        fields: dict[str, Any] = {
            "conn": i.id,
            "client": i.client,
            "proto": i.protocol,
            "target": i.target or "-",
            "rule": d.rule if d else "-",
            "route": i.route,
            "up": i.counters.up,
            "down": i.counters.down,
            "dur": round(time.time() - i.started, 3),
            "outcome": i.outcome,
        }
        if d is not None and d.registry:
            fields["registry"] = f"{d.registry}/{d.role}"
        if i.sni:
            fields["sni"] = i.sni
        if i.user:
            fields["user"] = i.user
        if i.requests:
            fields["requests"] = i.requests
        if i.error:
            fields["error"] = i.error
        ok = i.outcome in ("ok", "client", "target", "empty", "client-reset", "target-reset")
        access.log(logging.INFO if ok else logging.WARNING, "", extra={"fields": fields})


def outcome_of(e: FwdProxyError) -> str:
    """The access-log outcome for a refused or failed connection."""
    if isinstance(e, Rejected):
        return "auth-failed" if e.status == 407 else "rejected"
    if isinstance(e, DialError):
        return f"dial-{e.kind}"
    if isinstance(e, ProtocolError):
        return "bad-request"
    if isinstance(e, Overloaded):
        return "overloaded"
    if isinstance(e, HandshakeTimeout):
        return "handshake-timeout"
    return "error"
