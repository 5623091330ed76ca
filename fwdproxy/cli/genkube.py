"""`fwdproxy gen kubernetes`: a kustomize overlay of deploy/kubernetes for one cluster.

The manifests under deploy/kubernetes are generic: a node DaemonSet (base), the `gateway`
component (a parent cache on the tunnel node), and overlays for k3s, RKE2 and for nodes that
keep the proxy environment. What differs from cluster to cluster is the upstream tunnel, the
client CIDRs the gateway admits and where the image lives; this target writes an overlay with
exactly those: a kustomization.yaml naming the base and components, and the rules.yaml files
it swaps in (kustomize `configMapGenerator`: the nodes' ConfigMap replaced, the gateway's
created).

The rules.yaml files shipped under deploy/kubernetes are this module's output for the defaults
(`deploy_files`, checked by tests/test_deploy.py), so an overlay and the manifests it patches
cannot drift apart. Writes follow the other targets: print, or `--write` atomically with a
`.bak`, idempotent; nothing is applied to a cluster.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fwdproxy.cli.genfiles import GenError, read_text, write_file

TARGET: Final = "kubernetes"
HELP: Final = "a kustomize overlay of deploy/kubernetes: your upstream, CIDRs, image, gateway"
NAMESPACE: Final = "fwdproxy"
RULES_CONFIGMAP: Final = "fwdproxy-rules"
GATEWAY: Final = "fwdproxy-gateway"  # the Deployment, Service and PVC name
GATEWAY_RULES_CONFIGMAP: Final = "fwdproxy-gateway-rules"
UID: Final = 10001  # the image's user; runAsUser/runAsGroup in every manifest
PROXY_PORT: Final = 3128
MIRROR_PORT: Final = 5000
ADMIN_PORT: Final = 9128
CACHE_DIR: Final = "/var/cache/fwdproxy"
NODE_CACHE_SIZE: Final = "20GiB"
GATEWAY_CACHE_SIZE: Final = "90GiB"  # the claim is 100Gi: leave room for the index and tmp/
DEFAULT_UPSTREAM: Final = "socks5://127.0.0.1:1080"
DEFAULT_ALLOW: Final = ("10.0.0.0/8",)
DEFAULT_CLUSTER_DOMAIN: Final = "cluster.local"
DEFAULT_OUT: Final = "fwdproxy-cluster"
# --variant -> the directory under deploy/kubernetes the overlay builds on
VARIANTS: Final = {
    "containerd": "base",
    "k3s": "overlays/k3s",
    "rke2": "overlays/rke2",
    "proxy-env": "overlays/proxy-env",
}
# Characters a plain YAML scalar may hold in block context without changing its meaning.
_PLAIN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~%+=:@/$()-]*")
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


def gateway_host(cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """The gateway Service's fully qualified name: a name with fewer dots than `ndots` (5 in a
    pod's resolv.conf) is tried against every search domain first, so the FQDN saves the
    lookups that fail on each (re)connect."""
    return f"{GATEWAY}.{NAMESPACE}.svc.{cluster_domain}"


def _scalar(value: str) -> str:
    """A YAML scalar for a URL or CIDR: plain where that reads back as the same string."""
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def _flow(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) if ":" in i else _scalar(i) for i in items) + "]"


# --- rules.yaml ------------------------------------------------------------------------------

_DIRECT_RULES: Final = """\
rules:
  # Never tunnel local and cluster-internal destinations (they must stay on site).
  - name: local-names
    suffix: [localhost, svc, cluster.local, local, internal, home.arpa]
    action: direct
  - name: private-ranges
    cidr:
      - 127.0.0.0/8
      - 10.0.0.0/8
      - 172.16.0.0/12
      - 192.168.0.0/16
      - 100.64.0.0/10      # CGNAT, often used for VPN/overlay networks
      - 169.254.0.0/16     # link-local
      - "::1/128"
      - fc00::/7           # unique local
      - fe80::/10          # link-local
    action: direct
  # Every registry in the built-in catalog: API, token and blob/CDN hosts
  # (`fwdproxy explain IMAGE` lists them).
  - name: registries
    registries: all
    via: tunnel
  # Your own additions, e.g. a registry only the tunnel reaches:
  # - name: company-registry
  #   domain: [harbor.example.com]
  #   via: tunnel

# Everything else connects directly from the node.
default: direct
"""

_NODE: Final = (
    """\
# rules.yaml of fwdproxy on every node (DaemonSet, host network): {what}
{origin}\
# Check it: fwdproxy check -c rules.yaml

listen: 127.0.0.1:{proxy_port}

{via}\
upstreams:
  tunnel: {upstream}

"""
    + _DIRECT_RULES
    + """
# /healthz and /readyz (the DaemonSet's probes), /metrics and the dashboard; loopback only.
# From a workstation: kubectl -n {namespace} port-forward pod/<pod> {admin_port}
admin: {{listen: 127.0.0.1:{admin_port}}}
# log: {{level: info, format: json}}   # JSON lines for a log collector

{tail}\
"""
)
_WITH_MIRROR: Final = """\
the proxy, the
# registry mirror with its layer cache and the admin listener, all on 127.0.0.1."""
_WITHOUT_MIRROR: Final = """\
the proxy, which
# the runtimes use through HTTPS_PROXY=http://127.0.0.1:3128, and the admin
# listener, on 127.0.0.1; no mirror."""
_VIA_TUNNEL: Final = """\
# The upstream tunnel as this node reaches it (127.0.0.1 is the node itself: the
# DaemonSet uses the host network); `fwdproxy gen kubernetes --upstream URL`.
"""
_VIA_GATEWAY: Final = """\
# The gateway's proxy: registry traffic leaves the cluster on the tunnel node.
"""
_MIRROR: Final = """\
# The registry mirror: containerd/k3s pull through http://127.0.0.1:5000, as the
# DaemonSet's init container wrote into their config; each layer is fetched once per node.
mirror:
  listen: 127.0.0.1:{mirror_port}
{parent}\
  tag_ttl: 60s                # reuse a tag -> digest answer this long
  serve_stale: 7d             # answer tags from the cache while the upstream is down
cache:
  dir: {cache_dir}     # a hostPath on the node (base/daemonset.yaml)
  max_size: {cache_size}              # least recently used layers go first
"""
_PARENT: Final = """\
  # Misses go to the gateway's mirror first, so a layer crosses the tunnel once per
  # cluster; when that fails, this node fetches through its upstream (the gateway's proxy).
  parent: {parent}
"""
_NO_MIRROR: Final = """\
# No mirror: the runtimes send pulls to the proxy above through HTTPS_PROXY, which
# `fwdproxy gen containerd-dropin --write` sets on the node (deploy/kubernetes/README.md).
"""


def render_node_rules(
    upstream: str = DEFAULT_UPSTREAM,
    *,
    mirror: bool = True,
    parent: str | None = None,
    origin: str = "",
) -> str:
    """rules.yaml for the node DaemonSet: proxy and admin on loopback, the mirror (unless the
    node keeps the proxy environment), and with a gateway its proxy as the upstream and its
    mirror as the parent."""
    tail = _NO_MIRROR
    if mirror:
        tail = _MIRROR.format(
            mirror_port=MIRROR_PORT,
            parent=_PARENT.format(parent=_scalar(parent)) if parent else "",
            cache_dir=CACHE_DIR,
            cache_size=NODE_CACHE_SIZE,
        )
    return _NODE.format(
        what=_WITH_MIRROR if mirror else _WITHOUT_MIRROR,
        origin=f"# {origin}\n" if origin else "",
        proxy_port=PROXY_PORT,
        via=_VIA_GATEWAY if parent else _VIA_TUNNEL,
        upstream=_scalar(upstream),
        namespace=NAMESPACE,
        admin_port=ADMIN_PORT,
        tail=tail,
    )


_GATEWAY: Final = """\
# rules.yaml of the fwdproxy gateway (deploy/kubernetes/gateway): the parent cache on the
# tunnel node. Node mirrors ask its mirror first on a miss (their mirror.parent), node
# proxies send registry traffic through its proxy (their upstream), so each layer crosses
# the tunnel once per cluster.
{origin}\
# Check it: fwdproxy check -c rules.yaml

# Who may connect: the cluster's node and pod CIDRs. Node proxies and mirrors use the
# host network, so they connect from node addresses. 10.0.0.0/8 is a placeholder:
# `fwdproxy gen kubernetes --gateway --allow CIDR ...` sets yours.
listen: 0.0.0.0:{proxy_port}
allow: {cidrs}

# Replaced at start by $FWDPROXY_UPSTREAM, which gateway/deployment.yaml sets to the
# tunnel on the node the gateway runs on (socks5://$(NODE_IP):1080), and
# `fwdproxy gen kubernetes --gateway --upstream URL` to yours.
upstreams:
  tunnel: {upstream}

rules:
  - name: registries
    registries: all
    via: tunnel
  # An internal registry the gateway should fetch from directly:
  # - name: company-registry
  #   domain: [harbor.example.com]
  #   action: direct

# Only registry traffic may use the gateway: it is no general way out of the cluster.
default: reject

# Loopback in the pod: the probes run inside the container (exec); the dashboard and
# /metrics: kubectl -n {namespace} port-forward deploy/{gateway} {admin_port}
admin: {{listen: 127.0.0.1:{admin_port}}}

mirror:
  listen: 0.0.0.0:{mirror_port}
  allow: {cidrs}
  tag_ttl: 60s
  serve_stale: 7d
cache:
  dir: {cache_dir}     # the PersistentVolumeClaim (gateway/pvc.yaml)
  max_size: {cache_size}              # below the claim's 100Gi: the index and tmp/ need room
"""


def render_gateway_rules(allow: Sequence[str] = DEFAULT_ALLOW, origin: str = "") -> str:
    """rules.yaml for the gateway Deployment: proxy and mirror on the pod network for the
    cluster's CIDRs only, registry traffic through the tunnel, everything else refused."""
    return _GATEWAY.format(
        origin=f"# {origin}\n" if origin else "",
        proxy_port=PROXY_PORT,
        mirror_port=MIRROR_PORT,
        admin_port=ADMIN_PORT,
        cidrs=_flow(allow),
        upstream=DEFAULT_UPSTREAM,
        namespace=NAMESPACE,
        gateway=GATEWAY,
        cache_dir=CACHE_DIR,
        cache_size=GATEWAY_CACHE_SIZE,
    )


def deploy_files() -> dict[str, str]:
    """The rules.yaml files under deploy/kubernetes, by path relative to it (the defaults)."""
    parent = f"http://{gateway_host()}:{MIRROR_PORT}"
    gw_proxy = f"http://{gateway_host()}:{PROXY_PORT}"
    return {
        "base/rules.yaml": render_node_rules(),
        "overlays/gateway/node-rules.yaml": render_node_rules(gw_proxy, parent=parent),
        "overlays/gateway/gateway-rules.yaml": render_gateway_rules(),
        "overlays/proxy-env/rules.yaml": render_node_rules(mirror=False),
    }


# --- the overlay -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    upstream: str | None = None  # None: the default (nodes: DEFAULT_UPSTREAM; gateway: $NODE_IP)
    allow: tuple[str, ...] = DEFAULT_ALLOW
    gateway: bool = False
    variant: str = "containerd"
    base: str = "../deploy/kubernetes"
    image: str | None = None
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    gateway_address: str | None = None  # a pinned ClusterIP or another name for the gateway


def check_upstream(url: str) -> str:
    from fwdproxy.config import parse_upstream_url

    try:
        parse_upstream_url("tunnel", url)
    except ValueError as e:
        raise GenError(f"--upstream {url!r}: {e}", 2) from None
    if any(c.isspace() for c in url):
        raise GenError(f"--upstream {url!r}: no blanks in a URL", 2)
    return url.strip()


def check_cidrs(items: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in items:
        for item in (s.strip() for s in raw.split(",")):
            if not item:
                continue
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError as e:
                raise GenError(f"--allow {item!r}: {e}", 2) from None
            if net.prefixlen == 0:
                raise GenError(
                    f"--allow {item!r}: that is everyone; name the cluster's node and pod CIDRs",
                    2,
                )
            if str(net) not in out:
                out.append(str(net))
    return tuple(out)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def split_image(ref: str) -> dict[str, str]:
    """`name[:tag][@digest]` -> kustomize images fields (newName, newTag, digest)."""
    name, _, digest = ref.strip().partition("@")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    if not name or any(c.isspace() for c in ref) or (digest and ":" not in digest):
        raise GenError(f"--image {ref!r}: expected NAME[:TAG][@sha256:...]", 2)
    out = {"newName": name}
    if tag:
        out["newTag"] = tag
    if digest:
        out["digest"] = digest
    return out


def join_ref(base: str, sub: str) -> str:
    """`base` + `/sub` for a local path or a remote kustomize URL (`...//dir?ref=v1`)."""
    path, q, query = base.partition("?")
    return f"{path.rstrip('/')}/{sub}" + (f"?{query}" if q else "")


def render_overlay(o: Options, command: str) -> dict[str, str]:
    """{file name: content} of the overlay directory."""
    host = o.gateway_address or gateway_host(o.cluster_domain)
    host_port = f"[{host}]" if ":" in host else host
    origin = f"Written by `{command}`; rerun it to update."
    if o.gateway:
        node = render_node_rules(
            f"http://{host_port}:{PROXY_PORT}",
            mirror=o.variant != "proxy-env",
            parent=None if o.variant == "proxy-env" else f"http://{host_port}:{MIRROR_PORT}",
            origin=origin,
        )
    else:
        node = render_node_rules(
            o.upstream or DEFAULT_UPSTREAM, mirror=o.variant != "proxy-env", origin=origin
        )
    files = {"rules.yaml": node}
    k = [
        "# kustomization.yaml: fwdproxy for one cluster, from",
        f"#   {command}",
        "# Preview: kubectl kustomize .      Apply: kubectl apply -k .",
        "# Edit rules.yaml for rules of your own (the DaemonSet rolls when it changes).",
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"namespace: {NAMESPACE}",
        "resources:",
        f"  - {join_ref(o.base, VARIANTS[o.variant])}",
    ]
    if o.gateway:
        k += ["components:", f"  - {join_ref(o.base, 'gateway')}"]
    k += [
        "configMapGenerator:",
        f"  - name: {RULES_CONFIGMAP}",
        f"    namespace: {NAMESPACE}",
        "    behavior: replace",
        "    files:",
        "      - rules.yaml",
    ]
    if o.gateway:
        files["gateway-rules.yaml"] = render_gateway_rules(o.allow, origin)
        k += [
            f"  - name: {GATEWAY_RULES_CONFIGMAP}",
            f"    namespace: {NAMESPACE}",
            "    files:",
            "      - rules.yaml=gateway-rules.yaml",
        ]
        patches = []
        if o.upstream is not None:
            patches += [
                "  # The gateway's tunnel (deployment.yaml defaults to socks5://$(NODE_IP):1080).",
                "  - patch: |-",
                "      apiVersion: apps/v1",
                "      kind: Deployment",
                "      metadata:",
                f"        name: {GATEWAY}",
                "      spec:",
                "        template:",
                "          spec:",
                "            containers:",
                "              - name: fwdproxy",
                "                env:",
                "                  - name: FWDPROXY_UPSTREAM",
                f"                    value: {_scalar(o.upstream)}",
            ]
        if o.gateway_address and _is_ip(o.gateway_address):
            patches += [
                "  # The nodes reach the gateway at this address, without cluster DNS. clusterIP",
                "  # is immutable: delete the Service first to change it on a live cluster.",
                "  - patch: |-",
                "      apiVersion: v1",
                "      kind: Service",
                "      metadata:",
                f"        name: {GATEWAY}",
                "      spec:",
                f"        clusterIP: {json.dumps(o.gateway_address)}",
            ]
        if patches:
            k += ["patches:", *patches]
    if o.image:
        k += ["images:", "  - name: fwdproxy"]
        k += [f"    {key}: {json.dumps(value)}" for key, value in split_image(o.image).items()]
    files["kustomization.yaml"] = "\n".join(k) + "\n"
    return files


def options_from_args(args: argparse.Namespace) -> Options:
    if args.allow and not args.gateway:
        raise GenError("--allow sets who may use the gateway: it needs --gateway", 2)
    for flag, value in (
        ("--gateway-address", args.gateway_address),
        ("--cluster-domain", args.cluster_domain),
    ):
        if value and not args.gateway:
            raise GenError(f"{flag} is about reaching the gateway: it needs --gateway", 2)
    domain = str(args.cluster_domain or DEFAULT_CLUSTER_DOMAIN).strip(".").lower()
    if not _DNS_NAME.fullmatch(domain):
        raise GenError(f"--cluster-domain {args.cluster_domain!r}: not a DNS name", 2)
    address = args.gateway_address
    if address is not None:
        address = address.strip().strip("[]").lower()
        if not _is_ip(address) and not _DNS_NAME.fullmatch(address.rstrip(".")):
            raise GenError(
                f"--gateway-address {args.gateway_address!r}: an IP (the Service's pinned "
                "clusterIP) or a DNS name",
                2,
            )
    return Options(
        upstream=check_upstream(args.upstream) if args.upstream else None,
        allow=check_cidrs(args.allow) if args.allow else DEFAULT_ALLOW,
        gateway=bool(args.gateway),
        variant=args.variant or "containerd",
        base=args.base or default_base(args.out or DEFAULT_OUT),
        image=_checked_image(args.image),
        cluster_domain=domain,
        gateway_address=address,
    )


def _checked_image(ref: str | None) -> str | None:
    if not ref:
        return None
    split_image(ref)  # a usage error now rather than a kustomize error later
    return ref.strip()


def default_base(out: str, cwd: str | None = None) -> str:
    """deploy/kubernetes of the checkout we run in, relative to the overlay directory; else
    the layout of an overlay made next to deploy/ in a checkout."""
    here = Path(cwd or os.getcwd())
    found = here / "deploy" / "kubernetes"
    if (found / "base" / "kustomization.yaml").is_file():
        target = (here / out).resolve()
        return Path(os.path.relpath(found.resolve(), target)).as_posix()
    return "../deploy/kubernetes"


def redact(url: str) -> str:
    """The URL with its password replaced: the command is repeated in comments of files that
    reach every node (the nodes' ConfigMap), where the gateway's password has no business."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this overlay, for its header."""
    parts = ["fwdproxy", "gen", "kubernetes"]
    if args.upstream:
        parts += ["--upstream", redact(args.upstream)]
    if args.gateway:
        parts.append("--gateway")
    for cidr in args.allow:
        parts += ["--allow", cidr]
    if args.variant and args.variant != "containerd":
        parts += ["--variant", args.variant]
    for flag, attr in (
        ("--image", "image"),
        ("--cluster-domain", "cluster_domain"),
        ("--gateway-address", "gateway_address"),
        ("--base", "base"),
    ):
        if getattr(args, attr, None):
            parts += [flag, getattr(args, attr)]
    return shlex.join(parts)


# --- command ---------------------------------------------------------------------------------

TEACH: Final = f"""\
fwdproxy gen kubernetes [--upstream URL] [--gateway [--allow CIDR]... [--gateway-address IP]]
                        [--variant containerd|k3s|rke2|proxy-env] [--image NAME[:TAG]]
                        [--base PATH|URL] [--write [--out DIR]]

A kustomize overlay of deploy/kubernetes for your cluster: kustomization.yaml plus the
rules.yaml it swaps in (and gateway-rules.yaml with --gateway). Printed, or written into --out
DIR (default ./{DEFAULT_OUT}); then: kubectl apply -k DIR.

  --upstream URL     the tunnel: every node's (default {DEFAULT_UPSTREAM}, the node itself),
                     or with --gateway the gateway's (default socks5://$(NODE_IP):1080, the
                     tunnel node it is pinned to)
  --gateway          add the parent cache on the nodes labelled fwdproxy.io/tunnel=true; the
                     nodes' mirrors ask it first and their proxies use it as the upstream
  --allow CIDR       who may use the gateway: the cluster's node and pod CIDRs (repeatable;
                     default {", ".join(DEFAULT_ALLOW)})
  --gateway-address  how nodes reach the gateway: default its Service name
                     {gateway_host()} (cluster DNS, which the host-network
                     DaemonSet uses through dnsPolicy ClusterFirstWithHostNet); an IP here for a
                     Service whose clusterIP you pinned, so pulls do not depend on CoreDNS
  --cluster-domain   the cluster's DNS domain (default {DEFAULT_CLUSTER_DOMAIN})
  --variant          containerd (certs.d/_default/hosts.toml), k3s / rke2 (registries.yaml;
                     restart k3s/rke2 after the first rollout), proxy-env (no mirror: the
                     runtimes keep HTTPS_PROXY=http://127.0.0.1:{PROXY_PORT})
  --image REF        where nodes pull the fwdproxy image from (kustomize images:)
  --base PATH|URL    deploy/kubernetes as kustomize finds it from DIR: a relative path (default:
                     this checkout's, else ../deploy/kubernetes) or a remote URL such as
                     https://github.com/ORG/fwdproxy//deploy/kubernetes?ref=v0.1.0
"""


def add_args(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("kubernetes target")
    k.add_argument(
        "--upstream",
        metavar="URL",
        help=f"the tunnel: every node's (default {DEFAULT_UPSTREAM}), with --gateway the gateway's",
    )
    k.add_argument(
        "--gateway",
        action="store_true",
        help="add the parent cache on the nodes labelled fwdproxy.io/tunnel=true",
    )
    k.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help=f"who may use the gateway (repeatable; default {', '.join(DEFAULT_ALLOW)})",
    )
    k.add_argument(
        "--gateway-address",
        metavar="HOST",
        help="how nodes reach the gateway: an IP (pinned clusterIP) instead of its Service name",
    )
    k.add_argument(
        "--cluster-domain",
        metavar="DOMAIN",
        help=f"the cluster's DNS domain (default {DEFAULT_CLUSTER_DOMAIN})",
    )
    k.add_argument(
        "--variant", choices=list(VARIANTS), help="the node flavour (default containerd)"
    )
    k.add_argument("--image", metavar="REF", help="NAME[:TAG][@DIGEST] of the fwdproxy image")
    k.add_argument("--base", metavar="PATH|URL", help="deploy/kubernetes as seen from --out DIR")
    k.add_argument("--out", metavar="DIR", help=f"--write into DIR (default ./{DEFAULT_OUT})")


# (attribute, flag) of the kubernetes target's own options
_OWN: Final = (
    ("upstream", "--upstream"),
    ("gateway", "--gateway"),
    ("allow", "--allow"),
    ("gateway_address", "--gateway-address"),
    ("cluster_domain", "--cluster-domain"),
    ("variant", "--variant"),
    ("image", "--image"),
    ("base", "--base"),
    ("out", "--out"),
)
# (attribute, flag) of the runtime targets' options, meaningless here
_OTHERS: Final = (
    ("config", "-c/--config"),
    ("proxy", "--proxy"),
    ("agent", "--agent"),
    ("containerd_only", "--containerd-only"),
    ("env_file", "--env-file"),
    ("no_detect", "--no-detect"),
    ("cluster_cidr", "--cluster-cidr"),
    ("service_cidr", "--service-cidr"),
    ("no_proxy_extra", "--no-proxy-extra"),
    ("mirror", "--mirror"),
    ("registry", "--registry"),
    ("only_registry", "--only-registry"),
    ("certs_dir", "--certs-dir"),
    ("rke2", "--rke2"),
)


def check_flags(args: argparse.Namespace) -> None:
    """The runtime targets' flags after `kubernetes` are mistakes worth a usage error."""
    for attr, flag in _OTHERS:
        if getattr(args, attr, None):
            raise GenError(f"{flag} is for the runtime targets, not {TARGET}", 2)
    if getattr(args, "store", "both") != "both":
        raise GenError(f"--store is for docker-mirror, not {TARGET}", 2)


def check_other_flags(args: argparse.Namespace) -> None:
    """And this target's flags after any other target."""
    for attr, flag in _OWN:
        if getattr(args, attr, None):
            raise GenError(f"{flag} is for the {TARGET} target, not {args.target}", 2)


def run(args: argparse.Namespace) -> int:
    if args.root not in ("/", ""):
        raise GenError("--root is for the runtime targets; kubernetes writes into --out DIR", 2)
    if args.out and not args.write:
        raise GenError("--out DIR goes with --write", 2)
    command = command_line(args)
    files = render_overlay(options_from_args(args), command)
    out = Path(args.out or DEFAULT_OUT)
    if not args.write:
        for name, content in files.items():
            sys.stdout.write(f"# ---- {out / name}\n{content}")
        print(f"fwdproxy gen: rerun with --write to create {out}/", file=sys.stderr)
        return 0
    changed = False
    for name, content in files.items():
        target = out / name
        outcome = "unchanged" if read_text(target) == content else write_file(target, content)
        backup = f" (previous file kept as {target}.bak)" if outcome == "updated" else ""
        print(f"{target}: {outcome}{backup}")
        changed |= outcome != "unchanged"
    if changed:
        print(f"to apply: kubectl kustomize {out} | less; kubectl apply -k {out}")
    return 0
