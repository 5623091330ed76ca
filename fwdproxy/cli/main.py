"""Command line: `fwdproxy serve | check | route | explain | discover | gen | doctor | reload`.

Imports are lazy: `fwdproxy route HOST` must answer without loading the server stack (aiohttp,
h11, python-socks), because operators run it interactively and in scripts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fwdproxy import __version__

EPILOG_MAIN = """\
examples:
  fwdproxy serve                                  # shipped rules.yaml, 127.0.0.1:3128
  fwdproxy serve -c /etc/fwdproxy/rules.yaml --upstream socks5://127.0.0.1:7890
  fwdproxy check -c rules.yaml                    # validate; every error with file:line
  fwdproxy route registry-1.docker.io             # which rule routes this host, and where
  fwdproxy explain nginx:1.27                     # every host a pull touches, and its route
  fwdproxy discover dockerhub                     # live check of a registry's redirect hosts
  fwdproxy gen docker-dropin --write              # point dockerd at fwdproxy
  fwdproxy gen containerd-mirror --write          # pull through fwdproxy's registry mirror
  fwdproxy cache du                               # the mirror's layer cache, per registry
  HTTPS_PROXY=http://127.0.0.1:3128 skopeo inspect docker://nginx

Docs: README.md (Quick start, Configuration, Production).
"""


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="rules file (default: ./rules.yaml, /etc/fwdproxy/rules.yaml, the shipped one)",
    )


def _load(args: argparse.Namespace, **kw: Any) -> Any:
    from fwdproxy.config import load_config

    return load_config(args.config, **kw)


def _load_or_report(args: argparse.Namespace, summary: bool = False) -> Any:
    """The config for a dry-run command, or None after printing every problem."""
    from fwdproxy.core.errors import ConfigError

    try:
        return _load(args, upstream_override=args.upstream)
    except ConfigError as e:
        _print_problems(e.problems)
        if summary:
            print(f"{len(e.problems)} problem(s) found", file=sys.stderr)
        return None


def _print_problems(problems: list[str]) -> None:
    for p in problems:
        print(f"error: {p}", file=sys.stderr)


# -- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from fwdproxy.cli.logsetup import setup_logging
    from fwdproxy.core.errors import ConfigError

    overrides = {
        "upstream_override": args.upstream,
        "listen_override": args.listen or None,
        "mirror_override": args.mirror,
        "cache_dir_override": args.cache_dir,
    }
    try:
        cfg = _load(args, **overrides)
    except ConfigError as e:
        _print_problems(e.problems)
        return 1
    if args.admin:
        try:
            cfg = _with_admin(cfg, args.admin)
        except ValueError as e:
            print(f"error: --admin: {e}", file=sys.stderr)
            return 2
    level, fmt = args.log_level or cfg.log_level, args.log_format or cfg.log_format
    setup_logging(level, fmt)
    from fwdproxy.proxy.accesslog import ACCESS

    ACCESS.direct(sys.stderr, fmt, level)  # buffered, not one logging record per connection
    _warn_config(cfg)
    from fwdproxy.admin.app import AdminServer
    from fwdproxy.config import load_config
    from fwdproxy.mirror.service import MirrorService
    from fwdproxy.server import serve

    def reload_source() -> Any:
        return load_config(cfg.path, **overrides)

    _install_loop(args.loop)
    try:
        return asyncio.run(
            serve(
                cfg,
                allow_any_client=args.allow_any_client,
                pid_file=args.pid_file,
                reload_source=reload_source,
                admin_factory=AdminServer,
                mirror_factory=lambda server, spec: MirrorService(server.state, spec),
            )
        )
    except ConfigError as e:
        _print_problems(e.problems)
        return 1
    except OSError as e:
        print(f"error: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _with_admin(cfg: Any, addr: str) -> Any:
    """`--admin HOST:PORT`: enable (or move) the admin listener, keeping the config's token."""
    import dataclasses

    from fwdproxy.config import AdminSpec
    from fwdproxy.core.addr import split_host_port

    host, port = split_host_port(addr, allow_zero=True)
    token = (cfg.admin.token if cfg.admin else None) or os.environ.get("FWDPROXY_ADMIN_TOKEN")
    return dataclasses.replace(cfg, admin=AdminSpec(host, port, token))


def _install_loop(choice: str) -> None:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            if choice == "uvloop":
                print(
                    "error: --loop uvloop needs the uvloop package (pip install 'fwdproxy[fast]')",
                    file=sys.stderr,
                )
                raise SystemExit(1) from None


def _warn_config(cfg: Any) -> list[str]:
    warnings = []
    for group in cfg.upstreams.values():
        for m in group.members:
            if m.scheme == "socks4":
                warnings.append(
                    f"upstream {m.name}: socks4:// cannot carry host names, so names are resolved "
                    "locally; use socks4a:// or socks5:// to resolve at the upstream"
                )
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return warnings


# -- check / route -------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from fwdproxy.server import check_exposure

    cfg = _load_or_report(args, summary=True)
    if cfg is None:
        return 1
    problems = check_exposure(cfg)
    if problems:
        _print_problems(problems)
        return 1
    _warn_config(cfg)
    ups = ", ".join(f"{n}={'/'.join(m.url for m in g.members)}" for n, g in cfg.upstreams.items())
    print(f"{cfg.path}: OK")
    print(f"  listen:    {', '.join(lst.address for lst in cfg.listeners)}")
    print(f"  upstreams: {ups or 'none'}")
    print(f"  rules:     {len(cfg.router.rules)} (default: {cfg.router.default.route})")
    print(f"  registries in catalog: {len(cfg.catalog)}")
    if cfg.mirror is not None:
        from fwdproxy.core.units import format_size

        m = cfg.mirror
        where = ", ".join(f"http://{x.address}" for x in m.listeners)
        print(f"  mirror:    {where} (default registry {m.default_registry}, tag TTL "
              f"{m.tag_ttl_s:g}s, stale up to {m.serve_stale_s:g}s)")
        if cfg.cache is not None:
            bound = format_size(cfg.cache.max_size) if cfg.cache.max_size else "unbounded"
            print(f"  cache:     {cfg.cache.dir} (max {bound})")
        else:
            print("  cache:     none (the mirror streams without storing)")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    import json

    from fwdproxy.core.addr import AddressError, format_host_port, split_host_port
    from fwdproxy.routing.query import route_json

    cfg = _load_or_report(args)
    if cfg is None:
        return 1
    status = 0
    health = _live_health(cfg) if not args.json else None
    for target in args.targets:
        try:
            host, port = split_host_port(_strip_url(target), args.port)
        except AddressError as e:
            print(f"error: {target}: {e}", file=sys.stderr)
            status = 1
            continue
        d = cfg.router.decide(host, port)
        if args.json:
            print(json.dumps(route_json(cfg, host, port, d)))
            continue
        up = ""
        if d.action == "via" and d.upstream in cfg.upstreams:
            up = " (" + ", ".join(m.url for m in cfg.upstreams[d.upstream].members) + ")"
        verb = f"via {d.upstream}{up}" if d.action == "via" else d.action
        print(f"{format_host_port(host, port)} -> {verb}")
        line = f" (line {d.line})" if d.line else ""
        print(f"  rule:     {d.rule}{line}" + (f" matched {d.matched}" if d.matched else ""))
        if d.registry:
            print(f"  registry: {d.registry} ({d.role})")
        if d.action == "via" and d.upstream and cfg.admin is not None:
            print(f"  health:   {_health_line(health, d.upstream)}")
    return status


def _live_health(cfg: Any) -> dict[str, Any] | None:
    """Member health from the running proxy's admin API, if one is configured and answers."""
    if cfg.admin is None:
        return None
    import json
    import urllib.request

    host = cfg.admin.host if cfg.admin.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{format_host(host)}:{cfg.admin.port}/api/upstreams"
    req = urllib.request.Request(url)
    if cfg.admin.token:
        req.add_header("Authorization", f"Bearer {cfg.admin.token}")
    try:
        with urllib.request.urlopen(req, timeout=0.3) as resp:
            return dict(json.loads(resp.read()).get("upstreams", {}))
    except (OSError, ValueError):
        return None


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _health_line(health: dict[str, Any] | None, name: str) -> str:
    if health is None:
        return "unknown (no running proxy answered on the admin: address)"
    group = health.get(name)
    if not group:
        return "unknown (the running proxy has no such upstream; reload it?)"
    members = ", ".join(
        f"{m.get('url')} {'up' if m.get('healthy') else 'DOWN'}" for m in group.get("members", [])
    )
    return f"{'ok' if group.get('healthy') else 'ALL MEMBERS DOWN'}: {members}"


def _strip_url(target: str) -> str:
    """Accept `https://host/path` and `docker://host/x` too: keep only the authority."""
    if "://" in target:
        scheme, _, rest = target.partition("://")
        authority = rest.split("/", 1)[0]
        if ":" not in authority.rsplit("]", 1)[-1]:
            authority += ":80" if scheme == "http" else ":443"
        return authority
    return target


# -- explain / reload ---------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from fwdproxy.routing.explain import explain, explanation_json, format_explanation
    from fwdproxy.routing.imageref import ImageRefError

    cfg = _load_or_report(args)
    if cfg is None:
        return 1
    cache_dir = args.cache_dir or (cfg.cache.dir if cfg.cache is not None else None)
    if args.platform and cache_dir is None:
        print("error: --platform needs --cache-dir, or cache: in the config", file=sys.stderr)
        return 2
    status = 0
    for image in args.images:
        try:
            e = explain(image, cfg.router, dict(cfg.catalog))
        except ImageRefError as err:
            print(f"error: {image}: {err}", file=sys.stderr)
            status = 2
            continue
        cache_text, cache_json = "", None
        if cache_dir is not None:
            from fwdproxy.cli.cacheview import explain_cache

            try:
                cache_text, cache_json = explain_cache(cache_dir, e.image, args.platform)
            except ValueError as err:  # --platform
                print(f"error: --platform: {err}", file=sys.stderr)
                return 2
        if args.json:
            print(json.dumps({**explanation_json(e), "cache": cache_json}))
        else:
            print(format_explanation(e) + (f"\n{cache_text}" if cache_text else ""))
        if e.split:
            status = max(status, 1)
    return status


def cmd_reload(args: argparse.Namespace) -> int:
    import signal

    if args.admin:
        return _reload_via_admin(args.admin, args.token)
    try:
        with open(args.pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        print(f"error: cannot signal the proxy via {args.pid_file}: {e}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}; the log says whether the new config was applied")
    return 0


def _reload_via_admin(addr: str, token: str | None) -> int:
    import json
    import urllib.request

    url = addr if "://" in addr else f"http://{addr}"
    req = urllib.request.Request(url.rstrip("/") + "/api/reload", method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read() or b"{}")
    except OSError as e:
        body = {}
        err_body = getattr(e, "read", None)
        if err_body is not None:
            try:
                body = json.loads(err_body())
            except ValueError:
                pass
        if not body:
            print(f"error: admin endpoint {url}: {e}", file=sys.stderr)
            return 1
    for p in body.get("problems", []):
        print(f"error: {p}", file=sys.stderr)
    print("reloaded" if body.get("ok") else "reload rejected; the old config stays in force")
    return 0 if body.get("ok") else 1


# -- parser ---------------------------------------------------------------------------------


CORE_COMMANDS = ("serve", "check", "route", "explain", "reload")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fwdproxy",
        description="Split-routing forward proxy for container hosts: registry traffic through an "
        "upstream tunnel, everything else direct. One port speaks HTTP CONNECT, plain HTTP "
        "and SOCKS5/SOCKS4.",
        epilog=EPILOG_MAIN,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"fwdproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the proxy",
        formatter_class=formatter,
        description="Run the proxy in the foreground (logs to stderr; SIGHUP reloads the "
        "rules, SIGTERM drains and exits).",
        epilog="""examples:
  fwdproxy serve
  fwdproxy serve -c rules.yaml --listen 127.0.0.1:3128 --upstream socks5://127.0.0.1:7890
  fwdproxy serve --listen 172.17.0.1:3128     # refused unless rules.yaml has allow: or auth:
  FWDPROXY_UPSTREAM=http://10.0.0.5:8080 fwdproxy serve
  fwdproxy serve --mirror 127.0.0.1:5000 --cache-dir /var/cache/fwdproxy
                                              # + a registry mirror with a layer cache
""",
    )
    add_config_arg(p)
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen address (repeatable; overrides listen: in the config)",
    )
    p.add_argument(
        "--upstream",
        metavar="[NAME=]URL",
        help="replace an upstream's URL (default: the first one); also "
        "$FWDPROXY_UPSTREAM. socks5://, socks5h://, socks4a://, socks4://, http://",
    )
    p.add_argument(
        "--allow-any-client",
        action="store_true",
        help="allow a non-loopback listener without allow-list or auth (open proxy!)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--pid-file", metavar="FILE", help="write the PID here (for `fwdproxy reload`)")
    p.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve /metrics, the admin API and the dashboard here (overrides admin: in the "
        "config; the token stays admin.token, or $FWDPROXY_ADMIN_TOKEN)",
    )
    p.add_argument(
        "--mirror",
        metavar="HOST:PORT",
        help="also serve the registry mirror (OCI pull API) here; overrides mirror.listen. "
        "Runtimes pull through it without a CA: see `fwdproxy gen containerd-mirror`",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep the mirror's layer cache here (overrides cache.dir; without one the mirror "
        "streams without storing)",
    )
    p.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop (auto: uvloop where installed, as it is by default; asyncio: stdlib)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check",
        help="validate a config file",
        formatter_class=formatter,
        description="Validate the config: every problem is printed with file:line; exit 1 if any.",
        epilog="examples:\n  fwdproxy check\n  fwdproxy check -c /etc/fwdproxy/rules.yaml\n",
    )
    add_config_arg(p)
    p.add_argument("--upstream", metavar="[NAME=]URL", help="as for serve")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "route",
        help="dry run: which rule routes HOST, and where",
        formatter_class=formatter,
        description="Print the routing decision for each target without connecting anywhere.",
        epilog="""examples:
  fwdproxy route registry-1.docker.io
  fwdproxy route production.cloudflare.docker.com:443 10.1.2.3:80
  fwdproxy route https://ghcr.io/v2/ --json
""",
    )
    add_config_arg(p)
    p.add_argument("targets", nargs="+", metavar="HOST[:PORT]")
    p.add_argument("-p", "--port", type=int, default=443, help="port when none is given (443)")
    p.add_argument("--upstream", metavar="[NAME=]URL", help="as for serve")
    p.add_argument("--json", action="store_true", help="one JSON object per target")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser(
        "explain",
        help="every host a pull of IMAGE touches, and its route",
        formatter_class=formatter,
        description="Normalise an image reference like docker/containerd do and list the API, "
        "token and blob hosts its pull touches, with the rule and route of each. Offline. "
        "With a cache (cache: in the config, or --cache-dir), also which of its blobs the "
        "mirror's cache holds, read from the cache alone. "
        "Exit 1 when the pull would be split (API tunnelled, some other host not).",
        epilog="""examples:
  fwdproxy explain nginx
  fwdproxy explain ghcr.io/org/app@sha256:0123...
  fwdproxy explain registry.k8s.io/pause:3.10 localhost:5000/x --json
  fwdproxy explain alpine:3.20 --cache-dir /var/cache/fwdproxy   # which layers are cached
""",
    )
    add_config_arg(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--upstream", metavar="[NAME=]URL", help="as for serve")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="also say which of the image's blobs this cache holds (default: cache.dir)",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform picked from an index for the cache section (default: this host's)",
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "reload",
        help="ask a running proxy to reload its config",
        formatter_class=formatter,
        description="Signal the running proxy (SIGHUP via its pid file) or call its admin API. "
        "An invalid config is rejected and the old one stays in force.",
        epilog="examples:\n  fwdproxy reload --pid-file /run/fwdproxy.pid\n"
        "  fwdproxy reload --admin 127.0.0.1:9128 --token $TOKEN\n",
    )
    p.add_argument("--pid-file", default="/run/fwdproxy/fwdproxy.pid", metavar="FILE")
    p.add_argument("--admin", metavar="HOST:PORT", help="use the admin API instead of a signal")
    p.add_argument("--token", help="admin bearer token")
    p.set_defaults(func=cmd_reload)

    if not argv or argv[0] not in CORE_COMMANDS:
        _register_optional(sub)  # skipped for core commands: keeps `route` fast
    return parser


def _register_optional(sub: Any) -> None:
    """Commands that live in their own modules (kept import-light)."""
    for name in ("discover", "gen", "doctor", "cache"):
        try:
            module = __import__(f"fwdproxy.cli.{name}", fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
