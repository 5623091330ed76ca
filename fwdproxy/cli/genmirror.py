"""`fwdproxy gen containerd-mirror | docker-mirror | podman-mirror | k3s-mirror`.

Points each runtime at fwdproxy's registry mirror (a plain-HTTP OCI pull API, 127.0.0.1:5000 by
default), so pulls work without a CA. The runtimes tell the mirror the upstream registry in
different ways (mirrors.md §1.7, §2, §3.3, §4; `fwdproxy.proto.oci.parse_mirror_request`):

- containerd, k3s/RKE2 and Docker's containerd image store add `?ns=<registry>`, so one
  `certs.d/_default/hosts.toml` (k3s: the `"*"` mirror) serves every registry;
- containers/image (podman, CRI-O, skopeo, buildah) sends no `ns`, so each registry gets its own
  mirror location `HOST:PORT/<registry>` whose first path component names the upstream;
- Docker's classic `registry-mirrors` is Docker Hub only and reaches the default registry.

Same conventions as the proxy targets of `gen`: print, or `--write` atomically with a `.bak`,
idempotent, never restart anything. Merged files (daemon.json, registries.yaml) are rewritten
only when their content changes, so a hand-edited file that already points at the mirror keeps
its comments and layout. containerd's config.toml is never written: TOML cannot be rewritten
here without losing comments, and a second `[plugins...registry]` table would stop containerd
from starting, so `gen` checks it and prints the line to set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fwdproxy.cli.genfiles import GenError, read_text, root_path, write_file
from fwdproxy.cli.mirrorconf import (
    CONTAINERD_CERTS,
    CONTAINERD_CONFIG,
    DAEMON_JSON,
    DEFAULT_MIRROR,
    DOCKER_CERTS,
    K3S_REGISTRIES,
    PODMAN_DROPIN,
    RKE2_REGISTRIES,
    Mirror,
    check_containerd_config,
    load_toml,
    merge_registries_yaml,
    merge_registry_mirrors,
    own,
    parse_mirror_address,
    plan_podman_entries,
    prefix_of,
    registries_conf_files,
    registries_of,
    registry_dir,
    render_hosts_toml,
    render_podman_mirror,
    shadowing_dirs,
)
from fwdproxy.core.addr import format_host_port
from fwdproxy.proto.oci import OCIError, parse_registry


@dataclass(frozen=True, slots=True)
class Context:
    """The mirror address plus what the fwdproxy config says about the mirror, if one was given."""

    mirror: Mirror
    only: tuple[str, ...] = ()  # mirror.only: registries the mirror fetches from; empty: any
    prefixes: Mapping[str, str] = field(default_factory=dict)  # path prefix -> registry
    auth: bool = False
    catalog: Mapping[str, Any] | None = None  # the config's catalog; None: the built-in one
    notes: tuple[str, ...] = ()


def resolve_context(mirror_arg: str | None, config: str | None) -> Context:
    """--mirror wins; else the config's first mirror listener; else 127.0.0.1:5000."""
    mirror = parse_mirror_address(mirror_arg) if mirror_arg is not None else None
    if not config:
        return Context(mirror or parse_mirror_address(DEFAULT_MIRROR))
    try:
        from fwdproxy.config import load_config

        cfg = load_config(config)
    except Exception as e:  # someone else's loader: one clear line
        raise GenError(
            f"cannot read the mirror from {config}: {e}; pass --mirror HOST:PORT instead"
        ) from None
    spec = getattr(cfg, "mirror", None)
    catalog = getattr(cfg, "catalog", None) or None
    if spec is None:
        chosen = mirror or parse_mirror_address(DEFAULT_MIRROR)
        note = f"{config} has no mirror: section (the mirror is off); pointing at {chosen.address}"
        return Context(chosen, catalog=catalog, notes=(note,))
    if mirror is None:
        listener = spec.listeners[0]
        host, port = str(listener.host).strip("[]"), int(listener.port)
        if port == 0:
            raise GenError(
                f"{config}: mirror.listen has port 0 (chosen at start); pass --mirror HOST:PORT"
            )
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        mirror = parse_mirror_address(format_host_port(host, port), f"{config} mirror.listen")
    return Context(
        mirror,
        tuple(spec.only),
        dict(spec.prefixes),
        bool(spec.auth),
        catalog,
    )


def parse_registry_arg(text: str, flag: str = "--registry") -> str:
    """A registry host[:port] as the mirror names it (docker.io for every Docker Hub alias)."""
    try:
        return parse_registry(text.strip().lower()).name
    except OCIError as e:
        raise GenError(f"{flag} {text!r}: not a registry host[:port]: {e.message}", 2) from None


def catalog_registries(catalog: Mapping[str, Any] | None = None) -> list[str]:
    """Every registry name image references use in the catalog, in catalog order, no aliases."""
    if catalog is None:
        from fwdproxy.routing.catalog import builtin_catalog

        catalog = builtin_catalog()
    names: list[str] = []
    for registry in catalog.values():
        for ref in registry.refs:
            try:
                name = parse_registry(ref).name
            except OCIError:
                continue
            if name not in names:
                names.append(name)
    return names


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Output:
    """One file a target writes: `merge` maps its current text to the new text (returning the
    current text itself means "no change"), `show` is what printing without --write shows."""

    path: str
    merge: Callable[[str | None], str]
    show: str
    mode: int = 0o644


def _replace_with(content: str) -> Callable[[str | None], str]:
    return lambda _old: content


@dataclass(slots=True)
class Plan:
    outputs: list[Output]
    notes: list[str]
    restart: str


def _network_notes(ctx: Context, notes: list[str]) -> None:
    if not ctx.mirror.loopback:
        notes.append(
            f"{ctx.mirror.address} is not a loopback address: add {ctx.mirror.host} to NO_PROXY "
            "(gen ... --no-proxy-extra), or the runtime sends mirror requests through "
            "HTTP_PROXY; and make sure the mirror's allow-list admits this host"
        )
    if ctx.auth:
        notes.append(
            "mirror.auth is on: each runtime needs credentials for "
            f"{ctx.mirror.address} (containerd's hosts.toml has no credential key: use the CRI "
            "auth config or k3s configs:), or the mirror answers 401 and pulls fall back"
        )


def _hosts_outputs(
    root: str, certs_dir: str, ctx: Context, registries: list[str], target: str, notes: list[str]
) -> list[Output]:
    outs = []
    dirs = [registry_dir(root, certs_dir, r) for r in registries]
    for reg, dirname in [(None, "_default"), *zip(registries, dirs, strict=True)]:
        path = f"{certs_dir.rstrip('/')}/{dirname}/hosts.toml"
        content = render_hosts_toml(ctx.mirror, path, reg, target)
        outs.append(Output(path, _replace_with(content), content))
        d = root_path(root, path).parent
        if reg and d.is_dir() and (any(d.glob("*.crt")) or any(d.glob("*.cert"))):
            notes.append(
                f"{Path(path).parent}: has certificate files; with a hosts.toml there, "
                "containerd uses them only if hosts.toml names them "
                '(ca = "...", client = [...] under server)'
            )
    shadow = shadowing_dirs(root, certs_dir, ctx.mirror, dirs)
    if shadow:
        notes.append(
            f"{certs_dir}: {own(shadow, 'a directory', 'directories')}; such a directory hides "
            "_default, so those pulls skip the mirror (rerun with "
            + " ".join(f"--registry {s}" for s in shadow)
            + ")"
        )
    return outs


def _certs_dir(args: argparse.Namespace, default: str) -> str:
    certs_dir = str(args.certs_dir or default)
    if not certs_dir.startswith("/"):
        raise GenError(f"--certs-dir {certs_dir!r}: give an absolute path, as containerd needs", 2)
    return certs_dir.rstrip("/") or "/"


def plan_containerd(args: argparse.Namespace, ctx: Context) -> Plan:
    certs_dir = _certs_dir(args, CONTAINERD_CERTS)
    regs = _dedupe(parse_registry_arg(r) for r in args.registry)
    notes = list(ctx.notes)
    outs = _hosts_outputs(args.root, certs_dir, ctx, regs, "containerd-mirror", notes)
    if certs_dir.rstrip("/") == DOCKER_CERTS:
        notes.append(
            f"{DOCKER_CERTS} is read by Docker Engine >= 28 with the containerd image store, by "
            "nerdctl, and by containerd >= 2.2 with its default config_path"
        )
    else:
        check = check_containerd_config(
            read_text(root_path(args.root, CONTAINERD_CONFIG)), certs_dir
        )
        notes.append(f"{check.level}: {check.message}")
        notes += [f"    {line}" for line in check.snippet]
        notes.append(
            f"ctr reads hosts.toml only with --hosts-dir {certs_dir}; nerdctl reads "
            f"{CONTAINERD_CERTS} and {DOCKER_CERTS} by default"
        )
    _network_notes(ctx, notes)
    restart = (
        "nothing for hosts.toml (containerd reads it on every pull); "
        "systemctl restart containerd only after changing config_path"
    )
    return Plan(outs, notes, restart)


def plan_docker(args: argparse.Namespace, ctx: Context) -> Plan:
    certs_dir = _certs_dir(args, DOCKER_CERTS)
    regs = _dedupe(parse_registry_arg(r) for r in args.registry)
    notes = list(ctx.notes)
    outs: list[Output] = []
    if args.store in ("both", "classic"):
        show = "\n".join(
            [
                f"# {DAEMON_JSON}: merge this key (--write merges it and keeps every other key)",
                json.dumps({"registry-mirrors": [ctx.mirror.url]}, indent=2),
            ]
        )
        outs.append(
            Output(DAEMON_JSON, lambda old: merge_registry_mirrors(old, ctx.mirror), show + "\n")
        )
        notes.append(
            '"registry-mirrors" covers Docker Hub only on the classic store: ghcr.io, quay.io '
            "and the rest go to their registries directly (or through fwdproxy as a proxy)"
        )
        if ctx.auth:
            notes.append(
                "the classic store sends your `docker login` Docker Hub credentials to whatever "
                "the mirror challenges with (mirrors.md §2.2)"
            )
    if args.store in ("both", "containerd"):
        # _default is verified, not assumed: moby daemon/hosts.go (Engine >= 28) resolves with
        # containerd's HostDirFromRoot(registry.CertsDir()), and containerd's hostPaths tries
        # <host>_<port>_, <host>, then _default (mirrors.md §1.2, §2.5).
        outs += _hosts_outputs(args.root, certs_dir, ctx, regs, "docker-mirror", notes)
        notes.append(
            f"{certs_dir}/_default/hosts.toml: read by Docker Engine >= 28 with the containerd "
            "image store (default since Engine 29), on every pull, for every registry; Engine "
            "24-27 ignore hosts.toml and use registry-mirrors (Docker Hub only)"
        )
    if not ctx.mirror.loopback or ":" in ctx.mirror.host:
        notes.append(
            f"Docker treats only 127.0.0.0/8 (and ::1 from Engine 28) as insecure by default: "
            f'BuildKit and the containerd store on Engine <= 27 need "insecure-registries": '
            f'["{ctx.mirror.address}"] to use http:// (mirrors.md §2.4); gen does not add it'
        )
    _network_notes(ctx, notes)
    restart = "systemctl restart docker (daemon.json is read at start; hosts.toml on every pull)"
    if args.store == "containerd":
        restart = "nothing: dockerd reads hosts.toml on every pull"
    return Plan(outs, notes, restart)


def plan_podman(args: argparse.Namespace, ctx: Context) -> Plan:
    notes = list(ctx.notes)
    extras = [parse_registry_arg(r) for r in args.registry]
    if args.only_registry:
        names = _dedupe(parse_registry_arg(r, "--only-registry") for r in args.only_registry)
    else:
        base = list(ctx.only) if ctx.only else catalog_registries(ctx.catalog)
        names = _dedupe([*base, *extras])
    if ctx.only:
        refused = [n for n in names if n not in ctx.only]
        if refused:
            notes.append(
                f"mirror.only does not list {', '.join(refused)}: the mirror refuses them and "
                "podman falls back to the registry"
            )
    before, after = registries_conf_files(args.root)
    entries = plan_podman_entries(names, ctx.mirror, ctx.prefixes, before, notes)
    for path, text in after:
        try:
            data = load_toml(text) or {}
        except ValueError:
            continue
        hidden = sorted({prefix_of(r) for r in registries_of(data)} & set(names))
        if hidden:
            notes.append(
                f"{path} sorts after {Path(PODMAN_DROPIN).name} and replaces its entries for "
                f"{', '.join(hidden)}: those pulls skip the mirror"
            )
    if ":" in ctx.mirror.host:
        notes.append(
            "an IPv6 mirror address: containers/image versions whose reference grammar has no "
            "IPv6 literals reject these locations; prefer 127.0.0.1 or a host name"
        )
    _network_notes(ctx, notes)
    content = render_podman_mirror(entries, PODMAN_DROPIN)
    outs = [Output(PODMAN_DROPIN, _replace_with(content), content)]
    restart = (
        "nothing for podman, buildah and skopeo (read on every command); "
        "systemctl restart crio for CRI-O; restart podman.service if you use the API service"
    )
    return Plan(outs, notes, restart)


def plan_k3s(args: argparse.Namespace, ctx: Context) -> Plan:
    path = RKE2_REGISTRIES if args.rke2 else K3S_REGISTRIES
    keys = ["*", *_dedupe(parse_registry_arg(r) for r in args.registry)]
    notes = list(ctx.notes)
    show = merge_registries_yaml(None, ctx.mirror, keys, path, [])
    # 0600 for a new file: registries.yaml is where k3s keeps registry passwords (configs:).
    outs = [
        Output(
            path, lambda old: merge_registries_yaml(old, ctx.mirror, keys, path, notes), show, 0o600
        )
    ]
    notes.append(
        f"{path}: k3s/RKE2 from the Jan-2024 releases (v1.26.13, v1.27.10, v1.28.6, v1.29.1) "
        'turn "*" into a _default hosts.toml; put this file on every node'
    )
    if not ctx.mirror.loopback:
        notes.append(f"every node must reach {ctx.mirror.address}")
    _network_notes(ctx, notes)
    if args.rke2:
        service = "rke2-agent" if args.agent else "rke2-server"
    else:
        service = "k3s-agent" if args.agent else "k3s"
    return Plan(outs, notes, f"systemctl restart {service} (registries.yaml is read at start)")


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    name: str
    help: str
    plan: Callable[[argparse.Namespace, Context], Plan]
    teach: str  # the target's own --help


TARGETS: Final = {
    t.name: t
    for t in (
        MirrorTarget(
            "containerd-mirror",
            "certs.d/_default/hosts.toml: containerd pulls through fwdproxy's mirror",
            plan_containerd,
            f"""\
fwdproxy gen containerd-mirror [--mirror HOST:PORT] [--registry R]... [--certs-dir DIR] [--write]

Writes {CONTAINERD_CERTS}/_default/hosts.toml (and DIR/R/hosts.toml per --registry R):
  [host."http://127.0.0.1:5000"]
    capabilities = ["pull", "resolve"]
containerd >= 1.4 adds ?ns=<registry> to every mirror request, so the one _default file covers
every registry. There is no `server =` line: containerd then tries the registry itself after
the mirror, so a stopped mirror slows pulls instead of breaking them. A directory of a registry's
own (certs.d/docker.io/) hides _default for that registry: `gen` names such directories, and
--registry R writes the mirror into them.

The CRI plugin (kubelet, crictl) reads hosts.toml only when config.toml sets config_path:
  containerd 1.x (version = 2):  [plugins."io.containerd.grpc.v1.cri".registry]
                                   config_path = "{CONTAINERD_CERTS}"
  containerd 2.x (version = 3):  [plugins."io.containerd.cri.v1.images".registry]
                                   config_path = "{CONTAINERD_CERTS}"
  (2.2+ defaults to {CONTAINERD_CERTS}:{DOCKER_CERTS} when neither config_path nor the
  deprecated registry.mirrors is set; config_path and registry.mirrors together stop containerd.)
`gen` checks {CONTAINERD_CONFIG} and prints what to set; it never edits config.toml (a TOML
rewrite would lose its comments, and a second registry table would stop containerd).
ctr: `ctr images pull --hosts-dir {CONTAINERD_CERTS} docker.io/library/alpine:latest`.
nerdctl reads {CONTAINERD_CERTS} and {DOCKER_CERTS} by default.
--certs-dir {DOCKER_CERTS} writes the same file for Docker's containerd store (docker-mirror
does that too).

To apply: nothing for hosts.toml (read on every pull); systemctl restart containerd after
changing config_path.""",
        ),
        MirrorTarget(
            "docker-mirror",
            '"registry-mirrors" in daemon.json + certs.d/_default/hosts.toml (containerd store)',
            plan_docker,
            f"""\
fwdproxy gen docker-mirror [--mirror HOST:PORT] [--store both|classic|containerd] [--write]

Writes two files (--store picks one):
  {DAEMON_JSON}: "registry-mirrors": ["http://127.0.0.1:5000"] merged in, first in the
    list, every other key kept. The classic (graphdriver) store uses it for Docker Hub ONLY;
    images from ghcr.io, quay.io... do not use the mirror there. http:// works as written.
  {DOCKER_CERTS}/_default/hosts.toml: Docker Engine >= 28 with the containerd image store
    (the default for new installs since Engine 29) resolves every pull through containerd's
    hosts.toml under {DOCKER_CERTS} (not {CONTAINERD_CERTS}), with the _default fallback
    directory, so every registry goes through the mirror (containerd adds ?ns=<registry>).
    Engine 24-27 with the containerd store ignore hosts.toml and use registry-mirrors only.
    --registry R also writes {DOCKER_CERTS}/R/hosts.toml; a registry directory that exists
    already (with certificates for the classic store) hides _default for that registry.

Loopback (127.0.0.0/8) is always an insecure registry for Docker; a mirror on another address
needs BuildKit and Engine <= 27 to list it in "insecure-registries" to use http://.

To apply: systemctl restart docker (daemon.json is read at start; hosts.toml on every pull).""",
        ),
        MirrorTarget(
            "podman-mirror",
            "registries.conf.d drop-in: podman/CRI-O/skopeo/buildah pull through the mirror",
            plan_podman,
            f"""\
fwdproxy gen podman-mirror [--mirror HOST:PORT] [--registry R]... [--only-registry R]... [--write]

Writes {PODMAN_DROPIN} (registries.conf v2) with, per registry:
  [[registry]]
  prefix = "quay.io"
  location = "quay.io"
  [[registry.mirror]]
  location = "127.0.0.1:5000/quay.io"
  insecure = true
containers/image (podman, buildah, skopeo, CRI-O) sends no ?ns=, so the mirror reads the
registry from the first path component. insecure = true is needed for plain HTTP. Registries:
every registry in fwdproxy's catalog (or the config's mirror.only) plus --registry R, or exactly
the --only-registry list. docker.io keeps location = "docker.io" (containers/image dials
registry-1.docker.io for it).

A drop-in [[registry]] replaces the one with the same prefix in registries.conf and earlier
drop-ins, so `gen` carries their settings (insecure, blocked, other mirrors) into its entry and
names later drop-ins that would replace it. A v1 registries.conf ([registries.search]) cannot
be mixed with v2 drop-ins: `gen` stops and says so. ~/.config/containers/registries.conf, where
it exists, hides all /etc drop-ins for that user. `podman search` never uses mirrors.

To apply: nothing for podman, buildah and skopeo; systemctl restart crio for CRI-O.""",
        ),
        MirrorTarget(
            "k3s-mirror",
            'registries.yaml "*" mirror for k3s (--rke2: RKE2), merged',
            plan_k3s,
            f"""\
fwdproxy gen k3s-mirror [--mirror HOST:PORT] [--rke2] [--agent] [--registry R]... [--write]

Merges into {K3S_REGISTRIES} (--rke2: {RKE2_REGISTRIES}):
  mirrors:
    "*":
      endpoint: ["http://127.0.0.1:5000"]
Other mirrors and configs are kept; the mirror goes first in an existing "*" endpoint list.
k3s/RKE2 from the Jan-2024 releases (v1.26.13, v1.27.10, v1.28.6, v1.29.1) write "*" as a
_default hosts.toml for their containerd, which adds ?ns=<registry>; the registry itself is
tried after the mirror (k3s releases affected by k3s#9728 did not fall back for "*"). A
registry with an entry of its own (mirrors: docker.io:) does not use "*": --registry R adds
the mirror there too. The file is YAML-parsed and rewritten, so comments do not survive a
change (the previous file is kept as .bak).

To apply, on every node: systemctl restart k3s (--agent: k3s-agent; RKE2: rke2-server or
rke2-agent). registries.yaml is read only at start.""",
        ),
    )
}

_PROXY_ONLY: Final = (
    ("proxy", "--proxy"),
    ("cluster_cidr", "--cluster-cidr"),
    ("service_cidr", "--service-cidr"),
    ("no_proxy_extra", "--no-proxy-extra"),
    ("containerd_only", "--containerd-only"),
    ("env_file", "--env-file"),
)
_MIRROR_ONLY: Final = (
    ("mirror", "--mirror"),
    ("registry", "--registry"),
    ("only_registry", "--only-registry"),
    ("certs_dir", "--certs-dir"),
    ("rke2", "--rke2"),
)


def check_flags(args: argparse.Namespace) -> None:
    """Flags of the other kind of target are mistakes worth a usage error, not silence."""
    mirror = args.target in TARGETS
    for attr, flag in _PROXY_ONLY if mirror else _MIRROR_ONLY:
        if getattr(args, attr, None):
            kind = "the proxy targets" if mirror else "the *-mirror targets"
            raise GenError(f"{flag} is for {kind}, not {args.target}", 2)
    if not mirror and getattr(args, "store", "both") != "both":
        raise GenError(f"--store is for docker-mirror, not {args.target}", 2)
    if mirror:
        allowed = {
            "registry": ("containerd-mirror", "docker-mirror", "podman-mirror", "k3s-mirror"),
            "only_registry": ("podman-mirror",),
            "certs_dir": ("containerd-mirror", "docker-mirror"),
            "rke2": ("k3s-mirror",),
            "agent": ("k3s-mirror",),
        }
        for attr, targets in allowed.items():
            if getattr(args, attr, None) and args.target not in targets:
                raise GenError(f"--{attr.replace('_', '-')} does not apply to {args.target}", 2)
        if args.store != "both" and args.target != "docker-mirror":
            raise GenError(f"--store does not apply to {args.target}", 2)
        if args.only_registry and args.registry:
            raise GenError("--only-registry and --registry do not go together", 2)


def run_target(args: argparse.Namespace) -> int:
    """Print or install one mirror target's files; every file is computed before any is written,
    so a file we refuse to touch (bad JSON/YAML) leaves the others alone too."""
    t = TARGETS[args.target]
    ctx = resolve_context(args.mirror, args.config)
    plan = t.plan(args, ctx)
    if not args.write:
        for note in plan.notes:
            print(f"fwdproxy gen: {note}", file=sys.stderr)
        sys.stdout.write("\n".join(o.show for o in plan.outputs))
        return 0
    staged = []
    for o in plan.outputs:
        target = root_path(args.root, o.path)
        old = read_text(target)
        staged.append((target, old, o.merge(old), o.mode))
    for note in plan.notes:
        print(f"fwdproxy gen: {note}", file=sys.stderr)
    changed = False
    for target, old, content, mode in staged:
        outcome = "unchanged" if content == old else write_file(target, content, mode)
        backup = f" (previous file kept as {target}.bak)" if outcome == "updated" else ""
        print(f"{target}: {outcome}{backup}")
        changed |= outcome != "unchanged"
    if changed:
        print(f"to apply: {plan.restart}")
    return 0


def help_text(target: str) -> str:
    return TARGETS[target].teach + "\n"
