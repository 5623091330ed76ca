"""Registry token auth for the mirror's upstream client (pure).

A registry answers an anonymous pull with `401` and `WWW-Authenticate: Bearer realm=...,
service=...,scope=...` (RFC 6750 §3, distribution `spec/auth/token.md`); the client fetches a
token from the realm and retries with `Authorization: Bearer <token>`. Everything here is input
from the network: the challenge parser accepts any text and either returns challenges or raises
WWWAuthenticateError; the realm must be an absolute http(s) URL without credentials.

The realm is chosen by the upstream, so it can point anywhere (a link-local metadata address,
a loopback port): the caller must route the token request through the same allow-list and
egress rules as any other upstream request.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from fwdproxy.proto.oci import OCIError, parse_registry, validate_name

__all__ = [
    "MAX_HEADER_LENGTH",
    "MAX_TOKEN_BODY",
    "Challenge",
    "Token",
    "TokenRequest",
    "WWWAuthenticateError",
    "bearer_token_request",
    "parse_token_response",
    "parse_www_authenticate",
    "repository_scope",
]

MAX_HEADER_LENGTH: Final = 8192
MAX_TOKEN_BODY: Final = 256 * 1024
MAX_TOKEN_LENGTH: Final = 64 * 1024
# distribution `spec/auth/token.md`: expires_in defaults to 60 s, and no token lives shorter
# (Docker, containers/image: `issued_at + max(expires_in, 60)`).
MIN_TOKEN_LIFETIME_S: Final = 60

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token
_TOKEN68_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 9110 §11.2
_OWS: Final = " \t"
_TOKEN_VALUE_RE: Final = re.compile(r"[\x21-\x7e]+")  # goes into a header: VCHAR only
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


class WWWAuthenticateError(ValueError):
    """A challenge or token response we cannot use; the message says why (for logs)."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge. `scheme` and parameter names are lower-cased (both case-insensitive,
    RFC 9110 §11.1 and §11.2); values are unquoted. `token68` is set instead of `params` for
    schemes that use it."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


# ---------------------------------------------------------------------------------------------
# WWW-Authenticate (RFC 9110 §11.6.1)


class _Cursor:
    """Position in one header value; small helpers keep the grammar readable below."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def match(self, pattern: re.Pattern[str]) -> str | None:
        m = pattern.match(self.text, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()

    def fail(self, what: str) -> WWWAuthenticateError:
        return WWWAuthenticateError(f"{what} at offset {self.pos} of WWW-Authenticate")


def parse_www_authenticate(values: str | bytes | Iterable[str | bytes]) -> list[Challenge]:
    """All challenges in one or more WWW-Authenticate field values, in order.

    Bytes are decoded as ISO-8859-1 (obs-text, RFC 9110 §5.5). Duplicate parameter names in a
    challenge are an error (§11.2: each name MUST occur once): their meaning would be a guess.
    """
    if isinstance(values, (str, bytes)):
        values = [values]
    challenges: list[Challenge] = []
    total = 0
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        total += len(text)
        if total > MAX_HEADER_LENGTH:
            raise WWWAuthenticateError(f"WWW-Authenticate longer than {MAX_HEADER_LENGTH}")
        challenges += _parse_field(_Cursor(text))
    return challenges


def _parse_field(cur: _Cursor) -> list[Challenge]:
    out: list[Challenge] = []
    while True:
        cur.skip(_OWS + ",")
        if not cur.peek():
            return out
        scheme = cur.match(_TOKEN_RE)
        if scheme is None:
            raise cur.fail("expected an auth-scheme")
        if cur.peek() and cur.peek() not in _OWS + ",":
            raise cur.fail("expected a space after the auth-scheme")
        cur.skip(_OWS)
        token68 = _token68(cur)
        if token68 is not None:
            out.append(Challenge(scheme.lower(), {}, token68))
            continue
        out.append(Challenge(scheme.lower(), _auth_params(cur)))


def _token68(cur: _Cursor) -> str | None:
    """token68 only if it is the whole rest of this challenge (else it is an auth-param)."""
    start = cur.pos
    value = cur.match(_TOKEN68_RE)
    if value is not None:
        cur.skip(_OWS)
        if cur.peek() in ("", ","):
            return value
    cur.pos = start
    return None


def _auth_params(cur: _Cursor) -> dict[str, str]:
    params: dict[str, str] = {}
    while True:
        start = cur.pos
        cur.skip(_OWS + ",")
        name = cur.match(_TOKEN_RE)
        if name is None:
            if cur.peek():
                raise cur.fail("expected an auth-param")
            return params
        cur.skip(_OWS)
        if cur.peek() != "=":
            cur.pos = start  # a token not followed by "=" starts the next challenge
            return params
        cur.pos += 1
        cur.skip(_OWS)
        value = _quoted_string(cur) if cur.peek() == '"' else cur.match(_TOKEN_RE)
        if value is None:
            raise cur.fail(f"expected a value for {name!r}")
        if name.lower() in params:
            raise cur.fail(f"duplicate auth-param {name!r}")
        params[name.lower()] = value
        cur.skip(_OWS)
        if cur.peek() not in ("", ","):
            raise cur.fail("expected ',' between auth-params")


def _quoted_string(cur: _Cursor) -> str:
    """RFC 9110 §5.6.4 quoted-string, with quoted-pair; control characters are refused."""
    cur.pos += 1
    out: list[str] = []
    text = cur.text
    while cur.pos < len(text):
        ch = text[cur.pos]
        cur.pos += 1
        if ch == '"':
            return "".join(out)
        if ch == "\\":
            if cur.pos >= len(text):
                break
            ch = text[cur.pos]
            cur.pos += 1
        if not (ch == "\t" or " " <= ch <= "~" or "\x80" <= ch <= "\xff"):
            raise cur.fail("control character in a quoted-string")
        out.append(ch)
    raise cur.fail("unterminated quoted-string")


# ---------------------------------------------------------------------------------------------
# Token request and response (distribution spec/auth/token.md)


class TokenRequest(NamedTuple):
    """Where to GET a token: the realm URL as given and the query parameters to add to it."""

    realm: str
    params: list[tuple[str, str]]

    def url(self) -> str:
        """The realm with the parameters appended (it may already carry a query)."""
        query = urllib.parse.urlencode(self.params, quote_via=urllib.parse.quote)
        if not query:
            return self.realm
        return f"{self.realm}{'&' if urllib.parse.urlsplit(self.realm).query else '?'}{query}"


def repository_scope(name: str, actions: Sequence[str] = ("pull",)) -> str:
    """`repository:<name>:pull` (token.md "Requesting a Token"); OCIError NAME_INVALID for a bad
    name, since a scope built from an unchecked name could smuggle `:push` or a second scope."""
    return f"repository:{validate_name(name)}:{','.join(actions)}"


def bearer_token_request(
    challenge: Challenge, scope_override: str | Sequence[str] | None = None
) -> TokenRequest:
    """The token request a Bearer challenge asks for.

    `scope` repeats once per scope (the challenge's may hold several, space-separated).
    `scope_override` replaces the challenge's: a mirror asks for the scope of the repository it
    pulls, whatever the ping's challenge said.
    """
    if challenge.scheme != "bearer":
        raise WWWAuthenticateError(f"not a Bearer challenge: {challenge.scheme!r}")
    realm = challenge.params.get("realm")
    if not realm:
        raise WWWAuthenticateError("Bearer challenge without a realm")
    _check_realm(realm)
    params: list[tuple[str, str]] = []
    service = challenge.params.get("service")
    if service:
        params.append(("service", service))
    if scope_override is None:
        scopes = challenge.params.get("scope", "").split(" ")
    else:
        scopes = [scope_override] if isinstance(scope_override, str) else list(scope_override)
    params += [("scope", s) for s in scopes if s]
    return TokenRequest(realm, params)


def _check_realm(realm: str) -> None:
    """An absolute http(s) URL with a valid host, no userinfo (credentials to a stranger), no
    fragment."""
    if len(realm) > 2048 or not realm.isascii() or not realm.isprintable() or " " in realm:
        raise WWWAuthenticateError(f"realm is not a URL: {realm[:80]!r}")
    try:
        url = urllib.parse.urlsplit(realm)
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise WWWAuthenticateError(f"realm is not a valid URL: {realm[:80]!r}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise WWWAuthenticateError(f"realm must be an absolute http(s) URL: {realm[:80]!r}")
    if "@" in url.netloc or url.fragment or "#" in realm:
        raise WWWAuthenticateError(f"realm must not carry userinfo or a fragment: {realm[:80]!r}")
    try:
        parse_registry(url.netloc)  # the same strict host[:port] grammar as a registry's
    except OCIError:
        raise WWWAuthenticateError(f"realm has an invalid host: {realm[:80]!r}") from None


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and when to stop using it (seconds since the epoch, like `now`)."""

    value: str = field(repr=False)  # never in logs
    expires_at: float


def parse_token_response(body: bytes, now: float) -> Token:
    """A token endpoint's JSON -> Token; WWWAuthenticateError for anything unusable.

    `access_token` wins over `token` when both are set, as in Docker's client. The lifetime is
    `max(expires_in, 60)` counted from `issued_at` if that lies in [now - lifetime, now] and from
    `now` otherwise, so a skewed clock on either side cannot make a fresh token look expired.
    """
    if len(body) > MAX_TOKEN_BODY:
        raise WWWAuthenticateError(f"token response larger than {MAX_TOKEN_BODY} bytes")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise WWWAuthenticateError("token response is not JSON") from None
    if not isinstance(doc, dict):
        raise WWWAuthenticateError("token response is not a JSON object")
    value = doc.get("access_token") or doc.get("token")
    if not isinstance(value, str) or not value:
        raise WWWAuthenticateError("token response has no token")
    if len(value) > MAX_TOKEN_LENGTH or not _TOKEN_VALUE_RE.fullmatch(value):
        raise WWWAuthenticateError("token has characters that cannot go in a header")
    lifetime = _lifetime(doc.get("expires_in"))
    issued = doc.get("issued_at")
    start = now
    if isinstance(issued, str):
        at = _parse_rfc3339(issued)
        if at is not None and now - lifetime <= at <= now:
            start = at
    return Token(value, start + lifetime)


def _lifetime(expires_in: object) -> float:
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
        return MIN_TOKEN_LIFETIME_S
    if math.isnan(expires_in):
        return MIN_TOKEN_LIFETIME_S
    return float(min(max(expires_in, MIN_TOKEN_LIFETIME_S), 366 * 86400))


def _parse_rfc3339(text: str) -> float | None:
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
    try:  # min(second, 59): a leap second is the last second of its minute
        epoch = datetime.datetime(
            year, month, day, hour, minute, min(second, 59), tzinfo=datetime.timezone.utc
        ).timestamp()
    except (ValueError, OverflowError):
        return None
    if m[9]:
        offset = (int(m[10]) * 60 + int(m[11])) * 60
        epoch -= offset if m[9] == "+" else -offset
    return epoch + (float(m[7]) if m[7] else 0.0)
