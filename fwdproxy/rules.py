"""The rule engine (pure): compiled once per config load, first match wins, explains itself.

Rules are compiled into lookup tables instead of being scanned: exact names and suffixes are
dict lookups per label of the host (a host has few labels, a config may have 100k rules), CIDRs
are one dict per prefix length, globs are bucketed by their literal tail so only the globs that
could match a host are tried. Each table holds, per key, the matching rule indices in ascending
order; the lowest index whose port filter accepts the port wins, which is exactly "first match
wins" over the original list.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

ACTIONS: Final = ("direct", "reject", "via")
HOST_KINDS: Final = ("domain", "suffix", "glob", "regex", "cidr", "registries")
_INF: Final = 1 << 62
_IPV4_CHARS: Final = frozenset("0123456789.")


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule as written in the config, validated. `ports` is a tuple of inclusive ranges."""

    index: int
    action: str
    upstream: str | None = None
    name: str | None = None
    line: int | None = None
    domain: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    glob: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    cidr: tuple[str, ...] = ()
    registries: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()

    @property
    def label(self) -> str:
        """How logs and `route` name this rule."""
        return self.name if self.name else f"rules[{self.index}]"

    @property
    def has_host_matcher(self) -> bool:
        return bool(
            self.domain or self.suffix or self.glob or self.regex or self.cidr or self.registries
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a connection goes, and why."""

    action: str
    upstream: str | None
    rule: str
    line: int | None = None
    matched: str = ""
    registry: str | None = None
    role: str | None = None

    @property
    def route(self) -> str:
        """`direct`, `reject` or the upstream's name: the label used in logs and metrics."""
        return self.upstream if self.action == "via" and self.upstream else self.action

    def describe(self) -> str:
        """One line for `fwdproxy route` and logs."""
        where = f" (line {self.line})" if self.line else ""
        what = f" {self.matched}" if self.matched else ""
        reg = f" [registry {self.registry}/{self.role}]" if self.registry else ""
        target = f"via {self.upstream}" if self.action == "via" else self.action
        return f"{target} <- {self.rule}{where}{what}{reg}"


class _Entry:
    """One matcher of one rule, with the decision it makes prebuilt (no allocation per lookup)."""

    __slots__ = ("decision", "index", "matched", "ports", "registry", "role")

    def __init__(
        self, index: int, matched: str, registry: str | None = None, role: str | None = None
    ) -> None:
        self.index = index
        self.matched = matched
        self.registry = registry
        self.role = role
        self.ports: tuple[tuple[int, int], ...] = ()
        self.decision: Decision | None = None


@dataclass(slots=True)
class _Tables:
    exact: dict[str, list[_Entry]] = field(default_factory=dict)
    suffix: dict[str, list[_Entry]] = field(default_factory=dict)
    subdomain: dict[str, list[_Entry]] = field(default_factory=dict)
    globs: dict[str, list[tuple[_Entry, re.Pattern[str]]]] = field(default_factory=dict)
    loose_globs: list[tuple[_Entry, re.Pattern[str]]] = field(default_factory=list)
    regexes: list[tuple[_Entry, re.Pattern[str]]] = field(default_factory=list)
    cidr4: dict[int, dict[int, list[_Entry]]] = field(default_factory=dict)
    cidr6: dict[int, dict[int, list[_Entry]]] = field(default_factory=dict)
    any_host: list[_Entry] = field(default_factory=list)


def glob_tail(pattern: str) -> str:
    """The literal label suffix of a glob after its last wildcard label ('' if none).

    `prod-*.s3.dualstack.*.amazonaws.com` -> `amazonaws.com`: a host can only match if it ends
    with that suffix, so the glob is filed under it.
    """
    labels = pattern.split(".")
    tail: list[str] = []
    for label in reversed(labels):
        if any(c in label for c in "*?["):
            break
        tail.append(label)
    if len(tail) == len(labels):
        tail.pop()  # no wildcard at all: still keep at least one label to test against
    return ".".join(reversed(tail))


def _compile_glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


class Router:
    """Compiled rules; `decide(host, port)` is pure and cached. A reload builds a new Router."""

    def __init__(
        self,
        rules: Iterable[RuleSpec],
        default: Decision,
        catalog: Mapping[str, Any] | None = None,
        cache_size: int = 8192,
    ) -> None:
        self.rules: tuple[RuleSpec, ...] = tuple(rules)
        self.default = default
        self._catalog = dict(catalog or {})
        self._t = _Tables()
        for rule in self.rules:
            self._add(rule)
        self._sort()
        self.decide = lru_cache(maxsize=cache_size)(self.decide_uncached)  # type: ignore[method-assign]

    # -- compilation -------------------------------------------------------------------------

    def _add(self, rule: RuleSpec) -> None:
        t, i = self._t, rule.index
        for d in rule.domain:
            t.exact.setdefault(d, []).append(_Entry(i, f"domain {d}"))
        for s in rule.suffix:
            self._add_suffix(s, _Entry(i, f"suffix {s}"))
        for g in rule.glob:
            self._add_glob(g, _Entry(i, f"glob {g}"))
        for r in rule.regex:
            t.regexes.append((_Entry(i, f"regex {r}"), re.compile(r, re.IGNORECASE)))
        for c in rule.cidr:
            net = ipaddress.ip_network(c, strict=False)
            table = t.cidr4 if net.version == 4 else t.cidr6
            table.setdefault(net.prefixlen, {}).setdefault(int(net.network_address), []).append(
                _Entry(i, f"cidr {net}")
            )
        for name in rule.registries:
            # Catalog order: user registries come first, so they win over built-in ones.
            names = list(self._catalog) if name == "all" else [name]
            for reg_name in names:
                self._add_registry(i, reg_name)
        if not rule.has_host_matcher:
            t.any_host.append(_Entry(i, "any host"))

    def _add_suffix(self, s: str, entry: _Entry) -> None:
        if s.startswith("*."):
            s = s[1:]
        if s.startswith("."):
            self._t.subdomain.setdefault(s[1:], []).append(entry)
        else:
            self._t.suffix.setdefault(s, []).append(entry)

    def _add_glob(self, g: str, entry: _Entry) -> None:
        tail = glob_tail(g)
        if tail:
            self._t.globs.setdefault(tail, []).append((entry, _compile_glob(g)))
        else:
            self._t.loose_globs.append((entry, _compile_glob(g)))

    def _add_registry(self, index: int, reg_name: str) -> None:
        reg = self._catalog.get(reg_name)
        if reg is None:
            return
        for h in reg.hosts:
            entry = _Entry(index, f"{h.kind} {h.pattern}", reg.name, h.role)
            if h.kind == "domain":
                self._t.exact.setdefault(h.pattern, []).append(entry)
            elif h.kind == "suffix":
                self._add_suffix(h.pattern, entry)
            elif h.kind == "glob":
                self._add_glob(h.pattern, entry)
            elif h.kind == "regex":
                self._t.regexes.append((entry, re.compile(h.pattern, re.IGNORECASE)))

    def _entries(self) -> list[_Entry]:
        t = self._t
        out = [
            e for table in (t.exact, t.suffix, t.subdomain) for lst in table.values() for e in lst
        ]
        out += [e for glist in t.globs.values() for e, _ in glist]
        out += [e for e, _ in t.loose_globs] + [e for e, _ in t.regexes] + t.any_host
        out += [
            e
            for ct in (t.cidr4, t.cidr6)
            for nets in ct.values()
            for lst in nets.values()
            for e in lst
        ]
        return out

    def _finalise(self) -> None:
        by_index = {r.index: r for r in self.rules}  # indices are positions in the file
        for e in self._entries():
            rule = by_index[e.index]
            e.ports = rule.ports
            e.decision = Decision(
                action=rule.action,
                upstream=rule.upstream,
                rule=rule.label,
                line=rule.line,
                matched=e.matched,
                registry=e.registry,
                role=e.role,
            )

    def _sort(self) -> None:
        self._finalise()
        t = self._t
        for table in (t.exact, t.suffix, t.subdomain):
            for lst in table.values():
                lst.sort(key=lambda e: e.index)
        for glist in t.globs.values():
            glist.sort(key=lambda p: p[0].index)
        t.loose_globs.sort(key=lambda p: p[0].index)
        t.regexes.sort(key=lambda p: p[0].index)
        for ctable in (t.cidr4, t.cidr6):
            for nets in ctable.values():
                for lst in nets.values():
                    lst.sort(key=lambda e: e.index)
        t.any_host.sort(key=lambda e: e.index)
        self._cidr4 = sorted(t.cidr4.items(), reverse=True)
        self._cidr6 = sorted(t.cidr6.items(), reverse=True)

    # -- matching ----------------------------------------------------------------------------
    # The hot path: plain loops and local names, no allocation (entries carry their Decision).

    @staticmethod
    def _first(entries: list[_Entry] | None, port: int, best: _Entry | None) -> _Entry | None:
        if not entries:
            return best
        limit = best.index if best is not None else _INF
        for e in entries:
            if e.index >= limit:
                break
            if not e.ports or any(lo <= port <= hi for lo, hi in e.ports):
                return e
        return best

    @staticmethod
    def _first_pattern(
        pats: list[tuple[_Entry, re.Pattern[str]]] | None,
        host: str,
        port: int,
        best: _Entry | None,
    ) -> _Entry | None:
        if not pats:
            return best
        limit = best.index if best is not None else _INF
        for e, rx in pats:
            if e.index >= limit:
                break
            if rx.fullmatch(host) and (not e.ports or any(lo <= port <= hi for lo, hi in e.ports)):
                return e
        return best

    def _match_name(self, host: str, port: int) -> _Entry | None:
        t = self._t
        first = self._first
        suffix, subdomain, globs = t.suffix, t.subdomain, t.globs
        best = None
        lst = t.exact.get(host)
        if lst:
            best = first(lst, port, best)
        lst = suffix.get(host)
        if lst:
            best = first(lst, port, best)
        if globs and host in globs:
            best = self._first_pattern(globs[host], host, port, best)
        s = host
        i = s.find(".")
        while i >= 0:  # every parent on a label boundary: a.b.c -> b.c -> c
            s = s[i + 1 :]
            lst = suffix.get(s)
            if lst:
                best = first(lst, port, best)
            if subdomain:
                lst = subdomain.get(s)
                if lst:
                    best = first(lst, port, best)
            if globs and s in globs:
                best = self._first_pattern(globs[s], host, port, best)
            i = s.find(".")
        if t.loose_globs:
            best = self._first_pattern(t.loose_globs, host, port, best)
        if t.regexes:
            best = self._first_pattern(t.regexes, host, port, best)
        return best

    def _match_ip(self, host: str, port: int) -> _Entry | None:
        best = self._first(self._t.exact.get(host), port, None)
        if ":" in host:
            value, bits, table = int(ipaddress.IPv6Address(host)), 128, self._cidr6
        else:
            a, b, c, d = host.split(".")
            value, bits, table = (
                (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d),
                32,
                self._cidr4,
            )
        first = self._first
        for plen, nets in table:
            shift = bits - plen
            best = first(nets.get((value >> shift) << shift), port, best)
        return best

    def decide_uncached(self, host: str, port: int) -> Decision:
        """The decision for a normalised host (see addr.normalise_host) and port."""
        # Normalised hosts: an IP literal is IPv6 (has ':') or dotted-decimal IPv4, nothing else.
        if ":" in host or (host[-1:].isdigit() and _IPV4_CHARS.issuperset(host)):
            best = self._match_ip(host, port)
        else:
            best = self._match_name(host, port)
        if self._t.any_host:
            best = self._first(self._t.any_host, port, best)
        if best is None or best.decision is None:
            return self.default
        return best.decision

    def decide(self, host: str, port: int) -> Decision:  # replaced by a cached wrapper
        return self.decide_uncached(host, port)
