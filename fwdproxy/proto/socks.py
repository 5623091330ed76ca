"""Server side of the SOCKS5 (RFC 1928 + RFC 1929) and SOCKS4/4a CONNECT handshakes, sans-IO.

The machines own framing: bytes go in with `receive_data()` (b"" = EOF) in whatever pieces
TCP delivered, `next_event()` returns an event or NEED_DATA, and the reply methods return the
bytes to write. They never decide policy (which auth is good, whether to dial) and never send
a success reply on their own: the session answers only after its dial has succeeded.

SOCKS5 flow:  Socks5Greeting -> choose_method() -> [Socks5Credentials -> auth_reply(ok)]
              -> SocksConnect -> reply(code, bound); then relay `trailing_data` first.
SOCKS4 flow:  SocksConnect -> reply(granted, bound); then relay `trailing_data` first.

Errors: peer input the machine cannot serve raises ProtocolError, the machine enters ERROR and
every later call raises again, with one exception: `reply()` is a pure encoder that works in
any state, so the session can still answer `reply(err.socks_reply)` before closing. Calling a
method in the wrong state (a bug in the caller, not the peer) raises RuntimeError.

Text fields (RFC 1929 username/password, SOCKS4 USERID) are decoded as UTF-8 with
"surrogateescape": ASCII and UTF-8 read as typed, while any other bytes survive as lone
surrogates, so `.encode("utf-8", "surrogateescape")` gives back the exact wire bytes and such
a value can never compare equal to a configured (valid UTF-8) secret by accident.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from fwdproxy.core.errors import ProtocolError, Socks5Reply
from fwdproxy.proto.need import NEED_DATA, NeedData

__all__ = [
    "MAX_HOSTNAME_BYTES",
    "MAX_PENDING_BYTES",
    "MAX_USERID_BYTES",
    "NEED_DATA",
    "NeedData",
    "Socks4Server",
    "Socks5Credentials",
    "Socks5Greeting",
    "Socks5Server",
    "SocksConnect",
]

# A whole SOCKS5 handshake is at most 257 + 513 + 262 bytes, so this only ever trips on a
# client that floods us before the handshake is over; it leaves room for optimistic data
# (e.g. a TLS ClientHello) sent right behind the request in the same segment.
MAX_PENDING_BYTES: Final = 64 * 1024
MAX_USERID_BYTES: Final = 255  # SOCKS4 USERID (NUL-terminated, so unbounded on the wire)
MAX_HOSTNAME_BYTES: Final = 255  # SOCKS4a hostname; DNS names are at most 253 bytes

_NO_AUTH: Final = 0x00
_USER_PASS: Final = 0x02
_NO_ACCEPTABLE: Final = 0xFF
_ATYP_NAMES: Final = {0x01: "ipv4", 0x03: "domain", 0x04: "ipv6"}
_COMMAND_NAMES: Final = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}


@dataclass(frozen=True, slots=True)
class Socks5Greeting:
    """The client's method offer (RFC 1928 §3)."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Socks5Credentials:
    """RFC 1929 username/password. The password is kept out of repr() so it never hits a log."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SocksConnect:
    """A CONNECT request. `host` is an IP literal (atyp ipv4/ipv6) or an ASCII/IDNA name."""

    host: str
    port: int
    version: int  # 4 or 5
    atyp: str  # "ipv4" | "ipv6" | "domain"
    user_id: str = ""  # SOCKS4 USERID


Socks5Event = Socks5Greeting | Socks5Credentials | SocksConnect | NeedData
_T = TypeVar("_T")


class _State(enum.Enum):
    AWAIT_GREETING = enum.auto()
    AWAIT_METHOD_CHOICE = enum.auto()  # caller must call choose_method()
    AWAIT_AUTH = enum.auto()
    AWAIT_AUTH_DECISION = enum.auto()  # caller must call auth_reply()
    AWAIT_REQUEST = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


class _Machine:
    """Buffering, EOF, the size cap and the sticky ERROR state shared by both versions."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._done = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; b"" means the client closed its side (EOF)."""
        self._raise_if_failed()
        if not data:
            self._eof = True
        elif self._eof:
            raise RuntimeError("receive_data() called with data after EOF")
        else:
            self._buf += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its CONNECT request; b"" until that request is parsed."""
        return bytes(self._buf) if self._done else b""

    def _run(self, reader: Callable[[], _T]) -> _T:
        self._raise_if_failed()
        try:
            if len(self._buf) > MAX_PENDING_BYTES:
                raise ProtocolError(
                    f"more than {MAX_PENDING_BYTES} bytes sent before the handshake finished",
                    status_hint=431,
                )
            return reader()
        except ProtocolError as err:
            self._fail(err)
            raise

    def _fail(self, err: ProtocolError) -> None:
        self._error = err

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None:
            # A fresh instance each time, so tracebacks do not pile up on one object.
            raise ProtocolError(
                f"SOCKS handshake already failed: {err}",
                status_hint=err.status_hint,
                socks_reply=err.socks_reply,
            )

    def _need_more(self, what: str) -> NeedData:
        if self._eof:
            raise ProtocolError(f"client closed the connection in the middle of the {what}")
        return NEED_DATA

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class Socks5Server(_Machine):
    """Server-side SOCKS5 machine (RFC 1928 + RFC 1929); framing is owned here.

    With `require_auth` the only acceptable method is username/password (0x02), otherwise only
    "no authentication" (0x00): a client must offer the one the server wants.
    """

    def __init__(self, *, require_auth: bool = False) -> None:
        super().__init__()
        self._require_auth = require_auth
        self._state = _State.AWAIT_GREETING
        self._methods: tuple[int, ...] = ()
        self._in_request = False

    @property
    def reply_expected(self) -> bool:
        """True once method negotiation is over: an error is then answered with reply()."""
        return self._in_request

    def next_event(self) -> Socks5Event:
        """The next handshake event, or NEED_DATA. Raises ProtocolError on bad input."""
        readers = {
            _State.AWAIT_GREETING: self._read_greeting,
            _State.AWAIT_AUTH: self._read_credentials,
            _State.AWAIT_REQUEST: self._read_request,
        }
        self._raise_if_failed()
        reader = readers.get(self._state)
        if reader is None:
            raise RuntimeError(f"next_event() is not valid in state {self._state.name}")
        return self._run(reader)

    def choose_method(self) -> bytes:
        """The method-selection message for the last Socks5Greeting.

        b"\\x05\\xff" means no offered method is acceptable: the machine is then in ERROR and
        the caller writes these bytes and closes.
        """
        self._expect(_State.AWAIT_METHOD_CHOICE, "choose_method")
        wanted = _USER_PASS if self._require_auth else _NO_AUTH
        if wanted in self._methods:
            self._state = _State.AWAIT_AUTH if wanted == _USER_PASS else _State.AWAIT_REQUEST
            self._in_request = wanted == _NO_AUTH
            return bytes([5, wanted])
        offered = ", ".join(f"0x{m:02x}" for m in self._methods) or "none"
        self._refuse(
            f"no acceptable SOCKS5 auth method: client offered [{offered}], "
            f"server requires 0x{wanted:02x}"
        )
        return bytes([5, _NO_ACCEPTABLE])

    def auth_reply(self, ok: bool) -> bytes:
        """The RFC 1929 status message. After `ok=False` the machine is in ERROR (close)."""
        self._expect(_State.AWAIT_AUTH_DECISION, "auth_reply")
        if ok:
            self._state = _State.AWAIT_REQUEST
            self._in_request = True
            return b"\x01\x00"
        self._refuse("SOCKS5 username/password rejected")
        return b"\x01\x01"

    def reply(self, code: Socks5Reply | int, bound: tuple[str, int] | None = None) -> bytes:
        """An RFC 1928 §6 reply; `bound` is (address, port), ("0.0.0.0", 0) by default.

        Pure encoding: valid in every state, including ERROR.
        """
        if not 0 <= int(code) <= 0xFF:
            raise ValueError(f"SOCKS5 reply code out of range: {code!r}")
        host, port = bound if bound is not None else ("0.0.0.0", 0)
        return bytes([5, int(code), 0]) + _encode_socks5_addr(host) + struct.pack("!H", port)

    def _fail(self, err: ProtocolError) -> None:
        super()._fail(err)
        self._state = _State.ERROR

    def _refuse(self, message: str) -> None:
        status = 407 if self._require_auth else 400
        self._fail(ProtocolError(message, status_hint=status, socks_reply=Socks5Reply.NOT_ALLOWED))

    def _expect(self, state: _State, method: str) -> None:
        self._raise_if_failed()
        if self._state is not state:
            raise RuntimeError(f"{method}() is not valid in state {self._state.name}")

    def _read_greeting(self) -> Socks5Greeting | NeedData:
        buf = self._buf
        if buf and buf[0] != 5:
            raise ProtocolError(f"not a SOCKS5 greeting: version byte 0x{buf[0]:02x}")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return self._need_more("SOCKS5 greeting")
        self._methods = tuple(self._take(2 + buf[1])[2:])
        self._state = _State.AWAIT_METHOD_CHOICE
        return Socks5Greeting(self._methods)

    def _read_credentials(self) -> Socks5Credentials | NeedData:
        buf = self._buf
        if buf and buf[0] != 1:
            raise ProtocolError(
                f"bad RFC 1929 auth version 0x{buf[0]:02x} (expected 0x01)", status_hint=407
            )
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return self._need_more("SOCKS5 username/password")
        ulen = buf[1]
        end = 3 + ulen + buf[2 + ulen]
        if len(buf) < end:
            return self._need_more("SOCKS5 username/password")
        msg = self._take(end)
        self._state = _State.AWAIT_AUTH_DECISION
        return Socks5Credentials(_text(msg[2 : 2 + ulen]), _text(msg[3 + ulen :]))

    def _read_request(self) -> SocksConnect | NeedData:
        buf = self._buf
        _check_socks5_request_head(buf)
        if len(buf) < 5:
            return self._need_more("SOCKS5 request")
        atyp = buf[3]
        addr_len = {0x01: 4, 0x04: 16}.get(atyp, 1 + buf[4])
        end = 4 + addr_len + 2
        if len(buf) < end:
            return self._need_more("SOCKS5 request")
        msg = self._take(end)
        host = _decode_socks5_addr(atyp, msg[4 : end - 2])
        self._state = _State.DONE
        self._done = True
        return SocksConnect(host, int.from_bytes(msg[end - 2 :], "big"), 5, _ATYP_NAMES[atyp])


class Socks4Server(_Machine):
    """SOCKS4 and SOCKS4a CONNECT (server side). USERID is reported, never checked here."""

    def next_event(self) -> SocksConnect | NeedData:
        """The CONNECT request, or NEED_DATA. Raises ProtocolError on bad input."""
        self._raise_if_failed()
        if self._done:
            raise RuntimeError("next_event() called after the SOCKS4 request was parsed")
        return self._run(self._read_request)

    def reply(self, granted: bool, bound: tuple[str, int] | None = None) -> bytes:
        """The 8-byte SOCKS4 reply (0x5A granted / 0x5B rejected); valid in every state.

        SOCKS4 can only carry an IPv4 bound address; anything else is sent as 0.0.0.0.
        """
        host, port = bound if bound is not None else ("0.0.0.0", 0)
        try:
            packed = ipaddress.IPv4Address(host).packed
        except ValueError:
            packed = bytes(4)
        return bytes([0, 0x5A if granted else 0x5B]) + struct.pack("!H", port) + packed

    def _read_request(self) -> SocksConnect | NeedData:
        buf = self._buf
        _check_socks4_request_head(buf)
        if len(buf) < 8:
            return self._need_more("SOCKS4 request")
        user_id, end = _cstring(buf, 8, MAX_USERID_BYTES, "SOCKS4 USERID")
        if user_id is None:
            return self._need_more("SOCKS4 request")
        ip = bytes(buf[4:8])
        if ip[:3] == b"\0\0\0" and ip[3] != 0:  # SOCKS4a: 0.0.0.x means "hostname follows"
            name, end = _cstring(buf, end, MAX_HOSTNAME_BYTES, "SOCKS4a hostname")
            if name is None:
                return self._need_more("SOCKS4a request")
            host, atyp = _decode_hostname(name), "domain"
        else:
            host, atyp = str(ipaddress.IPv4Address(ip)), "ipv4"
        port = int.from_bytes(buf[2:4], "big")
        self._take(end)
        self._done = True
        return SocksConnect(host, port, 4, atyp, user_id=_text(user_id))


def _check_socks5_request_head(buf: bytearray) -> None:
    """Reject a bad version, command or address type as soon as its byte has arrived."""
    if buf and buf[0] != 5:
        raise ProtocolError(f"bad SOCKS5 request version 0x{buf[0]:02x}")
    if len(buf) >= 2 and buf[1] != 0x01:
        raise _unsupported_command(5, buf[1])
    if len(buf) >= 4 and buf[3] not in _ATYP_NAMES:
        raise ProtocolError(
            f"SOCKS5 address type 0x{buf[3]:02x} not supported",
            socks_reply=Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED,
        )


def _check_socks4_request_head(buf: bytearray) -> None:
    if buf and buf[0] != 4:
        raise ProtocolError(f"bad SOCKS4 request version 0x{buf[0]:02x}")
    if len(buf) >= 2 and buf[1] != 0x01:
        raise _unsupported_command(4, buf[1])


def _unsupported_command(version: int, cmd: int) -> ProtocolError:
    name = _COMMAND_NAMES.get(cmd, f"0x{cmd:02x}") if version == 5 or cmd < 3 else f"0x{cmd:02x}"
    return ProtocolError(
        f"SOCKS{version} command {name} not supported (only CONNECT)",
        status_hint=405,
        socks_reply=Socks5Reply.COMMAND_NOT_SUPPORTED,
    )


def _cstring(buf: bytearray, start: int, limit: int, what: str) -> tuple[bytes | None, int]:
    """The NUL-terminated field at `start` and the offset past its NUL; (None, 0) if partial."""
    nul = buf.find(0, start, start + limit + 1)
    if nul >= 0:
        return bytes(buf[start:nul]), nul + 1
    if len(buf) - start > limit:
        raise ProtocolError(f"{what} longer than {limit} bytes", status_hint=431)
    return None, 0


def _decode_socks5_addr(atyp: int, raw: bytes) -> str:
    if atyp == 0x01:
        return str(ipaddress.IPv4Address(raw))
    if atyp == 0x04:
        return str(ipaddress.IPv6Address(raw))
    return _decode_hostname(raw[1:])


def _decode_hostname(raw: bytes) -> str:
    """A requested host name as ASCII; UTF-8 names are converted to their IDNA A-label form."""
    if not raw:
        raise ProtocolError("empty host name in request")
    if any(b <= 0x20 or b == 0x7F for b in raw):
        raise ProtocolError(f"host name contains control or space bytes: {raw[:64]!r}")
    if raw.isascii():
        return raw.decode("ascii")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"host name is neither ASCII nor UTF-8: {raw[:64]!r}") from None
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ProtocolError(
            f"host name cannot be IDNA-encoded: {name[:64]!r}",
            socks_reply=Socks5Reply.HOST_UNREACHABLE,
        ) from None


def _encode_socks5_addr(host: str) -> bytes:
    """ATYP + address for a reply: IPv4/IPv6 literals as such, anything else as a DOMAIN."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 0 < len(name) < 256:
            raise ValueError(f"bound host name unusable in a SOCKS5 reply: {host!r}") from None
        return bytes([0x03, len(name)]) + name
    return bytes([0x01 if ip.version == 4 else 0x04]) + ip.packed


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
