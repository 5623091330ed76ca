"""`fwdproxy gen TARGET`: proxy settings for container runtimes, in each consumer's own syntax.

The `*-mirror` targets (registry mirror instead of proxy) live in `genmirror`, the `kubernetes`
target (a kustomize overlay of deploy/kubernetes) in `genkube`; this module owns the command
line for all of them.

Every runtime here is a Go program, so the values follow Go's rules (registries.md §2/§3):
HTTPS_PROXY must be set (Go >= 1.16 never falls back to HTTP_PROXY for https), proxy URLs use
http:// (the listener speaks plain HTTP CONNECT), and NO_PROXY is built by `noproxy`.
Writes are atomic, keep a `.bak` of a different previous file and are idempotent; nothing is
ever restarted, the user is told what to restart.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from fwdproxy.cli import genkube, genmirror, noproxy
from fwdproxy.cli.genfiles import GenError, load_json_object, read_text, root_path, write_file

DEFAULT_PROXY: Final = "http://127.0.0.1:3128"
_SAFE_URL: Final = re.compile(r"^[A-Za-z0-9._~%!&()*+,;=:@/\[\]-]+$")
_BEGIN: Final = "# BEGIN fwdproxy"
_END: Final = "# END fwdproxy"
# Every spelling a Go runtime (or k3s/RKE2 for its embedded containerd) reads a proxy from:
# an old value under any of them could silently win over ours, so an env-file merge drops them.
_PROXY_KEYS: Final = frozenset(
    f"{pre}{k}" for k in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") for pre in ("", "CONTAINERD_")
) | {"http_proxy", "https_proxy", "no_proxy"}


@dataclass(frozen=True, slots=True)
class Settings:
    proxy: str  # http://host:port, no trailing slash
    no_proxy: tuple[str, ...]

    @property
    def no_proxy_value(self) -> str:
        return ",".join(self.no_proxy)

    def cidr_comment(self) -> list[str]:
        cidrs = noproxy.cidr_entries(self.no_proxy)
        if not cidrs:
            return []
        return [
            "# CIDR entries only apply when the request host is an IP literal (Go rules):",
            f"#   {', '.join(cidrs)}",
            "# Names inside those ranges need their own entry (.svc/.cluster.local cover k8s).",
        ]


def env_pairs(s: Settings, lower: bool = True, prefix: str = "") -> list[tuple[str, str]]:
    pairs = [("HTTP_PROXY", s.proxy), ("HTTPS_PROXY", s.proxy), ("NO_PROXY", s.no_proxy_value)]
    out = [(prefix + k, v) for k, v in pairs]
    return out + [(k.lower(), v) for k, v in pairs] if lower else out


# --- proxy address ---------------------------------------------------------------------------


def normalise_proxy_url(url: str) -> str:
    """`http://host:port` from a URL or bare host:port; only http:// reaches the listener."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    if not _SAFE_URL.match(raw.split("://", 1)[1]):
        raise GenError(f"--proxy {url!r}: blanks, quotes, '$' and '\\' are not allowed", 2)
    parts = urlsplit(raw)
    if parts.scheme != "http":
        raise GenError(
            f"--proxy {url!r}: use an http:// URL; fwdproxy's listener is plain HTTP CONNECT "
            "(https:// fails with 'first record does not look like a TLS handshake')",
            2,
        )
    try:
        port = parts.port
    except ValueError:
        raise GenError(f"--proxy {url!r}: invalid port", 2) from None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise GenError(f"--proxy {url!r}: expected http://HOST:PORT", 2)
    return f"http://{parts.netloc}"


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def proxy_from_config(path: str) -> str:
    """The first listener of a fwdproxy config; a wildcard bind means 127.0.0.1 locally."""
    try:
        from fwdproxy.config import load_config

        cfg = load_config(path)
        listener = cfg.listeners[0]
        host, port = str(listener.host), int(listener.port)
    except Exception as e:  # any failure of someone else's loader becomes one clear message
        msg = f"cannot read the listener from {path}: {e}; pass --proxy URL instead"
        raise GenError(msg) from None
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return normalise_proxy_url(f"http://{format_hostport(host, port)}")


def resolve_proxy(args: argparse.Namespace) -> str:
    if getattr(args, "proxy", None):
        return normalise_proxy_url(args.proxy)
    if getattr(args, "config", None):
        return proxy_from_config(args.config)
    return DEFAULT_PROXY


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--proxy",
        metavar="URL",
        help=f"fwdproxy's address (default: the first listener of -c FILE, else {DEFAULT_PROXY})",
    )
    p.add_argument(
        "-c", "--config", metavar="FILE", help="fwdproxy config to take the listener from"
    )
    p.add_argument("--root", metavar="DIR", default="/", help="prefix for every path (default: /)")


# --- renderers -------------------------------------------------------------------------------


def systemd_quote(key: str, value: str) -> str:
    """Environment="K=V" with `%` -> `%%` (specifiers) and C escapes for `"` and `\\`."""
    kv = f"{key}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{kv}"'


def render_dropin(s: Settings, path: str, unit: str) -> str:
    lines = [
        f"# {path}",
        f"# Points {unit} at fwdproxy. Generated by `fwdproxy gen`; rerun it to update.",
        "# NO_PROXY is a shortcut, not a requirement: fwdproxy connects unlisted hosts directly.",
        *s.cidr_comment(),
        "",
        "[Unit]",
        "# Start after fwdproxy when both are installed; Wants= is weak, so a missing",
        "# fwdproxy.service never blocks this unit.",
        "Wants=fwdproxy.service",
        "After=fwdproxy.service",
        "",
        "[Service]",
        "# Go reads the upper-case names first; lower case is for child tools (curl, wget...).",
        *(systemd_quote(k, v) for k, v in env_pairs(s)),
    ]
    return "\n".join(lines) + "\n"


def daemon_json_block(s: Settings) -> dict[str, str]:
    return {"http-proxy": s.proxy, "https-proxy": s.proxy, "no-proxy": s.no_proxy_value}


def render_daemon_json(s: Settings, existing: str | None = None, path: str = "") -> str:
    """A daemon.json with the proxies block merged in; every other key keeps its place."""
    data = load_json_object(existing, path)
    proxies = data.get("proxies")
    if not isinstance(proxies, dict):
        proxies = {}
    data["proxies"] = {**proxies, **daemon_json_block(s)}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _toml_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_podman(s: Settings, path: str) -> str:
    lines = [
        f"# {path}",
        "# Proxy for podman/buildah/skopeo themselves (pulls, pushes); from `fwdproxy gen`.",
        "# [engine] env is not passed into containers. A later containers.conf.d file or",
        "# ~/.config/containers/containers.conf that sets [engine] env replaces this list.",
        '# Without this file: export the variables in the shell (eval "$(fwdproxy gen env)"),',
        "# or for podman under systemd (quadlet, podman.service) use an EnvironmentFile= written",
        "# by `fwdproxy gen env --env-file`.",
        *s.cidr_comment(),
        "",
        "[engine]",
        "env = [",
        *(f"  {_toml_str(f'{k}={v}')}," for k, v in env_pairs(s)),
        "]",
    ]
    return "\n".join(lines) + "\n"


def _env_file_value(v: str) -> str:
    return v if re.fullmatch(r"[A-Za-z0-9._~%!&()*+,;=:@/\[\]-]*", v) else shlex.quote(v)


def render_env_block(s: Settings, path: str, service: str, containerd_only: bool) -> str:
    prefix = "CONTAINERD_" if containerd_only else ""
    if containerd_only:
        who = [f"# Proxy for {service}'s embedded containerd only (image pulls)."]
    else:
        who = [
            f"# Proxy for {service}, its kubelet and containerd; {service} adds its pod/service",
            "# CIDRs and cluster domain to NO_PROXY itself.",
        ]
    lines = [
        f"{_BEGIN}: {path} (managed by `fwdproxy gen`; rerun it to update)",
        *who,
        "# Upper case only, as documented; Go reads upper case first.",
        *s.cidr_comment(),
        *(f"{k}={_env_file_value(v)}" for k, v in env_pairs(s, lower=False, prefix=prefix)),
        _END,
    ]
    return "\n".join(lines) + "\n"


def merge_env_file(existing: str | None, block: str) -> str:
    """Keep the user's lines (K3S_TOKEN...), drop old proxy keys and our old block, append ours."""
    kept: list[str] = []
    inside = False
    for line in (existing or "").splitlines():
        stripped = line.strip()
        if stripped.startswith(_BEGIN):
            inside = True
        if not inside:
            key = stripped.removeprefix("export ").split("=", 1)[0].strip()
            if not ("=" in stripped and key in _PROXY_KEYS):
                kept.append(line)
        if stripped == _END:
            inside = False
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + ("\n\n" if kept else "") + block


def render_shell(s: Settings, env_file: bool) -> str:
    if env_file:
        head = [
            "# KEY=VALUE lines for systemd EnvironmentFile=, podman/docker run --env-file.",
            "# Generated by `fwdproxy gen env --env-file`.",
        ]
        body = [f"{k}={v}" for k, v in env_pairs(s)]
    else:
        head = [
            '# Proxy variables for this shell: eval "$(fwdproxy gen env)".',
            "# curl < 7.86 and Python ignore CIDR entries; Node needs NODE_USE_ENV_PROXY=1.",
        ]
        body = [f"export {k}={shlex.quote(v)}" for k, v in env_pairs(s)]
    return "\n".join([*head, *s.cidr_comment(), *body]) + "\n"


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    help: str
    path: str | None  # standard path (agent variant chosen in path_for)
    restart: str
    kind: str  # dropin | json | podman | envfile | shell | value


TARGETS: Final = {
    t.name: t
    for t in (
        Target(
            "docker-dropin",
            "systemd drop-in for dockerd (any Docker version)",
            "/etc/systemd/system/docker.service.d/http-proxy.conf",
            "systemctl daemon-reload && systemctl restart docker",
            "dropin",
        ),
        Target(
            "daemon-json",
            '"proxies" block merged into /etc/docker/daemon.json (Docker Engine >= 23)',
            "/etc/docker/daemon.json",
            "systemctl restart docker",
            "json",
        ),
        Target(
            "containerd-dropin",
            "systemd drop-in for containerd (kubeadm nodes, nerdctl)",
            "/etc/systemd/system/containerd.service.d/http-proxy.conf",
            "systemctl daemon-reload && systemctl restart containerd",
            "dropin",
        ),
        Target(
            "podman",
            "containers.conf.d file with [engine] env for podman/buildah/skopeo",
            "/etc/containers/containers.conf.d/fwdproxy.conf",
            "nothing for the CLI; systemctl restart podman.service if you use the API service",
            "podman",
        ),
        Target(
            "crio-dropin",
            "systemd drop-in for CRI-O",
            "/etc/systemd/system/crio.service.d/00-proxy.conf",
            "systemctl daemon-reload && systemctl restart crio",
            "dropin",
        ),
        Target(
            "k3s-env",
            "k3s.service.env (--agent: k3s-agent.service.env), merged",
            "/etc/systemd/system/k3s.service.env",
            "systemctl restart k3s",
            "envfile",
        ),
        Target(
            "rke2-env",
            "/etc/default/rke2-server (--agent: rke2-agent), merged",
            "/etc/default/rke2-server",
            "systemctl restart rke2-server",
            "envfile",
        ),
        Target("env", "shell exports (or --env-file KEY=VALUE) on stdout", None, "", "shell"),
        Target("no-proxy", "just the computed NO_PROXY value", None, "", "value"),
    )
}


def path_and_restart(t: Target, agent: bool) -> tuple[str, str, str]:
    """(path, restart command, service name) with the --agent variant applied."""
    path, restart = t.path or "", t.restart
    service = {
        "docker-dropin": "docker",
        "daemon-json": "docker",
        "containerd-dropin": "containerd",
        "crio-dropin": "crio",
        "k3s-env": "k3s",
        "rke2-env": "rke2-server",
    }.get(t.name, "")
    if agent and t.name == "k3s-env":
        path, service = "/etc/systemd/system/k3s-agent.service.env", "k3s-agent"
    elif agent and t.name == "rke2-env":
        path, service = "/etc/default/rke2-agent", "rke2-agent"
    if agent and t.kind == "envfile":
        restart = f"systemctl restart {service}"
    return path, restart, service


# --- command ---------------------------------------------------------------------------------

EXAMPLES: Final = """\
examples:
  fwdproxy gen docker-dropin                     # print the drop-in for dockerd
  fwdproxy gen docker-dropin --write             # install it (then: daemon-reload, restart docker)
  fwdproxy gen daemon-json --write               # merge "proxies" into /etc/docker/daemon.json
  fwdproxy gen containerd-dropin --cluster-cidr 10.244.0.0/16 --service-cidr 10.96.0.0/12 --write
  fwdproxy gen k3s-env --agent --write           # k3s-agent.service.env, other lines kept
  fwdproxy gen podman --proxy http://127.0.0.1:3128
  eval "$(fwdproxy gen env)"                     # this shell only
  fwdproxy gen no-proxy --no-detect --no-proxy-extra registry.corp.example,.corp.example
  fwdproxy gen docker-dropin --root /tmp/stage --write   # write under /tmp/stage/etc/...

mirror targets (fwdproxy's pull-through registry mirror, plain HTTP, no CA needed):
  fwdproxy gen containerd-mirror --write         # certs.d/_default/hosts.toml; checks config_path
  fwdproxy gen docker-mirror --write             # registry-mirrors + /etc/docker/certs.d/_default
  fwdproxy gen podman-mirror --write             # registries.conf.d/50-fwdproxy-mirror.conf
  fwdproxy gen k3s-mirror --rke2 --write         # registries.yaml "*" mirror, merged
  fwdproxy gen containerd-mirror --help          # what a target writes, versions, what to restart
The mirror address: --mirror HOST:PORT, else mirror.listen of -c FILE, else 127.0.0.1:5000.

cluster target (a kustomize overlay of deploy/kubernetes; kubernetes --help for details):
  fwdproxy gen kubernetes --upstream socks5://10.0.0.5:1080 --write    # ./fwdproxy-cluster/
  fwdproxy gen kubernetes --gateway --allow 10.42.0.0/16 --allow 192.168.1.0/24 --write

NO_PROXY = localhost,127.0.0.1,127.0.0.0/8,::1 + this node's addresses and subnets (from
`ip -j addr`, skip with --no-detect) + --cluster-cidr/--service-cidr + .svc,.cluster.local
+ 169.254.169.254 + --no-proxy-extra. With fwdproxy it is a shortcut, not a correctness
requirement: a host not listed is still connected directly by fwdproxy.
"""


class _TargetHelp(argparse.Action):
    """-h/--help: after a *-mirror target, that target's own page (what it writes, which
    runtime versions read it, what to restart); otherwise the usual help."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str = argparse.SUPPRESS,
        default: Any = argparse.SUPPRESS,
        help: str | None = None,
    ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        target = getattr(namespace, "target", None)
        if target in genmirror.TARGETS:
            sys.stdout.write(genmirror.help_text(target))
        elif target == genkube.TARGET:
            sys.stdout.write(genkube.TEACH)
        else:
            parser.print_help()
        parser.exit()


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `gen` to the CLI's subparsers; it sets func=main."""
    p = subparsers.add_parser(
        "gen",
        help="print or install proxy or registry-mirror settings for a container runtime",
        description="Generate settings that point a container runtime at fwdproxy.\n\n"
        + "proxy targets:\n"
        + "\n".join(f"  {t.name:<18} {t.help}" for t in TARGETS.values())
        + "\n\nmirror targets (TARGET --help for details):\n"
        + "\n".join(f"  {t.name:<18} {t.help}" for t in genmirror.TARGETS.values())
        + f"\n\ncluster target (TARGET --help for details):\n  {genkube.TARGET:<18} {genkube.HELP}",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument(
        "-h",
        "--help",
        action=_TargetHelp,
        help="show this help (after a *-mirror or kubernetes target: that target's help) and exit",
    )
    p.add_argument(
        "target",
        choices=[*TARGETS, *genmirror.TARGETS, genkube.TARGET],
        metavar="TARGET",
        help="see the lists above",
    )
    add_proxy_args(p)
    p.add_argument(
        "--write", action="store_true", help="install at the standard path (under --root)"
    )
    p.add_argument(
        "--agent", action="store_true", help="k3s-env/rke2-env/k3s-mirror: the agent's file/unit"
    )
    p.add_argument(
        "--containerd-only",
        action="store_true",
        help="k3s-env/rke2-env: CONTAINERD_* names, so only image pulls use the proxy",
    )
    p.add_argument("--env-file", action="store_true", help="env: KEY=VALUE lines, no `export`")
    p.add_argument("--no-detect", action="store_true", help="do not add this node's addresses")
    p.add_argument(
        "--cluster-cidr", action="append", default=[], metavar="CIDR", help="pod CIDR (repeatable)"
    )
    p.add_argument(
        "--service-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="service CIDR (repeatable)",
    )
    p.add_argument(
        "--no-proxy-extra",
        action="append",
        default=[],
        metavar="LIST",
        help="more NO_PROXY entries, comma-separated (repeatable)",
    )
    m = p.add_argument_group("mirror targets")
    m.add_argument(
        "--mirror",
        metavar="HOST:PORT",
        help=f"the mirror's address (default: mirror.listen of -c FILE, else "
        f"{genmirror.DEFAULT_MIRROR})",
    )
    m.add_argument(
        "--registry",
        action="append",
        default=[],
        metavar="R",
        help="also a registry directory/entry of its own for R (repeatable); podman-mirror: "
        "a registry on top of the catalog's",
    )
    m.add_argument(
        "--only-registry",
        action="append",
        default=[],
        metavar="R",
        help="podman-mirror: exactly these registries (repeatable)",
    )
    m.add_argument(
        "--certs-dir",
        metavar="DIR",
        help="containerd-mirror/docker-mirror: the hosts directory (default "
        f"{genmirror.CONTAINERD_CERTS} / {genmirror.DOCKER_CERTS})",
    )
    m.add_argument(
        "--store",
        choices=("both", "classic", "containerd"),
        default="both",
        help="docker-mirror: daemon.json (classic), hosts.toml (containerd) or both",
    )
    m.add_argument("--rke2", action="store_true", help="k3s-mirror: RKE2's registries.yaml")
    genkube.add_args(p)
    p.set_defaults(func=main)
    return p


def build_settings(
    args: argparse.Namespace, detect: Callable[[], tuple[list[Any], str | None]]
) -> Settings:
    node: list[str] = []
    if not args.no_detect:
        addrs, err = detect()
        if err:
            print(f"fwdproxy gen: warning: {err}", file=sys.stderr)
        node = noproxy.node_entries(addrs)
    try:
        entries, notes = noproxy.build_no_proxy(
            node=node,
            cluster_cidrs=args.cluster_cidr,
            service_cidrs=args.service_cidr,
            extra=args.no_proxy_extra,
        )
    except noproxy.NoProxyError as e:
        raise GenError(str(e), 2) from None
    for note in notes:
        print(f"fwdproxy gen: note: {note}", file=sys.stderr)
    return Settings(resolve_proxy(args), tuple(entries))


def render(
    t: Target, s: Settings, args: argparse.Namespace, path: str, existing: str | None
) -> str:
    _, _, service = path_and_restart(t, args.agent)
    if t.kind == "dropin":
        return render_dropin(s, path, f"{service}.service")
    if t.kind == "json":
        return render_daemon_json(s, existing, path)
    if t.kind == "podman":
        return render_podman(s, path)
    if t.kind == "envfile":
        block = render_env_block(s, path, service, args.containerd_only)
        return merge_env_file(existing, block)
    if t.kind == "shell":
        return render_shell(s, args.env_file)
    return s.no_proxy_value + "\n"


def main(args: argparse.Namespace) -> int:
    try:
        if args.target == genkube.TARGET:
            genkube.check_flags(args)
            return genkube.run(args)
        genkube.check_other_flags(args)
        genmirror.check_flags(args)
        if args.target in genmirror.TARGETS:
            return genmirror.run_target(args)
        return _main(args, noproxy.detect_node_addresses)
    except GenError as e:
        print(f"fwdproxy gen: error: {e}", file=sys.stderr)
        return e.code


def _main(args: argparse.Namespace, detect: Callable[[], tuple[list[Any], str | None]]) -> int:
    t = TARGETS[args.target]
    if args.write and t.path is None:
        raise GenError(f"{t.name} prints to stdout only; redirect it to a file instead", 2)
    s = build_settings(args, detect)
    path, restart, _ = path_and_restart(t, args.agent)
    if t.kind == "json":
        print(
            f"fwdproxy gen: {path}: needs Docker Engine >= 23.0; older engines (Debian 12's "
            'docker.io is 20.10) ignore "proxies" silently - use docker-dropin there.',
            file=sys.stderr,
        )
    if not args.write:
        if t.kind == "json":
            print(f"fwdproxy gen: merge into {path}, or rerun with --write", file=sys.stderr)
        sys.stdout.write(render(t, s, args, path, None))
        return 0
    target = root_path(args.root, path)
    content = render(t, s, args, path, read_text(target) if t.kind in ("json", "envfile") else None)
    outcome = write_file(target, content, 0o600 if t.kind == "envfile" else 0o644)
    if outcome == "unchanged":
        print(f"{target}: unchanged")
        return 0
    backup = f" (previous file kept as {target}.bak)" if outcome == "updated" else ""
    print(f"{target}: {outcome}{backup}")
    print(f"to apply: {restart}")
    return 0


def run(argv: list[str]) -> int:
    """`fwdproxy gen ARGV...` without cli.py (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="fwdproxy")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["gen", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return int(args.func(args))
