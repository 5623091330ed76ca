"""The running proxy: listeners, live connections, reload and graceful shutdown.

Connections read `state.config` once when they start, so a reload (SIGHUP) swaps the config for
new connections and never touches running tunnels. An invalid new config is rejected whole and
the old one stays in force. On shutdown, connections that carry nothing yet (a handshake, a
dial, a kept-alive forwarding connection between requests) close at once; tunnels drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fwdproxy.config import Config, Listener, load_config
from fwdproxy.core.addr import is_loopback
from fwdproxy.core.errors import ConfigError
from fwdproxy.net.upstreams import UpstreamPool
from fwdproxy.proxy.accesslog import ACCESS
from fwdproxy.proxy.connection import ClientConnection
from fwdproxy.proxy.state import ConnInfo, Observer, ServerState

if TYPE_CHECKING:
    from fwdproxy.cache import BlobStore

__all__ = ["ConnInfo", "Observer", "Server", "ServerState", "Service", "check_exposure", "serve"]


class Service(Protocol):
    """A listener beside the proxy's own (the admin API): started and stopped with it."""

    @property
    def addresses(self) -> list[tuple[str, int]]: ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

logger = logging.getLogger("fwdproxy.server")


def check_exposure(cfg: Config, allow_any_client: bool = False) -> list[str]:
    """Refuse to become an open proxy: non-loopback listeners need an allow-list or auth."""
    problems = []
    for lst in cfg.listeners:
        if is_loopback(lst.host) or lst.allow or cfg.users or cfg.allow_any_client:
            continue
        if allow_any_client:
            continue
        problems.append(
            f"refusing to listen on {lst.address}: a non-loopback listener needs an allow-list "
            "(allow: [CIDR, ...]) or auth: users, otherwise anyone who can reach it may use the "
            "proxy. Set allow_any_client: true (or --allow-any-client) if that is really intended."
        )
    mirror = cfg.mirror
    for m in mirror.listeners if mirror is not None else ():
        if is_loopback(m.host) or m.allow or (mirror.auth and cfg.users):  # type: ignore[union-attr]
            continue
        if cfg.allow_any_client or allow_any_client:
            continue
        problems.append(
            f"refusing to serve the registry mirror on {m.address}: a non-loopback mirror needs "
            "an allow-list (mirror.allow: [CIDR, ...]) or mirror.auth: true with auth.users, "
            "otherwise anyone who can reach it can make this host fetch through its tunnel. "
            "Set allow_any_client: true (or --allow-any-client) if that is really intended."
        )
    if mirror is not None and mirror.auth and not cfg.users:
        problems.append("mirror.auth: true needs users under auth.users")
    return problems


def raise_nofile_limit() -> None:
    """Raise the soft fd limit to the hard limit: each tunnel holds two sockets."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _notify(kind: str, *args: Any) -> None:
    try:
        from fwdproxy import sdnotify
    except ImportError:
        return
    fn = getattr(sdnotify, kind, None)
    if fn is not None:
        with contextlib.suppress(OSError):
            fn(*args)


class Server:
    """Owns the listeners and the ServerState. Use `start()`, then `wait_closed()` or `stop()`."""

    def __init__(
        self,
        config: Config,
        *,
        allow_any_client: bool = False,
        reload_source: Callable[[], Config] | None = None,
        admin_factory: Callable[[Server, Any], Service] | None = None,
        mirror_factory: Callable[[Server, Any], Service] | None = None,
    ) -> None:
        self.allow_any_client = allow_any_client
        # Likewise the registry mirror (fwdproxy.mirror), started when the config has one.
        self.mirror_factory = mirror_factory
        self.mirror: Service | None = None
        # The admin listener lives in a higher layer (fwdproxy.admin); whoever builds the
        # server passes it in (the CLI's serve passes AdminServer).
        self.admin_factory = admin_factory
        self.state = ServerState(config, UpstreamPool(config))
        self._servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self._listeners: dict[tuple[str, int], Listener] = {}
        self._drained = asyncio.Event()
        self.state.on_empty = self._drained.set
        self._reload_source = reload_source or (lambda: load_config(config.path))
        self._stopped = asyncio.Event()
        self._sigint_count = 0
        self.admin: Service | None = None
        # The mirror's layer cache when `cache:` is configured (the mirror sets it); the admin
        # API's /api/cache endpoints act on it, since this process holds the store's lock.
        self.store: BlobStore | None = None

    # -- listeners ---------------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of every listener (ports resolved when 0 was asked)."""
        out = []
        for srv in self._servers.values():
            for s in srv.sockets:
                name = s.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def start(self) -> None:
        problems = check_exposure(self.state.config, self.allow_any_client)
        if problems:
            raise ConfigError(problems)
        raise_nofile_limit()
        for lst in self.state.config.listeners:
            await self._bind(lst)
        self.state.pool.start()
        await self._start_mirror()
        await self._start_admin()
        self._refresh_own()
        addrs = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.addresses)
        logger.info(
            "listening on %s (config %s, %d rules)",
            addrs,
            self.state.config.path,
            len(self.state.config.router.rules),
        )
        _notify("ready", f"listening on {addrs}")

    async def _bind(self, lst: Listener) -> None:
        key = (lst.host, lst.port)
        state, listeners = self.state, self._listeners

        def factory() -> ClientConnection:
            # The listener as it is now: a reload may have replaced its allow-list.
            return ClientConnection(state, listeners[key])

        self._listeners[key] = lst
        try:
            srv = await asyncio.get_running_loop().create_server(
                factory, lst.host, lst.port, backlog=1024, reuse_address=True
            )
        except OSError:
            self._listeners.pop(key, None)
            raise
        self._servers[key] = srv

    def _refresh_own(self) -> None:
        own = set(self.addresses)
        for service in (self.admin, self.mirror):
            if service is not None:
                own.update(service.addresses)
        self.state.own = own

    async def _start_mirror(self) -> None:
        spec = self.state.config.mirror
        if spec is None or self.mirror_factory is None:
            return
        self.mirror = self.mirror_factory(self, spec)
        try:
            await self.mirror.start()
        except BaseException:
            await self.mirror.stop()
            self.mirror = None
            raise
        self._refresh_own()

    async def _start_admin(self) -> None:
        spec = self.state.config.admin
        if spec is None or self.admin_factory is None:
            return
        self.admin = self.admin_factory(self, spec)
        await self.admin.start()

    # -- reload --------------------------------------------------------------------------------

    async def reload(self, new: Config | None = None) -> list[str]:
        """Validate and apply a new config; return the problems (empty when applied)."""
        _notify("reloading")
        try:
            try:
                cfg = new if new is not None else self._reload_source()
            except ConfigError as e:
                for p in e.problems:
                    logger.error("reload rejected: %s", p)
                self._reloaded(False, "")
                return e.problems
            problems = check_exposure(cfg, self.allow_any_client)
            if problems:
                for p in problems:
                    logger.error("reload rejected: %s", p)
                self._reloaded(False, "")
                return problems
            try:
                await self._apply(cfg)
            except OSError as e:
                problem = f"cannot listen on a new address: {e.strerror or e}"
                logger.error("reload rejected: %s", problem)
                self._reloaded(False, "")
                return [problem]
            self._reloaded(True, cfg.digest)
            logger.info(
                "reloaded %s (%d rules, digest %s); %d open connections keep their route",
                cfg.path,
                len(cfg.router.rules),
                cfg.digest or "-",
                len(self.state.connections),
            )
            return []
        finally:
            _notify("ready", f"listening on {len(self.addresses)} address(es)")

    def _reloaded(self, ok: bool, digest: str) -> None:
        for o in self.state.observers:
            o.reloaded(ok, digest)

    async def _apply(self, cfg: Config) -> None:
        old_pool = self.state.pool
        pool = UpstreamPool(cfg, previous=old_pool)
        wanted = {(lst.host, lst.port): lst for lst in cfg.listeners}
        for key, lst in wanted.items():
            if key not in self._servers:
                await self._bind(lst)  # may raise OSError: nothing has been swapped yet
            else:
                self._listeners[key] = lst
        for key in list(self._servers):
            if key not in wanted:
                srv = self._servers.pop(key)
                self._listeners.pop(key, None)
                srv.close()
        self.state.config = cfg
        self.state.pool = pool
        pool.start()
        await old_pool.stop()
        self._refresh_own()
        if cfg.log_level:
            logging.getLogger().setLevel(cfg.log_level.upper())
            ACCESS.set_level(cfg.log_level)

    # -- shutdown ------------------------------------------------------------------------------

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let tunnels drain up to grace_s, then close the rest."""
        if self._stopped.is_set():
            return
        _notify("stopping")
        grace = self.state.config.limits.shutdown_grace_s if grace_s is None else grace_s
        self.state.accepting = False
        for srv in self._servers.values():
            srv.close()
        conns = self.state.connections
        for info in [i for i in conns.values() if i.idle]:
            if info.closer is not None:
                info.closer()  # nothing in flight: no reason to hold the shutdown
        if conns:
            logger.info("shutting down: waiting up to %gs for %d tunnel(s)", grace, len(conns))
            await self._drain(grace)
            for info in list(conns.values()):
                if info.closer is not None:
                    info.closer()
            await self._drain(5)
        await self.state.pool.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        if self.admin is not None:
            await self.admin.stop()
        for srv in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1)
        ACCESS.flush()
        self._stopped.set()

    async def _drain(self, timeout_s: float) -> None:
        """Wait until no connection is left (ServerState.on_empty), at most timeout_s."""
        if not self.state.connections:
            return
        self._drained.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout_s)

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    def close_connection(self, conn_id: int) -> bool:
        info = self.state.connections.get(conn_id)
        if info is None or info.closer is None:
            return False
        info.closer()
        return True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.stop()))
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            logger.warning("second interrupt: exiting now")
            os._exit(130)
        asyncio.get_running_loop().create_task(self.stop())


async def serve(
    config: Config,
    *,
    allow_any_client: bool = False,
    pid_file: str | None = None,
    reload_source: Callable[[], Config] | None = None,
    admin_factory: Callable[[Server, Any], Service] | None = None,
    mirror_factory: Callable[[Server, Any], Service] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; the `fwdproxy serve` main loop."""
    server = Server(
        config,
        allow_any_client=allow_any_client,
        reload_source=reload_source,
        admin_factory=admin_factory,
        mirror_factory=mirror_factory,
    )
    await server.start()
    server.install_signal_handlers()
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        await server.wait_closed()
    finally:
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
    logger.info("stopped")
    return 0
