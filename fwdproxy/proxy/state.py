"""What the server and the admin see of the proxy: live connections and the hooks on them.

Passive data only (like uvicorn's ServerState): the connection code writes into ConnInfo, the
server owns ServerState, and observers (metrics) are told when a connection opens, dials and
closes. Nothing here imports the connection code, so the admin layer can read it freely.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fwdproxy.core.addr import ip_of, is_loopback
from fwdproxy.core.outcome import Outcome
from fwdproxy.net.relay import Counters

if TYPE_CHECKING:
    from fwdproxy.config import Config
    from fwdproxy.net.upstreams import UpstreamPool
    from fwdproxy.routing.rules import Decision

_ids = itertools.count(1)
RECENT_ERRORS = 50


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
    outcome: Outcome = Outcome.OPEN
    error: str | None = None
    dial_s: float | None = None
    requests: int = 0
    # True while nothing is in flight for the client (handshake, or a kept-alive forwarding
    # connection between requests): shutdown closes these at once instead of draining them.
    idle: bool = True
    # Ends the connection now (outcome closed-by-server); set by the connection code.
    closer: Callable[[], None] | None = None

    @property
    def route(self) -> str:
        return self.decision.route if self.decision else "-"

    def finish(self, outcome: Outcome, error: str | None = None) -> None:
        """Record how the connection ended; the first call wins."""
        if self.outcome is Outcome.OPEN:
            self.outcome = outcome
            self.error = error

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
            "outcome": self.outcome.value,
        }


class Observer:
    """Hooks for metrics; every method is called on the hot path, so keep them cheap."""

    def opened(self, info: ConnInfo) -> None: ...
    def closed(self, info: ConnInfo) -> None: ...
    def dialed(self, route: str, seconds: float) -> None: ...
    def reloaded(self, ok: bool, digest: str) -> None: ...


@dataclass
class ServerState:
    """What connections see of the server. `config` is replaced atomically on reload."""

    config: Config
    pool: UpstreamPool
    connections: dict[int, ConnInfo] = field(default_factory=dict)
    observers: list[Observer] = field(default_factory=list)
    own: set[tuple[str, int]] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    recent_errors: list[dict[str, Any]] = field(default_factory=list)
    accepting: bool = True
    # Called when the last connection closed (the server's drain waits on it).
    on_empty: Callable[[], None] | None = None

    def opened(self, info: ConnInfo) -> None:
        self.connections[info.id] = info
        for o in self.observers:
            o.opened(info)

    def closed(self, info: ConnInfo) -> None:
        self.connections.pop(info.id, None)
        if info.outcome.is_error:
            self.recent_errors.append({"ts": time.time(), **info.as_dict(), "error": info.error})
            del self.recent_errors[:-RECENT_ERRORS]
        for o in self.observers:
            o.closed(info)
        if not self.connections and self.on_empty is not None:
            self.on_empty()

    def dialed(self, route: str, seconds: float) -> None:
        for o in self.observers:
            o.dialed(route, seconds)

    def is_own_address(self, host: str, port: int) -> bool:
        if (host, port) in self.own:
            return True
        ip = ip_of(host)
        if ip is None and host != "localhost":
            return False
        for h, p in self.own:
            if p == port and (h in ("0.0.0.0", "::") or (is_loopback(host) and is_loopback(h))):
                return True
        return False

    @property
    def overloaded(self) -> bool:
        return len(self.connections) > self.config.limits.max_connections
