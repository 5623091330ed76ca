"""Prometheus metrics of one Server, and the throughput sampler behind the dashboard chart.

Each Server gets its own CollectorRegistry, so many servers can live in one process (tests) and
nothing leaks into prometheus_client's global registry. The hot path stays cheap: the observer
hooks count once per dial and once per closed connection. Everything that can be read from the
live state instead (active tunnels, upstream health, the config digest) is read at scrape time by
a custom collector.

Bytes are attributed incrementally by a ledger: each time a connection is looked at (at a
scrape, a sample or its close) only the bytes moved since the last look are added to its
(route, registry). So a long download shows up while it runs, a closed tunnel is never counted
twice, and the counters stay monotonic even when a plain-HTTP connection changes route between
requests. No metric is labelled by destination host: routes, rules and registries come from the
config, so their number is bounded by it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fwdproxy import __version__
from fwdproxy.proxy.state import Observer

if TYPE_CHECKING:
    from fwdproxy.proxy.state import ConnInfo, ServerState

ROUTE_NONE: Final = "none"  # connections that ended before a routing decision
DIAL_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
Key = tuple[str, str]  # (route, registry)


def route_key(info: ConnInfo) -> Key:
    """The (route, registry) labels of a connection; '' when it matched no registry."""
    d = info.decision
    if d is None:
        return ROUTE_NONE, ""
    return d.route, d.registry or ""


class ByteLedger:
    """Bytes per (route, registry), open tunnels included, each byte counted exactly once."""

    def __init__(self) -> None:
        self.totals: dict[Key, list[int]] = {}
        self._seen: dict[int, tuple[int, int]] = {}

    def settle(self, info: ConnInfo) -> None:
        up, down = info.counters.up, info.counters.down
        seen_up, seen_down = self._seen.get(info.id, (0, 0))
        if up == seen_up and down == seen_down:
            return
        total = self.totals.setdefault(route_key(info), [0, 0])
        total[0] += up - seen_up
        total[1] += down - seen_down
        self._seen[info.id] = (up, down)

    def sync(self, live: Iterable[ConnInfo]) -> None:
        for info in list(live):
            self.settle(info)

    def close(self, info: ConnInfo) -> None:
        self.settle(info)
        self._seen.pop(info.id, None)


class ProxyMetrics(Observer):
    """The observer and the registry behind GET /metrics, one per Server."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.ledger = ByteLedger()
        self.closed_total = 0
        self.errors_total = 0
        self.reload_counts = {"ok": 0, "failed": 0}
        self.last_reload: float | None = None
        self.carry = _Carry()
        self.carry.track(state.pool)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "fwdproxy_connections",
            "Closed client connections by protocol, routing decision and outcome.",
            ["protocol", "route", "rule", "registry", "outcome"],
            registry=r,
        )
        self.dial_seconds = Histogram(
            "fwdproxy_dial_duration_seconds",
            "Time to open the connection to the target (directly or through the upstream).",
            ["route"],
            buckets=DIAL_BUCKETS_S,
            registry=r,
        )
        self.handshake_errors = Counter(
            "fwdproxy_handshake_errors",
            "Connections that ended before their tunnel was up, by outcome.",
            ["kind"],
            registry=r,
        )
        self.reloads = Counter(
            "fwdproxy_config_reloads", "Config reloads by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        r.register(_StateCollector(self))

    # -- Observer hooks (hot path) ------------------------------------------------------------

    def closed(self, info: ConnInfo) -> None:
        route, registry = route_key(info)
        rule = info.decision.rule if info.decision else ""
        outcome = info.outcome
        self.connections.labels(info.protocol, route, rule, registry, outcome.value).inc()
        self.ledger.close(info)
        self.closed_total += 1
        if outcome.is_error:
            self.errors_total += 1
            if outcome.before_tunnel:  # not resets, relay errors or closes by the server
                self.handshake_errors.labels(outcome.value).inc()

    def dialed(self, route: str, seconds: float) -> None:
        self.dial_seconds.labels(route).observe(seconds)

    def reloaded(self, ok: bool, digest: str) -> None:
        result = "ok" if ok else "failed"
        self.reloads.labels(result).inc()
        self.reload_counts[result] += 1
        self.last_reload = time.time()
        self.carry.track(self.state.pool)  # the old pool's final counts, before it is gone


class _Carry:
    """Keeps per-pool counters monotonic across reloads.

    A reload builds a new UpstreamPool whose failure and failover counts start at 0. The pool
    seen last is held until the next one appears (at a reload or a scrape), so its final counts
    can be added to a base: nothing counted between the last scrape and a reload is lost.
    """

    def __init__(self) -> None:
        self.pool: object | None = None
        self.base: dict[tuple[str, ...], float] = {}

    def track(self, pool: object) -> None:
        if pool is self.pool:
            return
        if self.pool is not None:
            for key, value in _pool_counters(self.pool).items():
                self.base[key] = self.base.get(key, 0.0) + value
        self.pool = pool

    def read(self, pool: object) -> dict[tuple[str, ...], float]:
        self.track(pool)
        values = _pool_counters(pool)
        return {k: self.base.get(k, 0.0) + values.get(k, 0.0) for k in set(values) | set(self.base)}


def _pool_counters(pool: Any) -> dict[tuple[str, ...], float]:
    """Failovers per group and failures per member (keyed by the member's safe URL)."""
    out: dict[tuple[str, ...], float] = {}
    for name, group in pool.snapshot().items():
        out[("failovers", name)] = float(group["failovers"])
        for m in group["members"]:
            out[("failures", name, m["url"])] = float(m["failures"])
    return out


class _StateCollector(Collector):
    """Metrics read from the live state at scrape time."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        state = self.m.state
        yield from self._bytes(state)
        yield from self._active(state)
        yield from self._upstreams(state)
        yield from self._config(state)

    def _bytes(self, state: ServerState) -> Iterator[Metric]:
        self.m.ledger.sync(state.connections.values())
        fam = CounterMetricFamily(
            "fwdproxy_bytes",
            "Tunnel bytes by direction (up: client to target), route and registry; "
            "includes the bytes of open tunnels so far.",
            labels=["direction", "route", "registry"],
        )
        for (route, registry), (up, down) in sorted(self.m.ledger.totals.items()):
            fam.add_metric(["up", route, registry], up)
            fam.add_metric(["down", route, registry], down)
        yield fam

    def _active(self, state: ServerState) -> Iterator[Metric]:
        counts = dict.fromkeys(["direct", *state.config.upstreams], 0)
        for info in list(state.connections.values()):
            route = info.decision.route if info.decision else ROUTE_NONE
            counts[route] = counts.get(route, 0) + 1
        fam = GaugeMetricFamily(
            "fwdproxy_active_connections",
            "Open client connections by route ('none': not routed yet).",
            labels=["route"],
        )
        for route, n in sorted(counts.items()):
            fam.add_metric([route], n)
        yield fam

    def _upstreams(self, state: ServerState) -> Iterator[Metric]:
        pool = state.pool
        snap: dict[str, Any] = pool.snapshot()
        healthy = GaugeMetricFamily(
            "fwdproxy_upstream_member_healthy",
            "1 when the upstream member is in use, 0 while marked down.",
            labels=["upstream", "member"],
        )
        latency = GaugeMetricFamily(
            "fwdproxy_upstream_check_latency_seconds",
            "Duration of the last good health check through the member.",
            labels=["upstream", "member"],
        )
        for name, group in sorted(snap.items()):
            for m in group["members"]:
                healthy.add_metric([name, m["url"]], 1.0 if m["healthy"] else 0.0)
                if m["latency_s"] is not None:
                    latency.add_metric([name, m["url"]], m["latency_s"])
        totals = self.m.carry.read(pool)
        failovers = CounterMetricFamily(
            "fwdproxy_upstream_failovers",
            "Tunnels that were opened on another member after the first choice failed.",
            labels=["upstream"],
        )
        failures = CounterMetricFamily(
            "fwdproxy_upstream_member_failures",
            "Failed dials and health checks per upstream member.",
            labels=["upstream", "member"],
        )
        for key, value in sorted(totals.items()):
            if key[0] == "failovers":
                failovers.add_metric([key[1]], value)
            else:
                failures.add_metric([key[1], key[2]], value)
        yield from (healthy, latency, failovers, failures)

    def _config(self, state: ServerState) -> Iterator[Metric]:
        cfg = state.config
        info = GaugeMetricFamily(
            "fwdproxy_config_info",
            "The config in force (digest: first 12 hex of its SHA-256).",
            labels=["path", "digest"],
        )
        info.add_metric([str(cfg.path), cfg.digest or ""], 1)
        yield info
        yield GaugeMetricFamily(
            "fwdproxy_config_rules", "Rules in the config in force.", value=len(cfg.router.rules)
        )
        if self.m.last_reload is not None:
            yield GaugeMetricFamily(
                "fwdproxy_config_last_reload_timestamp_seconds",
                "When the last reload was attempted.",
                value=self.m.last_reload,
            )
        yield GaugeMetricFamily(
            "fwdproxy_accepting",
            "1 while new connections are accepted, 0 once shutting down.",
            value=1.0 if state.accepting else 0.0,
        )
        yield GaugeMetricFamily(
            "fwdproxy_start_time_seconds", "Start time (Unix seconds).", value=state.started
        )
        build = GaugeMetricFamily("fwdproxy_build_info", "fwdproxy version.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


# -- throughput history for the dashboard ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # wall clock, for the chart's axis
    rates: Mapping[Key, tuple[float, float]]  # bytes/s (up, down) since the previous sample


class ThroughputSampler:
    """Samples byte totals every `interval_s`: rate history per (route, registry) and per tunnel.

    Rates come from deltas between consecutive samples, so every poller sees the same numbers
    and polling faster does not make them noisier.
    """

    def __init__(
        self,
        state: ServerState,
        ledger: ByteLedger,
        interval_s: float = 1.0,
        keep_s: float = 300.0,
    ) -> None:
        self.state = state
        self.ledger = ledger
        self.interval_s = interval_s
        self.history: deque[Sample] = deque(maxlen=max(2, int(keep_s / interval_s)))
        self._prev_totals: dict[Key, tuple[int, int]] = {}
        self._prev_t: float | None = None
        self._conn_prev: dict[int, tuple[float, int, int]] = {}
        self._conn_rates: dict[int, tuple[float, float]] = {}

    def sample(self, now: float | None = None) -> None:
        mono = time.monotonic() if now is None else now
        live = list(self.state.connections.values())
        self.ledger.sync(live)
        totals = {k: (v[0], v[1]) for k, v in self.ledger.totals.items()}
        if self._prev_t is not None and mono > self._prev_t:
            dt = mono - self._prev_t
            rates = {}
            for key, (up, down) in totals.items():
                p_up, p_down = self._prev_totals.get(key, (0, 0))
                rates[key] = ((up - p_up) / dt, (down - p_down) / dt)
            self.history.append(Sample(time.time(), rates))
        self._prev_totals, self._prev_t = totals, mono
        self._sample_connections(live, mono)

    def _sample_connections(self, live: list[ConnInfo], mono: float) -> None:
        rates: dict[int, tuple[float, float]] = {}
        prev: dict[int, tuple[float, int, int]] = {}
        for info in live:
            up, down = info.counters.up, info.counters.down
            last = self._conn_prev.get(info.id)
            if last is not None and mono > last[0]:
                dt = mono - last[0]
                rates[info.id] = ((up - last[1]) / dt, (down - last[2]) / dt)
            prev[info.id] = (mono, up, down)
        self._conn_prev, self._conn_rates = prev, rates

    def rate(self, conn_id: int) -> tuple[float, float]:
        """(up, down) bytes/s of a tunnel over the last interval; (0, 0) before two samples."""
        return self._conn_rates.get(conn_id, (0.0, 0.0))

    def current(self) -> Mapping[Key, tuple[float, float]]:
        return self.history[-1].rates if self.history else {}

    def series(self) -> dict[str, Any]:
        """The history as aligned arrays, the shape the dashboard chart draws."""
        samples = list(self.history)
        keys = sorted({k for s in samples for k in s.rates})
        return {
            "interval_s": self.interval_s,
            "keep_s": round(self.interval_s * (self.history.maxlen or 0), 3),
            "t": [round(s.t, 3) for s in samples],
            "series": [
                {
                    "route": route,
                    "registry": registry,
                    "up": [
                        round(s.rates.get((route, registry), (0.0, 0.0))[0], 1) for s in samples
                    ],
                    "down": [
                        round(s.rates.get((route, registry), (0.0, 0.0))[1], 1) for s in samples
                    ],
                }
                for route, registry in keys
            ],
        }

    async def run(self) -> None:
        """Sample forever (cancel to stop)."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)


class MirrorCollector(Collector):
    """The registry mirror's counters and the cache's size, read at scrape time.

    `source()` returns the running MirrorService (or None when the mirror is off), so the
    collector can be registered before the mirror starts and survives its absence.
    """

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        service = self._source()
        if service is None:
            return
        regs = service.stats.registries
        req = CounterMetricFamily(
            "fwdproxy_mirror_requests",
            "Mirror requests by upstream registry and kind (manifest, blob, tags-list, ...).",
            labels=["registry", "kind"],
        )
        for name, s in sorted(regs.items()):
            for kind, n in sorted(s.requests.items()):
                req.add_metric([name, kind], n)
        yield req
        simple = (
            ("fwdproxy_mirror_cache_hits", "Answers from the cache.", "hits"),
            ("fwdproxy_mirror_cache_misses", "Answers that needed the upstream.", "misses"),
            ("fwdproxy_mirror_stale", "Tags answered stale because the upstream failed.", "stale"),
            ("fwdproxy_mirror_coalesced", "Requests that joined another's upstream fetch.",
             "coalesced"),
            ("fwdproxy_mirror_resumes", "Upstream transfers resumed with Range after a break.",
             "resumes"),
            ("fwdproxy_mirror_verify_failures",
             "Upstream bytes whose digest did not match (never served, never cached).",
             "verify_failures"),
            ("fwdproxy_mirror_errors", "Mirror requests answered with an error.", "errors"),
            ("fwdproxy_mirror_cache_served_bytes", "Body bytes served from the cache.",
             "bytes_from_cache"),
        )
        for metric, doc, attr in simple:
            fam = CounterMetricFamily(metric, doc, labels=["registry"])
            for name, s in sorted(regs.items()):
                fam.add_metric([name], getattr(s, attr))
            yield fam
        fetched = CounterMetricFamily(
            "fwdproxy_mirror_fetched_bytes",
            "Bytes the mirror fetched from upstream registries, by registry and route.",
            labels=["registry", "route"],
        )
        for name, s in sorted(regs.items()):
            for route, n in sorted(s.bytes_fetched.items()):
                fetched.add_metric([name, route], n)
        yield fetched
        store = service.store
        if store is not None:
            usage = store.usage()
            yield GaugeMetricFamily("fwdproxy_cache_size_bytes", "Bytes of committed blobs.",
                                    value=usage.bytes)
            yield GaugeMetricFamily("fwdproxy_cache_blobs", "Committed blobs in the cache.",
                                    value=usage.count)
            yield GaugeMetricFamily("fwdproxy_cache_max_size_bytes",
                                    "The cache's bound (0: unbounded).",
                                    value=store.max_size or 0)
