"""`fwdproxy explain IMAGE`: which hosts a pull of IMAGE touches and where each one is routed.

The classic failure is a split pull: the API host goes through the tunnel, the manifest resolves,
then the blob redirect lands on a CDN host that goes direct (or is rejected) and the layer download
hangs. A proxy cannot see that redirect inside TLS, so this module predicts it from the catalog
and asks the router about every host. Pure: the router and the catalog are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fwdproxy.routing.catalog import CatalogHost, Registry, registry_for_ref_host
from fwdproxy.routing.imageref import DEFAULT_PORT, ImageRef, parse_image_ref


class RouteDecision(Protocol):
    """Structural type of the rule engine's decision (fwdproxy.routing.rules), read-only here."""

    @property
    def action(self) -> str: ...  # "direct" | "reject" | "via"
    @property
    def upstream(self) -> str | None: ...
    @property
    def rule(self) -> str: ...
    @property
    def line(self) -> int | None: ...
    @property
    def registry(self) -> str | None: ...
    @property
    def role(self) -> str | None: ...
    @property
    def route(self) -> str: ...


class HostRouter(Protocol):
    """Structural type of the rule engine's router: one decision per (host, port)."""

    def decide(self, host: str, port: int) -> RouteDecision: ...


@dataclass(frozen=True)
class PullHost:
    """One host a pull connects to, why it is in the list, and what the router does with it."""

    host: str
    port: int
    role: str  # "api", "api+blob", "token", "blob"
    note: str
    decision: RouteDecision


@dataclass(frozen=True)
class Explanation:
    image: ImageRef
    registry: Registry | None
    hosts: tuple[PullHost, ...]  # hosts[0] is the API host
    split: bool
    problems: tuple[str, ...]


_UNKNOWN_NOTE = (
    "registry not in the catalog: its token and blob hosts are unknown; "
    "`fwdproxy discover` can find them"
)
_CONSEQUENCE = {
    "api": "requests redirected there",
    "token": "authentication",
    "blob": "layer downloads",
}


def explain(
    image: str | ImageRef, router: HostRouter, catalog: Mapping[str, Registry]
) -> Explanation:
    """Route every host a pull of `image` touches; raises ImageRefError for a bad reference."""
    ref = image if isinstance(image, ImageRef) else parse_image_ref(image)
    registry = registry_for_ref_host(catalog, ref.registry)
    hosts = tuple(
        PullHost(host, port, role, note, router.decide(host, port))
        for host, port, role, note in _pull_targets(ref, registry)
    )
    split, problems = _find_problems(hosts)
    return Explanation(ref, registry, hosts, split, tuple(problems))


def _pull_targets(ref: ImageRef, registry: Registry | None) -> list[tuple[str, int, str, str]]:
    """(host, port, role, note) in order: API host, other API hosts, token hosts, blob hosts."""
    if registry is None:
        return [(ref.host, ref.port, "api", _UNKNOWN_NOTE)]
    api_roles = ["api"]
    api_notes = [f"{registry.title} API (/v2/, manifests)"]
    if ref.registry == "docker.io":
        api_notes.append("docker.io is served by registry-1.docker.io")
    targets: list[tuple[str, int, str, str]] = []
    seen = {ref.host}
    for role in ("api", "token", "blob"):
        for entry in registry.hosts_with_role(role):
            if role != "api" and _served_by_api_host(entry, registry, ref.host):
                api_roles.append(role)
                api_notes.append(f"also the {role} host ({entry.label}{_evidence(entry)})")
                continue
            if role == "api" and entry.kind != "domain":
                continue  # a family of registry names, not a host this pull is sent to
            for host in entry.hosts:
                if host not in seen:
                    seen.add(host)
                    note = _entry_note(entry)
                    targets.append((host, DEFAULT_PORT, role, note))
    api_target = (ref.host, ref.port, "+".join(dict.fromkeys(api_roles)), "; ".join(api_notes))
    return [api_target, *targets]


def _served_by_api_host(entry: CatalogHost, registry: Registry, api_host: str) -> bool:
    """Whether `entry` says the API host itself plays this role.

    True for an exact entry naming the API host, and for a pattern whose examples are all API
    hosts of the registry (Artifact Registry: blobs come from the same <region>-docker.pkg.dev).
    A pattern that merely also covers the API host (suffix quay.io for cdnNN.quay.io) is not.
    """
    if not entry.matches(api_host):
        return False
    if entry.kind == "domain":
        return True
    api_entries = registry.hosts_with_role("api")
    return all(any(a.matches(ex) for a in api_entries) for ex in entry.examples)


def _entry_note(entry: CatalogHost) -> str:
    if entry.role == "api":
        what = "another API host of this registry (alias or redirect target)"
    elif entry.kind == "domain":
        what = "exact host"
    else:
        what = f"example of {entry.label}"
    return what + _evidence(entry)


def _evidence(entry: CatalogHost) -> str:
    return {"weak": "; WEAK evidence", "false": "; UNVERIFIED"}.get(entry.verified, "")


def _find_problems(hosts: tuple[PullHost, ...]) -> tuple[bool, list[str]]:
    api = hosts[0]
    problems: list[str] = []
    if api.decision.action == "reject":
        problems.append(
            f"the API host {_hostport(api)} is rejected ({_rule(api.decision)}): "
            "the pull cannot start"
        )
    split = False
    for other in hosts[1:]:
        d = other.decision
        if _splits_from_api(api.decision, d):
            split = True
            problems.append(
                f"{other.role} host {_hostport(other)} goes {_describe(d)} ({_rule(d)}) "
                f"while the API host {_hostport(api)} goes via {api.decision.upstream}: "
                f"the manifest resolves but {_CONSEQUENCE.get(other.role, 'that step')} "
                "will hang or fail"
            )
        elif d.action == "reject":
            problems.append(
                f"{other.role} host {_hostport(other)} is rejected ({_rule(d)}): "
                f"{_CONSEQUENCE.get(other.role, 'that step')} will fail"
            )
    return split, problems


def _splits_from_api(api: RouteDecision, other: RouteDecision) -> bool:
    """A tunnelled API host with a pull host that does not leave through the same upstream."""
    return api.action == "via" and not (other.action == "via" and other.upstream == api.upstream)


def _describe(decision: RouteDecision) -> str:
    if decision.action == "via":
        return f"via {decision.upstream}"
    return "rejected" if decision.action == "reject" else decision.action


def _rule(decision: RouteDecision) -> str:
    return decision.rule if decision.line is None else f"{decision.rule} (line {decision.line})"


def _hostport(pull: PullHost) -> str:
    host = f"[{pull.host}]" if ":" in pull.host else pull.host
    return f"{host}:{pull.port}"


def verdict(e: Explanation) -> str:
    """One line saying whether the pull will work as routed."""
    api = e.hosts[0].decision
    unknown = "" if e.registry else "; token and blob hosts unknown, run `fwdproxy discover`"
    if api.action == "reject":
        return f"REJECTED: the API host is rejected by {_rule(api)}{unknown}"
    if e.split:
        bad = sum(1 for p in e.hosts[1:] if _splits_from_api(api, p.decision))
        return (
            f"SPLIT: the API host goes via {api.upstream} but {bad} other pull host(s) do not; "
            f"the pull will hang or fail after the manifest{unknown}"
        )
    if e.problems:
        return f"BROKEN: {len(e.problems)} pull host(s) are rejected{unknown}"
    routes = {_describe(p.decision) for p in e.hosts}
    if len(routes) == 1 and len(e.hosts) == 1:
        return f"OK: the only known pull host goes {routes.pop()}{unknown}"
    if len(routes) == 1:
        return f"OK: all {len(e.hosts)} pull hosts go {routes.pop()}{unknown}"
    return (
        "MIXED: the API host goes direct and some pull hosts are tunnelled; this works only "
        f"if direct access works, and region-picking CDNs may choose a different region{unknown}"
    )


def format_explanation(e: Explanation) -> str:
    """Human table (ROLE HOST:PORT ROUTE RULE NOTE), then the verdict and any problems."""
    title = f"{e.registry.name} ({e.registry.title})" if e.registry else "unknown (not in catalog)"
    header = ("ROLE", "HOST:PORT", "ROUTE", "RULE", "NOTE")
    rows = [header] + [
        (p.role, _hostport(p), _describe(p.decision), _rule(p.decision), p.note) for p in e.hosts
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [f"image:    {e.image}", f"registry: {title}", ""]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines += ["", f"verdict: {verdict(e)}"]
    lines += [f"  - {problem}" for problem in e.problems]
    return "\n".join(lines) + "\n"


def explanation_json(e: Explanation) -> dict[str, Any]:
    """A JSON-ready dict with the same content as the table."""
    return {
        "image": str(e.image),
        "reference": {
            "registry": e.image.registry,
            "host": e.image.host,
            "port": e.image.port,
            "repository": e.image.repository,
            "tag": e.image.tag,
            "digest": e.image.digest,
        },
        "registry": e.registry.name if e.registry else None,
        "registry_title": e.registry.title if e.registry else None,
        "hosts": [
            {
                "host": p.host,
                "port": p.port,
                "role": p.role,
                "note": p.note,
                "action": p.decision.action,
                "upstream": p.decision.upstream,
                "route": p.decision.route,
                "rule": p.decision.rule,
                "line": p.decision.line,
                "rule_registry": p.decision.registry,
                "rule_role": p.decision.role,
            }
            for p in e.hosts
        ],
        "split": e.split,
        "problems": list(e.problems),
        "verdict": verdict(e),
    }
