"""The `mirror:` and `cache:` sections of rules.yaml (registry mirror and layer cache).

Kept apart from the proxy's sections so the loader stays readable; problems are reported
through the loader's `add(line, where, message)` so they come out with file:line like the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fwdproxy.config.values import Add, Net, existing_file, parse_nets, secret_ref
from fwdproxy.config.yamlsrc import line_of
from fwdproxy.core.addr import AddressError, split_host_port
from fwdproxy.core.units import parse_duration, parse_size
from fwdproxy.proto.oci import DOCKER_HUB, OCIError, parse_registry

__all__ = [
    "DEFAULT_MIRROR_LISTEN",
    "CacheSpec",
    "MirrorListener",
    "MirrorParent",
    "MirrorRegistry",
    "MirrorSpec",
    "parse_cache",
    "parse_mirror",
]

DEFAULT_MIRROR_LISTEN: Final = "127.0.0.1:5000"


@dataclass(frozen=True, slots=True)
class MirrorRegistry:
    """Per-registry settings for the mirror's upstream fetches. `password` is a secret: it is
    never logged or shown (repr hides it)."""

    name: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    plain_http: bool = False  # only for registries on a private network


@dataclass(frozen=True, slots=True)
class MirrorParent:
    """Another fwdproxy mirror (a cluster's gateway cache) asked before the registry itself.
    `url` is `http(s)://host:port`; credentials are for its `mirror.auth` (never logged)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def authority(self) -> str:
        return self.url.split("://", 1)[1]


@dataclass(frozen=True, slots=True)
class MirrorListener:
    host: str
    port: int
    allow: tuple[Net, ...] = ()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    listeners: tuple[MirrorListener, ...]
    auth: bool = False  # clients authenticate with `auth.users` (HTTP Basic)
    default_registry: str = DOCKER_HUB
    prefixes: Mapping[str, str] = field(default_factory=dict)
    only: tuple[str, ...] = ()  # registries the mirror may fetch from; empty: any allowed
    registries: Mapping[str, MirrorRegistry] = field(default_factory=dict)
    tag_ttl_s: float = 60.0
    serve_stale_s: float = 7 * 86400.0  # 0: never answer from a stale tag
    fetch_timeout_s: float = 30.0  # no upstream progress for this long breaks a fetch
    retries: int = 5  # resumes of one blob before the client gets an error
    parents: tuple[MirrorParent, ...] = ()  # tried in order before the node's own route
    tls_cert: str | None = None  # serve the mirror over HTTPS (a parent across a network)
    tls_key: str | None = None

    def registry(self, name: str) -> MirrorRegistry:
        return self.registries.get(name) or MirrorRegistry(name)

    def serves(self, name: str) -> bool:
        return not self.only or name in self.only


@dataclass(frozen=True, slots=True)
class CacheSpec:
    dir: str
    max_size: int | None = None  # bytes; None: unbounded


_MIRROR_KEYS: Final = {
    "listen",
    "allow",
    "auth",
    "default_registry",
    "prefixes",
    "only",
    "registries",
    "tag_ttl",
    "serve_stale",
    "fetch_timeout",
    "retries",
    "parent",
    "tls",
}
_REGISTRY_KEYS: Final = {"username", "password", "ca_file", "plain_http"}


def _registry_name(text: object, line: int | None, where: str, add: Add) -> str | None:
    try:
        return parse_registry(str(text)).name
    except OCIError as e:
        add(line, where, f"not a registry host[:port]: {e.message}")
        return None


def _listeners(raw: Any, allow_raw: Any, line: int | None, add: Add) -> tuple[MirrorListener, ...]:
    common = parse_nets(allow_raw, "mirror.allow", line, add)
    items = raw if isinstance(raw, list) else [raw if raw is not None else DEFAULT_MIRROR_LISTEN]
    out = []
    for i, item in enumerate(items):
        where = f"mirror.listen[{i}]" if isinstance(raw, list) else "mirror.listen"
        allow, addr = common, item
        if isinstance(item, dict):
            addr = item.get("listen")
            if "allow" in item:
                allow = parse_nets(item["allow"], f"{where}.allow", line, add)
        try:
            host, port = split_host_port(str(addr), allow_zero=True)
        except AddressError as e:
            add(line, where, f"{e} (expected HOST:PORT such as {DEFAULT_MIRROR_LISTEN})")
            continue
        out.append(MirrorListener(host, port, allow))
    return tuple(out)


def _secret(raw: Any, where: str, line: int | None, env: Mapping[str, str], base: Path,
            add: Add) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, (str, int)):
        return str(raw)
    if isinstance(raw, dict) and ("env" in raw or "file" in raw):
        return secret_ref(raw, where, line, env, base, add)
    add(line, where, "use a string, {env: VAR} or {file: PATH}")
    return None


def _registries(raw: Any, line: int | None, env: Mapping[str, str], base: Path,
                add: Add) -> dict[str, MirrorRegistry]:
    out: dict[str, MirrorRegistry] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        add(line, "mirror.registries", "must be a mapping of registry host: {username, ...}")
        return out
    for key, value in raw.items():
        rline = line_of(raw, key) or line
        where = f"mirror.registries.{key}"
        name = _registry_name(key, rline, where, add)
        value = value or {}
        if name is None:
            continue
        if not isinstance(value, dict):
            add(rline, where, "must be a mapping {username, password, ca_file, plain_http}")
            continue
        for k in set(value) - _REGISTRY_KEYS:
            add(line_of(value, k) or rline, f"{where}.{k}",
                f"unknown key; known: {', '.join(sorted(_REGISTRY_KEYS))}")
        password = _secret(value.get("password"), f"{where}.password",
                           line_of(value, "password") or rline, env, base, add)
        username = value.get("username")
        if (username is None) != (value.get("password") is None):
            add(rline, where, "username and password go together")
        ca_file = existing_file(value.get("ca_file"), f"{where}.ca_file",
                                line_of(value, "ca_file") or rline, base, add)
        out[name] = MirrorRegistry(
            name,
            None if username is None else str(username),
            password,
            ca_file,
            bool(value.get("plain_http", False)),
        )
    return out


def _parents(raw: Any, line: int | None, env: Mapping[str, str], base: Path,
             add: Add) -> tuple[MirrorParent, ...]:
    """`parent: URL`, a list of URLs, or of {url, username, password, ca_file}."""
    out = []
    items = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    for i, item in enumerate(items):
        where = f"mirror.parent[{i}]" if isinstance(raw, list) else "mirror.parent"
        iline = line_of(item) or line
        spec = item if isinstance(item, dict) else {"url": item}
        for k in set(spec) - {"url", "username", "password", "ca_file"}:
            add(iline, f"{where}.{k}", "unknown key; known: url, username, password, ca_file")
        url = str(spec.get("url", ""))
        scheme, sep, rest = url.partition("://")
        rest = rest.rstrip("/")
        try:
            if scheme not in ("http", "https") or not sep or "/" in rest or "@" in rest:
                raise AddressError("must be http://HOST:PORT or https://HOST:PORT (no path)")
            split_host_port(rest, 443 if scheme == "https" else 80)
        except AddressError as e:
            add(iline, where, f"{url!r}: {e}")
            continue
        password = _secret(spec.get("password"), f"{where}.password", iline, env, base, add)
        ca_file = existing_file(spec.get("ca_file"), f"{where}.ca_file", iline, base, add)
        username = spec.get("username")
        out.append(MirrorParent(f"{scheme}://{rest}",
                                None if username is None else str(username), password, ca_file))
    return tuple(out)


def _tls(raw: Any, line: int | None, base: Path, add: Add) -> dict[str, str]:
    """`tls: {cert: PATH, key: PATH}`: both files must exist (loaded when the mirror starts)."""
    if raw is None or raw is False:
        return {}
    if not isinstance(raw, dict) or "cert" not in raw or "key" not in raw:
        add(line, "mirror.tls", "a mapping {cert: PATH, key: PATH}")
        return {}
    for k in set(raw) - {"cert", "key"}:
        add(line_of(raw, k) or line, f"mirror.tls.{k}", "unknown key; known: cert, key")
    out = {}
    for key in ("cert", "key"):
        path = existing_file(raw[key], f"mirror.tls.{key}", line_of(raw, key) or line, base, add)
        if path is not None:
            out[f"tls_{key}"] = path
    return out


def _seconds(raw: Mapping[str, Any], key: str, default: float, add: Add) -> float:
    if key not in raw:
        return default
    try:
        return parse_duration(raw[key])
    except ValueError as e:
        add(line_of(raw, key), f"mirror.{key}", str(e))
        return default


def parse_mirror(raw: Any, env: Mapping[str, str], base: Path, add: Add,
                 line: int | None = None) -> MirrorSpec | None:
    """`mirror:` as a mapping, a bare `HOST:PORT`, `true` (the default address) or off."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if isinstance(raw, str):
        raw = {"listen": raw}
    if not isinstance(raw, dict):
        add(line, "mirror", "a mapping {listen: HOST:PORT, ...}, a HOST:PORT, true or false")
        return None
    for k in set(raw) - _MIRROR_KEYS:
        add(line_of(raw, k) or line, f"mirror.{k}",
            f"unknown key; known: {', '.join(sorted(_MIRROR_KEYS))}")
    listeners = _listeners(raw.get("listen"), raw.get("allow"), line_of(raw, "listen") or line,
                           add)
    default = _registry_name(raw.get("default_registry", DOCKER_HUB),
                             line_of(raw, "default_registry") or line, "mirror.default_registry",
                             add) or DOCKER_HUB
    prefixes: dict[str, str] = {}
    praw = raw.get("prefixes") or {}
    if not isinstance(praw, dict):
        add(line_of(raw, "prefixes") or line, "mirror.prefixes",
            "must be a mapping of path prefix: registry host (dockerhub: docker.io)")
        praw = {}
    for key, value in praw.items():
        pline = line_of(praw, key) or line
        prefix = str(key).strip("/")
        name = _registry_name(value, pline, f"mirror.prefixes.{key}", add)
        if not prefix or prefix == "v2" or prefix.startswith("v2/"):
            add(pline, f"mirror.prefixes.{key}", "a prefix must be non-empty and not start with v2")
        elif name is not None:
            prefixes[prefix] = name
    only_raw = raw.get("only") or []
    only = []
    for i, item in enumerate(only_raw if isinstance(only_raw, list) else [only_raw]):
        name = _registry_name(item, line_of(raw, "only") or line, f"mirror.only[{i}]", add)
        if name is not None:
            only.append(name)
    retries = raw.get("retries", 5)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 100:
        add(line_of(raw, "retries") or line, "mirror.retries", "a whole number from 0 to 100")
        retries = 5
    return MirrorSpec(
        listeners=listeners,
        auth=bool(raw.get("auth", False)),
        default_registry=default,
        prefixes=prefixes,
        only=tuple(only),
        registries=_registries(raw.get("registries"), line_of(raw, "registries") or line, env,
                               base, add),
        tag_ttl_s=_seconds(raw, "tag_ttl", 60.0, add),
        serve_stale_s=_seconds(raw, "serve_stale", 7 * 86400.0, add),
        fetch_timeout_s=_seconds(raw, "fetch_timeout", 30.0, add) or 30.0,
        retries=retries,
        parents=_parents(raw.get("parent"), line_of(raw, "parent") or line, env, base, add),
        **_tls(raw.get("tls"), line_of(raw, "tls") or line, base, add),
    )


def parse_cache(raw: Any, base: Path, add: Add, line: int | None = None) -> CacheSpec | None:
    """`cache:` as `{dir: PATH, max_size: 50GiB}`, a bare directory, or off."""
    if raw is None or raw is False:
        return None
    if isinstance(raw, str):
        raw = {"dir": raw}
    if not isinstance(raw, dict) or "dir" not in raw:
        add(line, "cache", "a mapping {dir: PATH, max_size: 50GiB} or a directory")
        return None
    for k in set(raw) - {"dir", "max_size"}:
        add(line_of(raw, k) or line, f"cache.{k}", "unknown key; known: dir, max_size")
    max_size = None
    if raw.get("max_size") is not None:
        try:
            max_size = parse_size(raw["max_size"]) or None
        except ValueError as e:
            add(line_of(raw, "max_size") or line, "cache.max_size", str(e))
    return CacheSpec(str((base / str(raw["dir"])).expanduser()), max_size)
