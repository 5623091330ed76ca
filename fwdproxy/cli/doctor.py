"""`fwdproxy doctor`: read-only check of the runtimes' proxy settings on this host.

It reads the files `fwdproxy gen` writes (and hand-written ones at the same places), takes the
value each Go runtime will actually use (upper case before lower case, daemon.json over the
environment, CONTAINERD_* over the plain names in k3s/RKE2) and reports what will go wrong:
HTTPS_PROXY missing (Go >= 1.16 ignores HTTP_PROXY for https), a proxy that is not this
fwdproxy, NO_PROXY entries Go never matches, upper/lower case disagreeing, a dead listener.

When a registry mirror is expected (--mirror, or a `mirror:` section in -c FILE) or a runtime is
found pointed at it, it also reports per runtime whether pulls go through the mirror (the files
`gen *-mirror` writes, read back with `mirrorconf`) and whether the mirror answers `GET /v2/`.
The only network calls are a TCP connect to the proxy listener and that one GET to a loopback
mirror address.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from fwdproxy.cli import gen, mirrorconf, noproxy
from fwdproxy.cli.mirrorconf import Mirror, same_endpoint

PROBLEM: Final = "problem"
WARNING: Final = "warning"
NOTE: Final = "note"
OK: Final = "ok"
BASES: Final = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# Registry API hosts users type (the stable part of the catalog): if NO_PROXY covers one of
# them, pulls from it skip fwdproxy and its tunnel rules.
REGISTRY_HOSTS: Final = (
    "registry-1.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
)
Probe = Callable[[str, int, float], "str | None"]
# (HTTP status, Docker-Distribution-API-Version header, error) of GET /v2/ on the mirror.
MirrorProbe = Callable[[str, int, float], "tuple[int | None, str | None, str | None]"]


@dataclass(slots=True)
class Finding:
    level: str
    message: str


@dataclass(slots=True)
class RuntimeReport:
    name: str
    files: list[str]
    settings: dict[str, str]
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Expected:
    url: str
    host: str
    port: int
    any_host: bool = False  # listener bound to a wildcard: any local address will do


@dataclass(frozen=True, slots=True)
class ExpectedMirror:
    mirror: Mirror
    explicit: bool = False  # --mirror or a mirror: section: report even if nothing points at it
    any_host: bool = False  # bound to a wildcard: any local address with that port will do

    def named_by(self, url: str) -> bool:
        return same_endpoint(url, self.mirror, self.any_host)


# --- parsers ---------------------------------------------------------------------------------

_CESC: Final = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "s": " ",
}


def split_systemd_words(value: str) -> list[str]:
    """systemd's extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE), common escapes only."""
    words: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    in_word = False
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            hexdigits = value[i + 2 : i + 4]
            if (
                nxt == "x"
                and len(hexdigits) == 2
                and all(h in "0123456789abcdefABCDEF" for h in hexdigits)
            ):
                cur.append(chr(int(hexdigits, 16)))
                i += 4
            else:
                cur.append(_CESC.get(nxt, nxt))
                i += 2
            in_word = True
            continue
        if quote:
            if c == quote:
                quote = None
            else:
                cur.append(c)
        elif c in "\"'":
            quote, in_word = c, True
        elif c.isspace():
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(c)
            in_word = True
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


def parse_unit_env(text: str) -> tuple[dict[str, str], list[str]]:
    """Environment= assignments and EnvironmentFile= paths from a unit/drop-in's [Service]."""
    env: dict[str, str] = {}
    files: list[str] = []
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        key, sep, value = s.partition("=")
        if section != "Service" or not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Environment":
            if not value:
                env.clear()
            for word in split_systemd_words(value):
                k, eq, v = word.partition("=")
                if eq:
                    env[k] = v.replace("%%", "%")
        elif key == "EnvironmentFile":
            if not value:
                files.clear()
            files.extend(value.split())
    return env, files


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= (and k3s/RKE2) read them."""
    env: dict[str, str] = {}
    for line in text.replace("\\\n", "").splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        s = s.removeprefix("export ").lstrip()
        key, sep, value = s.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = "".join(split_systemd_words(value)) if value[1:-1] else ""
        env[key.strip()] = value
    return env


def podman_engine_env(text: str) -> list[str] | None:
    """[engine] env of a containers.conf; None when the file does not set it."""
    if sys.version_info >= (3, 11):
        import tomllib as toml
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as toml
        except ImportError:
            return _podman_env_fallback(text)
    try:
        engine = toml.loads(text).get("engine", {})
    except toml.TOMLDecodeError:
        return _podman_env_fallback(text)
    env = engine.get("env") if isinstance(engine, dict) else None
    return [str(x) for x in env] if isinstance(env, list) else None


def _podman_env_fallback(text: str) -> list[str] | None:
    """`env = [...]` under [engine], strings only: enough for files we and people write."""
    section = ""
    lines = iter(text.splitlines())
    for line in lines:
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1].strip()
        elif section == "engine" and re.match(r"env\s*=\s*\[", s):
            body = s.split("[", 1)[1]
            while not re.search(r"\]\s*(#.*)?$", body):
                body += "\n" + next(lines, "]")
            return [
                _toml_unescape(m[1]) if m[1] is not None else m[2] for m in _TOML_STR.finditer(body)
            ]
    return None


_TOML_STR: Final = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'')
_TOML_ESC: Final = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _toml_unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: _TOML_ESC.get(m.group(1), m.group(1)), s)


# --- checks ----------------------------------------------------------------------------------


def pick(env: Mapping[str, str], base: str, prefix: str = "") -> tuple[str, str] | None:
    """(name, value) the runtime uses: PREFIX+NAME, then NAME, then name; empty means unset."""
    for name in (prefix + base, base, base.lower()) if prefix else (base, base.lower()):
        if env.get(name):
            return name, env[name]
    return None


def _same_host(a: str, b: str) -> bool:
    def norm(h: str) -> str:
        h = h.strip("[]").lower()
        ip = noproxy.go_parse_ip(h)
        if h == "localhost" or (ip is not None and ip.is_loopback):
            return "loopback"
        return str(ip) if ip is not None else h

    return norm(a) == norm(b)


def check_proxy_value(name: str, value: str, exp: Expected) -> Finding:
    raw = value.strip() if "://" in value else "http://" + value.strip()
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return Finding(
            PROBLEM,
            f"{name}={value}: https:// to a plain listener fails "
            "('first record does not look like a TLS handshake'); use http://",
        )
    if scheme == "socks5h":
        return Finding(
            PROBLEM,
            f"{name}={value}: older Go rejects socks5h:// "
            "('lookup socks5h: no such host'); use http://",
        )
    if scheme not in ("http", "socks5"):
        return Finding(PROBLEM, f"{name}={value}: scheme {scheme!r} is not one Go supports")
    try:
        port = parts.port or {"http": 80, "socks5": 1080}[scheme]
    except ValueError:
        return Finding(PROBLEM, f"{name}={value}: invalid port")
    host = parts.hostname or ""
    if port != exp.port or not (exp.any_host or _same_host(host, exp.host)):
        return Finding(PROBLEM, f"{name}={value} does not point at this fwdproxy ({exp.url})")
    return Finding(OK, f"{name} points at fwdproxy ({value})")


def check_settings(env: Mapping[str, str], exp: Expected, prefix: str = "") -> list[Finding]:
    out: list[Finding] = []
    for base in BASES:
        for pre in dict.fromkeys((prefix, "")):
            up, lo = env.get(pre + base), env.get((pre + base).lower())
            if up and lo and up != lo:
                out.append(
                    Finding(
                        PROBLEM,
                        f"{pre + base} and {(pre + base).lower()} differ: "
                        "Go uses upper case, curl/wget/Python lower case",
                    )
                )
    http, https, nop = (pick(env, b, prefix) for b in BASES)
    if https is None:
        why = "HTTPS_PROXY missing: Go >= 1.16 ignores HTTP_PROXY for https://, so pulls "
        out.append(Finding(PROBLEM, why + "go direct, not through fwdproxy"))
    for got in (https, http):
        if got:
            out.append(check_proxy_value(*got, exp))
    if https and http is None:
        out.append(Finding(WARNING, "HTTP_PROXY unset: plain-http registries go direct"))
    if nop:
        out += [Finding(level, f"{nop[0]}: {msg}") for level, msg in noproxy.lint_no_proxy(nop[1])]
        hit = [h for h in REGISTRY_HOSTS if noproxy.go_bypasses(nop[1], h, 443)]
        if hit:
            out.append(Finding(PROBLEM, f"{nop[0]} bypasses fwdproxy for {', '.join(hit)}"))
    return out


def probe_tcp(host: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connect succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


# --- sources ---------------------------------------------------------------------------------

DROPINS: Final = (
    ("docker", "docker.service"),
    ("containerd", "containerd.service"),
    ("crio", "crio.service"),
)
ENV_FILES: Final = (
    ("k3s", "/etc/systemd/system/k3s.service.env"),
    ("k3s-agent", "/etc/systemd/system/k3s-agent.service.env"),
    ("rke2-server", "/etc/default/rke2-server"),
    ("rke2-agent", "/etc/default/rke2-agent"),
)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _dropin_source(root: Path, name: str, unit: str) -> RuntimeReport | None:
    d = root / "etc/systemd/system" / f"{unit}.d"
    confs = sorted(d.glob("*.conf")) if d.is_dir() else []
    if not confs:
        return None
    files = [str(p) for p in confs]
    # systemd merges the drop-ins in name order (an empty Environment= resets earlier ones)
    # and applies every EnvironmentFile= after all Environment= lines.
    env, env_files = parse_unit_env("\n".join(_read(p) or "" for p in confs))
    for f in env_files:
        fp = root / f.lstrip("-").lstrip("/")
        text = _read(fp)
        if text is not None:
            files.append(str(fp))
            env.update(parse_env_file(text))
    return RuntimeReport(f"{name} (systemd drop-in)", files, env)


def _daemon_json_source(root: Path) -> RuntimeReport | None:
    path = root / "etc/docker/daemon.json"
    text = _read(path)
    if text is None:
        return None
    rep = RuntimeReport("docker (daemon.json)", [str(path)], {})
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        msg = f"invalid JSON at line {e.lineno}, column {e.colno}: dockerd will not start"
        rep.findings.append(Finding(PROBLEM, msg))
        return rep
    proxies = data.get("proxies") if isinstance(data, dict) else None
    if isinstance(proxies, dict):
        for key, base in zip(("http-proxy", "https-proxy", "no-proxy"), BASES, strict=True):
            if isinstance(proxies.get(key), str):
                rep.settings[base] = proxies[key]
    return rep


def _podman_source(root: Path) -> RuntimeReport | None:
    base = root / "etc/containers"
    paths = [base / "containers.conf"]
    d = base / "containers.conf.d"
    paths += sorted(d.glob("*.conf")) if d.is_dir() else []
    env_list: list[str] | None = None
    files = []
    for p in paths:
        text = _read(p)
        if text is None:
            continue
        files.append(str(p))
        found = podman_engine_env(text)
        env_list = found if found is not None else env_list  # later files replace the list
    if not files:
        return None
    env = dict(x.split("=", 1) for x in env_list or [] if "=" in x)
    return RuntimeReport("podman (containers.conf [engine] env)", files, env)


def collect(root: Path) -> list[RuntimeReport]:
    reports = [r for n, u in DROPINS[:1] if (r := _dropin_source(root, n, u))]
    reports += [r for r in (_daemon_json_source(root),) if r]
    reports += [r for n, u in DROPINS[1:] if (r := _dropin_source(root, n, u))]
    reports += [r for r in (_podman_source(root),) if r]
    for name, path in ENV_FILES:
        p = root / path.lstrip("/")
        text = _read(p)
        if text is not None:
            reports.append(RuntimeReport(f"{name} (env file)", [str(p)], parse_env_file(text)))
    return reports


# --- mirror ----------------------------------------------------------------------------------


def probe_mirror(
    host: str, port: int, timeout_s: float
) -> tuple[int | None, str | None, str | None]:
    """GET /v2/ over plain HTTP, straight to the address (http.client uses no proxy)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/v2/", headers={"User-Agent": "fwdproxy-doctor"})
        resp = conn.getresponse()
        resp.read(65536)
        return resp.status, resp.getheader("Docker-Distribution-API-Version"), None
    except (OSError, http.client.HTTPException) as e:
        return None, None, str(e) or type(e).__name__
    finally:
        conn.close()


def _hosts_dir_findings(
    root: Path, certs_dir: str, exp: ExpectedMirror, who: str, missing: str = WARNING
) -> tuple[list[str], list[Finding], bool]:
    """(files, findings, pointed) for a containerd hosts directory. `missing` is the level for
    "_default does not send pulls to the mirror"; a registry directory of its own hides
    _default (mirrors.md §1.2), so one without the mirror is reported too."""
    base = root / certs_dir.lstrip("/")
    dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    files: list[str] = []
    out: list[Finding] = []
    named: list[str] = []
    bypass: list[str] = []
    for d in [base / "_default", *(p for p in dirs if p.name != "_default")]:
        path = d / "hosts.toml"
        text = _read(path)
        urls: list[str] = []
        if text is not None:
            files.append(str(path))
            try:
                urls = mirrorconf.hosts_toml_urls(text)
            except ValueError as e:
                where = f"{certs_dir}/{d.name}/hosts.toml"
                out.append(Finding(PROBLEM, f"{where}: invalid TOML ({e}); {who} ignores it"))
        if any(exp.named_by(u) for u in urls):
            named.append(d.name)
        elif d.name != "_default":
            bypass.append(d.name)
    if "_default" in named:
        out.append(Finding(OK, f"{certs_dir}/_default/hosts.toml sends {who} pulls to the mirror"))
    else:
        msg = f"{certs_dir}/_default/hosts.toml does not name {exp.mirror.url}: {who} pulls skip it"
        out.append(Finding(missing, msg))
    specific = [n for n in named if n != "_default"]
    if specific:
        out.append(Finding(OK, f"registry directories naming the mirror: {', '.join(specific)}"))
    if "_default" in named and bypass:
        out.append(
            Finding(
                WARNING,
                f"{certs_dir}: {mirrorconf.own(bypass, 'a directory', 'directories')} "
                "without the mirror; such a directory hides _default, so those pulls skip the "
                "mirror (gen ... --registry R)",
            )
        )
    return files, out, bool(named)


def _containerd_mirror(root: Path, exp: ExpectedMirror) -> tuple[RuntimeReport, bool] | None:
    if not (root / "etc/containerd").is_dir():
        return None
    files, findings, pointed = _hosts_dir_findings(
        root, mirrorconf.CONTAINERD_CERTS, exp, "containerd"
    )
    rep = RuntimeReport("containerd (mirror)", files, {}, findings)
    if pointed:
        cfg = root / mirrorconf.CONTAINERD_CONFIG.lstrip("/")
        text = _read(cfg)
        if text is not None:
            rep.files.append(str(cfg))
        check = mirrorconf.check_containerd_config(text)
        message = " ".join([check.message, *(line.strip() for line in check.snippet)])
        rep.findings.append(Finding(check.level, message))
    return rep, pointed


def _docker_mirror(root: Path, exp: ExpectedMirror) -> tuple[RuntimeReport, bool] | None:
    if not (root / "etc/docker").is_dir():
        return None
    rep = RuntimeReport("docker (mirror)", [], {})
    path = root / mirrorconf.DAEMON_JSON.lstrip("/")
    text = _read(path)
    mirrors: list[Any] = []
    if text is not None:
        rep.files.append(str(path))
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            data = {}  # reported by the daemon.json proxy check
        found = data.get("registry-mirrors") if isinstance(data, dict) else None
        mirrors = found if isinstance(found, list) else []
    classic = any(isinstance(u, str) and exp.named_by(u) for u in mirrors)
    if classic:
        rep.findings.append(
            Finding(OK, '"registry-mirrors" has the mirror (classic store: Docker Hub only)')
        )
    else:
        rep.findings.append(
            Finding(
                WARNING,
                'no "registry-mirrors" entry for the mirror: classic-store pulls '
                "skip it (fwdproxy gen docker-mirror --write)",
            )
        )
    files, findings, pointed = _hosts_dir_findings(
        root,
        mirrorconf.DOCKER_CERTS,
        exp,
        "Docker >= 28 containerd-store",
        NOTE if classic else WARNING,
    )
    rep.files += files
    rep.findings += findings
    return rep, classic or pointed


def _podman_mirror(root: Path, exp: ExpectedMirror) -> tuple[RuntimeReport, bool] | None:
    if not (root / "etc/containers").is_dir():
        return None
    rep = RuntimeReport("podman/CRI-O (mirror)", [], {})
    paths = [root / mirrorconf.REGISTRIES_CONF.lstrip("/")]
    d = root / mirrorconf.REGISTRIES_DIR.lstrip("/")
    paths += sorted(d.glob("*.conf")) if d.is_dir() else []
    effective: dict[str, tuple[str, dict[str, Any]]] = {}
    for p in paths:
        text = _read(p)
        if text is None:
            continue
        rep.files.append(str(p))
        try:
            data = mirrorconf.load_toml(text)
        except ValueError as e:
            rep.findings.append(
                Finding(PROBLEM, f"{p.name}: invalid TOML ({e}); podman refuses it")
            )
            continue
        for reg in mirrorconf.registries_of(data or {}):
            effective[mirrorconf.prefix_of(reg)] = (p.name, reg)  # a later file replaces it
    through = []
    for prefix, (name, reg) in effective.items():
        for mir in reg.get("mirror") or []:
            loc = str(mir.get("location", "")) if isinstance(mir, dict) else ""
            if not exp.named_by(loc):
                continue
            through.append(prefix)
            if mir.get("insecure") is not True:
                rep.findings.append(
                    Finding(
                        PROBLEM,
                        f"{name}: mirror {loc} for {prefix} lacks insecure = true; "
                        "the mirror is plain HTTP, so pulls skip it",
                    )
                )
            if "/" not in loc.strip("/") and prefix.split("/")[0] != "docker.io":
                rep.findings.append(
                    Finding(
                        PROBLEM,
                        f"{name}: mirror {loc} for {prefix} has no /<registry> "
                        "path, so the mirror fetches from its default registry (Docker Hub)",
                    )
                )
    if through:
        shown = ", ".join(through[:6]) + (
            f" and {len(through) - 6} more" if len(through) > 6 else ""
        )
        n = len(through)
        rep.findings.append(
            Finding(
                OK, f"{n} registr{'y pulls' if n == 1 else 'ies pull'} through the mirror: {shown}"
            )
        )
    else:
        rep.findings.append(
            Finding(
                WARNING,
                "no registries.conf mirror names the mirror: pulls skip it "
                "(fwdproxy gen podman-mirror --write)",
            )
        )
    return rep, bool(through)


def _k3s_mirror(
    root: Path, exp: ExpectedMirror, name: str, path: str
) -> tuple[RuntimeReport, bool] | None:
    if not (root / "etc/rancher" / name).is_dir():
        return None
    import yaml

    rep = RuntimeReport(f"{name} (mirror)", [], {})
    p = root / path.lstrip("/")
    text = _read(p)
    if text is None:
        rep.findings.append(
            Finding(WARNING, f"no {path}: pulls skip the mirror (fwdproxy gen k3s-mirror --write)")
        )
        return rep, False
    rep.files.append(str(p))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        rep.findings.append(Finding(PROBLEM, f"invalid YAML ({e}); {name} cannot read it"))
        return rep, False
    mirrors = data.get("mirrors") if isinstance(data, dict) else None
    mirrors = mirrors if isinstance(mirrors, dict) else {}

    def points(key: Any) -> bool:
        entry = mirrors.get(key)
        eps = entry.get("endpoint") if isinstance(entry, dict) else None
        return isinstance(eps, list) and any(isinstance(u, str) and exp.named_by(u) for u in eps)

    star = points("*")
    named = [str(k) for k in mirrors if k != "*" and points(k)]
    hidden = [str(k) for k in mirrors if k != "*" and not points(k)]
    if star:
        rep.findings.append(Finding(OK, '"*" sends every registry to the mirror'))
    else:
        rep.findings.append(Finding(WARNING, 'no "*" mirror entry naming the mirror'))
    if named:
        rep.findings.append(Finding(OK, f"entries naming the mirror: {', '.join(named)}"))
    if star and hidden:
        rep.findings.append(
            Finding(
                WARNING,
                f"{mirrorconf.own(hidden, 'an entry', 'entries')} without the mirror; k3s uses "
                'such an entry instead of "*", so those pulls skip it',
            )
        )
    return rep, star or bool(named)


def mirror_reports(root: Path, exp: ExpectedMirror) -> tuple[list[RuntimeReport], bool]:
    """Per runtime present under `root`: is it pointed at the mirror? (reports, any pointed)"""
    found = [
        _containerd_mirror(root, exp),
        _docker_mirror(root, exp),
        _podman_mirror(root, exp),
        _k3s_mirror(root, exp, "k3s", mirrorconf.K3S_REGISTRIES),
        _k3s_mirror(root, exp, "rke2", mirrorconf.RKE2_REGISTRIES),
    ]
    reports = [r for r, _ in (f for f in found if f)]
    return reports, any(p for _, p in (f for f in found if f))


def check_mirror(
    exp: ExpectedMirror, pointed: bool, probe: MirrorProbe
) -> tuple[dict[str, Any], list[Finding]]:
    """Whether the mirror answers GET /v2/; only a loopback address is ever probed."""
    m = exp.mirror
    info: dict[str, Any] = {"address": m.address, "probed": False, "status": None, "error": None}
    if not m.loopback:
        note = f"mirror {m.address}: not probed (doctor only probes loopback addresses)"
        return info, [Finding(NOTE, note)]
    status, api, err = probe(m.host, m.port, 2.0)
    info.update(probed=True, status=status, error=err)
    if err is not None:
        why = "; runtimes pointed at it fall back to the registries (slower, uncached)"
        level = WARNING if pointed else NOTE
        return info, [
            Finding(
                level,
                f"mirror {m.address} is not answering ({err}), /v2/ check "
                f"skipped{why if pointed else ''}",
            )
        ]
    if status in (200, 401):
        out = [Finding(OK, f"mirror {m.address} answers GET /v2/ ({status})")]
        if api != "registry/2.0":
            out.append(
                Finding(
                    NOTE,
                    f"mirror {m.address}: no Docker-Distribution-API-Version: registry/2.0 header",
                )
            )
        return info, out
    return info, [
        Finding(
            PROBLEM,
            f"{m.address} answers GET /v2/ with {status}: not a registry "
            "mirror (another service on that port?)",
        )
    ]


def _has_proxy(rep: RuntimeReport) -> bool:
    return any(k.upper().removeprefix("CONTAINERD_") in BASES for k in rep.settings)


def diagnose(
    root: Path,
    exp: Expected,
    probe: Probe = probe_tcp,
    mirror: ExpectedMirror | None = None,
    mirror_probe: MirrorProbe = probe_mirror,
) -> dict[str, Any]:
    """The whole report as plain data (the --json output). The mirror part appears when the
    mirror is expected or some runtime points at it; `report["mirror"]` is None otherwise."""
    reports = collect(root)
    configured = []
    for rep in reports:
        if rep.findings or not _has_proxy(rep):
            if not rep.findings:
                rep.findings.append(Finding(NOTE, "present, but sets no proxy"))
            continue
        prefix = "CONTAINERD_" if rep.name.endswith("(env file)") else ""
        rep.findings += check_settings(rep.settings, exp, prefix)
        if rep.name.startswith("docker (daemon.json)"):
            rep.findings.append(
                Finding(
                    NOTE,
                    '"proxies" needs Docker Engine >= 23.0; older '
                    "engines (Debian 12: 20.10) ignore it, use a drop-in",
                )
            )
        configured.append(rep)
    global_findings: list[Finding] = []
    docker = [
        [(pick(r.settings, b) or ("", ""))[1] for b in BASES]
        for r in configured
        if r.name.startswith("docker")
    ]
    if len(docker) == 2 and docker[0] != docker[1]:
        global_findings.append(
            Finding(
                WARNING,
                "docker: drop-in and daemon.json disagree; "
                "daemon.json wins on Engine >= 23, the drop-in before",
            )
        )
    mirror_runtimes: list[RuntimeReport] = []
    mirror_info: dict[str, Any] | None = None
    mirror_findings: list[Finding] = []
    if mirror is not None:
        mirror_runtimes, pointed = mirror_reports(root, mirror)
        if mirror.explicit or pointed:
            mirror_info, mirror_findings = check_mirror(mirror, pointed, mirror_probe)
            mirror_info["pointed"] = pointed
        else:
            mirror_runtimes = []
    if not configured:
        if mirror_info and mirror_info["pointed"]:
            msg = "no container runtime uses fwdproxy as a proxy: only mirrored pulls go through it"
            global_findings.append(Finding(WARNING, msg))
        else:
            global_findings.append(
                Finding(
                    PROBLEM,
                    "no container runtime is configured to use a proxy; see `fwdproxy gen --help`",
                )
            )
    err = probe(exp.host, exp.port, 1.0)
    listener = {
        "address": gen.format_hostport(exp.host, exp.port),
        "reachable": err is None,
        "error": err,
    }
    if err is not None:
        global_findings.append(
            Finding(PROBLEM, f"fwdproxy listener {listener['address']} is not reachable: {err}")
        )
    global_findings += mirror_findings
    reports += mirror_runtimes
    every = global_findings + [f for r in reports for f in r.findings]
    problems = sum(f.level == PROBLEM for f in every)
    return {
        "root": str(root),
        "proxy": exp.url,
        "listener": listener,
        "mirror": mirror_info,
        "runtimes": [asdict(r) for r in reports],
        "findings": [asdict(f) for f in global_findings],
        "problems": problems,
        "warnings": sum(f.level == WARNING for f in every),
        "ok": problems == 0,
    }


def render_text(report: Mapping[str, Any]) -> str:
    lines = [f"fwdproxy doctor: expecting {report['proxy']} (root {report['root']})"]
    lst = report["listener"]
    state = "reachable" if lst["reachable"] else f"NOT reachable ({lst['error']})"
    lines.append(f"listener {lst['address']}: {state}")
    mir = report.get("mirror")
    if mir:
        if not mir["probed"]:
            lines.append(f"mirror {mir['address']}: not probed")
        elif mir["error"]:
            lines.append(f"mirror {mir['address']}: not answering ({mir['error']})")
        else:
            lines.append(f"mirror {mir['address']}: GET /v2/ -> {mir['status']}")
    for r in report["runtimes"]:
        lines.append(f"{r['name']}: {', '.join(r['files'])}")
        lines += [f"  {f['level'].upper():<8} {f['message']}" for f in r["findings"]]
    lines += [f"{f['level'].upper():<8} {f['message']}" for f in report["findings"]]
    if report["ok"]:
        lines.append(f"result: all good ({report['warnings']} warning(s))")
    else:
        lines.append(f"result: {report['problems']} problem(s), {report['warnings']} warning(s)")
    return "\n".join(lines) + "\n"


# --- command ---------------------------------------------------------------------------------

EXAMPLES: Final = """\
examples:
  fwdproxy doctor                          # check this host against http://127.0.0.1:3128
  fwdproxy doctor -c /etc/fwdproxy/rules.yaml   # expect the config's first listener
  fwdproxy doctor --proxy http://172.17.0.1:3128 --json
  fwdproxy doctor --root /tmp/stage        # check files staged by `fwdproxy gen --root`
  fwdproxy doctor --mirror 127.0.0.1:5000  # also check the runtimes against the registry mirror

It reads (under --root): docker/containerd/crio drop-ins in /etc/systemd/system/*.service.d/,
/etc/docker/daemon.json, /etc/containers/containers.conf(.d), k3s/k3s-agent .service.env and
/etc/default/rke2-{server,agent}. Exit status 0: all good; 1: problems found.

Mirror checks (with --mirror, a mirror: section in -c FILE, or any runtime pointed at
127.0.0.1:5000): containerd and Docker certs.d/*/hosts.toml and containerd's config_path,
daemon.json "registry-mirrors", registries.conf(.d) mirrors, k3s/RKE2 registries.yaml; then
GET /v2/ on the mirror if its address is loopback (a mirror that is not running is skipped).
To see what a running daemon really has: systemctl show --property=Environment docker
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `doctor` to the CLI's subparsers; it sets func=main."""
    p = subparsers.add_parser(
        "doctor",
        help="check the container runtimes' proxy and mirror settings (read-only)",
        description="Check that the container runtimes on this host use fwdproxy correctly.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_proxy_args(p)
    p.add_argument(
        "--mirror",
        metavar="HOST:PORT",
        help="expect the registry mirror here (default: mirror.listen of -c FILE, else "
        f"{mirrorconf.DEFAULT_MIRROR} when a runtime points there)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=main)
    return p


def expected_from_args(args: argparse.Namespace) -> Expected:
    url = gen.resolve_proxy(args)
    parts = urlsplit(url)
    any_host = False
    if not getattr(args, "proxy", None) and getattr(args, "config", None):
        any_host = _config_is_wildcard(args.config)
    return Expected(url, parts.hostname or "127.0.0.1", parts.port or 3128, any_host)


def expected_mirror(args: argparse.Namespace) -> ExpectedMirror:
    """--mirror, else the config's mirror listener, else the default (reported only if used)."""
    if getattr(args, "mirror", None) is not None:
        return ExpectedMirror(mirrorconf.parse_mirror_address(args.mirror), explicit=True)
    if getattr(args, "config", None):
        from fwdproxy.config import load_config

        spec = getattr(load_config(args.config), "mirror", None)
        if spec is not None and int(spec.listeners[0].port):
            host = str(spec.listeners[0].host).strip("[]")
            wildcard = host in ("", "0.0.0.0", "::")
            m = Mirror("127.0.0.1" if wildcard else host, int(spec.listeners[0].port))
            return ExpectedMirror(m, explicit=True, any_host=wildcard)
    return ExpectedMirror(mirrorconf.parse_mirror_address(mirrorconf.DEFAULT_MIRROR))


def _config_is_wildcard(path: str) -> bool:
    from fwdproxy.config import load_config

    host = str(load_config(path).listeners[0].host).strip("[]")
    ip = noproxy.go_parse_ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


def main(
    args: argparse.Namespace, probe: Probe = probe_tcp, mirror_probe: MirrorProbe = probe_mirror
) -> int:
    try:
        exp = expected_from_args(args)
        mirror = expected_mirror(args)
    except gen.GenError as e:
        print(f"fwdproxy doctor: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # someone else's config loader: one clear line, not a traceback
        print(f"fwdproxy doctor: error: cannot read {args.config}: {e}", file=sys.stderr)
        return 1
    report = diagnose(Path(args.root), exp, probe, mirror, mirror_probe)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
    return 0 if report["ok"] else 1


def run(argv: list[str], probe: Probe = probe_tcp, mirror_probe: MirrorProbe = probe_mirror) -> int:
    """`fwdproxy doctor ARGV...` without cli.py (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="fwdproxy")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["doctor", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return main(args, probe, mirror_probe)
