"""Config loading and validation: rules.yaml -> frozen dataclasses + a compiled Router.

All problems are collected in one pass and reported together, each as `file:line: where: what`,
so an operator fixes a file in one edit instead of one error per restart.
"""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from fwdproxy.config.mirror import (
    CacheSpec,
    MirrorSpec,
    parse_cache,
    parse_mirror,
)
from fwdproxy.config.mirror import (
    MirrorListener as MirrorListener,
)
from fwdproxy.config.mirror import (
    MirrorRegistry as MirrorRegistry,
)
from fwdproxy.config.values import parse_nets, secret_ref
from fwdproxy.config.yamlsrc import LineDict, line_of, load_yaml
from fwdproxy.core.addr import MAX_HOST_LEN, AddressError, normalise_host, split_host_port
from fwdproxy.core.errors import ConfigError
from fwdproxy.routing.rules import HOST_KINDS, Decision, Router, RuleSpec, compile_regex

DEFAULT_LISTEN: Final = "127.0.0.1:3128"
DEFAULT_CONFIG_NAME: Final = "rules.yaml"
UPSTREAM_ENV: Final = "FWDPROXY_UPSTREAM"
UPSTREAM_SCHEMES: Final = ("socks5", "socks5h", "socks4", "socks4a", "http")
GROUP_POLICIES: Final = ("fallback", "round-robin")
# Cloud metadata (credentials!) and "this host" addresses are never a proxy target by default.
DEFAULT_DENY: Final = ("169.254.169.254/32", "fd00:ec2::254/128", "0.0.0.0/8", "::/128")


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream proxy. `rdns`: hostnames are sent to it unresolved (always, except socks4)."""

    name: str
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def rdns(self) -> bool:
        return self.scheme != "socks4"

    @property
    def url(self) -> str:
        """The URL with the password hidden: safe for logs and `route` output."""
        cred = f"{self.username}:***@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{cred}{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checking of group members: a TCP handshake through the member."""

    interval_s: float = 15.0
    timeout_s: float = 5.0
    target: str | None = None  # host:port; default: the first registry API host, port 443
    rise: int = 2  # consecutive good checks before a recovered member is used again


@dataclass(frozen=True, slots=True)
class UpstreamGroup:
    """A named upstream: one or more members tried by `policy`."""

    name: str
    members: tuple[UpstreamSpec, ...]
    policy: str = "fallback"
    check: HealthCheck | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout_s: float = 10.0
    dial_timeout_s: float = 10.0
    idle_timeout_s: float = 900.0
    max_connections: int = 4096
    max_head_bytes: int = 16384
    shutdown_grace_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SniffTLS:
    """Route IP-literal targets on TLS ports by the SNI of the client's ClientHello."""

    enabled: bool = True
    ports: tuple[int, ...] = (443,)
    dial_name: bool = True  # dial the sniffed name (not the IP) when it is tunnelled
    timeout_s: float = 3.0


@dataclass(frozen=True, slots=True)
class AdminSpec:
    host: str = "127.0.0.1"
    port: int = 9128
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    listeners: tuple[Listener, ...]
    upstreams: Mapping[str, UpstreamGroup]
    router: Router
    hosts: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    users: Mapping[str, str] = field(default_factory=dict)  # user -> "plain:..." | "sha256:<hex>"
    allow_any_client: bool = False
    deny_targets: tuple[str, ...] = ()
    deny_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    loopback_targets: bool = False
    sniff_tls: SniffTLS = SniffTLS()
    admin: AdminSpec | None = None
    log_level: str = "info"
    log_format: str = "text"
    catalog: Mapping[str, Any] = field(default_factory=dict)
    mirror: MirrorSpec | None = None
    cache: CacheSpec | None = None
    digest: str = ""

    @property
    def auth_required(self) -> bool:
        return bool(self.users)


def default_config_path() -> Path:
    """`./rules.yaml`, else `/etc/fwdproxy/rules.yaml`, else the copy shipped in the package."""
    for candidate in (
        Path.cwd() / DEFAULT_CONFIG_NAME,
        Path("/etc/fwdproxy") / DEFAULT_CONFIG_NAME,
    ):
        if candidate.is_file():
            return candidate
    return Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME  # fwdproxy/rules.yaml


class _Problems:
    """Collects problems with their file:line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []
        self.section_lines: dict[Any, int] = {}

    def add(self, line: int | None, where: str, what: str) -> None:
        if not line:  # a scalar has no line of its own: use the line of its top-level key
            line = self.section_lines.get(re.split(r"[.\[]", where, maxsplit=1)[0])
        loc = f"{self.path}:{line}" if line else self.path
        self.items.append(f"{loc}: {where}: {what}")


def _unknown_keys(raw: Mapping[Any, Any], known: set[str], where: str, p: _Problems) -> None:
    """Typos must not pass silently: `auth: {user: ...}` would otherwise disable auth."""
    for key in raw:
        if key not in known:
            p.add(line_of(raw, key), f"{where}.{key}", f"unknown key; known: {sorted(known)}")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_upstream_url(name: str, url: str) -> UpstreamSpec:
    """Parse `scheme://[user:pass@]host:port`; raise ValueError with the reason."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        raise ValueError(
            f"unsupported scheme {parts.scheme!r} in {url!r}; use one of "
            + ", ".join(f"{s}://" for s in UPSTREAM_SCHEMES)
        )
    if not parts.hostname:
        raise ValueError(f"missing host in {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    if port is None:
        port = 8080 if scheme == "http" else 1080
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r} in upstream URL")
    return UpstreamSpec(
        name=name,
        scheme=scheme,
        host=normalise_host(parts.hostname),
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


# -- sections ------------------------------------------------------------------------------


def _parse_upstreams(raw: Any, p: _Problems) -> dict[str, UpstreamGroup]:
    out: dict[str, UpstreamGroup] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        p.add(line_of(raw), "upstreams", "must be a mapping of name: URL")
        return out
    for name, value in raw.items():
        line = line_of(raw, name)
        where = f"upstreams.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            p.add(line, where, "upstream names use letters, digits, '_', '-', '.'")
            continue
        if name in ("direct", "reject"):
            p.add(line, where, f"{name!r} is an action, not an upstream name")
            continue
        group = _parse_group(name, value, line, where, p)
        if group is not None:
            out[name] = group
    return out


def _parse_group(
    name: str, value: Any, line: int | None, where: str, p: _Problems
) -> UpstreamGroup | None:
    if isinstance(value, str):
        urls, policy, check_raw = [value], "fallback", None
    elif isinstance(value, dict):
        unknown = set(value) - {"url", "members", "policy", "check"}
        if unknown:
            p.add(line, where, f"unknown keys {sorted(unknown)}")
        urls = _as_list(value.get("members", value.get("url")))
        policy = str(value.get("policy", "fallback"))
        check_raw = value.get("check")
        if policy not in GROUP_POLICIES:
            p.add(line_of(value, "policy"), f"{where}.policy", f"one of {list(GROUP_POLICIES)}")
    else:
        p.add(line, where, "must be a URL or a mapping with members:")
        return None
    if not urls:
        p.add(line, where, "no upstream URL given")
        return None
    members = []
    for i, url in enumerate(urls):
        try:
            members.append(parse_upstream_url(name if len(urls) == 1 else f"{name}#{i}", str(url)))
        except (ValueError, AddressError) as e:
            p.add(line_of(value, "members") if isinstance(value, dict) else line, where, str(e))
    check_line = line_of(value, "check") if isinstance(value, dict) else line
    check = _parse_check(check_raw, where, p, check_line) if check_raw is not None else None
    if check is None and len(members) > 1:
        check = HealthCheck()
    return UpstreamGroup(name, tuple(members), policy, check) if members else None


def _parse_check(raw: Any, where: str, p: _Problems, line: int | None = None) -> HealthCheck | None:
    if raw is False:
        return None
    if not isinstance(raw, dict):
        p.add(line_of(raw) or line, f"{where}.check", "must be a mapping or false")
        return None
    _unknown_keys(raw, {"interval_s", "timeout_s", "target", "rise"}, f"{where}.check", p)
    try:
        return HealthCheck(
            interval_s=float(raw.get("interval_s", 15.0)),
            timeout_s=float(raw.get("timeout_s", 5.0)),
            target=str(raw["target"]) if raw.get("target") else None,
            rise=int(raw.get("rise", 2)),
        )
    except (TypeError, ValueError) as e:
        p.add(line_of(raw), f"{where}.check", str(e))
        return None


def _parse_ports(raw: Any, line: int | None, where: str, p: _Problems) -> list[tuple[int, int]]:
    ports: list[tuple[int, int]] = []
    for item in _as_list(raw):
        text = str(item).strip()
        m = re.fullmatch(r"(\d{1,5})(?:\s*-\s*(\d{1,5}))?", text)
        if not m:
            p.add(line, where, f"invalid port or range {text!r}")
            continue
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if not (0 < lo <= hi < 65536):
            p.add(line, where, f"port range {text!r} outside 1-65535 or reversed")
            continue
        ports.append((lo, hi))
    return ports


def _parse_action(
    raw: Mapping[str, Any], line: int | None, where: str, upstreams: Mapping[str, Any], p: _Problems
) -> tuple[str, str | None] | None:
    via = raw.get("via")
    action = raw.get("action")
    if via is not None and not isinstance(via, str):
        p.add(line, where, "via: must be the name of one upstream")
        return None
    if action is not None and not isinstance(action, str):
        p.add(line, where, "action: must be direct or reject")
        return None
    if via is not None and action not in (None, "via"):
        p.add(line, where, "give either 'action: direct|reject' or 'via: UPSTREAM', not both")
        return None
    if via is not None:
        if via not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none defined"
            p.add(line, where, f"via: unknown upstream {via!r} (upstreams: {known})")
            return None
        return "via", str(via)
    if action in ("direct", "reject"):
        return str(action), None
    if action is None:
        p.add(line, where, "missing action: add 'action: direct', 'action: reject' or 'via: NAME'")
    else:
        p.add(line, where, f"unknown action {action!r}: use direct, reject or via: NAME")
    return None


_RULE_KEYS: Final = {"name", "action", "via", "port", *("domain", "suffix", "glob", "regex")} | {
    "cidr",
    "registries",
}


# A name exactly as normalise_host returns it (its label rule, last label starting with a
# letter so that it cannot be an IP spelling): big domain lists are mostly such names, and
# one regex match is much cheaper than normalising each again.
_NORMAL_NAME: Final = re.compile(
    r"(?:[a-z0-9_*](?:[a-z0-9_*-]{0,61}[a-z0-9_*])?\.)*[a-z](?:[a-z0-9_*-]{0,61}[a-z0-9_*])?"
)


def _fresh(s: str) -> str:
    """A new string equal to s. Rules outlive the parsed YAML: if they kept the parser's own
    string objects, those would pin the memory of the whole parsed file after a big load."""
    return s[:1] + s[1:] if len(s) > 1 else s


def _norm_names(values: list[Any], line: int | None, where: str, p: _Problems) -> tuple[str, ...]:
    out = []
    for v in values:
        s = str(v).strip()
        lead = ""
        if s.startswith("*."):
            lead, s = "*.", s[2:]
        elif s.startswith("."):
            lead, s = ".", s[1:]
        if len(s) <= MAX_HOST_LEN and _NORMAL_NAME.fullmatch(s):
            out.append(lead + s if lead else _fresh(s))
            continue
        try:
            out.append(lead + normalise_host(s))
        except AddressError as e:
            p.add(line, where, str(e))
    return tuple(out)


_Matchers = tuple[
    tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]
]


def _items(value: Any) -> list[Any]:
    """Like _as_list, without copying a list: 100k short-lived copies fragment memory."""
    return value if isinstance(value, list) else _as_list(value)


def _rule_matchers(
    raw: Mapping[str, Any], where: str, ctx: _RuleContext, p: _Problems
) -> _Matchers:
    """(domain, suffix, glob, regex, cidr) of one rule, validated; absent keys cost nothing."""
    empty: tuple[str, ...] = ()
    domain = suffix = glob = regex = cidr = empty
    if "domain" in raw:
        domain = _norm_names(_items(raw["domain"]), line_of(raw, "domain"), f"{where}.domain", p)
    if "suffix" in raw:
        suffix = _norm_names(_items(raw["suffix"]), line_of(raw, "suffix"), f"{where}.suffix", p)
    if "glob" in raw:
        glob = tuple(str(g).lower().rstrip(".") for g in _items(raw["glob"]))
    if "regex" in raw:
        regexes = []
        for r in _items(raw["regex"]):
            try:
                text = _fresh(str(r))
                ctx.compiled[text] = compile_regex(text)  # compiled once: the router reuses it
                regexes.append(text)
            except re.error as e:
                p.add(line_of(raw, "regex"), f"{where}.regex", f"invalid regex {r!r}: {e}")
        regex = tuple(regexes)
    if "cidr" in raw:
        cidrs = []
        for c in _items(raw["cidr"]):
            try:
                cidrs.append(str(ipaddress.ip_network(str(c), strict=False)))
            except ValueError as e:
                p.add(line_of(raw, "cidr"), f"{where}.cidr", str(e))
        cidr = tuple(cidrs)
    return domain, suffix, glob, regex, cidr


def _rule_registries(
    raw: Mapping[str, Any], where: str, ctx: _RuleContext, p: _Problems
) -> tuple[str, ...]:
    regs = _as_list(raw.get("registries"))
    for r in regs:
        if not isinstance(r, str):
            p.add(line_of(raw, "registries"), f"{where}.registries", "registry names are strings")
        elif r != "all" and r not in ctx.catalog:
            p.add(
                line_of(raw, "registries"),
                f"{where}.registries",
                f"unknown registry {r!r}; known: all, " + ", ".join(sorted(ctx.catalog)),
            )
    return tuple(r for r in regs if isinstance(r, str))


def _parse_rule(
    i: int, raw: Any, line: int | None, ctx: _RuleContext, p: _Problems
) -> RuleSpec | None:
    where = f"rules[{i}]"
    if not isinstance(raw, dict):
        p.add(line, where, "each rule is a mapping such as {suffix: docker.io, via: tunnel}")
        return None
    if not raw.keys() <= _RULE_KEYS:
        p.add(
            line,
            where,
            f"unknown keys {sorted(set(raw) - _RULE_KEYS)}; matchers: domain, suffix, glob, "
            "regex, cidr, registries, port",
        )
    act = _parse_action(raw, line, where, ctx.upstreams, p)
    domain, suffix, glob, regex, cidr = _rule_matchers(raw, where, ctx, p)
    registries = _rule_registries(raw, where, ctx, p) if "registries" in raw else ()
    ports = (
        _parse_ports(raw["port"], line_of(raw, "port"), f"{where}.port", p) if "port" in raw else ()
    )
    if act is None:
        return None
    spec = RuleSpec(
        index=i,
        action=act[0],
        upstream=act[1],
        name=raw.get("name"),
        line=line,
        ports=tuple(ports),
        domain=domain,
        suffix=suffix,
        glob=glob,
        regex=regex,
        cidr=cidr,
        registries=registries,
    )
    if not spec.has_host_matcher and not spec.ports and not (raw.keys() & _HOST_KINDS):
        p.add(
            line,
            where,
            "a rule needs a matcher (domain, suffix, glob, regex, cidr, "
            "registries or port); use default: for a catch-all",
        )
        return None
    return spec


_HOST_KINDS: Final = frozenset(HOST_KINDS)


@dataclass
class _RuleContext:
    upstreams: Mapping[str, UpstreamGroup]
    catalog: Mapping[str, Any]
    compiled: dict[str, re.Pattern[str]] = field(default_factory=dict)


def _parse_default(
    raw: Any, upstreams: Mapping[str, Any], p: _Problems, line: int | None
) -> Decision:
    if raw is None or raw == "direct":
        return Decision("direct", None, "default", line)
    if raw == "reject":
        return Decision("reject", None, "default", line)
    if isinstance(raw, dict) and "via" in raw:
        act = _parse_action(raw, line, "default", upstreams, p)
        if act:
            return Decision(act[0], act[1], "default", line)
        return Decision("direct", None, "default", line)
    if isinstance(raw, str) and raw in upstreams:
        return Decision("via", raw, "default", line)
    p.add(line, "default", "use direct, reject or {via: UPSTREAM}")
    return Decision("direct", None, "default", line)


def _parse_listeners(
    raw: Any, allow_raw: Any, p: _Problems, line: int | None
) -> tuple[Listener, ...]:
    global_allow = _parse_allow(allow_raw, "allow", p, line)
    items = _as_list(raw) or [DEFAULT_LISTEN]
    out = []
    for i, item in enumerate(items):
        where = f"listen[{i}]"
        iline = line_of(raw, i) if isinstance(raw, list) else line
        allow = global_allow
        addr = item
        if isinstance(item, dict):
            addr = item.get("listen")
            if "allow" in item:
                allow = _parse_allow(item["allow"], f"{where}.allow", p, iline)
        try:
            host, port = split_host_port(str(addr), allow_zero=True)
            out.append(Listener(host, port, allow))
        except AddressError as e:
            p.add(iline, where, f"{e} (expected HOST:PORT such as 127.0.0.1:3128)")
    return tuple(out)


def _parse_allow(raw: Any, where: str, p: _Problems, line: int | None) -> tuple[Any, ...]:
    return parse_nets(raw, where, line, p.add)


def _parse_users(
    raw: Any, p: _Problems, env: Mapping[str, str], base: Path, line: int | None = None
) -> dict[str, str]:
    """Users: `name: password`, `{sha256: HEX}`, `{env: VAR}` or `{file: PATH}`."""
    users: dict[str, str] = {}
    if raw is None:
        return users
    if not isinstance(raw, dict):
        p.add(line_of(raw) or line, "auth.users", "must be a mapping of user: secret")
        return users
    for name, secret in raw.items():
        where, line = f"auth.users.{name}", line_of(raw, name)
        if isinstance(secret, (str, int)):
            users[str(name)] = "plain:" + str(secret)
        elif isinstance(secret, dict) and "sha256" in secret:
            h = str(secret["sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", h):
                p.add(line, where, "sha256 must be 64 hex digits (sha256sum of the password)")
            users[str(name)] = "sha256:" + h
        elif isinstance(secret, dict) and ("env" in secret or "file" in secret):
            value = secret_ref(secret, where, line, env, base, p.add)
            if value is not None:
                users[str(name)] = "plain:" + value
        else:
            p.add(line, where, "use a password string or {sha256: HEX} | {env: VAR} | {file: PATH}")
    return users


def _parse_limits(raw: Any, p: _Problems) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        p.add(line_of(raw), "limits", "must be a mapping")
        return Limits()
    known = Limits.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            p.add(line_of(raw, key), f"limits.{key}", f"unknown limit; known: {sorted(known)}")
            continue
        try:
            number = float(value) if key.endswith("_s") else int(value)
        except (TypeError, ValueError):
            p.add(line_of(raw, key), f"limits.{key}", f"not a number: {value!r}")
            continue
        if number <= 0:
            p.add(line_of(raw, key), f"limits.{key}", "must be positive")
            continue
        kwargs[key] = number
    return Limits(**kwargs)


def _parse_hosts(raw: Any, p: _Problems) -> dict[str, str]:
    out: dict[str, str] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        p.add(line_of(raw), "hosts", "must be a mapping of name: IP")
        return out
    for name, ip in raw.items():
        try:
            out[normalise_host(str(name))] = str(ipaddress.ip_address(str(ip)))
        except (ValueError, AddressError) as e:
            p.add(line_of(raw, name), f"hosts.{name}", str(e))
    return out


def _parse_sniff(raw: Any, p: _Problems) -> SniffTLS:
    if raw is None:
        return SniffTLS()
    if isinstance(raw, bool):
        return SniffTLS(enabled=raw)
    if not isinstance(raw, dict):
        p.add(line_of(raw), "sniff_tls", "true, false or a mapping")
        return SniffTLS()
    _unknown_keys(raw, {"enabled", "ports", "dial_name", "timeout_s"}, "sniff_tls", p)
    try:
        return SniffTLS(
            enabled=bool(raw.get("enabled", True)),
            ports=tuple(int(x) for x in _as_list(raw.get("ports", [443]))),
            dial_name=bool(raw.get("dial_name", True)),
            timeout_s=float(raw.get("timeout_s", 3.0)),
        )
    except (TypeError, ValueError) as e:
        p.add(line_of(raw), "sniff_tls", str(e))
        return SniffTLS()


def _parse_admin(raw: Any, p: _Problems, env: Mapping[str, str]) -> AdminSpec | None:
    if raw is None or raw is False:
        return None
    if isinstance(raw, str):
        raw = {"listen": raw}
    if not isinstance(raw, dict):
        p.add(line_of(raw), "admin", "a mapping {listen: HOST:PORT, token: ...} or false")
        return None
    _unknown_keys(raw, {"listen", "token"}, "admin", p)
    try:
        host, port = split_host_port(str(raw.get("listen", "127.0.0.1:9128")), allow_zero=True)
    except AddressError as e:
        p.add(line_of(raw, "listen"), "admin.listen", str(e))
        return None
    token = raw.get("token")
    if isinstance(token, dict) and "env" in token:
        token = env.get(str(token["env"]))
    return AdminSpec(host, port, str(token) if token else None)


_TOP_KEYS: Final = {
    "listen",
    "allow",
    "allow_any_client",
    "auth",
    "upstreams",
    "registries",
    "rules",
    "default",
    "hosts",
    "limits",
    "deny_targets",
    "loopback_targets",
    "sniff_tls",
    "admin",
    "mirror",
    "cache",
    "log",
}


def parse_config(
    data: Any,
    path: str = "<config>",
    *,
    upstream_override: str | None = None,
    listen_override: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    catalog_loader: Callable[[], Mapping[str, Any]] | None = None,
    mirror_override: str | None = None,
    cache_dir_override: str | None = None,
) -> Config:
    """Validate parsed YAML (with line info) into a Config; raise ConfigError with all problems."""
    env = os.environ if env is None else env
    p = _Problems(path)
    if data is None:
        data = LineDict()
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping (listen:, upstreams:, rules:)"]
        )
    p.section_lines = dict(getattr(data, "key_lines", {}))
    for key in set(data) - _TOP_KEYS:
        p.add(line_of(data, key), str(key), f"unknown key; known: {', '.join(sorted(_TOP_KEYS))}")

    catalog = dict((catalog_loader or _builtin_catalog)())
    if data.get("registries") is not None:
        catalog = _merge_user_registries(
            catalog, data["registries"], p, line_of(data, "registries")
        )

    upstreams = _parse_upstreams(data.get("upstreams"), p)
    override = upstream_override or env.get(UPSTREAM_ENV)
    if override:
        _apply_upstream_override(upstreams, override, p)

    ctx = _RuleContext(upstreams, catalog)
    rules_raw = data.get("rules")
    specs = []
    if rules_raw is not None and not isinstance(rules_raw, list):
        p.add(line_of(data, "rules"), "rules", "must be a list of rules")
    for i, raw in enumerate(rules_raw if isinstance(rules_raw, list) else []):
        spec = _parse_rule(i, raw, line_of(rules_raw, i), ctx, p)
        if spec is not None:
            specs.append(spec)
    default = _parse_default(data.get("default"), upstreams, p, line_of(data, "default"))

    listen_raw = listen_override if listen_override else data.get("listen")
    listeners = _parse_listeners(listen_raw, data.get("allow"), p, line_of(data, "listen"))
    base = Path(path).parent if path and not path.startswith("<") else Path.cwd()
    auth = data.get("auth") or {}
    if isinstance(auth, dict):
        _unknown_keys(auth, {"users"}, "auth", p)
    else:
        p.add(line_of(data, "auth"), "auth", "must be a mapping {users: {name: secret}}")
    users = _parse_users(
        auth.get("users") if isinstance(auth, dict) else None,
        p,
        env,
        base,
        line_of(auth, "users") if isinstance(auth, dict) else None,
    )
    log = data.get("log") or {}
    if isinstance(log, dict):
        _unknown_keys(log, {"level", "format"}, "log", p)
    else:
        p.add(line_of(data, "log"), "log", "must be a mapping {level: info, format: text}")
    level = str(log.get("level", "info")).lower() if isinstance(log, dict) else "info"
    fmt = str(log.get("format", "text")).lower() if isinstance(log, dict) else "text"
    if level not in ("debug", "info", "warning", "error"):
        p.add(line_of(log, "level"), "log.level", "one of debug, info, warning, error")
    if fmt not in ("text", "json"):
        p.add(line_of(log, "format"), "log.format", "one of text, json")
    deny = tuple(str(x) for x in _as_list(data.get("deny_targets", DEFAULT_DENY)))
    deny_nets = []
    for d in deny:
        try:
            deny_nets.append(ipaddress.ip_network(d, strict=False))
        except ValueError as e:
            p.add(line_of(data, "deny_targets"), "deny_targets", str(e))
    cfg = Config(
        path=path,
        listeners=listeners,
        upstreams=upstreams,
        router=Router(specs, default, catalog, compiled=ctx.compiled),
        hosts=_parse_hosts(data.get("hosts"), p),
        limits=_parse_limits(data.get("limits"), p),
        users=users,
        allow_any_client=bool(data.get("allow_any_client", False)),
        deny_targets=deny,
        deny_nets=tuple(deny_nets),
        loopback_targets=bool(data.get("loopback_targets", False)),
        sniff_tls=_parse_sniff(data.get("sniff_tls"), p),
        admin=_parse_admin(data.get("admin"), p, env),
        log_level=level,
        log_format=fmt,
        catalog=catalog,
        mirror=parse_mirror(
            _with_listen(data.get("mirror"), mirror_override), env, base, p.add,
            line_of(data, "mirror"),
        ),
        cache=parse_cache(
            _with_dir(data.get("cache"), cache_dir_override), base, p.add, line_of(data, "cache")
        ),
    )
    if p.items:
        raise ConfigError(p.items)
    return cfg


def _with_listen(raw: Any, listen: str | None) -> Any:
    """`serve --mirror HOST:PORT` turns the mirror on at that address, keeping its settings."""
    if listen is None:
        return raw
    if isinstance(raw, dict):
        merged = LineDict(raw)
        merged.key_lines = dict(getattr(raw, "key_lines", {}))
        merged["listen"] = listen
        return merged
    return {"listen": listen}


def _with_dir(raw: Any, directory: str | None) -> Any:
    """`serve --cache-dir DIR` sets the cache directory, keeping `max_size`."""
    if directory is None:
        return raw
    if isinstance(raw, dict):
        merged = LineDict(raw)
        merged.key_lines = dict(getattr(raw, "key_lines", {}))
        merged["dir"] = str(Path(directory).resolve())
        return merged
    return {"dir": str(Path(directory).resolve())}


def _apply_upstream_override(upstreams: dict[str, UpstreamGroup], text: str, p: _Problems) -> None:
    """`--upstream [NAME=]URL`: replace that upstream (default: the only/first one) or add it."""
    name, sep, url = text.partition("=")
    if not sep or "://" in name:
        name, url = "", text
    if not name:
        name = next(iter(upstreams), "tunnel")
    try:
        spec = parse_upstream_url(name, url)
    except (ValueError, AddressError) as e:
        p.add(None, f"--upstream / ${UPSTREAM_ENV}", str(e))
        return
    old = upstreams.get(name)
    upstreams[name] = UpstreamGroup(name, (spec,), old.policy if old else "fallback", None)


def _builtin_catalog() -> Mapping[str, Any]:
    from fwdproxy.routing.catalog import builtin_catalog

    return builtin_catalog()


def _merge_user_registries(
    catalog: dict[str, Any], raw: Any, p: _Problems, line: int | None
) -> dict[str, Any]:
    from fwdproxy.routing.catalog import merge_catalog, parse_registries

    try:
        extra = parse_registries({"registries": raw}, where=p.path)
    except ConfigError as e:
        for problem in e.problems:
            p.add(line, "registries", problem)
        return catalog
    return dict(merge_catalog(catalog, extra))


# An unquoted item with a colon inside a flow list or mapping (`[10.0.0.0/8, ::1/128]`,
# `{hosts: [a:1]}`): YAML reads the colon as a key separator and fails with a message that
# names no cause.
_FLOW_COLON: Final = re.compile(r"[\[{,]\s*[^\s'\"\[\]{},]*:[^\s\]},]")


def _yaml_hint(text: str, line: int | None) -> str:
    """A likely cause for a YAML syntax error on (or just before) 0-based `line`, or ''."""
    if line is None:
        return ""
    lines = text.splitlines()
    for i in (line, line - 1):
        if 0 <= i < len(lines) and _FLOW_COLON.search(lines[i].split("#", 1)[0]):
            return (
                f" (line {i + 1} has an unquoted value with ':' inside [...] or {{...}}, "
                "such as an IPv6 address or host:port; quote it: \"::1/128\")"
            )
    return ""


def load_config(
    path: str | Path | None = None,
    *,
    upstream_override: str | None = None,
    listen_override: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    mirror_override: str | None = None,
    cache_dir_override: str | None = None,
) -> Config:
    """Read and validate a config file; raise ConfigError (with file:line) on any problem."""
    import yaml

    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read config: {e.strerror or e}"]) from None
    # A big rule file allocates millions of objects that all stay alive until the Router is
    # built: with the cyclic GC on, each generation-0 overflow rescans the growing heap, which
    # made loading 100k rules several times slower. Nothing here creates garbage cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            data = load_yaml(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            problem = getattr(e, "problem", None) or str(e)
            hint = _yaml_hint(text, mark.line if mark is not None else None)
            raise ConfigError([f"{loc}: YAML syntax error: {problem}{hint}"]) from None
        cfg = parse_config(
            data,
            str(p),
            upstream_override=upstream_override,
            listen_override=listen_override,
            env=env,
            mirror_override=mirror_override,
            cache_dir_override=cache_dir_override,
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    import hashlib

    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return dataclasses.replace(cfg, digest=digest)
