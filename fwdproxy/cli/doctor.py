"""`fwdproxy doctor`: read-only check of the runtimes' proxy settings on this host.

It reads the files `fwdproxy gen` writes (and hand-written ones at the same places), takes the
value each Go runtime will actually use (upper case before lower case, daemon.json over the
environment, CONTAINERD_* over the plain names in k3s/RKE2) and reports what will go wrong:
HTTPS_PROXY missing (Go >= 1.16 ignores HTTP_PROXY for https), a proxy that is not this
fwdproxy, NO_PROXY entries Go never matches, upper/lower case disagreeing, a dead listener.
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

from fwdproxy.cli import gen, noproxy

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


def _has_proxy(rep: RuntimeReport) -> bool:
    return any(k.upper().removeprefix("CONTAINERD_") in BASES for k in rep.settings)


def diagnose(root: Path, exp: Expected, probe: Probe = probe_tcp) -> dict[str, Any]:
    """The whole report as plain data (the --json output)."""
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
    if not configured:
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
    every = global_findings + [f for r in reports for f in r.findings]
    problems = sum(f.level == PROBLEM for f in every)
    return {
        "root": str(root),
        "proxy": exp.url,
        "listener": listener,
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

It reads (under --root): docker/containerd/crio drop-ins in /etc/systemd/system/*.service.d/,
/etc/docker/daemon.json, /etc/containers/containers.conf(.d), k3s/k3s-agent .service.env and
/etc/default/rke2-{server,agent}. Exit status 0: all good; 1: problems found.
To see what a running daemon really has: systemctl show --property=Environment docker
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `doctor` to the CLI's subparsers; it sets func=main."""
    p = subparsers.add_parser(
        "doctor",
        help="check the container runtimes' proxy settings (read-only)",
        description="Check that the container runtimes on this host use fwdproxy correctly.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_proxy_args(p)
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


def _config_is_wildcard(path: str) -> bool:
    from fwdproxy.config import load_config

    host = str(load_config(path).listeners[0].host).strip("[]")
    ip = noproxy.go_parse_ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


def main(args: argparse.Namespace, probe: Probe = probe_tcp) -> int:
    try:
        exp = expected_from_args(args)
    except gen.GenError as e:
        print(f"fwdproxy doctor: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # someone else's config loader: one clear line, not a traceback
        print(f"fwdproxy doctor: error: cannot read {args.config}: {e}", file=sys.stderr)
        return 1
    report = diagnose(Path(args.root), exp, probe)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
    return 0 if report["ok"] else 1


def run(argv: list[str], probe: Probe = probe_tcp) -> int:
    """`fwdproxy doctor ARGV...` without cli.py (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="fwdproxy")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["doctor", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return main(args, probe)
