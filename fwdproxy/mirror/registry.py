"""Talking to one upstream registry the way a careful client does: the token dance, redirects
to blob CDNs, and errors turned into answers the mirror's clients understand.

- Anonymous, or with the registry's credentials from the config (sent only to the registry's
  own token realm or its Basic challenge; never logged). Tokens are reused per (registry, scope)
  until they expire.
- Redirects are followed here (up to MAX_REDIRECTS), each target opened through the router like
  any other host; the registry's `Authorization` is never sent to another host (S3 and R2 refuse
  a signed URL that also carries one), and an https fetch never continues over plain http.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from fwdproxy.config.mirror import MirrorRegistry
from fwdproxy.mirror.http import URL, FetchError, HTTPClient, Response
from fwdproxy.proto.oci import OCIError, Registry
from fwdproxy.proto.www_auth import (
    Token,
    WWWAuthenticateError,
    bearer_token_request,
    parse_token_response,
    parse_www_authenticate,
    repository_scope,
)

__all__ = ["MAX_REDIRECTS", "RegistryClient", "Upstream"]

MAX_REDIRECTS: Final = 5
MAX_ERROR_BODY: Final = 64 * 1024
MAX_TOKEN_BODY: Final = 64 * 1024
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

logger = logging.getLogger("fwdproxy.mirror")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one request goes: the registry, its settings, and the repository (for scopes)."""

    registry: Registry
    settings: MirrorRegistry
    repository: str | None

    def url(self, path: str, query: str = "") -> URL:
        scheme = "http" if self.settings.plain_http else "https"
        tail = f"?{query}" if query else ""
        return URL.parse(f"{scheme}://{self.registry.api_host}{path}{tail}")


class RegistryClient:
    """Registry requests with auth and redirects on top of HTTPClient."""

    def __init__(self, http: HTTPClient, *, clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._clock = clock
        self._tokens: dict[tuple[str, str], Token] = {}
        self._basic: set[str] = set()  # registries that answered with a Basic challenge

    async def get(self, up: Upstream, method: str, path: str, query: str = "",
                  headers: Iterable[tuple[str, str]] = (), *, timeout_s: float = 30.0,
                  follow: bool = True) -> Response:
        """One request, authenticated and (for GET) with redirects followed. The response may
        be any status; the caller decides what a 404 or a 429 means for its client."""
        extra = list(headers)
        url = up.url(path, query)
        resp = await self._send(up, method, url, extra, timeout_s)
        if resp.status == 401:
            challenge_header = resp.get_all("www-authenticate")
            await _drain(resp)
            if await self._authenticate(up, challenge_header, timeout_s):
                resp = await self._send(up, method, url, extra, timeout_s)
        hops = 0
        while follow and resp.status in _REDIRECTS and method in ("GET", "HEAD"):
            location = resp.headers.get("location")
            await _drain(resp)
            if not location:
                raise FetchError(f"{up.registry.name} redirected without a Location",
                                 retryable=False)
            hops += 1
            if hops > MAX_REDIRECTS:
                raise FetchError(f"more than {MAX_REDIRECTS} redirects from {up.registry.name}",
                                 retryable=False)
            target = url.join(location)
            if url.scheme == "https" and target.scheme != "https":
                raise FetchError(f"refusing a redirect from https to {target.redacted()}",
                                 retryable=False)
            # Only Accept and Range survive a hop to another host (as in Docker's client).
            same = target.host == url.host and target.port == url.port
            carry = extra if same else [(k, v) for k, v in extra
                                        if k.lower() in ("accept", "range")]
            auth = same and target.host == up.url("/").host
            url = target
            resp = await self._send(up if auth else None, method, url, carry, timeout_s)
        return resp

    async def _send(self, up: Upstream | None, method: str, url: URL,
                    headers: list[tuple[str, str]], timeout_s: float) -> Response:
        hdrs = list(headers)
        if up is not None:
            auth = self._authorization(up)
            if auth:
                hdrs.append(("Authorization", auth))
        return await self._http.request(method, url, hdrs, timeout_s=timeout_s)

    def _scope(self, up: Upstream) -> str:
        return repository_scope(up.repository) if up.repository else ""

    def _authorization(self, up: Upstream) -> str | None:
        token = self._tokens.get((up.registry.name, self._scope(up)))
        if token is not None:
            if token.expires_at - 10 > self._clock():
                return f"Bearer {token.value}"
            del self._tokens[(up.registry.name, self._scope(up))]
        if up.registry.name in self._basic:
            return _basic(up.settings)
        return None

    async def _authenticate(self, up: Upstream, values: list[str], timeout_s: float) -> bool:
        """React to a 401: fetch a token (or switch to Basic). False when nothing can help."""
        try:
            challenges = parse_www_authenticate(values)
        except WWWAuthenticateError as e:
            raise FetchError(f"{up.registry.name} sent an unusable challenge: {e}",
                             retryable=False, status=502) from None
        for ch in challenges:
            if ch.scheme == "bearer":
                await self._fetch_token(up, ch, timeout_s)
                return True
            if ch.scheme == "basic" and up.settings.username is not None:
                if up.registry.name in self._basic:
                    return False  # our credentials were refused already
                self._basic.add(up.registry.name)
                return True
        return False

    async def _fetch_token(self, up: Upstream, ch: object, timeout_s: float) -> None:
        try:
            req = bearer_token_request(ch, self._scope(up) or None)  # type: ignore[arg-type]
        except (WWWAuthenticateError, OCIError) as e:
            raise FetchError(f"{up.registry.name}: bad token challenge: {e}",
                             retryable=False) from None
        url = URL.parse(req.url())
        if url.scheme != "https" and not up.settings.plain_http:
            raise FetchError(f"{up.registry.name}: refusing a token realm over plain http "
                             f"({url.redacted()})", retryable=False)
        headers = []
        if up.settings.username is not None:
            # Credentials go to the realm the registry itself named, over TLS.
            headers.append(("Authorization", _basic(up.settings) or ""))
        resp = await self._http.request("GET", url, headers, timeout_s=timeout_s)
        body = await resp.read(MAX_TOKEN_BODY)
        if resp.status != 200:
            raise FetchError(
                f"token service {url.authority} answered {resp.status} for {up.registry.name}"
                + (" (check mirror.registries credentials)" if resp.status in (401, 403) else ""),
                retryable=resp.status >= 500, status=502 if resp.status >= 500 else 403,
            )
        try:
            token = parse_token_response(body, self._clock())
        except WWWAuthenticateError as e:
            raise FetchError(f"token service {url.authority}: {e}", retryable=False) from None
        self._tokens[(up.registry.name, self._scope(up))] = token


def _basic(settings: MirrorRegistry) -> str | None:
    if settings.username is None or settings.password is None:
        return None
    raw = f"{settings.username}:{settings.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


async def _drain(resp: Response) -> None:
    """Read a small body so the connection can be reused; drop it otherwise."""
    if resp.content_length is not None and resp.content_length <= MAX_ERROR_BODY:
        try:
            await resp.read(MAX_ERROR_BODY)
        except FetchError:
            resp.close()
    else:
        resp.close()
