"""Upstream groups: member health, failover and round-robin, active health checks.

A dial that fails before any byte reached the client is retried on the next healthy member
within the client's dial deadline. Health state is sticky (no flapping): a member marked down by
a failed dial or check is used again only after `rise` consecutive good checks. Tunnels already
running on a member that dies simply end; new tunnels go to the next member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from fwdproxy.config import Config, UpstreamGroup, UpstreamSpec
from fwdproxy.core.errors import DialError, DialTimeout
from fwdproxy.net.dial import Deadline, Dialed, dial_via

logger = logging.getLogger("fwdproxy.upstreams")

Dialer = Callable[[UpstreamSpec, str, int, float], Awaitable[Dialed]]


@dataclass
class MemberState:
    spec: UpstreamSpec
    healthy: bool = True
    good_streak: int = 0
    last_check: float | None = None
    last_latency_s: float | None = None
    last_error: str | None = None
    failures: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.spec.name,
            "url": self.spec.url,
            "healthy": self.healthy,
            "last_check": self.last_check,
            "latency_s": self.last_latency_s,
            "last_error": self.last_error,
            "failures": self.failures,
        }


@dataclass
class GroupState:
    group: UpstreamGroup
    members: list[MemberState] = field(default_factory=list)
    rr: int = 0
    failovers: int = 0

    def order(self) -> list[MemberState]:
        """Members to try, best first: healthy ones by policy, then the rest as a last resort."""
        healthy = [m for m in self.members if m.healthy]
        if self.group.policy == "round-robin" and healthy:
            k = self.rr % len(healthy)
            self.rr += 1
            healthy = healthy[k:] + healthy[:k]
        return healthy + [m for m in self.members if not m.healthy]


class UpstreamPool:
    """All upstream groups of one config, with their health. Survives reloads by member URL."""

    def __init__(
        self,
        config: Config,
        previous: UpstreamPool | None = None,
        dialer: Dialer | None = None,
        on_change: Callable[[str, MemberState], None] | None = None,
    ) -> None:
        self._dial: Dialer = dialer or (
            lambda spec, host, port, t: dial_via(spec, host, port, timeout_s=t)
        )
        self.groups: dict[str, GroupState] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._on_change = on_change
        old = {}
        if previous is not None:
            for g in previous.groups.values():
                for m in g.members:
                    old[(g.group.name, m.spec.url)] = m
        for name, group in config.upstreams.items():
            st = GroupState(group)
            for spec in group.members:
                prev = old.get((name, spec.url))
                st.members.append(
                    MemberState(spec, prev.healthy, prev.good_streak) if prev else MemberState(spec)
                )
            self.groups[name] = st
        self._probe_targets = _probe_targets(config)

    async def open(self, name: str, host: str, port: int, deadline: Deadline) -> Dialed:
        """Tunnel to host:port through group `name`, failing over between members."""
        st = self.groups[name]
        errors: list[DialError] = []
        order = st.order()
        for k, member in enumerate(order):
            left = deadline.left()
            if left <= 0:
                break
            # Share the client's deadline so a blackholed member cannot eat all of it.
            budget = left / (len(order) - k)
            try:
                dialed = await self._dial(member.spec, host, port, budget)
            except DialError as e:
                errors.append(e)
                if e.kind in ("upstream_down", "upstream_error") or (
                    isinstance(e, DialTimeout) and len(st.members) > 1
                ):
                    self._mark(name, member, False, str(e))
                    continue
                raise  # the member worked; the target itself failed: do not fail over
            if k:
                st.failovers += 1
                logger.warning("upstream %s: failed over to %s", name, member.spec.url)
            return dialed
        if errors:
            last = errors[-1]
            if len(errors) > 1:
                tried = "; ".join(str(e) for e in errors)
                if isinstance(last, DialTimeout):
                    raise DialTimeout(f"all members of {name} failed: {tried}", hop=name)
                raise DialError(f"all members of {name} failed: {tried}", hop=name, kind=last.kind)
            raise last
        raise DialTimeout(f"upstream {name}: dial deadline passed", hop=name)

    def _mark(self, group: str, m: MemberState, ok: bool, error: str | None = None) -> None:
        was = m.healthy
        if ok:
            m.good_streak += 1
            m.last_error = None
            check = self.groups[group].group.check
            rise = check.rise if check else 1
            if not m.healthy and m.good_streak >= rise:
                m.healthy = True
        else:
            m.failures += 1
            m.good_streak = 0
            m.last_error = error
            if len(self.groups[group].members) > 1 or self.groups[group].group.check:
                m.healthy = False
        if was != m.healthy:
            logger.warning(
                "upstream %s member %s is now %s%s",
                group,
                m.spec.url,
                "healthy" if m.healthy else "DOWN",
                f": {error}" if error else "",
            )
            if self._on_change:
                self._on_change(group, m)

    def healthy(self, name: str) -> bool:
        st = self.groups.get(name)
        return bool(st and any(m.healthy for m in st.members))

    def snapshot(self) -> dict[str, object]:
        return {
            name: {
                "policy": st.group.policy,
                "failovers": st.failovers,
                "members": [m.as_dict() for m in st.members],
            }
            for name, st in self.groups.items()
        }

    # -- active health checks -----------------------------------------------------------------

    def start(self) -> None:
        """Start one checker task per group that has a check configured."""
        for name, st in self.groups.items():
            if st.group.check is not None:
                self._tasks.append(
                    asyncio.get_running_loop().create_task(
                        self._check_loop(name, st), name=f"health-{name}"
                    )
                )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def check_once(self, name: str) -> None:
        """Probe every member of a group once (also used by tests instead of waiting)."""
        st = self.groups[name]
        check = st.group.check
        timeout = check.timeout_s if check else 5.0
        host, port = self._probe_targets.get(name, ("registry-1.docker.io", 443))
        if check and check.target:
            host, _, p = check.target.rpartition(":")
            port = int(p)
        await asyncio.gather(*(self._probe(name, m, host, port, timeout) for m in st.members))

    async def _probe(self, name: str, m: MemberState, host: str, port: int, t: float) -> None:
        start = time.monotonic()
        try:
            dialed = await self._dial(m.spec, host, port, t)
        except DialError as e:
            m.last_check = time.time()
            self._mark(name, m, False, str(e))
            return
        dialed.close()
        m.last_check = time.time()
        m.last_latency_s = time.monotonic() - start
        self._mark(name, m, True)

    async def _check_loop(self, name: str, st: GroupState) -> None:
        assert st.group.check is not None
        while True:  # members start healthy; the first probe runs one interval after start
            await asyncio.sleep(st.group.check.interval_s)
            await self.check_once(name)


def _probe_targets(config: Config) -> Mapping[str, tuple[str, int]]:
    """Per group: the first registry API host (or domain) that a rule sends through it."""
    out: dict[str, tuple[str, int]] = {}
    for rule in config.router.rules:
        if rule.action != "via" or not rule.upstream or rule.upstream in out:
            continue
        names = sorted(config.catalog) if "all" in rule.registries else list(rule.registries)
        for reg in names:
            entry = config.catalog.get(reg)
            if entry is not None:
                out[rule.upstream] = (entry.api, 443)
                break
        else:
            if rule.domain:
                out[rule.upstream] = (rule.domain[0], 443)
    return out
