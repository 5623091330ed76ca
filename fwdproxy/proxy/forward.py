"""Plain HTTP forwarding (absolute-form requests) as a protocol-level state machine.

Nothing here reads with a coroutine. The client connection (fwdproxy.proxy.connection) passes
its transport callbacks to the Forwarder; the origin connection's protocol
(fwdproxy.proxy.origin) passes its own. Each side is framed by an h11 machine (SERVER role
towards the client, CLIENT role towards the origin); every callback pulls the events h11 has
and moves them on with `transport.write`. The one Task is the dial of a new origin connection.

One request cycle on a keep-alive client connection:

    HEAD --Request--> admit, route --+-- same host:port and route: reuse ----+--> BODY
      ^                              +-- new origin: dial Task (no pulling) -+
      |                              +-- refused (403/407/502/504): answer, discard the body
      |
      +-- both machines DONE: start_next_cycle <-- request and response both complete

BODY moves request body events to the origin (or drops them after a refusal); the response is
relayed as soon as the origin sends it, even while the request body still streams (an origin
may answer early). A cycle ends when the client's request and our response are complete; a
connection that must close (either side said so, HTTP/1.0, the client half-closed, shutdown)
closes then, and every other one starts the next cycle. Pipelined requests wait in h11's
buffer, with reading paused, until the response before them is complete.

Each request is routed on its own host, so one connection may alternate between direct and
tunnelled origins; the origin connection is reused while host, port and route stay the same.

Flow control: when the origin's write buffer passes high-water its pause_writing() pauses
reading the client, and the client's pauses reading the origin (resume_writing() undoes it).
Reading the client also pauses when a dial or a pipelined request keeps bytes waiting, so what
one connection holds stays bounded by the water marks plus one receive per side.

Timing: one timer per connection, re-armed lazily. Between requests the connection may idle
for idle_timeout_s; once the first byte of a request head arrives the whole head must follow
within handshake_timeout_s (408); inside an exchange, nothing received for idle_timeout_s ends
it (504 when the request was sent and the origin never began its response).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import h11

from fwdproxy.core.addr import format_host_port
from fwdproxy.core.errors import (
    FwdProxyError,
    ProtocolError,
    Rejected,
    http_error_response,
    http_status,
)
from fwdproxy.core.outcome import Outcome, outcome_of
from fwdproxy.net.relay import describe
from fwdproxy.net.relay_fast import HIGH_WATER, LOW_WATER
from fwdproxy.proto.http1 import Target, absolute_target, framing_problem, strip_hop_by_hop
from fwdproxy.proxy.origin import Key, Origin

if TYPE_CHECKING:
    from fwdproxy.config import Config
    from fwdproxy.net.dial import Dialed
    from fwdproxy.proxy.state import ConnInfo
    from fwdproxy.routing.rules import Decision

logger = logging.getLogger("fwdproxy.session")

# Why reading the client is paused (a bit set: reading resumes when none is left).
HOLD_DIAL: Final = 1  # more than HIGH_WATER arrived while a dial runs
HOLD_ORIGIN: Final = 2  # the origin's write buffer is full
HOLD_NEXT: Final = 4  # a pipelined request waits for the response before it

_ENDED: Final = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # a message in this direction is over
_NOT_STARTED: Final = (h11.IDLE, h11.SEND_RESPONSE)  # our response has not begun
_CHALLENGE: Final = (("Proxy-Authenticate", 'Basic realm="fwdproxy"'),)
_EOM: Final = h11.EndOfMessage()
_CONTINUE: Final = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")


class Context(Protocol):
    """What the forwarder needs of its client connection (fwdproxy.proxy.connection)."""

    @property
    def config(self) -> Config: ...
    @property
    def info(self) -> ConnInfo: ...
    @property
    def transport(self) -> Any: ...
    @property
    def stopping(self) -> bool:
        """The server is shutting down: close once the exchange in flight is complete."""

    def admit_http(self, proxy_authorization: bytes | None) -> None:
        """Allow-list, then Basic auth; raise Rejected (403/407)."""

    def decide(self, host: str, port: int) -> Decision:
        """Admission checks and the rules; raise Rejected/Overloaded."""

    async def dial(self, d: Decision, host: str, port: int) -> Dialed:
        """Open the origin connection `d` says; raise DialError."""

    def end(self, outcome: Outcome, error: str | None = None) -> None:
        """Record the outcome (the first one wins) and close the client connection."""


class Forwarder:
    """Serves absolute-form HTTP requests on one client connection (see the module docstring).

    The client connection calls `start()` once, then passes on its transport callbacks:
    `client_data`, `client_eof`, `client_full`, `client_lost`, and `close` for shutdown.
    """

    __slots__ = (
        "admitted",
        "challenged",
        "client",
        "client_full_",
        "counters",
        "ctx",
        "dial_task",
        "early",
        "ended",
        "head_deadline",
        "head_s",
        "hold",
        "idle_s",
        "info",
        "loop",
        "origin",
        "out",
        "pending",
        "pumping",
        "sink",
        "timer",
        "timer_at",
        "transport",
    )

    def __init__(self, ctx: Context, first: bytes, eof: bool) -> None:
        self.ctx = ctx
        # Looked up once: on CPython 3.11 each get_running_loop() costs a getpid() syscall.
        self.loop = asyncio.get_running_loop()
        self.info = ctx.info
        self.counters = ctx.info.counters
        self.transport = ctx.transport
        limits = ctx.config.limits
        self.idle_s = limits.idle_timeout_s
        self.head_s = limits.handshake_timeout_s
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        if first:
            self.client.receive_data(first)
        if eof:
            self.client.receive_data(b"")
        self.origin: Origin | None = None
        self.out: list[bytes] = []  # for the client, written once per callback (_flush)
        # Where request body events go: the origin, or nowhere (the request was answered).
        self.sink: Origin | None = None
        self.dial_task: asyncio.Task[None] | None = None
        self.pending: tuple[h11.Request, Target, Key] | None = None  # waits for its dial
        self.early = 0  # bytes received while a dial runs
        self.hold = 0  # HOLD_* bits
        self.client_full_ = False  # the client's write buffer is above high-water
        self.ended = False
        self.pumping = False  # inside _pump: a finished cycle lets its loop go on
        # Set at the first byte of a request head after the first: the head must follow by then.
        self.head_deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        # A 407 challenge (no credentials) on this connection; the connection ends as
        # auth-failed unless a later request was let through.
        self.challenged: Rejected | None = None
        self.admitted = False

    def start(self) -> None:
        """Begin with the bytes handed over (the first request head, maybe more)."""
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        now = time.monotonic()
        self.counters.last_activity = now
        self._arm(now + self.idle_s)
        try:
            self._pump()
        except Exception as e:  # the one catch-all for this entry point
            self._internal(e)

    # -- client transport callbacks ------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.ended:
            return
        self.counters.last_activity = time.monotonic()
        self.client.receive_data(data)
        try:
            if self.dial_task is not None:
                self.early += len(data)
                if self.early > HIGH_WATER:
                    self._hold(HOLD_DIAL)
                return
            self._pump()
        except Exception as e:
            self._internal(e)

    def client_eof(self) -> None:
        if self.ended:
            return
        self.client.receive_data(b"")
        try:
            if self.dial_task is None:
                self._pump()
        except Exception as e:
            self._internal(e)

    def client_full(self, full: bool) -> None:
        """The client's write buffer passed high-water (or drained): pause the origin."""
        self.client_full_ = full
        o = self.origin
        if o is not None:
            if full:
                o.pause_reading()
            else:
                o.resume_reading()

    def client_lost(self) -> None:
        """The client connection is gone; the connection records its own outcome."""
        if self.challenged is not None and not self.admitted:
            self.info.finish(Outcome.AUTH_FAILED, str(self.challenged))
        self._teardown()

    def close(self) -> None:
        """Shutdown or the admin API: end now."""
        self._end(Outcome.CLOSED_BY_SERVER)

    # -- the client's events -------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle every client event h11 can give now (not while a dial runs)."""
        self.pumping = True
        try:
            self._pump_events()
        finally:
            self.pumping = False
            self._flush()

    def _pump_events(self) -> None:
        c = self.client
        while not self.ended and self.dial_task is None:
            try:
                ev = c.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(e)
                return
            t = type(ev)
            if t is h11.Data:
                self.counters.up += len(ev.data)  # type: ignore[union-attr]
                if self.sink is not None:
                    self.sink.send(ev)
            elif ev is h11.NEED_DATA:
                if c.their_state is h11.IDLE:
                    self._awaiting_head()
                return
            elif t is h11.Request:
                self._request(ev)  # type: ignore[arg-type]
            elif t is h11.EndOfMessage:
                if self.sink is not None:
                    self.sink.send(_EOM)  # trailers are not forwarded
                self._cycle_check()
            elif ev is h11.PAUSED:
                # A pipelined request (or a possible protocol switch) waits for our response.
                self._hold(HOLD_NEXT)
                return
            else:  # ConnectionClosed: the client half-closed
                if c.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
                    self._end(Outcome.OK)  # nothing in flight
                return

    def _awaiting_head(self) -> None:
        """Between requests: idle (shutdown may close it at once) or a head dripping in."""
        if self.client.trailing_data[0]:
            self.info.idle = False
            if self.head_deadline is None:
                self.head_deadline = time.monotonic() + self.head_s
                self._arm(self.head_deadline)
        else:
            self.info.idle = True

    def _bad_request(self, e: h11.RemoteProtocolError) -> None:
        c = self.client
        if c.trailing_data[1] and c.our_state is not h11.IDLE:
            msg = "client closed in the middle of a request body"
        else:
            msg = f"malformed request: {e}"
        # h11 hints 501 for a Transfer-Encoding it does not implement; a request whose body
        # length cannot be determined is malformed (RFC 9112 §6.3): 400.
        self._answer(431 if e.error_status_hint == 431 else 400, msg)
        self._end(Outcome.BAD_REQUEST, msg)

    def _request(self, req: h11.Request) -> None:
        info = self.info
        info.idle = False
        self.head_deadline = None
        if req.method == b"CONNECT":
            self._answer(
                405,
                "CONNECT after a forwarded request is not supported on the same connection; "
                "open a new one",
            )
            self._end(Outcome.OK)
            return
        info.requests += 1
        # (iterating h11's Headers goes item by item through __getitem__: one list is cheaper)
        headers = [(name.lower(), value) for name, value in req.headers.raw_items()]
        problem = framing_problem(headers)
        if problem:
            # RFC 9112 §6.1: answer and close, or the rest of the stream is a request the
            # origin and this proxy would disagree about (request smuggling).
            self._answer(400, problem)
            self._end(Outcome.BAD_REQUEST, problem)
            return
        credentials = None
        for name, value in headers:
            if name == b"proxy-authorization":
                credentials = value
                break
        try:
            self.ctx.admit_http(credentials)
            target = absolute_target(req.target.decode("ascii", "replace"))
        except (Rejected, ProtocolError) as e:
            status = http_status(e)
            self._answer(status, str(e), _CHALLENGE if status == 407 else ())
            if isinstance(e, Rejected) and e.status == 407 and not e.credentials_given:
                self.challenged = e  # the client may answer the challenge on this connection
                self.sink = None
                return
            self._end(outcome_of(e), str(e))  # a wrong guess ends it, as on CONNECT and SOCKS5
            return
        self.admitted = True
        info.target = format_host_port(target.host, target.port)
        try:
            d = self.ctx.decide(target.host, target.port)
        except FwdProxyError as e:
            self._refused(e)
            return
        key = (target.host, target.port, d.route)
        o = self.origin
        if o is not None and o.usable(key):
            self._send_request(req, target, o)
            return
        self._drop_origin()
        self.pending = (req, target, key)
        self.early = 0
        self.dial_task = self.loop.create_task(
            self._dial(d, target.host, target.port)
        )

    def _refused(self, e: FwdProxyError) -> None:
        """Answer the request with `e`'s status; the connection stays usable."""
        self._answer(http_status(e), str(e))
        self.sink = None
        self.info.finish(outcome_of(e), str(e))
        self._cycle_check()

    def _send_request(self, req: h11.Request, target: Target, o: Origin) -> None:
        """Send the request head to `o`; its body follows as the client's events arrive."""
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces any Host header.
        host = target.host if target.port == 80 else format_host_port(target.host, target.port)
        headers: list[tuple[bytes, bytes]] = [(b"Host", host.encode())]
        expect = te = False
        for name, value in strip_hop_by_hop(list(req.headers.raw_items())):
            low = name.lower()
            if low == b"host":
                continue
            if low == b"expect" and value.lower() == b"100-continue":
                expect = True  # answered here: the body goes on as soon as the origin is there
                continue
            te = te or low == b"transfer-encoding"
            headers.append((name, value))
        if te:
            # Never forward both framings (RFC 9112 §6.1): that is a request-smuggling vector.
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        o.send(h11.Request(method=req.method, target=target.path.encode(), headers=headers))
        self.sink = o
        if expect and self.client.their_http_version != b"1.0":
            self._send(_CONTINUE)

    # -- dialling ------------------------------------------------------------------------------

    async def _dial(self, d: Decision, host: str, port: int) -> None:
        try:
            dialed = await self.ctx.dial(d, host, port)
        except FwdProxyError as e:
            self.dial_task = None
            self.pending = None
            try:
                self._refused(e)
                self._release(HOLD_DIAL)
                self._pump()
            except Exception as e2:
                self._internal(e2)
            return
        except Exception as e:
            self.dial_task = None
            self._internal(e)
            return
        self.dial_task = None
        pending, self.pending = self.pending, None
        if self.ended or pending is None:  # the client left (or was closed) while we dialled
            dialed.close()
            return
        try:
            req, target, key = pending
            o = self.origin = Origin(key, dialed.transport, self)
            self._send_request(req, target, o)
            dialed.hand_over(o)  # early bytes and EOF are parsed as the response, from here
            if self.client_full_:
                o.pause_reading()
            self.counters.last_activity = time.monotonic()
            self._release(HOLD_DIAL)
            self._pump()
        except Exception as e:
            self._internal(e)

    # -- the origin's events (fwdproxy.proxy.origin.Owner) ---------------------------------------

    def origin_data(self, o: Origin) -> None:
        self.counters.last_activity = time.monotonic()
        try:
            self._pump_origin(o)
            self._flush()
        except Exception as e:
            self._internal(e)

    def _pump_origin(self, o: Origin) -> None:
        conn = o.conn
        if conn.our_state is h11.IDLE:
            # Nothing was asked: an idle origin that speaks or closes is done for.
            self._drop_origin()
            return
        while o is self.origin:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                if o.eof and conn.their_state is h11.SEND_RESPONSE:
                    self._origin_failed(o, f"{o.where} closed the connection without a response")
                else:
                    self._origin_failed(o, f"bad response from {o.where}: {e}")
                return
            t = type(ev)
            if t is h11.Data:
                self.counters.down += len(ev.data)  # type: ignore[union-attr]
                self._send(ev)
            elif ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            elif t is h11.Response:
                headers = strip_hop_by_hop(list(ev.headers.raw_items()))  # type: ignore[union-attr]
                if any(k.lower() == b"transfer-encoding" for k, _ in headers):
                    # h11 framed the body by chunked; a Content-Length beside it would let the
                    # client frame it differently.
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                self._send(
                    h11.Response(
                        status_code=ev.status_code,  # type: ignore[union-attr]
                        headers=headers,
                        reason=ev.reason,  # type: ignore[union-attr]
                    )
                )
            elif t is h11.EndOfMessage:
                self._send(_EOM)  # trailers are not forwarded (an HTTP/1.0 client cannot take them)
                self._cycle_check()
            elif t is h11.InformationalResponse:
                if ev.status_code != 101:  # type: ignore[union-attr]
                    self._send(
                        h11.InformationalResponse(
                            status_code=ev.status_code,  # type: ignore[union-attr]
                            headers=strip_hop_by_hop(list(ev.headers.raw_items())),  # type: ignore[union-attr]
                        )
                    )
            else:  # ConnectionClosed after a complete response: the origin is done
                self._drop_origin()
                self._cycle_check()
                return

    def origin_lost(self, o: Origin, exc: Exception | None) -> None:
        if o is not self.origin:
            return
        try:
            if o.conn.our_state is h11.IDLE:
                self._drop_origin()  # an idle keep-alive origin went away
            elif exc is not None:
                self._origin_failed(o, f"{o.where} failed: {describe(exc)}")
            else:
                self._pump_origin(o)  # the EOF ends a close-delimited body, or is an error
                if o is self.origin:
                    self._origin_failed(o, f"{o.where} closed the connection")
            self._flush()
        except Exception as e:
            self._internal(e)

    def origin_full(self, o: Origin, full: bool) -> None:
        if o is not self.origin:
            return
        if full:
            self._hold(HOLD_ORIGIN)
        else:
            self._release(HOLD_ORIGIN)

    def _origin_failed(self, o: Origin, reason: str, status: int = 502) -> None:
        """The origin broke the exchange: answer if we still can, else end the connection."""
        self._drop_origin()
        if self.client.our_state in _NOT_STARTED:
            self._answer(status, reason)
            self._cycle_check()  # the rest of the request body is discarded
            return
        # The client can tell from the framing that the body is incomplete.
        self._end(Outcome.TARGET_RESET, f"origin failed mid-response: {reason}")

    def _drop_origin(self) -> None:
        o = self.origin
        if o is None:
            return
        self.origin = None
        if self.sink is o:
            self.sink = None
        self._release(HOLD_ORIGIN)
        o.close()

    # -- end of a cycle, end of the connection ---------------------------------------------------

    def _cycle_check(self) -> None:
        """Start the next cycle (or close) once the request and the response are complete."""
        c = self.client
        if c.our_state not in _ENDED or c.their_state not in _ENDED or self.ended:
            return
        self.sink = None
        o = self.origin
        if o is not None:
            oc = o.conn
            if oc.our_state is h11.DONE and oc.their_state is h11.DONE and not oc.trailing_data[0]:
                oc.start_next_cycle()
            elif oc.our_state is not h11.IDLE:  # (IDLE: this request never reached it)
                self._drop_origin()
        if c.our_state is not h11.DONE or c.their_state is not h11.DONE:
            self._end(Outcome.OK)
        elif self.ctx.stopping:
            self._end(Outcome.CLOSED_BY_SERVER)
        else:
            c.start_next_cycle()
            self._release(HOLD_NEXT)
            if not self.pumping:  # (inside _pump, its loop goes on with the next request)
                self._pump()

    def _end(self, outcome: Outcome, error: str | None = None) -> None:
        if self.ended:
            return
        if self.challenged is not None and not self.admitted:
            self.info.finish(Outcome.AUTH_FAILED, str(self.challenged))
        self._flush()  # the answer goes out before the close
        self._teardown()
        self.ctx.end(outcome, error)

    def _teardown(self) -> None:
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dial_task is not None:
            self.dial_task.cancel()  # its result has nowhere to go
            self.dial_task = None
        self._drop_origin()

    def _internal(self, e: Exception) -> None:
        logger.exception("conn %d: internal error", self.info.id)
        self._end(Outcome.INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    # -- writing to the client -----------------------------------------------------------------

    def _send(self, event: Any) -> None:
        """Frame `event` for the client; the bytes go out at the end of this callback."""
        parts = self.client.send_with_data_passthrough(event)
        if parts:
            self.out += parts

    def _flush(self) -> None:
        """One write for everything one callback produced (a small response: one send)."""
        out = self.out
        if out:
            self.out = []
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def _answer(self, status: int, message: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        """Answer the current request with an error, if our response has not started."""
        if self.client.our_state not in _NOT_STARTED:
            return
        body = (message.rstrip("\n") + "\n").encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Proxy-Agent", "fwdproxy"),
            *extra,
        ]
        self._send(h11.Response(status_code=status, headers=headers))
        self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())

    # -- reading the client: pause reasons -------------------------------------------------------

    def _hold(self, why: int) -> None:
        if not self.hold and not self.ended:
            self.transport.pause_reading()
        self.hold |= why

    def _release(self, why: int) -> None:
        if self.hold & why:
            self.hold &= ~why
            if not self.hold and not self.ended:
                self.transport.resume_reading()

    # -- the timer -----------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        """Make sure the timer fires by `at` (it re-arms itself for anything later)."""
        if self.timer is not None:
            if self.timer_at <= at:
                return
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_later(
            max(0.0, at - time.monotonic()), self._on_timer
        )

    def _on_timer(self) -> None:
        self.timer = None
        if self.ended:
            return
        try:
            self._tick(time.monotonic())
            self._flush()
        except Exception as e:
            self._internal(e)

    def _tick(self, now: float) -> None:
        if self.dial_task is not None:  # the dial has its own deadline
            self._arm(now + self.idle_s)
            return
        hd = self.head_deadline
        if hd is not None and now >= hd:
            # h11 has no request to answer yet: the 408 goes out as raw bytes.
            msg = "request head not received in time"
            self.transport.write(http_error_response(408, msg))
            self._end(Outcome.HANDSHAKE_TIMEOUT, msg)
            return
        idle_end = self.counters.last_activity + self.idle_s
        if now >= idle_end:
            self._idle_timeout()
            return
        self._arm(idle_end if hd is None else min(hd, idle_end))

    def _idle_timeout(self) -> None:
        c = self.client
        o = self.origin
        if o is not None and c.their_state in _ENDED and c.our_state in _NOT_STARTED:
            # The whole request went out; the origin never began its answer.
            self._origin_failed(o, f"{o.where} sent no response within {self.idle_s:g}s", 504)
            self.counters.last_activity = time.monotonic()
            if not self.ended:
                self._arm(self.counters.last_activity + self.idle_s)
            return
        self._end(Outcome.IDLE_TIMEOUT, "no data within idle_timeout_s")
