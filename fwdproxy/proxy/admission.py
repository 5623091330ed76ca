"""Who may use the proxy and for what: pure checks, applied in one order for every protocol.

1. the client allow-list (before anything the client says is looked at, so a client outside it
   learns nothing, not even whether a password is right);
2. credentials (HTTP Basic, SOCKS5 username/password);
3. overload;
4. the target: deny-list, the proxy's own ports (loops), loopback targets for remote clients;
5. the rules (routing.rules; a reject rule is a refusal too).
Each check returns a reason or raises Rejected/Overloaded; none does IO.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fwdproxy.core.addr import ip_of, is_loopback
from fwdproxy.core.errors import Overloaded, Rejected
from fwdproxy.proto.http1 import parse_basic_credentials

if TYPE_CHECKING:
    from fwdproxy.config import Config, Listener
    from fwdproxy.routing.rules import Decision

_DUMMY = hashlib.sha256(b"fwdproxy").digest()


def check_password(users: Mapping[str, str], user: str, password: str) -> bool:
    """Constant-time check of a user's password against `plain:` or `sha256:` entries."""
    stored = users.get(user)
    if stored is None:
        # Compare anyway so that unknown users take as long as wrong passwords.
        hmac.compare_digest(_DUMMY, hashlib.sha256(password.encode("utf-8", "replace")).digest())
        return False
    kind, _, value = stored.partition(":")
    if kind == "sha256":
        given = hashlib.sha256(password.encode("utf-8", "surrogateescape")).hexdigest()
        return hmac.compare_digest(given, value)
    return hmac.compare_digest(
        password.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")
    )


def client_refusal(listener: Listener, peer_ip: str) -> str | None:
    """Why this client may not use `listener` (its allow-list), or None."""
    allow = listener.allow
    if not allow:
        return None
    ip = ip_of(peer_ip)
    if ip is not None and any(ip in net for net in allow):
        return None
    return f"client {peer_ip} is not in the allow-list of {listener.address}"


def basic_auth(config: Config, proxy_authorization: bytes | None) -> str | None:
    """The user of a `Proxy-Authorization: Basic` header; Rejected(407) when it does not pass.

    None when the config needs no auth. A missing header is a challenge (credentials_given
    False); wrong credentials are a failed guess.
    """
    if not config.auth_required:
        return None
    cred = parse_basic_credentials(proxy_authorization)
    if cred is None:
        raise Rejected("proxy authentication required", status=407)
    if not check_password(config.users, cred[0], cred[1]):
        raise Rejected(
            f"proxy authentication failed for user {cred[0]!r}", status=407, credentials_given=True
        )
    return cred[0]


def check_target(
    config: Config,
    host: str,
    port: int,
    peer_ip: str,
    *,
    overloaded: bool,
    is_own: Callable[[str, int], bool],
) -> None:
    """Refusals that need no routing decision: overload, deny-list, loops, loopback."""
    if overloaded:
        raise Overloaded(
            f"too many connections (limit {config.limits.max_connections}); retry later"
        )
    ip = ip_of(host) or ip_of(config.hosts.get(host, ""))
    if ip is not None:
        for net in config.deny_nets:
            if ip.version == net.version and ip in net:
                raise Rejected(f"target {host} is on the deny-list ({net})")
    if is_own(host, port):
        raise Rejected(f"target {host}:{port} is this proxy itself (loop refused)")
    if is_loopback(host) and not config.loopback_targets and not is_loopback(peer_ip):
        raise Rejected(f"loopback target {host} refused for non-loopback client")


def check_decision(d: Decision, host: str, port: int) -> None:
    """A reject rule refuses, naming the rule and its line."""
    if d.action == "reject":
        where = f" (line {d.line})" if d.line else ""
        raise Rejected(f"{host}:{port} rejected by rule {d.rule}{where}")
