"""`fwdproxy cache ls | tags | du | verify | prune | warm`: operate the mirror's layer cache.

Looking (ls, tags, du, `prune --dry-run`, `explain`) uses the read-only view, so it works while
the proxy owns the cache. Changing (verify, prune) needs the store's exclusive lock; while a
running proxy holds it, the same operation goes through that proxy's admin API instead
(automatically when the config has `admin:`, or with `--via-admin`), because a second owner
would repair the directory under the first one's feet.

Imports stay inside the commands: registering this module must not load aiohttp or sqlite
for `fwdproxy route`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fwdproxy.cli.cacheview import ago, media_kind, short_digest, table
from fwdproxy.cli.main import add_config_arg, format_host, formatter

if TYPE_CHECKING:  # at run time each command imports what it uses
    from fwdproxy.cache import BlobRow, BlobStore, ReadOnlyStore
    from fwdproxy.config import AdminSpec, Config

DEFAULT_PRUNE_AGE: Final = "30d"
SORT_KEYS: Final = ("used", "size", "hits")
ADMIN_TOKEN_ENV: Final = "FWDPROXY_ADMIN_TOKEN"

EPILOG: Final = """\
examples:
  fwdproxy cache ls --sort size                # biggest blobs first
  fwdproxy cache ls --registry ghcr.io --json
  fwdproxy cache tags                          # cached tag -> digest answers, with age
  fwdproxy cache du                            # total, % of max_size, bytes per registry
  fwdproxy cache verify                        # re-hash every blob; exit 1 if any was bad
  fwdproxy cache prune --older-than 14d --dry-run
  fwdproxy cache warm alpine:3.20 ghcr.io/org/app:1 --platform linux/arm64

The cache directory is --cache-dir DIR, else cache.dir of the config (-c FILE, or the default
rules.yaml). ls/tags/du work while the proxy runs; verify and prune then go through its admin
API (admin: in the config).
"""


class CacheCommandError(Exception):
    """A problem reported as one `error:` line; `code` is the exit status (2: usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- where the cache is ------------------------------------------------------------------------


@dataclass
class CacheContext:
    root: Path
    cfg: Config | None  # the loaded config, if one could be
    max_size: int | None  # bytes; None: unbounded (or unknown, see max_size_unknown)
    max_size_unknown: str | None = None  # why the config cannot tell this dir's max_size


def load_config_for(args: argparse.Namespace, optional: bool) -> Config | None:
    """The config: required if -c was given; with `optional`, a broken default is ignored."""
    from fwdproxy.config import load_config
    from fwdproxy.core.errors import ConfigError

    try:
        return load_config(args.config)
    except ConfigError as e:
        if optional and args.config is None:
            return None
        raise CacheCommandError("\n".join(e.problems)) from None


def cache_context(args: argparse.Namespace) -> CacheContext:
    """--cache-dir, else the config's cache.dir; an error naming both when neither is set."""
    given = getattr(args, "cache_dir", None)
    cfg = load_config_for(args, optional=given is not None)
    spec = getattr(cfg, "cache", None)
    if given is not None:
        root = Path(given).expanduser().resolve()
    elif spec is not None:
        root = Path(spec.dir).expanduser().resolve()
    else:
        where = cfg.path if cfg is not None else "the config"
        raise CacheCommandError(
            f"no cache directory: pass --cache-dir DIR, or set cache: {{dir: DIR}} in {where} "
            "(-c FILE picks another config)",
            2,
        )
    if spec is not None and Path(spec.dir).expanduser().resolve() == root:
        return CacheContext(root, cfg, spec.max_size)
    why = "no config" if cfg is None else f"{cfg.path} has no cache: section"
    if spec is not None:
        why = f"the config's cache.dir is {spec.dir}"
    return CacheContext(root, cfg, None, why)


def open_view(root: Path) -> ReadOnlyStore:
    """The read-only view, or a clear error when there is no cache there."""
    from fwdproxy.cache import CacheError, ReadOnlyStore

    try:
        return ReadOnlyStore(root)
    except CacheError as e:
        raise CacheCommandError(str(e)) from None


# -- ls / tags / du ----------------------------------------------------------------------------


def blob_json(row: BlobRow) -> dict[str, Any]:
    return {
        "digest": str(row.digest),
        "size": row.size,
        "media_type": row.media_type,
        "kind": media_kind(row.media_type),
        "created": row.created,
        "last_access": row.last_access,
        "hits": row.hits,
        "refs": list(row.refs),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    if args.tags:
        return cmd_tags(args)
    from fwdproxy.core.units import format_size
    from fwdproxy.proto.oci import OCIError, parse_registry

    ctx = cache_context(args)
    with open_view(ctx.root) as view:
        rows = view.list()
    everything = rows
    if args.registry:
        try:
            wanted = parse_registry(args.registry).name
        except OCIError as e:
            raise CacheCommandError(f"--registry: {e.message}", 2) from None
        rows = [r for r in rows if any(ref.partition("/")[0] == wanted for ref in r.refs)]
    key = {
        "used": lambda r: (-r.last_access, str(r.digest)),
        "size": lambda r: (-r.size, str(r.digest)),
        "hits": lambda r: (-r.hits, -r.last_access, str(r.digest)),
    }[args.sort]
    rows = sorted(rows, key=key)
    total = sum(r.size for r in rows)
    if args.json:
        body = {"dir": str(ctx.root), "count": len(rows), "bytes": total}
        print(json.dumps({**body, "blobs": [blob_json(r) for r in rows]}))
        return 0
    now = time.time()
    lines = table(
        [("DIGEST", "SIZE", "TYPE", "LAST USED", "HITS", "REFS")]
        + [
            (
                short_digest(r.digest),
                format_size(r.size),
                media_kind(r.media_type),
                ago(r.last_access, now),
                str(r.hits),
                ", ".join(r.refs) or "-",
            )
            for r in rows
        ],
        right=frozenset({1, 4}),
    )
    print("\n".join(lines if rows else ["(no blobs)"]))
    summary = f"{len(rows)} blob(s), {format_size(total)}"
    if args.registry:
        everything_bytes = sum(r.size for r in everything)
        summary += (
            f" referenced by {wanted} (of {len(everything)} blob(s), "
            f"{format_size(everything_bytes)} in the cache)"
        )
    print(summary)
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    ctx = cache_context(args)
    with open_view(ctx.root) as view:
        tags = view.tags()
        cached = {str(t.digest): view.lookup(t.digest) is not None for t in tags}
    if getattr(args, "registry", None):
        tags = [t for t in tags if t.registry == args.registry]
    if args.json:
        out = [
            {
                "registry": t.registry,
                "repo": t.repo,
                "tag": t.tag,
                "digest": str(t.digest),
                "media_type": t.media_type,
                "fetched_at": t.fetched_at,
                "manifest_cached": cached[str(t.digest)],
            }
            for t in tags
        ]
        print(json.dumps({"dir": str(ctx.root), "tags": out}))
        return 0
    now = time.time()
    lines = table(
        [("IMAGE", "DIGEST", "TYPE", "FETCHED", "MANIFEST")]
        + [
            (
                f"{t.registry}/{t.repo}:{t.tag}",
                short_digest(t.digest),
                media_kind(t.media_type),
                ago(t.fetched_at, now),
                "cached" if cached[str(t.digest)] else "not cached",
            )
            for t in tags
        ]
    )
    print("\n".join(lines if tags else ["(no cached tags)"]))
    print(f"{len(tags)} tag(s)")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    from fwdproxy.cache.summary import percent_full, summarize
    from fwdproxy.core.units import format_size

    ctx = cache_context(args)
    with open_view(ctx.root) as view:
        summary = summarize(view.list())
        tags = len(view.tags())
    if args.json:
        body = summary.as_json(ctx.max_size)
        body["max_size_unknown"] = ctx.max_size_unknown
        print(json.dumps({"dir": str(ctx.root), **body, "tags": tags}))
        return 0
    if ctx.max_size_unknown:
        limit = f" (max_size unknown: {ctx.max_size_unknown})"
    elif ctx.max_size is None:
        limit = " (no max_size: unbounded)"
    else:
        limit = (
            f" of {format_size(ctx.max_size)} max_size "
            f"({percent_full(summary.bytes, ctx.max_size)}% full)"
        )
    print(f"cache:  {ctx.root}")
    print(f"blobs:  {summary.count}, {format_size(summary.bytes)}{limit}")
    print(f"tags:   {tags}")
    rows = [(r.registry, format_size(r.bytes), f"{r.count} blob(s)") for r in summary.registries]
    if summary.unreferenced.count:
        loose = summary.unreferenced
        rows.append(("(no refs)", format_size(loose.bytes), f"{loose.count} blob(s)"))
    if rows:
        print("by registry:")
        for line in table(rows, right=frozenset({1})):
            print(f"  {line}")
    if summary.shared:
        print("  (blobs shared by registries are shown under each; the total counts them once)")
    return 0


# -- verify / prune ----------------------------------------------------------------------------


def describe_pid(pid: int | None, root: Path) -> str:
    """`pid 123 (fwdproxy serve -c rules.yaml)`, as far as the lock file and /proc tell."""
    if pid is None:
        return f"another process (its pid is not in {root / 'lock'})"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    cmd = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return f"pid {pid} ({cmd[:120]})" if cmd else f"pid {pid}"


def open_owner(ctx: CacheContext, args: argparse.Namespace, action: str) -> BlobStore | None:
    """The store with its lock, or None when the running proxy's admin API should do it."""
    from fwdproxy.cache import BlobStore, StoreLocked

    if args.via_admin:
        return None
    if not (ctx.root / "index.sqlite").is_file():
        raise CacheCommandError(f"{ctx.root}: no cache here (no index.sqlite)")
    try:
        # No max_size: opening must not evict on the side; verify and prune say what they do.
        return BlobStore(ctx.root, None)
    except StoreLocked as e:
        who = describe_pid(e.pid, ctx.root)
        admin = getattr(ctx.cfg, "admin", None)
        if admin is not None:
            print(
                f"{ctx.root} is in use by {who}; running {action} through its admin API "
                f"at {admin_url(admin)}",
                file=sys.stderr,
            )
            return None
        raise CacheCommandError(
            f"{ctx.root} is in use by {who}: the running proxy owns the cache. Run {action} "
            f"inside it through the admin API: `fwdproxy cache {action} --via-admin` (POST "
            f"/api/cache/{action}; needs admin: in the config), or stop it first."
        ) from None


def admin_url(admin: AdminSpec) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
    return f"http://{format_host(host)}:{admin.port}"


def admin_call(ctx: CacheContext, method: str, path: str) -> dict[str, Any]:
    """One admin API call for the cache at ctx.root; every failure is a CacheCommandError."""
    import urllib.error
    import urllib.request

    admin = getattr(ctx.cfg, "admin", None)
    if admin is None:
        raise CacheCommandError(
            "--via-admin needs an admin listener: set admin: {listen: HOST:PORT} in the config"
        )
    base = admin_url(admin)
    token = admin.token or os.environ.get(ADMIN_TOKEN_ENV)

    def call(m: str, p: str, timeout: float | None) -> dict[str, Any]:
        req = urllib.request.Request(base + p, method=m)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return dict(json.loads(resp.read() or b"{}"))
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except ValueError:
                message = e.reason
            if e.code == 401:
                message = f"{message} (set admin.token or ${ADMIN_TOKEN_ENV})"
            raise CacheCommandError(f"admin API {base}{p}: {e.code} {message}") from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise CacheCommandError(f"admin API {base} did not answer: {reason}") from None

    info = call("GET", "/api/cache", 30.0)
    theirs = Path(str(info.get("dir", ""))).resolve()
    if theirs != ctx.root:
        raise CacheCommandError(
            f"the proxy at {base} caches in {theirs}, not in {ctx.root}; nothing was done"
        )
    return call(method, path, None)  # a verify of a big cache takes as long as it takes


def cmd_verify(args: argparse.Namespace) -> int:
    from fwdproxy.core.units import format_size

    ctx = cache_context(args)
    started = time.monotonic()
    store = open_owner(ctx, args, "verify")
    if store is None:
        if not args.quiet:
            print("verifying inside the proxy (no progress over the API)...", file=sys.stderr)
        body = admin_call(ctx, "POST", "/api/cache/verify")
        bad = [str(d) for d in body.get("bad", [])]
        missing = [str(d) for d in body.get("missing", [])]
        checked, nbytes = int(body.get("checked", 0)), int(body.get("bytes", 0))
    else:
        with store:
            bad, missing, checked, nbytes = _verify_here(store, args.quiet)
    quarantine = ctx.root / "quarantine"
    for d in bad:
        print(f"BAD      {d}  moved to {quarantine / d.replace(':', '-', 1)}", file=sys.stderr)
    for d in missing:
        print(f"MISSING  {d}  (file gone; its row was dropped)", file=sys.stderr)
    took = time.monotonic() - started
    verdict = "all good" if not (bad or missing) else f"{len(bad)} bad, {len(missing)} missing"
    if bad or missing or not args.quiet:
        print(f"verified {checked} blob(s), {format_size(nbytes)} in {took:.1f}s: {verdict}")
    return 1 if bad or missing else 0


def _verify_here(store: BlobStore, quiet: bool) -> tuple[list[str], list[str], int, int]:
    import logging

    from fwdproxy.cli.progress import Progress

    sizes = {str(r.digest): r.size for r in store.list()}
    progress = None if quiet else Progress(sum(sizes.values()), "verify")
    done, previous = 0, ""

    def step(n: int, total: int, digest: Any) -> None:
        # Called before each blob is hashed, so the previous one is done.
        nonlocal done, previous
        done += sizes.get(previous, 0)
        previous = str(digest)
        if progress is not None:
            progress.update(done)

    store_log = logging.getLogger("fwdproxy.cache.store")
    level = store_log.level
    store_log.setLevel(logging.ERROR)  # its per-blob warning is our BAD line, said once
    try:
        report = store.verify(step)
        if progress is not None:
            progress.update(progress.total)
    finally:
        store_log.setLevel(level)
        if progress is not None:
            progress.close()
    bad, missing = [str(d) for d in report.bad], [str(d) for d in report.missing]
    return bad, missing, report.checked, report.bytes


def cmd_prune(args: argparse.Namespace) -> int:
    import urllib.parse

    from fwdproxy.core.units import format_size, parse_duration

    if args.all and args.older_than:
        raise CacheCommandError("--all and --older-than exclude each other", 2)
    age_text = None if args.all else (args.older_than or DEFAULT_PRUNE_AGE)
    try:
        age = None if age_text is None else parse_duration(age_text)
    except ValueError as e:
        raise CacheCommandError(f"--older-than: {e}", 2) from None
    what = "every unpinned blob" if age is None else f"blobs unused for {age_text}"
    ctx = cache_context(args)
    if args.dry_run:
        return _prune_dry_run(ctx, age, what)
    store = open_owner(ctx, args, "prune")
    if store is None:
        query = {"all": "1"} if age_text is None else {"older_than": age_text}
        body = admin_call(ctx, "POST", f"/api/cache/prune?{urllib.parse.urlencode(query)}")
        pruned, freed = int(body.get("count", 0)), int(body.get("freed_bytes", 0))
        tags = int(body.get("tags_forgotten", 0))
        left = body.get("remaining", {})
        left_count, left_bytes = int(left.get("count", 0)), int(left.get("bytes", 0))
    else:
        with store:
            sizes = {str(r.digest): r.size for r in store.list()}
            tags = len(store.tags())
            gone = store.prune(older_than_s=age)
            tags -= len(store.tags())
            pruned, freed = len(gone), sum(sizes.get(str(d), 0) for d in gone)
            usage = store.usage()
            left_count, left_bytes = usage.count, usage.bytes
    print(
        f"pruned {pruned} blob(s) ({what}), freed {format_size(freed)}, forgot {tags} tag(s); "
        f"{left_count} blob(s), {format_size(left_bytes)} left"
    )
    return 0


def _prune_dry_run(ctx: CacheContext, age: float | None, what: str) -> int:
    from fwdproxy.core.units import format_size

    now = time.time()
    cutoff = float("inf") if age is None else now - age
    with open_view(ctx.root) as view:
        rows = view.list()
        tags = [t for t in view.tags() if t.fetched_at < cutoff]
    victims = sorted(
        (r for r in rows if r.last_access < cutoff), key=lambda r: (r.last_access, str(r.digest))
    )
    lines = [
        (
            "would delete",
            short_digest(r.digest),
            format_size(r.size),
            media_kind(r.media_type),
            f"last used {ago(r.last_access, now)}",
        )
        for r in victims
    ]
    lines += [
        (
            "would forget",
            f"{t.registry}/{t.repo}:{t.tag}",
            "",
            "tag",
            f"fetched {ago(t.fetched_at, now)}",
        )
        for t in tags
    ]
    for line in table(lines, right=frozenset({2})):
        print(line)
    freed = sum(r.size for r in victims)
    print(
        f"dry run: would prune {len(victims)} of {len(rows)} blob(s) ({what}), freeing "
        f"{format_size(freed)}, and forget {len(tags)} tag(s); blobs a running proxy is "
        "serving right now would be kept"
    )
    return 0


# -- warm --------------------------------------------------------------------------------------


def mirror_url_from(cfg: Config | None) -> str | None:
    mirror = getattr(cfg, "mirror", None)
    if mirror is None or not mirror.listeners:
        return None
    first = mirror.listeners[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(first.host, first.host)
    return f"http://{format_host(host)}:{first.port}"


def cmd_warm(args: argparse.Namespace) -> int:
    import asyncio

    from fwdproxy.cli.progress import Progress
    from fwdproxy.cli.warm import (
        ALL_PLATFORMS,
        PlatformChoice,
        parse_platform,
        warm,
    )
    from fwdproxy.routing.imageref import ImageRefError, parse_image_ref

    args.images = list(args.images) + _images_from(args.from_files or [])
    if not args.images:
        raise CacheCommandError("nothing to warm: name IMAGEs or --from FILE", 2)
    for image in args.images:
        try:
            parse_image_ref(image)
        except ImageRefError as e:
            raise CacheCommandError(f"{image}: {e}", 2) from None
    try:
        platforms = [parse_platform(p) for p in args.platform or []]
    except ValueError as e:
        raise CacheCommandError(f"--platform: {e}", 2) from None
    if args.all_platforms and platforms:
        raise CacheCommandError("--platform and --all-platforms exclude each other", 2)
    if args.standalone:
        if args.mirror:
            raise CacheCommandError("--standalone and --mirror exclude each other", 2)
        return _warm_standalone(args, platforms)
    mirror = args.mirror
    if mirror is None:
        mirror = mirror_url_from(load_config_for(args, optional=False))
        if mirror is None:
            raise CacheCommandError(
                "no mirror to warm through: pass --mirror URL, or set mirror: in the config "
                "(warm pulls through a running mirror, which caches what it serves)",
                2,
            )
    if "://" not in mirror:
        mirror = f"http://{mirror}"
    choice: PlatformChoice = ALL_PLATFORMS if args.all_platforms else (platforms or None)
    progress = None if args.quiet else Progress(label="warm")
    try:
        report = asyncio.run(
            warm(mirror, args.images, choice, progress, concurrency=args.concurrency)
        )
    finally:
        if progress is not None:
            progress.close()
    return _print_warm(args, mirror, report)


def _images_from(paths: list[str]) -> list[str]:
    """Images named by Kubernetes manifests or `kubectl get -o json|yaml` output ('-': stdin)."""
    from fwdproxy.cli.kubeimages import ManifestError, images_in_text

    out: list[str] = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise CacheCommandError(f"--from {path}: {e.strerror or e}", 2) from None
        try:
            found = images_in_text(text)
        except ManifestError as e:
            raise CacheCommandError(f"--from {path}: {e}", 2) from None
        if not found:
            print(f"fwdproxy cache warm: --from {path}: no container images found",
                  file=sys.stderr)
        out += [i for i in found if i not in out]
    return out


def _warm_standalone(args: argparse.Namespace, platforms: list[Any]) -> int:
    """Warm the cache dir without a running proxy: an in-process mirror on an ephemeral
    loopback port, routed by the config's rules and upstreams, serves `warm` and stops."""
    import asyncio

    from fwdproxy.cli.progress import Progress
    from fwdproxy.cli.warm import ALL_PLATFORMS, PlatformChoice, warm
    from fwdproxy.config import load_config
    from fwdproxy.core.errors import ConfigError
    from fwdproxy.mirror.service import MirrorService
    from fwdproxy.server import Server

    try:
        cfg = load_config(args.config, listen_override=["127.0.0.1:0"],
                          mirror_override="127.0.0.1:0", cache_dir_override=args.cache_dir)
    except ConfigError as e:
        raise CacheCommandError("\n".join(e.problems)) from None
    cache = cfg.cache
    if cache is None:
        raise CacheCommandError("--standalone fills a cache directory: pass --cache-dir DIR or "
                                "set cache: {dir: DIR} in the config", 2)
    import dataclasses

    cfg = dataclasses.replace(cfg, admin=None)
    choice: PlatformChoice = ALL_PLATFORMS if args.all_platforms else (platforms or None)

    async def run() -> Any:
        server = Server(cfg, mirror_factory=lambda srv, spec: MirrorService(srv.state, spec))
        try:
            await server.start()
        except ConfigError as e:
            raise CacheCommandError("\n".join(e.problems)) from None
        progress = None if args.quiet else Progress(label="warm")
        try:
            assert server.mirror is not None
            host, port = server.mirror.addresses[0]
            return await warm(f"http://{host}:{port}", args.images, choice, progress,
                              concurrency=args.concurrency)
        finally:
            if progress is not None:
                progress.close()
            await server.stop(grace_s=0)

    try:
        report = asyncio.run(run())
    except OSError as e:
        raise CacheCommandError(f"cannot open the cache or a listener: {e}") from None
    return _print_warm(args, f"standalone ({cache.dir})", report)


def _print_warm(args: argparse.Namespace, mirror: str, report: Any) -> int:
    from fwdproxy.cli.warm import format_platform
    from fwdproxy.core.units import format_size
    if args.json:
        print(json.dumps({"mirror": mirror, **report.as_json()}))
        return 0 if report.ok else 1
    rows = [
        (
            "ok" if r.ok else "FAILED",
            r.reference or r.image,
            short_digest(r.digest) if r.digest else "",
            ", ".join(r.platforms) or ("-" if r.digest else ""),
            f"{r.blobs} blob(s), {format_size(r.bytes)}" if r.blobs else "",
        )
        for r in report.images
    ]
    for r, line in zip(report.images, table(rows, right=frozenset()), strict=True):
        print(line)
        for err in r.errors:
            print(f"        error: {err}")
    print(report.summary())
    if args.platform is None and not args.all_platforms and not args.quiet:
        from fwdproxy.cli.warm import host_platform

        print(f"(platform: {format_platform(host_platform())}, this host's; see --platform)")
    return 0 if report.ok else 1


# -- parser ------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    add_config_arg(p)
    p.add_argument("--cache-dir", metavar="DIR", help="the cache directory (default: cache.dir)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `cache` and its subcommands to the CLI's subparsers."""
    p = subparsers.add_parser(
        "cache",
        help="inspect and maintain the mirror's layer cache",
        formatter_class=formatter,
        description="Inspect (ls, tags, du), check (verify), shrink (prune) and fill (warm) "
        "the registry mirror's content-addressed layer cache.",
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda _args: _usage(p))

    s = sub.add_parser(
        "ls",
        help="list cached blobs",
        formatter_class=formatter,
        description="One line per blob: digest, size, type, last use, hits and "
        "the registry/repository names that asked for it. Read-only.",
    )
    _common(s)
    s.add_argument("--json", action="store_true", help="one JSON document")
    s.add_argument("--sort", choices=SORT_KEYS, default="used", help="order (default: used)")
    s.add_argument("--registry", metavar="R", help="only blobs registry R asked for")
    s.add_argument("--tags", action="store_true", help="list cached tags instead (cache tags)")
    s.set_defaults(func=_run(cmd_ls))

    s = sub.add_parser(
        "tags",
        help="list cached tag -> digest answers",
        formatter_class=formatter,
        description="Every tag answer the mirror cached, with its age and whether "
        "the manifest it names is still in the cache. Read-only.",
    )
    _common(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--registry", metavar="R", help="only tags of registry R")
    s.set_defaults(func=_run(cmd_tags))

    s = sub.add_parser(
        "du",
        help="space used, per registry",
        formatter_class=formatter,
        description="Total blobs and bytes, the share of max_size, and bytes per "
        "registry (a blob shared by two registries counts once in the total and "
        "under both). Read-only.",
    )
    _common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run(cmd_du))

    s = sub.add_parser(
        "verify",
        help="re-hash every blob, quarantine bad ones",
        formatter_class=formatter,
        description="Re-hash every cached blob against its digest; mismatches "
        "move to quarantine/ and leave the index. Exit 1 if any blob was bad "
        "or missing. Needs the cache's lock, or the running proxy's admin API.",
    )
    _common(s)
    s.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress; print only problems (and the summary if there were any)",
    )
    s.add_argument(
        "--via-admin",
        action="store_true",
        help="run it inside the running proxy (admin: in the config)",
    )
    s.set_defaults(func=_run(cmd_verify))

    s = sub.add_parser(
        "prune",
        help="delete blobs not used for a while",
        formatter_class=formatter,
        description="Delete cached blobs unused for --older-than (default "
        f"{DEFAULT_PRUNE_AGE}), or --all; blobs being served are never deleted. "
        "Also forgets tag answers older than the cutoff. Needs the cache's lock, "
        "or the running proxy's admin API; --dry-run needs neither.",
    )
    _common(s)
    s.add_argument(
        "--older-than", metavar="AGE", help=f"e.g. 12h, 7d (default {DEFAULT_PRUNE_AGE})"
    )
    s.add_argument("--all", action="store_true", help="every blob not in use right now")
    s.add_argument("--dry-run", action="store_true", help="only list what would go")
    s.add_argument(
        "--via-admin",
        action="store_true",
        help="run it inside the running proxy (admin: in the config)",
    )
    s.set_defaults(func=_run(cmd_prune))

    s = sub.add_parser(
        "warm",
        help="pre-pull images into the cache through the mirror",
        formatter_class=formatter,
        description="Pull IMAGEs through a running mirror, which caches what it "
        "serves: manifest, the platform manifests of an index, then every config "
        "and layer blob (each fetched once, checked against its digest, "
        "discarded). Exit 1 if any image failed.",
        epilog="examples:\n  fwdproxy cache warm alpine nginx:1.27\n"
        "  fwdproxy cache warm ghcr.io/org/app:1 --platform linux/arm64 "
        "--platform linux/amd64\n"
        "  fwdproxy cache warm quay.io/org/app@sha256:... --all-platforms "
        "--mirror http://10.0.0.2:5000\n"
        "  kubectl get pods -A -o json | fwdproxy cache warm --from -\n"
        "  fwdproxy cache warm --from deploy.yaml --standalone --cache-dir /var/cache/fwdproxy\n",
    )
    add_config_arg(s)
    s.add_argument("images", nargs="*", metavar="IMAGE")
    s.add_argument(
        "--from",
        dest="from_files",
        action="append",
        metavar="FILE",
        help="also warm every image a Kubernetes manifest or `kubectl get pods -A -o json` "
        "output names (repeatable; - reads stdin)",
    )
    s.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to warm from an index (repeatable; default: this host's)",
    )
    s.add_argument("--all-platforms", action="store_true", help="every platform in the index")
    s.add_argument(
        "--mirror",
        metavar="URL",
        help="the mirror (default: http:// + the config's first mirror.listen)",
    )
    s.add_argument(
        "--standalone",
        action="store_true",
        help="no running proxy: fill the cache dir (--cache-dir or cache.dir) through an "
        "in-process mirror that routes by the config's rules (the dir must not be in use)",
    )
    s.add_argument("--cache-dir", metavar="DIR", help="with --standalone: the cache to fill")
    s.add_argument(
        "--concurrency", type=int, default=4, metavar="N", help="blobs fetched at once (default 4)"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="the report as one JSON document")
    s.set_defaults(func=_run(cmd_warm))
    return p


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _run(fn: Any) -> Any:
    """Turn CacheCommandError into `error:` lines and its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except CacheCommandError as e:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:
            return 130

    return run
