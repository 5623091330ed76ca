"""Prototype rule-engine changes, applied by monkeypatching (`rules_bench.py --patched`).

They measure what proposed edits to rules.py / addr.py would buy:

1. `ip_of` skips `ipaddress` for names: a host is an IP literal only if it has a ':' or is
   all digits and dots. `ipaddress.ip_address()` raising ValueError for every name costs
   microseconds, and names are the common case.
2. The `Decision` of each matched table entry is built once and reused: a frozen dataclass
   with seven fields costs about a microsecond to construct per call.
3. `_match_name` walks the label suffixes with one slice per level and skips tables that are
   empty, instead of three lookups and helper calls per level.
"""

from __future__ import annotations

from typing import Any

from fwdproxy import addr, rules

_INF = 1 << 62


def fast_ip_of(host: str) -> Any:
    if ":" not in host and not host.replace(".", "").isdigit():
        return None
    return _orig_ip_of(host)


_orig_ip_of = addr.ip_of


def _first(router: Any, entries: list[Any] | None, port: int, best: Any) -> Any:
    if not entries:
        return best
    limit = best.index if best is not None else _INF
    rule_list = router.rules
    for e in entries:
        if e.index >= limit:
            break
        ports = rule_list[e.index].ports
        if not ports or any(lo <= port <= hi for lo, hi in ports):
            return e
    return best


def match_name(self: Any, host: str, port: int) -> Any:
    t = self._t
    exact, suffix, sub, globs = t.exact, t.suffix, t.subdomain, t.globs
    best = _first(self, exact.get(host), port, None) if exact else None
    s = host
    first = True
    while True:
        if suffix:
            hit = suffix.get(s)
            if hit:
                best = _first(self, hit, port, best)
        if sub and not first:
            hit = sub.get(s)
            if hit:
                best = _first(self, hit, port, best)
        if globs:
            pats = globs.get(s)
            if pats:
                best = self._first_pattern(pats, host, port, best)
        dot = s.find(".")
        if dot < 0:
            break
        s = s[dot + 1 :]
        first = False
    if t.loose_globs:
        best = self._first_pattern(t.loose_globs, host, port, best)
    if t.regexes:
        best = self._first_pattern(t.regexes, host, port, best)
    return best


def decide_uncached(self: Any, host: str, port: int) -> Any:
    ip = fast_ip_of(host)
    best = self._match_ip(ip, host, port) if ip is not None else self._match_name(host, port)
    if self._t.any_host:
        best = self._first(self._t.any_host, port, best)
    if best is None:
        return self.default
    memo = self.__dict__.setdefault("_decision_memo", {})
    d = memo.get(id(best))
    if d is None:
        rule = self.rules[best.index]
        d = memo[id(best)] = rules.Decision(
            action=rule.action,
            upstream=rule.upstream,
            rule=rule.label,
            line=rule.line,
            matched=best.matched,
            registry=best.registry,
            role=best.role,
        )
    return d


def apply() -> None:
    addr.ip_of = fast_ip_of  # type: ignore[assignment]
    rules.ip_of = fast_ip_of  # type: ignore[attr-defined]
    rules.Router._match_name = match_name  # type: ignore[method-assign]
    rules.Router.decide_uncached = decide_uncached  # type: ignore[method-assign]
