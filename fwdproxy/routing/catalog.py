"""The registry catalog: which hosts an image pull touches, per registry, as validated data.

Registries redirect blob downloads to CDNs and object stores that change without notice, so the
host list ships as `catalog.yaml` (package data) instead of constants in code. The same entry form
is accepted under `registries:` in rules.yaml, which is why `parse_registries` reports every
problem with its path instead of stopping at the first. The rule engine compiles these entries
into its own fast matcher; `CatalogHost.matches` is the slow reference used by tests and explain.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal

import yaml

from fwdproxy.core.errors import ConfigError
from fwdproxy.routing.imageref import DEFAULT_REGISTRY, DOCKER_HUB_API_HOST, REPOSITORY_RE

Role = Literal["api", "token", "blob"]
ROLES: Final = ("api", "token", "blob")
MATCHER_KINDS: Final = ("domain", "suffix", "glob", "regex")
VERIFIED_LEVELS: Final = ("true", "weak", "false")

# Parents whose subdomains belong to many unrelated tenants: a suffix (or a loose glob) on one of
# these would tunnel other people's buckets and distributions too.
MULTI_TENANT_PARENTS: Final = (
    "cloudfront.net",
    "r2.cloudflarestorage.com",
    "cloudflarestorage.com",
    "amazonaws.com",
    "githubusercontent.com",
    "blob.core.windows.net",
    "googleapis.com",
    "appspot.com",
    "azureedge.net",
    "azurefd.net",
    "fastly.net",
    "akamaized.net",
)
MIN_GLOB_PREFIX: Final = 8  # literal characters before the first wildcard on a multi-tenant parent

_ENTRY_KEYS: Final = frozenset({"title", "refs", "api", "probe", "hosts"})
_HOST_KEYS: Final = frozenset({*MATCHER_KINDS, "role", "source", "verified", "examples"})
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_GLOB_RE = re.compile(r"[a-z0-9.*?-]+")
# Hosts no regex entry may match: one per multi-tenant parent shape, plus bare TLD neighbours.
_REGEX_CANARIES: Final = (
    *(
        host
        for parent in MULTI_TENANT_PARENTS
        for host in (parent, f"x.{parent}", f"other-tenant.{parent}", f"a.b.{parent}")
    ),
    *(
        f"{c}x.{parent}"
        for parent in MULTI_TENANT_PARENTS
        for c in "abcdefghijklmnopqrstuvwxyz0123456789"
    ),
    *(f"x.{tld}" for tld in ("com", "net", "org", "io", "dev")),
)


@dataclass(frozen=True, slots=True)
class CatalogHost:
    """One host matcher of a registry, with the role that host plays in a pull."""

    kind: str  # "domain" | "suffix" | "glob" | "regex"
    pattern: str
    role: str  # Role
    source: str = ""
    verified: str = "true"  # "true" | "weak" | "false"
    examples: tuple[str, ...] = ()

    def matches(self, host: str) -> bool:
        """Whether `host` (already lowercase, no trailing dot) is covered by this entry."""
        if self.kind == "domain":
            return host == self.pattern
        if self.kind == "suffix":
            return host == self.pattern or host.endswith("." + self.pattern)
        return _compiled(self.kind, self.pattern).fullmatch(host) is not None

    @property
    def label(self) -> str:
        """Short human form: 'suffix docker.com', 'domain ghcr.io'."""
        return f"{self.kind} {self.pattern}"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Concrete hosts for this entry: the exact host, or the examples of a pattern."""
        return (self.pattern,) if self.kind == "domain" else self.examples


@dataclass(frozen=True, slots=True)
class Registry:
    """A registry: the names image references use for it and every host its pulls touch."""

    name: str
    title: str
    refs: tuple[str, ...]
    api: str
    hosts: tuple[CatalogHost, ...]
    probe: str | None = None

    def hosts_with_role(self, role: str) -> tuple[CatalogHost, ...]:
        return tuple(h for h in self.hosts if h.role == role)


@functools.lru_cache(maxsize=1024)
def _compiled(kind: str, pattern: str) -> re.Pattern[str]:
    if kind == "glob":
        body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
        return re.compile(body)
    return re.compile(pattern, re.IGNORECASE)


# --------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=1)
def _load_builtin() -> tuple[str, dict[str, Registry]]:
    text = resources.files("fwdproxy.routing").joinpath("catalog.yaml").read_text(encoding="utf-8")
    # libyaml's parser when available: the catalog is parsed on every CLI run.
    doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    try:
        registries = parse_registries(doc, where="catalog.yaml")
    except ConfigError as err:
        raise ConfigError([f"catalog.yaml: {p}" for p in err.problems]) from None
    if not registries:
        raise ConfigError(["catalog.yaml: no registries"])
    return str(doc.get("version", "")), registries


def builtin_catalog() -> dict[str, Registry]:
    """The packaged catalog (parsed once; each call returns a fresh dict of the same entries)."""
    return dict(_load_builtin()[1])


def builtin_catalog_version() -> str:
    """The `version:` stamp of the packaged catalog, so reports can say how old the data is."""
    return _load_builtin()[0]


def merge_catalog(
    base: Mapping[str, Registry], extra: Mapping[str, Registry]
) -> dict[str, Registry]:
    """`extra` (the user's registries) replaces same-named entries and comes first in order,
    so that a user entry claiming a ref or host of a built-in one wins every lookup."""
    merged = dict(extra)
    merged.update((name, reg) for name, reg in base.items() if name not in extra)
    return merged


def registry_for_ref_host(catalog: Mapping[str, Registry], host: str) -> Registry | None:
    """The registry an image reference's registry part belongs to ('k8s.gcr.io' -> k8s).

    Exact refs win; then an api-role host entry matching the bare host (us-east1-docker.pkg.dev).
    """
    key = host.strip().lower().rstrip(".")
    for registry in catalog.values():
        if key in registry.refs:
            return registry
    bare = _strip_port(key)
    for registry in catalog.values():
        if bare in registry.refs:
            return registry
    bare = bare.strip("[]")
    for registry in catalog.values():
        if any(h.role == "api" and h.matches(bare) for h in registry.hosts):
            return registry
    return None


# --------------------------------------------------------------------------- validation


def parse_registries(data: object, where: str = "catalog") -> dict[str, Registry]:
    """Validate a document's `registries:` section (name -> entry) into Registry objects.

    `data` is the document mapping (catalog.yaml, or rules.yaml / {"registries": ...}); other
    top-level keys are ignored and a missing or empty section gives {}. Problems carry their
    path inside the document ("registries.dockerhub.hosts[3]: ..."); `where` names the source
    only when the document itself is malformed. Raises ConfigError listing all problems at once.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"{where}: must be a mapping with a 'registries' key"])
    section = data.get("registries")
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(["registries: must be a mapping of registry name to entry"])
    problems: list[str] = []
    result: dict[str, Registry] = {}
    owner: dict[str, str] = {}
    for name, entry in section.items():
        path = f"registries.{name}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problems.append(f"{path}: registry name must be lowercase letters, digits and '-'")
            continue
        registry = _parse_registry(name, entry, path, problems)
        if registry is None:
            continue
        for i, ref in enumerate(registry.refs):
            if ref in owner:
                problems.append(f"{path}.refs[{i}]: {ref} is already a ref of {owner[ref]}")
            owner.setdefault(ref, name)
        result[name] = registry
    if problems:
        raise ConfigError(problems)
    return result


def _parse_registry(name: str, entry: object, path: str, problems: list[str]) -> Registry | None:
    if not isinstance(entry, Mapping):
        problems.append(
            f"{path}: must be a mapping with refs, hosts and optionally title/api/probe"
        )
        return None
    before = len(problems)
    problems.extend(f"{path}.{key}: unknown key" for key in entry if key not in _ENTRY_KEYS)
    title = entry.get("title", name)
    if not isinstance(title, str) or not title.strip():
        problems.append(f"{path}.title: must be a non-empty string")
    refs = _parse_refs(entry.get("refs"), f"{path}.refs", problems)
    api = entry.get("api", _default_api(refs[0]) if refs else None)
    if api is not None:
        api = _parse_registry_name(api, f"{path}.api", problems)
    probe = entry.get("probe")
    if probe is not None and (not isinstance(probe, str) or not REPOSITORY_RE.fullmatch(probe)):
        problems.append(f"{path}.probe: must be a repository path like library/alpine (no tag)")
    hosts = _parse_hosts(entry.get("hosts"), f"{path}.hosts", problems)
    if len(problems) > before or api is None:
        return None
    registry = Registry(name, str(title), refs, api, hosts, probe)
    _check_api_coverage(registry, path, problems)
    return registry


def _default_api(ref: str) -> str:
    return DOCKER_HUB_API_HOST if ref == DEFAULT_REGISTRY else ref


def _check_api_coverage(registry: Registry, path: str, problems: list[str]) -> None:
    """Each ref and the api host must be routed as an API host, or pulls start untunnelled."""
    named = [(f"refs[{i}]", ref) for i, ref in enumerate(registry.refs)]
    named.append(("api", registry.api))
    for key, value in named:
        bare = _strip_port(value).strip("[]")
        if not any(h.role == "api" and h.matches(bare) for h in registry.hosts):
            problems.append(f"{path}.{key}: {bare} is not matched by any host entry with role api")


def _parse_refs(value: object, path: str, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: must be a non-empty list of registry names (e.g. [ghcr.io])")
        return ()
    refs = (_parse_registry_name(item, f"{path}[{i}]", problems) for i, item in enumerate(value))
    return tuple(ref for ref in refs if ref is not None)


def _parse_registry_name(value: object, path: str, problems: list[str]) -> str | None:
    """host, host:port or [ipv6]:port, lowercased."""
    if not isinstance(value, str):
        problems.append(f"{path}: must be a string")
        return None
    text = value.strip().lower().rstrip(".")
    host = _strip_port(text)
    port = text[len(host) + 1 :]
    valid_port = not port or (port.isdigit() and 1 <= int(port) <= 65535)
    if not valid_port or not _is_host(host.strip("[]") if host.startswith("[") else host):
        problems.append(f"{path}: {value!r} is not a registry name (host, host:port, [ipv6]:port)")
        return None
    return text


def _strip_port(text: str) -> str:
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end >= 0 else text
    host, _, port = text.rpartition(":")
    return host if host and port.isdigit() and ":" not in host else text


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.split(".")
    return len(text) <= 253 and all(_LABEL_RE.fullmatch(label) for label in labels)


def _parse_hosts(value: object, path: str, problems: list[str]) -> tuple[CatalogHost, ...]:
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: must be a non-empty list of host entries")
        return ()
    hosts: list[CatalogHost] = []
    seen: set[tuple[str, str, str]] = set()
    for i, item in enumerate(value):
        host = _parse_host(item, f"{path}[{i}]", problems)
        if host is None:
            continue
        key = (host.kind, host.pattern, host.role)
        if key in seen:
            problems.append(f"{path}[{i}]: duplicate entry {host.label} ({host.role})")
        seen.add(key)
        hosts.append(host)
    return tuple(hosts)


def _parse_host(item: object, path: str, problems: list[str]) -> CatalogHost | None:
    if not isinstance(item, Mapping):
        problems.append(f"{path}: must be a mapping like {{domain: ghcr.io, role: api}}")
        return None
    before = len(problems)
    problems.extend(f"{path}.{key}: unknown key" for key in item if key not in _HOST_KEYS)
    kinds = [k for k in MATCHER_KINDS if k in item]
    if len(kinds) != 1:
        problems.append(f"{path}: needs exactly one of {', '.join(MATCHER_KINDS)}")
        return None
    kind = kinds[0]
    raw = item[kind]
    if not isinstance(raw, str) or not raw.strip():
        problems.append(f"{path}.{kind}: must be a non-empty string")
        return None
    pattern = raw.strip() if kind == "regex" else raw.strip().lower().rstrip(".")
    problems.extend(f"{path}.{kind}: {msg}" for msg in _pattern_problems(kind, pattern))
    role = item.get("role")
    if role not in ROLES:
        problems.append(f"{path}.role: must be one of {', '.join(ROLES)}")
    source = item.get("source", "")
    if not isinstance(source, str):
        problems.append(f"{path}.source: must be a string")
    verified = _parse_verified(item.get("verified", True), f"{path}.verified", problems)
    if len(problems) > before:
        return None
    host = CatalogHost(kind, pattern, str(role), str(source), verified)
    examples = _parse_examples(host, item.get("examples"), f"{path}.examples", problems)
    return CatalogHost(kind, pattern, str(role), str(source), verified, examples)


def _parse_verified(value: object, path: str, problems: list[str]) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in VERIFIED_LEVELS:
        return value.lower()
    problems.append(f"{path}: must be true, weak or false")
    return "false"


def _parse_examples(
    host: CatalogHost, value: object, path: str, problems: list[str]
) -> tuple[str, ...]:
    if host.kind == "domain":
        if value is not None:
            problems.append(f"{path}: only suffix, glob and regex entries take examples")
        return ()
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: {host.kind} entries need a non-empty list of example hosts")
        return ()
    examples: list[str] = []
    for j, raw in enumerate(value):
        if not isinstance(raw, str) or not _is_host(raw.strip().lower().rstrip(".")):
            problems.append(f"{path}[{j}]: {raw!r} is not a host name")
            continue
        example = raw.strip().lower().rstrip(".")
        if not host.matches(example):
            problems.append(f"{path}[{j}]: {example} does not match {host.label}")
        examples.append(example)
    return tuple(examples)


def _pattern_problems(kind: str, pattern: str) -> list[str]:
    if kind == "domain":
        return [] if _is_host(pattern) else [f"{pattern!r} is not a host name or IP address"]
    if kind == "suffix":
        return _suffix_problems(pattern)
    if kind == "glob":
        return _glob_problems(pattern)
    return _regex_problems(pattern)


def _suffix_problems(pattern: str) -> list[str]:
    if pattern.startswith((".", "*")):
        bare = pattern.lstrip("*.")
        return [f"write the bare domain ({bare}); a suffix already matches it and its subdomains"]
    if not _is_host(pattern):
        return [f"{pattern!r} is not a domain name"]
    if pattern.count(".") < 1:
        return [f"suffix {pattern} is a whole top-level domain; too broad"]
    for parent in MULTI_TENANT_PARENTS:
        if pattern == parent or pattern.endswith("." + parent) or parent.endswith("." + pattern):
            return [
                f"suffix on multi-tenant parent {parent} would tunnel other tenants' hosts; "
                "use exact domain entries (or a glob with a long literal prefix)"
            ]
    return []


def _glob_problems(pattern: str) -> list[str]:
    if not _GLOB_RE.fullmatch(pattern):
        return [f"{pattern!r}: a glob may use only letters, digits, '.', '-', '*' and '?'"]
    wildcards = [i for i, ch in enumerate(pattern) if ch in "*?"]
    if not wildcards:
        return [f"glob {pattern} has no '*' or '?'; use domain"]
    tail = pattern[wildcards[-1] + 1 :]
    tail_domain = tail.partition(".")[2]
    if tail_domain.count(".") < 1 or not _is_host(tail_domain):
        return [f"glob {pattern} is too broad: it must end in a literal domain such as .quay.io"]
    prefix = wildcards[0]
    for parent in MULTI_TENANT_PARENTS:
        under = ("." + parent).endswith(tail) or tail.endswith("." + parent)
        if under and prefix < MIN_GLOB_PREFIX:
            return [
                f"glob on multi-tenant parent {parent} needs a literal prefix of at least "
                f"{MIN_GLOB_PREFIX} characters before its first wildcard (has {prefix})"
            ]
    return []


def _regex_problems(pattern: str) -> list[str]:
    try:
        compiled = _compiled("regex", pattern)
    except re.error as err:
        return [f"invalid regular expression: {err}"]
    for canary in _REGEX_CANARIES:
        if compiled.fullmatch(canary):
            return [f"regex {pattern!r} also matches unrelated host {canary}; make it tighter"]
    plain = pattern.replace("\\", "").lower()
    prefix = _regex_literal_prefix(pattern)
    for parent in MULTI_TENANT_PARENTS:
        if parent in plain and prefix < MIN_GLOB_PREFIX:
            return [
                f"regex on multi-tenant parent {parent} needs a literal prefix of at least "
                f"{MIN_GLOB_PREFIX} characters (has {prefix}); prefer exact domain entries"
            ]
    return []


def _regex_literal_prefix(pattern: str) -> int:
    """Length of the host text a regex pins down before its first metacharacter."""
    count, i = 0, 1 if pattern.startswith("^") else 0
    while i < len(pattern):
        if pattern[i] == "\\" and pattern[i + 1 : i + 2] in (".", "-"):
            i += 2
        elif pattern[i].isalnum() or pattern[i] == "-":
            i += 1
        else:
            break
        count += 1
    return count
