"""The rig: four network namespaces wired like a docker host behind a split-routing proxy.

    outside (10.77.3.2)            "the internet": nginx TLS front for Docker Hub + Quay names,
        | 10.77.3.0/24             docker-registry backend on its loopback
    gateway (10.77.3.1 / 10.77.1.1)  danted SOCKS5 :1080 and tinyproxy CONNECT :8888; resolves the
        | 10.77.1.0/24             public names (its hosts file); has no link to the intranet
    node (10.77.1.2 / 10.77.2.1)   the docker host: fwdproxy on 127.0.0.1:3128, dockerd, containerd,
        | 10.77.2.0/24             podman, skopeo; no route to outside, cannot resolve public names
    intranet (10.77.2.2)           internal HTTP service :80 and internal TLS registry :5000

Direct veth pairs only, and IP forwarding stays off in every namespace, so the node can reach
the outside only through the gateway's proxies and the gateway can never reach the intranet.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2erig.images import TestImage, bulk_layers, make_image, write_oci_layout
from e2erig.netns import Netns, NetnsSet
from e2erig.pki import TestCA
from e2erig.procs import Proc, Supervisor

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE.parent / "templates"
REPO_ROOT = HERE.parents[2]

GW_NODE_IP = "10.77.1.1"
NODE_GW_IP = "10.77.1.2"
NODE_INTRA_IP = "10.77.2.1"
INTRA_IP = "10.77.2.2"
GW_OUT_IP = "10.77.3.1"
OUT_IP = "10.77.3.2"
SOCKS_PORT = 1080
HTTP_UPSTREAM_PORT = 8888
PROXY_PORT = 3128
BACKEND_ADDR = "127.0.0.1:5000"

HUB_NAMES = ("registry-1.docker.io", "index.docker.io", "auth.docker.io",
             "production.cloudflare.docker.com")
QUAY_NAMES = ("quay.io", "cdn01.quay.io")
PUBLIC_NAMES = HUB_NAMES + QUAY_NAMES
INTRA_REGISTRY = "registry.intranet.test"
INTRA_REGISTRY_PORT = 5000
INTRA_WEB = "web.intranet.test"
# Resolvable only through fwdproxy's own `hosts:` override, not the node's resolver.
INTRA_OVERRIDE = "legacy.intranet.test"

BULK_COUNT = 8
BULK_SIZE = 4 * 1024 * 1024 + 4096

# Every image differs (its one file names it), so no pull can be answered from another's cache.
HUB_IMAGES = ("skopeo-http", "skopeo-socks", "skopeo-upstream-http", "docker", "containerd",
              "podman", "cache", "failure")
QUAY_IMAGES = ("skopeo-http", "skopeo-socks", "docker", "containerd", "podman")
# `fwdproxy discover` pulls each registry's probe repository from fwdproxy's own catalog.
CATALOG = REPO_ROOT / "fwdproxy" / "routing" / "catalog.yaml"
PROBE_KEYS = {"hub": "dockerhub", "quay": "quay"}
INTRA_IMAGES = ("skopeo", "docker", "containerd", "podman", "failure", "blanket")


@dataclass(frozen=True)
class ImageRef:
    """Where a test image lives, as each client spells it."""

    registry: str  # "hub" | "quay" | "intra"
    repo: str      # path inside the registry, e.g. library/e2e-docker
    tag: str
    image: TestImage

    @property
    def reference(self) -> str:
        """Fully qualified name as users type it (docker.io/..., quay.io/...)."""
        host = {"hub": "docker.io", "quay": "quay.io",
                "intra": f"{INTRA_REGISTRY}:{INTRA_REGISTRY_PORT}"}[self.registry]
        return f"{host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.image.pushed_digests[self.registry]


def render(template: str, dest: Path, **values: str) -> Path:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise ValueError(f"{template}: unfilled placeholder in {dest}")
    dest.write_text(text)
    return dest


class Rig:
    """Builds the topology, starts the servers, pushes the images; `close()` undoes all of it."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fwdproxy-e2e-"))
        self.prefix = "fpe2e-" + secrets.token_hex(3)
        self.nets = NetnsSet(self.prefix)
        self.home = self.tmp / "home"
        self.home.mkdir()
        # podman insists that $DOCKER_CONFIG/config.json exists once DOCKER_CONFIG is set.
        (self.home / ".docker").mkdir()
        (self.home / ".docker" / "config.json").write_text("{}\n")
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.sup = Supervisor(self.logs, self._base_env())
        self.images: dict[str, ImageRef] = {}
        self.socks: Proc | None = None
        self.access_log = self.logs / "nginx-access.log"
        self.socks_log = self.logs / "danted-socks.log"

    # --- environment ----------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        """A clean environment: no proxy variables or user config leak in from the machine."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.tmp),
            "DOCKER_CONFIG": str(self.home / ".docker"),
            "CONTAINERS_REGISTRIES_CONF": str(self.tmp / "registries.conf"),
        }

    def client_env(self, **extra: str) -> dict[str, str]:
        env = self._base_env()
        env.update(extra)
        return env

    def proxy_env(self, proxy_url: str, **extra: str) -> dict[str, str]:
        """What a user exports for a Go client: HTTPS_PROXY matters (HTTP_PROXY is not used for
        https:// since Go 1.16), plus the test CA as the system trust store."""
        return self.client_env(
            HTTPS_PROXY=proxy_url, HTTP_PROXY=proxy_url, NO_PROXY="",
            SSL_CERT_FILE=str(self.ca.cert), **extra,
        )

    # --- build ----------------------------------------------------------------------------
    def build(self) -> None:
        self._namespaces()
        self._pki()
        self._outside()
        self._intranet()
        self._gateway()
        self._images()

    def _namespaces(self) -> None:
        public = dict.fromkeys(PUBLIC_NAMES, OUT_IP)
        self.out = self.nets.add("out", hosts=public)
        self.gw = self.nets.add("gw", hosts=public)
        self.intra = self.nets.add("intra", hosts={INTRA_REGISTRY: INTRA_IP, INTRA_WEB: INTRA_IP})
        # The node's "intranet DNS" knows the internal names and nothing public.
        self.node = self.nets.add("node", hosts={INTRA_REGISTRY: INTRA_IP, INTRA_WEB: INTRA_IP})
        self.nets.link(self.node, "to-gw", f"{NODE_GW_IP}/24",
                       self.gw, "to-node", f"{GW_NODE_IP}/24")
        self.nets.link(self.node, "to-intra", f"{NODE_INTRA_IP}/24",
                       self.intra, "to-node", f"{INTRA_IP}/24")
        self.nets.link(self.gw, "to-out", f"{GW_OUT_IP}/24", self.out, "to-gw", f"{OUT_IP}/24")
        (self.tmp / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        )
        (self.tmp / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )

    def _pki(self) -> None:
        self.ca = TestCA(self.tmp / "pki")
        self.public_cert = self.ca.issue("public", PUBLIC_NAMES)
        self.intra_cert = self.ca.issue("intranet", (INTRA_REGISTRY, INTRA_WEB))
        # One directory with the CA, the shape --cert-dir (skopeo, podman) expects.
        self.cert_dir = self.tmp / "certs"
        self.cert_dir.mkdir()
        shutil.copy(self.ca.cert, self.cert_dir / "ca.crt")

    def _registry(self, name: str, ns: Netns, addr: str, extra: str = "",
                  env: dict[str, str] | None = None) -> tuple[Proc, Path]:
        storage = self.tmp / f"{name}-storage"
        storage.mkdir()
        conf = render("registry.yml", self.tmp / f"{name}.yml", STORAGE=str(storage), ADDR=addr,
                      EXTRA=extra)
        proc = self.sup.start(name, ns, ["docker-registry", "serve", str(conf)], env=env)
        host, port = addr.rsplit(":", 1)
        ns.wait_tcp(host, int(port), alive=proc.dead)
        return proc, storage

    def _outside(self) -> None:
        _, storage = self._registry("registry-outside", self.out, BACKEND_ADDR)
        self.outside_storage = storage
        run = self.tmp / "nginx"
        run.mkdir()
        conf = render(
            "nginx.conf", run / "nginx.conf", RUN=str(run), ACCESS_LOG=str(self.access_log),
            CERT=str(self.public_cert.cert), KEY=str(self.public_cert.key), IP=OUT_IP,
            BACKEND=BACKEND_ADDR, STORAGE=str(storage),
        )
        self.nginx = self.sup.start(
            "nginx", self.out,
            ["nginx", "-p", str(run), "-c", str(conf), "-e", str(self.logs / "nginx-error.log"),
             "-g", "daemon off;"],
        )
        self.out.wait_tcp(OUT_IP, 443, alive=self.nginx.dead)

    def _intranet(self) -> None:
        tls = (
            "  tls:\n"
            f"    certificate: {self.intra_cert.cert}\n"
            f"    key: {self.intra_cert.key}\n"
        )
        self._registry("registry-intranet", self.intra, f"{INTRA_IP}:{INTRA_REGISTRY_PORT}",
                       extra=tls)
        self.web_root = self.tmp / "intranet-web"
        self.web_root.mkdir()
        (self.web_root / "index.txt").write_text("intranet says hello\n")
        self.intranet_blob = self.web_root / "blob.bin"
        self.intranet_blob.write_bytes(random.Random("intranet").randbytes(1024 * 1024))
        self.intra_web = self.sup.start(
            "intranet-web", self.intra,
            [sys.executable, "-m", "http.server", "80", "--bind", INTRA_IP,
             "--directory", str(self.web_root)],
        )
        self.intra.wait_tcp(INTRA_IP, 80, alive=self.intra_web.dead)

    def _gateway(self) -> None:
        self.start_socks()
        conf = render(
            "tinyproxy.conf", self.tmp / "tinyproxy-gw.conf", PORT=str(HTTP_UPSTREAM_PORT),
            LISTEN=GW_NODE_IP, LOG=str(self.logs / "tinyproxy-gw-access.log"),
            PID=str(self.tmp / "tinyproxy-gw.pid"), ALLOW="10.77.1.0/24", UPSTREAMS="",
        )
        self.http_upstream = self.sup.start("tinyproxy-gw", self.gw,
                                            ["tinyproxy", "-d", "-c", str(conf)])
        self.gw.wait_tcp(GW_NODE_IP, HTTP_UPSTREAM_PORT, alive=self.http_upstream.dead)

    def start_socks(self) -> None:
        """Start (or restart) danted; its log keeps growing across restarts."""
        conf = render(
            "danted.conf", self.tmp / "danted.conf", LOG=str(self.socks_log),
            INTERNAL_IP=GW_NODE_IP, PORT=str(SOCKS_PORT), EXTERNAL_IP=GW_OUT_IP,
            CLIENT_NET="10.77.1.0/24",
        )
        self.socks = self.sup.start(
            "danted", self.gw, ["danted", "-f", str(conf), "-p", str(self.tmp / "danted.pid")]
        )
        self.gw.wait_tcp(GW_NODE_IP, SOCKS_PORT, alive=self.socks.dead)

    def stop_socks(self) -> None:
        if self.socks is not None:
            self.sup.stop(self.socks)
            self.socks = None
        end_probe = self.node.tcp_probe(GW_NODE_IP, SOCKS_PORT)
        if end_probe is None:
            raise RuntimeError("SOCKS port still accepting after danted was stopped")

    # --- images ---------------------------------------------------------------------------
    def _images(self) -> None:
        """Build and push every test image; `image("hub:docker")` finds them by key."""
        for name in HUB_IMAGES:
            self.images[f"hub:{name}"] = ImageRef("hub", f"library/e2e-{name}", "v1",
                                                  make_image(f"hub-{name}"))
        for name in QUAY_IMAGES:
            self.images[f"quay:{name}"] = ImageRef("quay", f"fwdproxy/e2e-{name}", "v1",
                                                   make_image(f"quay-{name}"))
        for name in INTRA_IMAGES:
            self.images[f"intra:{name}"] = ImageRef("intra", f"e2e/{name}", "v1",
                                                    make_image(f"intra-{name}"))
        bulk = make_image("hub-bulk", extra_layers=bulk_layers(BULK_COUNT, BULK_SIZE, "bulk"))
        self.images["hub:bulk"] = ImageRef("hub", "library/e2e-bulk", "v1", bulk)
        for registry, repo in catalog_probes().items():
            self.images[f"{registry}:probe"] = ImageRef(registry, repo, "latest",
                                                        make_image(f"{registry}-probe"))
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(self._push, self.images.values()))

    def _push(self, ref: ImageRef) -> None:
        layout = self.tmp / "layouts" / f"{ref.registry}-{ref.repo.replace('/', '_')}"
        write_oci_layout(ref.image, layout, ref.tag)
        digest_file = layout.with_suffix(".digest")
        if ref.registry == "intra":
            ns, dest = self.intra, f"{INTRA_IP}:{INTRA_REGISTRY_PORT}"
        else:
            ns, dest = self.out, BACKEND_ADDR
        ns.run(
            ["skopeo", "--policy", str(self.tmp / "policy.json"), "copy", "--quiet",
             "--format", "v2s2",  # Docker schema 2, what Docker Hub serves
             "--dest-tls-verify=false", "--digestfile", str(digest_file),
             f"oci:{layout}:{ref.tag}", f"docker://{dest}/{ref.repo}:{ref.tag}"],
            env=self.client_env(),
        )
        ref.image.pushed_digests[ref.registry] = digest_file.read_text().strip()

    def publish(self, images: dict[str, ImageRef]) -> None:
        """Push more images after the build (a test module's own); `image(key)` finds them.
        One TestImage may appear under several keys (the same image in two registries)."""
        clash = set(images) & set(self.images)
        if clash:
            raise ValueError(f"images already published: {sorted(clash)}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(self._push, images.values()))
        self.images.update(images)

    def image(self, key: str) -> ImageRef:
        return self.images[key]

    # --- logs -----------------------------------------------------------------------------
    def access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines()

    def socks_text(self) -> str:
        try:
            return self.socks_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- teardown -------------------------------------------------------------------------
    def close(self) -> list[str]:
        problems = self.sup.stop_all()
        problems += self.nets.teardown()
        if os.environ.get("FWDPROXY_E2E_KEEP"):
            problems.append(f"kept {self.tmp} (FWDPROXY_E2E_KEEP set)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.tmp.exists():
                problems.append(f"could not remove {self.tmp}")
        return problems


def catalog_probes() -> dict[str, str]:
    """Probe repositories of the Docker Hub and Quay entries in fwdproxy's catalog (if any)."""
    try:
        catalog = yaml.safe_load(CATALOG.read_text())["registries"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    probes = {}
    for registry, key in PROBE_KEYS.items():
        probe = (catalog.get(key) or {}).get("probe")
        if isinstance(probe, str) and probe:
            probes[registry] = probe
    return probes

