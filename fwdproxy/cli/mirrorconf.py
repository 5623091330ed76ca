"""The runtime config files that point at fwdproxy's registry mirror: parse, render, merge, check.

Shared by `gen *-mirror` (which writes them) and `doctor` (which reads them back), so both agree
on what "pointed at the mirror" means. Facts and versions: mirrors.md §1 (containerd hosts.toml,
config_path), §2 (Docker registry-mirrors, the containerd image store's /etc/docker/certs.d),
§3 (registries.conf v2), §4 (k3s/RKE2 registries.yaml).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fwdproxy.cli.genfiles import GenError, load_json_object, read_text, root_path
from fwdproxy.core.addr import AddressError, format_host_port, is_loopback, split_host_port

DEFAULT_MIRROR: Final = "127.0.0.1:5000"
CONTAINERD_CERTS: Final = "/etc/containerd/certs.d"
DOCKER_CERTS: Final = "/etc/docker/certs.d"
CONTAINERD_CONFIG: Final = "/etc/containerd/config.toml"
DAEMON_JSON: Final = "/etc/docker/daemon.json"
REGISTRIES_CONF: Final = "/etc/containers/registries.conf"
REGISTRIES_DIR: Final = "/etc/containers/registries.conf.d"
PODMAN_DROPIN: Final = f"{REGISTRIES_DIR}/50-fwdproxy-mirror.conf"
K3S_REGISTRIES: Final = "/etc/rancher/k3s/registries.yaml"
RKE2_REGISTRIES: Final = "/etc/rancher/rke2/registries.yaml"
# containerd >= 2.2 uses these when config.toml sets neither config_path nor mirrors (Linux).
CONTAINERD_DEFAULT_ROOTS: Final = (CONTAINERD_CERTS, DOCKER_CERTS)
CRI_V2: Final = "io.containerd.grpc.v1.cri"
CRI_V3: Final = "io.containerd.cri.v1.images"
_ADDRESS_CHARS: Final = re.compile(r"[A-Za-z0-9.:\[\]-]+")
_K3S_HEADER: Final = "# {path}: from `fwdproxy gen k3s-mirror`"


# --- the mirror address ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mirror:
    """Where runtimes reach the mirror. `host` is normalised, IPv6 without brackets."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def parse_mirror_address(text: str, what: str = "--mirror") -> Mirror:
    """HOST:PORT or http://HOST:PORT; anything else is a usage error (exit 2)."""
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if sep:
        if scheme.lower() != "http":
            raise GenError(
                f"{what} {text!r}: the mirror speaks plain HTTP; write HOST:PORT or "
                "http://HOST:PORT",
                2,
            )
        raw = rest.removesuffix("/")
    expect = f"expected HOST:PORT such as {DEFAULT_MIRROR} ([::1]:5000 for IPv6)"
    if not _ADDRESS_CHARS.fullmatch(raw):
        raise GenError(f"{what} {text!r}: {expect}", 2)
    try:
        host, port = split_host_port(raw)
    except AddressError as e:
        raise GenError(f"{what} {text!r}: {e}; {expect}", 2) from None
    if host in ("0.0.0.0", "::"):
        raise GenError(
            f"{what} {text!r}: a wildcard is a bind address, not one a runtime can dial; "
            "use 127.0.0.1",
            2,
        )
    return Mirror(host, port)


def same_endpoint(url: str, mirror: Mirror, any_host: bool = False) -> bool:
    """Whether an endpoint URL or HOST:PORT[/path] names `mirror` (localhost = 127.0.0.1);
    `any_host`: the mirror listens on a wildcard, so only the port has to match."""
    raw = url.strip()
    default = 80 if raw.lower().startswith("http:") else 443
    raw = raw.split("://", 1)[1] if "://" in raw else raw
    try:
        host, port = split_host_port(raw.split("/", 1)[0], default)
    except AddressError:
        return False
    if port != mirror.port:
        return False
    return any_host or host == mirror.host or (is_loopback(host) and mirror.loopback)


def own(names: list[str], one: str, many: str) -> str:
    """'x has a directory of its own' / 'x, y have directories of their own'."""
    if len(names) == 1:
        return f"{names[0]} has {one} of its own"
    return f"{', '.join(names)} have {many} of their own"


# --- small file helpers ----------------------------------------------------------------------


def load_toml(text: str) -> dict[str, Any] | None:
    """Parsed TOML, or None without a TOML reader (Python 3.10 without tomli); ValueError if bad."""
    if sys.version_info >= (3, 11):
        import tomllib as toml
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as toml
        except ImportError:
            return None
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as e:
        raise ValueError(str(e)) from None


def _toml_value(v: Any) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    return None


# --- containerd: hosts.toml and config_path --------------------------------------------------


def render_hosts_toml(m: Mirror, path: str, registry: str | None, target: str) -> str:
    scope = f"from {registry}" if registry else "from every registry without its own directory here"
    lines = [
        f"# {path}",
        f"# Pulls {scope} try fwdproxy's registry mirror first.",
        f"# Generated by `fwdproxy gen {target}`; rerun it to update.",
        "# containerd adds ?ns=<registry> to every request, so the mirror knows the upstream.",
        "# No `server =` line on purpose: after the mirror, containerd tries the registry itself",
        "# (per request), so a stopped mirror slows pulls down instead of failing them (through",
        "# fwdproxy if HTTPS_PROXY points there). To forbid that, add as the first line:",
        f'#   server = "{m.url}"',
        "",
        f'[host."{m.url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Check:
    """A finding about a runtime's config, in doctor's levels (ok, note, warning, problem)."""

    level: str
    message: str
    snippet: tuple[str, ...] = ()


def _registry_table(data: Mapping[str, Any], version: int) -> tuple[str, Any]:
    plugins = data.get("plugins")
    plugins = plugins if isinstance(plugins, dict) else {}
    if version >= 3:
        key = CRI_V3
    elif version == 2:
        key = CRI_V2
    else:
        key = "cri"
    plugin = plugins.get(key)
    return key, plugin.get("registry") if isinstance(plugin, dict) else None


def _config_path_snippet(table: str, certs_dir: str, exists: bool) -> tuple[str, ...]:
    header = f"[plugins.{json.dumps(table) if '.' in table else table}.registry]"
    if exists:
        return (f'in the existing {header} table set:  config_path = "{certs_dir}"',)
    return (header, f'  config_path = "{certs_dir}"')


def check_containerd_config(
    text: str | None, certs_dir: str = CONTAINERD_CERTS, path: str = CONTAINERD_CONFIG
) -> Check:
    """Whether containerd's CRI plugin reads hosts.toml from `certs_dir` (mirrors.md §1.1)."""
    certs_dir = certs_dir.rstrip("/") or "/"
    if text is None:
        if certs_dir in CONTAINERD_DEFAULT_ROOTS:
            level = "warning"
            why = f"containerd >= 2.2 reads {certs_dir} by default, 1.x, 2.0 and 2.1 do not"
        else:
            level, why = "problem", "containerd reads no hosts.toml from there by default"
        return Check(
            level,
            f"{path} not found: {why}. Create it with, for containerd 1.x:",
            (
                "version = 2",
                *_config_path_snippet(CRI_V2, certs_dir, False),
                "or for containerd 2.x:",
                "version = 3",
                *_config_path_snippet(CRI_V3, certs_dir, False),
            ),
        )
    try:
        data = load_toml(text)
    except ValueError as e:
        return Check("problem", f"{path}: invalid TOML ({e}); containerd will not start")
    if data is None:  # pragma: no cover - Python 3.10 without tomli
        found = re.search(r'^\s*config_path\s*=\s*"([^"]*)"', text, re.MULTILINE)
        if found and certs_dir in found[1].split(":"):
            return Check("ok", f'{path}: config_path = "{found[1]}"')
        return Check("warning", f"{path}: cannot check config_path (no TOML reader); see --help")
    disabled = data.get("disabled_plugins")
    if isinstance(disabled, list) and ({"cri", CRI_V2} & {str(x) for x in disabled}):
        return Check(
            "note",
            f"{path}: the CRI plugin is disabled (Docker's containerd.io package does that), so "
            "no kubelet or crictl pulls here; ctr needs --hosts-dir, nerdctl reads "
            f"{CONTAINERD_CERTS} by default",
        )
    raw_version = data.get("version")
    plugins = data.get("plugins")
    v1 = isinstance(plugins, dict) and "cri" in plugins
    # No `version`: containerd 1.x reads the file as version 1 (plugins.cri); one without a
    # plugins.cri section can simply become version 2, the form every 1.x document uses.
    version = raw_version if isinstance(raw_version, int) else (1 if v1 else 2)
    table, registry = _registry_table(data, version)
    registry = registry if isinstance(registry, dict) else None
    config_path = str(registry.get("config_path") or "") if registry else ""
    if config_path:
        roots = [p.rstrip("/") or "/" for p in config_path.split(":") if p]
        if certs_dir in roots:
            return Check("ok", f'{path}: config_path = "{config_path}" includes {certs_dir}')
        return Check(
            "problem",
            f'{path}: config_path = "{config_path}" does not include {certs_dir}, so the '
            "hosts.toml files there are never read; set:",
            (f'config_path = "{certs_dir}"',),
        )
    if registry and registry.get("mirrors"):
        return Check(
            "problem",
            f"{path}: the deprecated registry.mirrors is set, so containerd ignores hosts.toml; "
            "config_path together with it stops containerd from starting. Move those mirrors to "
            "hosts.toml files, delete them, then set config_path",
            _config_path_snippet(table, certs_dir, True),
        )
    if version >= 3 and certs_dir in CONTAINERD_DEFAULT_ROOTS:
        return Check(
            "warning",
            f"{path}: config_path not set: containerd >= 2.2 then reads {certs_dir} by default, "
            "2.0 and 2.1 read nothing; to be sure, set:",
            _config_path_snippet(table, certs_dir, registry is not None),
        )
    prefix = () if raw_version is not None or v1 else ("version = 2   # first line",)
    return Check(
        "problem",
        f"{path}: config_path not set, so the CRI plugin (kubelet, crictl) reads no hosts.toml; "
        "add:",
        (*prefix, *_config_path_snippet(table, certs_dir, registry is not None)),
    )


def hosts_toml_urls(text: str) -> list[str]:
    """The `[host."URL"]` keys and `server` of a hosts.toml; ValueError when it does not parse
    (containerd then ignores the whole file, logging only `failed to decode hosts.toml`)."""
    data = load_toml(text)
    if data is None:  # pragma: no cover - Python 3.10 without tomli
        return re.findall(r'^\s*\[host\."([^"]+)"\]', text, re.MULTILINE)
    hosts = data.get("host")
    urls = [str(u) for u in hosts] if isinstance(hosts, dict) else []
    server = data.get("server")
    return [*urls, server] if isinstance(server, str) else urls


def names_mirror(text: str | None, m: Mirror) -> bool:
    """Whether a hosts.toml text sends pulls to `m` (False for a missing or broken file)."""
    if text is None:
        return False
    try:
        return any(same_endpoint(u, m) for u in hosts_toml_urls(text))
    except ValueError:
        return False


def registry_dir(root: str, certs_dir: str, name: str) -> str:
    """The directory name containerd reads for registry `name`: `<host>_<port>_` when it exists
    (containerd tries that spelling first), else `name` itself (`<host>:<port>`)."""
    host, sep, port = name.rpartition(":")
    if sep and host and port.isdigit():
        alt = f"{host}_{port}_"
        if root_path(root, f"{certs_dir}/{alt}").is_dir():
            return alt
    return name


def shadowing_dirs(root: str, certs_dir: str, m: Mirror, skip: Iterable[str]) -> list[str]:
    """Registry directories under `certs_dir` that hide `_default` without naming the mirror
    (containerd uses the first of <host>_<port>_, <host>, _default that exists: §1.2)."""
    base = root_path(root, certs_dir)
    try:
        entries = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []
    skipped = set(skip)
    return [
        d.name
        for d in entries
        if d.name != "_default"
        and d.name not in skipped
        and not names_mirror(read_text(d / "hosts.toml"), m)
    ]


# --- Docker: daemon.json registry-mirrors ----------------------------------------------------


def merge_registry_mirrors(existing: str | None, m: Mirror, path: str = DAEMON_JSON) -> str:
    """daemon.json with the mirror first in "registry-mirrors"; `existing` itself if present."""
    data = load_json_object(existing, path)
    mirrors = data.get("registry-mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(x, str) for x in mirrors):
        raise GenError(f'{path}: "registry-mirrors" is not a list of URLs; file left untouched')
    if existing is not None and any(same_endpoint(x, m) for x in mirrors):
        return existing
    data["registry-mirrors"] = [m.url, *mirrors]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# --- podman / CRI-O / skopeo: registries.conf.d ----------------------------------------------


@dataclass(slots=True)
class RegistryEntry:
    """A `[[registry]]` as the drop-in writes it: our mirror first, carried-over settings after."""

    prefix: str
    location: str
    mirror_location: str
    keys: dict[str, Any] = field(default_factory=dict)  # carried over: insecure, blocked...
    mirrors: list[dict[str, Any]] = field(default_factory=list)  # carried-over mirrors
    source: str = ""


def registries_of(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    regs = data.get("registry")
    return [r for r in regs if isinstance(r, dict)] if isinstance(regs, list) else []


def prefix_of(reg: Mapping[str, Any]) -> str:
    return str(reg.get("prefix") or reg.get("location") or "")


def is_v1(data: Mapping[str, Any]) -> bool:
    v1 = data.get("registries")
    return isinstance(v1, dict) and bool({"search", "insecure", "block"} & set(v1))


def registries_conf_files(root: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(files read before our drop-in, files after it) as (standard path, text)."""
    before: list[tuple[str, str]] = []
    after: list[tuple[str, str]] = []
    main = read_text(root_path(root, REGISTRIES_CONF))
    if main is not None:
        before.append((REGISTRIES_CONF, main))
    d = root_path(root, REGISTRIES_DIR)
    ours = Path(PODMAN_DROPIN).name
    names = sorted(p.name for p in d.glob("*.conf")) if d.is_dir() else []
    for name in names:
        if name == ours:
            continue
        text = read_text(d / name)
        if text is not None:
            (before if name < ours else after).append((f"{REGISTRIES_DIR}/{name}", text))
    return before, after


def podman_location(name: str, m: Mirror, prefixes: Mapping[str, str]) -> str:
    """`HOST:PORT/<registry>`; a registry with a port needs a configured mirror.prefixes entry,
    because `:` inside a path component is not a valid image reference."""
    if ":" not in name:
        return f"{m.address}/{name}"
    for prefix, registry in prefixes.items():
        if registry == name and "/" not in prefix:
            return f"{m.address}/{prefix}"
    raise GenError(
        f"{name}: a registry with a port (or an IPv6 literal) cannot be the path of a "
        "registries.conf mirror location; give it a prefix in the config (mirror: prefixes: "
        f"myreg: {name}) and pass -c FILE",
        2,
    )


def plan_podman_entries(
    names: list[str],
    m: Mirror,
    prefixes: Mapping[str, str],
    before: list[tuple[str, str]],
    notes: list[str],
) -> list[RegistryEntry]:
    """One entry per registry, carrying over what an earlier file said for the same prefix
    (a drop-in `[[registry]]` replaces it whole: containers-registries.conf.d(5))."""
    earlier: dict[str, tuple[str, dict[str, Any]]] = {}
    for path, text in before:
        try:
            data = load_toml(text)
        except ValueError as e:
            raise GenError(
                f"{path}: invalid TOML ({e}); podman refuses to run with it; fix it first"
            ) from None
        if data is None:  # pragma: no cover - Python 3.10 without tomli
            notes.append(f"cannot read {path} (no TOML reader): its settings are not carried over")
            continue
        if is_v1(data):
            raise GenError(
                f"{path} uses the v1 format ([registries.search] ...); containers/image "
                "refuses to mix it with a v2 drop-in. Convert it to v2 first "
                "(containers-registries.conf(5))"
            )
        for reg in registries_of(data):
            earlier[prefix_of(reg)] = (path, reg)
    entries = []
    for name in names:
        mirror_location = podman_location(name, m, prefixes)
        # location = prefix, docker.io included: containers/image dials registry-1.docker.io
        # for "docker.io" itself (docker/docker_client.go newDockerClient).
        entry = RegistryEntry(name, name, mirror_location)
        if name in earlier:
            path, reg = earlier[name]
            entry.source = path
            entry.location = str(reg.get("location") or name)
            for k, v in reg.items():
                if k not in ("prefix", "location", "mirror") and _toml_value(v) is not None:
                    entry.keys[k] = v
            for mir in reg.get("mirror") or []:
                if isinstance(mir, dict) and str(mir.get("location", "")) != mirror_location:
                    entry.mirrors.append(
                        {k: v for k, v in mir.items() if _toml_value(v) is not None}
                    )
        entries.append(entry)
    return entries


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def render_podman_mirror(entries: list[RegistryEntry], path: str) -> str:
    lines = [
        f"# {path}",
        "# podman, buildah, skopeo and CRI-O pull through fwdproxy's registry mirror first.",
        "# Generated by `fwdproxy gen podman-mirror`; rerun it to update.",
        "# containers/image sends no ns=, so the first path component of each mirror location",
        "# names the upstream registry. insecure = true: the mirror speaks plain HTTP.",
        "# If the mirror fails before the manifest, the registry itself serves the whole image.",
        "# A [[registry]] here replaces the one with the same prefix in registries.conf and in",
        "# earlier drop-ins (their settings are carried over below); a later drop-in with the",
        "# same prefix replaces this one. ~/.config/containers/registries.conf, where it exists,",
        "# hides every drop-in in /etc for that user.",
    ]
    for e in entries:
        lines += ["", "[[registry]]"]
        if e.source:
            lines.append(f"# settings carried over from {e.source}")
        lines += [f"prefix = {json.dumps(e.prefix)}", f"location = {json.dumps(e.location)}"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in e.keys.items()]
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {json.dumps(e.mirror_location)}",
            "insecure = true",
        ]
        for mir in e.mirrors:
            lines += ["", "[[registry.mirror]]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in mir.items()]
    return "\n".join(lines) + "\n"


# --- k3s / RKE2: registries.yaml -------------------------------------------------------------


def merge_registries_yaml(
    existing: str | None, m: Mirror, keys: list[str], path: str, notes: list[str]
) -> str:
    """registries.yaml with the mirror first in `mirrors[k].endpoint` for each key (`*` first);
    `existing` itself when every entry already has it. Other mirrors and `configs` are kept."""
    import yaml

    data: Any = {}
    if existing is not None and existing.strip():
        try:
            data = yaml.safe_load(existing)
        except yaml.YAMLError as e:
            flat = " ".join(str(e).split())
            raise GenError(f"{path}: invalid YAML ({flat}); file left untouched") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise GenError(f"{path}: top level is not a mapping; file left untouched")
    mirrors = data.get("mirrors")
    if mirrors is None:
        mirrors = data["mirrors"] = {}
    if not isinstance(mirrors, dict):
        raise GenError(f"{path}: mirrors: is not a mapping; file left untouched")
    changed = False
    for key in keys:
        entry = mirrors.get(key)
        entry = {} if entry is None else entry
        endpoints = entry.get("endpoint", []) if isinstance(entry, dict) else None
        if not isinstance(endpoints, list) or not all(isinstance(x, str) for x in endpoints):
            raise GenError(
                f"{path}: mirrors.{key}.endpoint is not a list of URLs; file left untouched"
            )
        if not any(same_endpoint(x, m) for x in endpoints):
            entry["endpoint"] = [m.url, *endpoints]
            mirrors[key] = entry
            changed = True
    for key, entry in mirrors.items():
        if key in keys or not isinstance(entry, dict):
            continue
        endpoints = entry.get("endpoint") or []
        if not any(isinstance(x, str) and same_endpoint(x, m) for x in endpoints):
            notes.append(
                f'{path}: mirrors.{key} has its own entry, which k3s uses instead of "*": pulls '
                f"from {key} skip the mirror (rerun with --registry {key} to add it there)"
            )
    if existing is not None and not changed:
        return existing
    if existing and existing.strip() and not existing.startswith(_K3S_HEADER.format(path=path)):
        notes.append(f"{path}: comments in the old file are not kept (see the .bak after --write)")
    head = [
        _K3S_HEADER.format(path=path),
        '# "*" (and any --registry entries) send pulls to fwdproxy\'s mirror first; containerd',
        "# adds ?ns=<registry>, so the mirror knows the upstream. Read at start: restart k3s/RKE2.",
    ]
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body
