"""`fwdproxy discover`: a live pull check against a fake registry that speaks the real flow.

The fake registry is three TLS origins on loopback (API, token realm, blob CDN) with certificates
from a throw-away CA. Their names (`*.fake.localhost`) reach them only through a real upstream
SOCKS5 server (asyncio-socks-server in a subprocess) that resolves names itself, so a host
counts as tunnelled in these tests only if it really went through that upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import web
from helpers import LOOPBACK, Blackhole, Upstream, clean_env, closed_port, wait_port_sync
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.cli import discover as dsc
from fwdproxy.cli.main import main as cli_main
from fwdproxy.config import load_config
from fwdproxy.routing.catalog import builtin_catalog, parse_registries
from fwdproxy.routing.rules import Decision

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
API = "registry.fake.localhost"
AUTH = "auth.fake.localhost"
CDN = "cdn.fake.localhost"
HANG = "hang.fake.localhost"
SERVICE = "fake-registry.test"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# asyncio-socks-server resolves with the system resolver, and glibc without nss-myhostname does
# not give `*.localhost` the loopback address RFC 6761 reserves for it. This wrapper adds exactly
# that (and logs each name, so a test can tell the upstream got the name and not an IP).
RESOLVE_LOCALHOST_SHIM = """
import runpy, socket, sys
_real = socket.getaddrinfo
def getaddrinfo(host, port, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower().rstrip(".").endswith(".localhost"):
        print("shim: resolve " + name, flush=True)
        host = "127.0.0.1"
    return _real(host, port, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
sys.argv = ["asyncio_socks_server", *sys.argv[1:]]
runpy.run_module("asyncio_socks_server", run_name="__main__", alter_sys=True)
"""


def start_resolving_socks(tmp: Path) -> Upstream:
    """asyncio-socks-server that resolves `*.localhost` to 127.0.0.1 (RFC 6761) itself."""
    port = closed_port()
    env = clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    up = Upstream(
        "asyncio-socks-server",
        [
            sys.executable,
            "-c",
            RESOLVE_LOCALHOST_SHIM,
            "-H",
            LOOPBACK,
            "-P",
            str(port),
            "--access-log",
        ],
        tmp / "socks.log",
        "socks5",
        port,
        r"Established TCP stream between .* and \('127\.0\.0\.1', {port}\)$",
        env=env,
    )
    try:
        wait_port_sync(LOOPBACK, port, 20.0, up)
    except BaseException:
        up.stop()
        raise
    return up


def resolved_names(up: Upstream) -> set[str]:
    return set(re.findall(r"^shim: resolve (\S+)$", up.log(), re.M))


# -- the fake registry ---------------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    origin: str
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server_ctx: ssl.SSLContext

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@dataclass
class FakeRegistry:
    """API, token realm and CDN origins speaking the distribution pull flow over TLS."""

    pki: Pki
    challenge: str | None = None  # None: the standard Bearer challenge
    blob_redirect: bool = True  # False: the API host serves blobs itself
    seen: list[Seen] = field(default_factory=list)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _runners: list[web.AppRunner] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._add_image("fake/app", "latest", DOCKER_MANIFEST, "amd64", [b"y" * 900, b"x" * 10])
        arm = self._add_image("fake/multi", "arm64-only", OCI_MANIFEST, "arm64", [b"arm"])
        amd = self._add_image("fake/multi", "amd64-only", OCI_MANIFEST, "amd64", [b"amd"])
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": arm,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "arm64"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest_of(b"att"),
                    "size": 1,
                    "platform": {"os": "unknown", "architecture": "unknown"},
                },
            ],
        }
        self.manifests[("fake/multi", "latest")] = (OCI_INDEX, json.dumps(index).encode())

    def _add_image(
        self, repo: str, tag: str, media_type: str, arch: str, layers: list[bytes]
    ) -> str:
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        self.blobs[digest_of(config)] = config
        for layer in layers:
            self.blobs[digest_of(layer)] = layer
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": {"digest": digest_of(config), "size": len(config)},
                "layers": [{"digest": digest_of(x), "size": len(x)} for x in layers],
            }
        ).encode()
        digest = digest_of(body)
        self.manifests[(repo, tag)] = self.manifests[(repo, digest)] = (media_type, body)
        return digest

    def config_digest(self, repo: str, tag: str) -> str:
        return str(json.loads(self.manifests[(repo, tag)][1])["config"]["digest"])

    # -- origins ---------------------------------------------------------------------------------

    def url(self, name: str, path: str) -> str:
        return f"https://{name}:{self.ports[name]}{path}"

    @property
    def ref(self) -> str:
        return f"{API}:{self.ports[API]}"

    def _challenge(self, scope: str | None = None) -> str:
        if self.challenge is not None:
            return self.challenge
        extra = f',scope="{scope}"' if scope else ""
        return f'Bearer realm="{self.url(AUTH, "/token")}",service="{SERVICE}"{extra}'

    def _unauthorised(self, scope: str | None = None) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]},
            status=401,
            headers={"WWW-Authenticate": self._challenge(scope)},
        )

    def _authorised(self, request: web.Request, repo: str) -> bool:
        return request.headers.get("Authorization") == f"Bearer tok:{repo}"

    async def _v2(self, request: web.Request) -> web.Response:
        return self._unauthorised()

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        repo, ref = request.match_info["repo"], request.match_info["ref"]
        if not self._authorised(request, repo):
            return self._unauthorised(f"repository:{repo}:pull")
        if repo == "fake/moved":
            raise web.HTTPTemporaryRedirect(self.url(CDN, "/manifests/fake/app/latest"))
        return self._serve_manifest(repo, ref)

    def _serve_manifest(self, repo: str, ref: str) -> web.Response:
        if (repo, ref) not in self.manifests:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media_type, body = self.manifests[(repo, ref)]
        return web.Response(
            body=body,
            headers={"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)},
        )

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["repo"], request.match_info["digest"]
        if not self._authorised(request, repo):
            return self._unauthorised(f"repository:{repo}:pull")
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if not self.blob_redirect:
            return web.Response(body=self.blobs[digest], content_type="application/octet-stream")
        raise web.HTTPTemporaryRedirect(self.url(CDN, f"/blobs/{digest}?sig=s3cr3t&expires=60"))

    async def _token(self, request: web.Request) -> web.Response:
        m = re.fullmatch(r"repository:(.+):pull", request.query.get("scope", ""))
        if request.query.get("service") != SERVICE or m is None:
            return web.json_response({"details": "bad service or scope"}, status=400)
        return web.json_response({"token": f"tok:{m.group(1)}", "expires_in": 300})

    async def _cdn_blob(self, request: web.Request) -> web.Response:
        data = self.blobs.get(request.match_info["digest"])
        if data is None or request.query.get("sig") != "s3cr3t":
            return web.Response(status=403, text="signature mismatch")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _cdn_manifest(self, request: web.Request) -> web.Response:
        return self._serve_manifest(request.match_info["repo"], request.match_info["ref"])

    def _app(self, name: str, routes: list[web.RouteDef]) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append(Seen(name, request.method, request.path_qs, dict(request.headers)))
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.add_routes(routes)
        return app

    async def start(self) -> FakeRegistry:
        apps = {
            API: self._app(
                API,
                [
                    web.get("/v2/", self._v2),
                    web.get("/v2/{repo:.+}/manifests/{ref}", self._manifest),
                    web.get("/v2/{repo:.+}/blobs/{digest}", self._blob),
                ],
            ),
            AUTH: self._app(AUTH, [web.get("/token", self._token)]),
            CDN: self._app(
                CDN,
                [
                    web.get("/blobs/{digest}", self._cdn_blob),  # GET also answers HEAD
                    web.get("/manifests/{repo:.+}/{ref}", self._cdn_manifest),
                ],
            ),
        }
        for name, app in apps.items():
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=self.pki.server_ctx)
            await site.start()
            self.ports[name] = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def requests(self, origin: str, method: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.origin == origin and method in (None, s.method)]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert(API, AUTH, CDN, HANG)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_ctx)
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca_file, server_ctx)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = start_resolving_socks(tmp_path_factory.mktemp("socks"))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
async def registry(pki: Pki) -> AsyncIterator[FakeRegistry]:
    reg = await FakeRegistry(pki).start()
    try:
        yield reg
    finally:
        await reg.stop()


def rules_doc(
    reg: FakeRegistry,
    upstream_url: str,
    *,
    with_cdn: bool = True,
    first_rules: list[dict[str, Any]] | None = None,
    hosts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A rules.yaml with the fake registry as a user `registries:` entry, tunnelled."""
    catalog_hosts = [{"domain": API, "role": "api"}, {"domain": AUTH, "role": "token"}]
    if with_cdn:
        catalog_hosts.append({"domain": CDN, "role": "blob"})
    return {
        "listen": "127.0.0.1:3128",
        "loopback_targets": True,
        "upstreams": {"tunnel": upstream_url},
        "registries": {
            "fake": {
                "title": "Fake registry",
                "refs": [reg.ref],
                "api": reg.ref,
                "probe": "fake/app",
                "hosts": catalog_hosts,
            }
        },
        "rules": [
            *(first_rules or []),
            {"name": "fake-registry", "registries": ["fake"], "via": "tunnel"},
            # Safety net: tests never dial a real registry, whatever they select.
            {"name": "loopback-names-only", "regex": r"^(?!.*\.localhost$).*", "action": "reject"},
        ],
        "hosts": hosts or {},
        "default": "direct",
        "limits": {"dial_timeout_s": 5},
    }


def write_rules(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def run_cli(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    """`python -m fwdproxy ARGS` as a user runs it; the test loop keeps serving meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwdproxy",
        *args,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def suggestion_block(text: str) -> str:
    """The YAML printed after the 'suggested rule' line, up to the next blank or verdict line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "suggested rule" in line) + 1
    block = []
    for line in lines[start:]:
        if not line.strip() or re.match(r"^\S+: (OK|SPLIT|ERROR)", line):
            break
        block.append(line)
    return "\n".join(block) + "\n"


# -- end to end through the CLI ------------------------------------------------------------------


async def test_discover_covered_registry_exits_0_with_every_host_tunnelled(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    cfg = write_rules(tmp_path / "rules.yaml", rules_doc(registry, upstream.url))
    rc, out, err = await run_cli(
        "discover", "-c", str(cfg), "--ca-file", str(pki.ca_file), "--json", "fake"
    )
    assert rc == 0, out + err
    doc = json.loads(out)
    (rep,) = doc["registries"]
    assert (rep["registry"], rep["status"], rep["error"], doc["exit_code"]) == (
        "fake",
        "ok",
        None,
        0,
    )
    hosts = {h["host"]: h for h in rep["hosts"]}
    assert {h: hosts[h]["roles"] for h in hosts} == {API: ["api"], AUTH: ["token"], CDN: ["blob"]}
    assert all(h["route"] == "tunnel" and not h["split"] for h in hosts.values())
    assert hosts[CDN]["steps"][0].startswith("redirect from GET blob 307")
    assert any(s.startswith("HEAD blob redirect 200") for s in hosts[CDN]["steps"])
    # Every name really went through the upstream, by name (resolved there, not here).
    for name in (API, AUTH, CDN):
        assert upstream.carried(registry.ports[name]) >= 1, name
    assert {API, AUTH, CDN} <= resolved_names(upstream)
    # The pull flow as the registry saw it: token, manifest, one blob, no blob body download.
    token = registry.requests(AUTH)[0]
    assert "scope=repository:fake/app:pull" in token.path and f"service={SERVICE}" in token.path
    manifest = next(s for s in registry.requests(API) if "/manifests/" in s.path)
    for media_type in (
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ):
        assert media_type in manifest.headers["Accept"]
    blob_gets = [s for s in registry.requests(API) if "/blobs/" in s.path]
    assert [s.path for s in blob_gets] == [
        f"/v2/fake/app/blobs/{registry.config_digest('fake/app', 'latest')}"
    ]
    assert [s.method for s in registry.requests(CDN)] == ["HEAD"]


async def test_discover_human_table_lists_every_host_with_route_and_rule(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    cfg = write_rules(tmp_path / "rules.yaml", rules_doc(registry, upstream.url))
    rc, out, err = await run_cli("discover", "-c", str(cfg), "--ca-file", str(pki.ca_file), "fake")
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == ["REGISTRY", "ROLE", "HOST", "ROUTE", "RULE"]
    rows = {line.split()[2]: line.split() for line in lines[1:4]}
    assert rows[f"{CDN}:{registry.ports[CDN]}"][:5] == [
        "fake",
        "blob",
        f"{CDN}:{registry.ports[CDN]}",
        "via",
        "tunnel",
    ]
    assert "fake-registry (line" in lines[1]
    assert any(
        line.startswith("fake: OK (fake/app:latest): 3 host(s), all via tunnel") for line in lines
    )
    assert "suggested" not in out and err == ""


async def test_discover_uncovered_cdn_suggests_a_rule_that_fixes_it(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    doc = rules_doc(registry, upstream.url, with_cdn=False)
    cfg = write_rules(tmp_path / "rules.yaml", doc)
    rc, out, err = await run_cli(
        "discover", "-c", str(cfg), "--ca-file", str(pki.ca_file), registry.ref
    )
    assert rc == 1, out + err
    cdn = f"{CDN}:{registry.ports[CDN]}"
    row = next(line for line in out.splitlines() if cdn in line)
    assert row.split()[:5] == ["fake", "blob", cdn, "direct", "!"] and "default" in row
    assert "fake: SPLIT" in out and f"blob host {cdn} goes direct by rule default (line" in out
    assert f"not in the catalog entry fake: {cdn}" in out
    # The split host was only recorded: nothing was sent to it, directly or otherwise.
    assert registry.requests(CDN) == [] and upstream.carried(registry.ports[CDN]) == 0
    rules = yaml.safe_load(suggestion_block(out))
    assert rules == [{"name": "discovered-fake", "suffix": ["fake.localhost"], "via": "tunnel"}]

    fixed = write_rules(
        tmp_path / "fixed.yaml",
        rules_doc(registry, upstream.url, with_cdn=False, first_rules=rules),
    )
    rc, out, err = await run_cli("check", "-c", str(fixed))
    assert rc == 0, out + err
    rc, out, err = await run_cli(
        "discover", "-c", str(fixed), "--ca-file", str(pki.ca_file), "--json", "fake"
    )
    assert rc == 0, out + err
    (rep,) = json.loads(out)["registries"]
    cdn_host = next(h for h in rep["hosts"] if h["host"] == CDN)
    assert cdn_host["rule"] == "discovered-fake" and cdn_host["route"] == "tunnel"
    assert [s.method for s in registry.requests(CDN)] == ["HEAD"]
    assert upstream.carried(registry.ports[CDN]) >= 1


async def test_discover_cli_reports_unknown_registry_and_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{domain: x, via: nowhere}]\n")
    rc, out, err = await run_cli("discover", "-c", str(bad))
    assert rc == 2 and "unknown upstream 'nowhere'" in err and out == ""
    good = write_rules(tmp_path / "ok.yaml", {"upstreams": {"tunnel": "socks5://127.0.0.1:1"}})
    rc, out, err = await run_cli("discover", "-c", str(good), "no-such-registry", "--json")
    assert rc == 2 and "no-such-registry: not a registry name" in err
    assert json.loads(out)["problems"] and json.loads(out)["registries"] == []


# -- in-process: the flow's branches and failures ------------------------------------------------


def load(tmp_path: Path, doc: dict[str, Any]) -> Any:
    return load_config(write_rules(tmp_path / "rules.yaml", doc), env={})


def targets(cfg: Any, *args: str) -> list[dsc.Target]:
    found, problems = dsc.select_targets(cfg.catalog, list(args))
    assert problems == []
    return found


async def test_discover_index_picks_linux_amd64(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    (rep,) = await dsc.discover(
        cfg, targets(cfg, f"{registry.ref}/fake/multi"), ssl=pki.client_ctx()
    )
    assert rep.error is None and rep.status == "ok" and rep.target.name == "fake"
    amd = digest_of(registry.manifests[("fake/multi", "amd64-only")][1])
    paths = [s.path for s in registry.requests(API)]
    assert f"/v2/fake/multi/manifests/{amd}" in paths
    assert f"/v2/fake/multi/blobs/{registry.config_digest('fake/multi', 'amd64-only')}" in paths
    assert not any(registry.config_digest("fake/multi", "arm64-only") in p for p in paths)


async def test_discover_records_manifest_redirect_hosts(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    (rep,) = await dsc.discover(
        cfg, targets(cfg, f"{registry.ref}/fake/moved"), ssl=pki.client_ctx(), head=False
    )
    assert rep.error is None, rep.error
    cdn = rep.hosts[(CDN, registry.ports[CDN])]
    assert cdn.roles == ["api", "blob"]
    assert cdn.steps == [
        "GET manifest 200",
        "redirect from GET blob 307",
        "HEAD skipped (--no-head)",
    ]
    # The token was not sent to the other host the manifest was redirected to.
    cdn_get = registry.requests(CDN, "GET")[0]
    assert cdn_get.path == "/manifests/fake/app/latest" and "Authorization" not in cdn_get.headers
    assert registry.requests(CDN, "HEAD") == []  # --no-head


async def test_discover_blob_served_by_the_api_host_itself(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    registry.blob_redirect = False
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    (rep,) = await dsc.discover(cfg, targets(cfg, "fake"), ssl=pki.client_ctx())
    assert rep.error is None and rep.status == "ok"
    assert {s.host: s.roles for s in rep.hosts.values()} == {API: ["api", "blob"], AUTH: ["token"]}
    assert registry.requests(CDN) == []


async def test_discover_missing_probe_is_an_error_and_the_others_are_still_checked(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    reports = await dsc.discover(
        cfg, targets(cfg, f"{registry.ref}/fake/missing:1.0", "fake"), ssl=pki.client_ctx()
    )
    assert [r.status for r in reports] == ["error", "ok"]
    assert reports[0].error == f"probe fake/missing:1.0 not found on {registry.ref} (404)"
    assert dsc.exit_code(reports) == 2


async def test_discover_unreachable_upstream_names_it(
    registry: FakeRegistry, pki: Pki, tmp_path: Path
) -> None:
    dead = f"socks5://127.0.0.1:{closed_port()}"
    cfg = load(tmp_path, rules_doc(registry, dead))
    (rep,) = await dsc.discover(cfg, targets(cfg, "fake"), ssl=pki.client_ctx())
    assert rep.error is not None and rep.status == "error"
    assert rep.error.startswith(f"the proxy could not open {registry.ref}: upstream tunnel")
    assert "unreachable" in rep.error and dead in rep.error
    assert registry.seen == []


async def test_discover_untrusted_certificate_says_ca_file_and_insecure_works(
    registry: FakeRegistry, upstream: Upstream, tmp_path: Path
) -> None:
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    (rep,) = await dsc.discover(cfg, targets(cfg, "fake"), ssl=ssl.create_default_context())
    assert rep.error is not None and "not trusted" in rep.error and "--ca-file" in rep.error
    (rep,) = await dsc.discover(cfg, targets(cfg, "fake"), ssl=False)
    assert rep.error is None and rep.status == "ok"


async def test_discover_times_out_per_registry(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    async with Blackhole() as hole:
        doc = rules_doc(registry, upstream.url, hosts={HANG: LOOPBACK})
        cfg = load(tmp_path, doc)
        start = time.monotonic()
        reports = await dsc.discover(
            cfg,
            targets(cfg, f"{HANG}:{hole.port}/x/y", "fake"),
            ssl=pki.client_ctx(),
            timeout_s=1.0,
        )
        elapsed = time.monotonic() - start
    assert reports[0].error is not None and "during /v2/" in reports[0].error
    assert "1s" in reports[0].error and reports[0].target.title == "not in the catalog"
    assert reports[1].status == "ok" and elapsed < 10
    assert reports[0].hosts[(HANG, hole.port)].decision.action == "direct"


async def test_discover_basic_only_registry_is_reported_as_needing_credentials(
    registry: FakeRegistry, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    registry.challenge = 'Basic realm="private"'
    cfg = load(tmp_path, rules_doc(registry, upstream.url))
    (rep,) = await dsc.discover(cfg, targets(cfg, "fake"), ssl=pki.client_ctx())
    assert (
        rep.error == f'{registry.ref} wants credentials (Basic realm="private"); '
        "discover checks anonymous pulls"
    )


# -- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
        ),
        (
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://ghcr.io/token",
                        "service": "ghcr.io",
                        "scope": "repository:a/b:pull,push",
                    },
                )
            ],
        ),
        (
            "BEARER Realm=https://quay.io/v2/auth, Service=quay.io",
            [("bearer", {"realm": "https://quay.io/v2/auth", "service": "quay.io"})],
        ),
        (
            'Basic realm="Harbor", Bearer realm="https://h/service/token",service="harbor-registry"',
            [
                ("basic", {"realm": "Harbor"}),
                ("bearer", {"realm": "https://h/service/token", "service": "harbor-registry"}),
            ],
        ),
        (
            'Bearer realm = "a\\"b\\\\c" ,  service="s"',
            [("bearer", {"realm": 'a"b\\c', "service": "s"})],
        ),
        ('Bearer realm="unterminated', [("bearer", {"realm": "unterminated"})]),
        ("Bearer", [("bearer", {})]),
        ('Bearer realm="x" junk, service="y"', [("bearer", {"realm": "x", "service": "y"})]),
        ('Bearer=x, "quoted", Basic realm=r', [("basic", {"realm": "r"})]),
        ('Bearer realm="a", realm="b"', [("bearer", {"realm": "a"})]),
        (",, ,", []),
        ("", []),
    ],
    ids=[
        "docker-hub",
        "comma-in-scope",
        "case-and-unquoted",
        "two-challenges",
        "escapes-spaces",
        "unterminated",
        "scheme-only",
        "junk-dropped",
        "garbage-skipped",
        "first-param-wins",
        "only-commas",
        "empty",
    ],
)
def test_discover_parse_www_authenticate(
    header: str, expected: list[tuple[str, dict[str, str]]]
) -> None:
    got = [(c.scheme, dict(c.params)) for c in dsc.parse_www_authenticate(header)]
    assert got == expected


def test_discover_parse_www_authenticate_token68() -> None:
    (c,) = dsc.parse_www_authenticate("Negotiate YIIBhg==")
    assert (c.scheme, c.token68, dict(c.params)) == ("negotiate", "YIIBhg==", {})
    a, b = dsc.parse_www_authenticate("Negotiate abc, Bearer realm=r")
    assert a.token68 == "abc" and (b.scheme, dict(b.params)) == ("bearer", {"realm": "r"})


def test_discover_bearer_challenge_needs_a_realm() -> None:
    assert dsc.bearer_challenge(['Basic realm="x"', "Bearer service=s"]) is None
    ch = dsc.bearer_challenge(['Basic realm="x"', "Bearer service=s", 'Bearer realm="r"'])
    assert ch is not None and ch.params["realm"] == "r"


_TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyz-"
tokens = st.text(_TOKEN_CHARS, min_size=1, max_size=12)
values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("é\t"), max_size=40
)


def render(scheme: str, params: dict[str, str]) -> str:
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in params.values())
    return " ".join(
        [scheme, ", ".join(f'{k}="{v}"' for k, v in zip(params, quoted, strict=True))]
    ).rstrip()


@given(st.lists(st.tuples(tokens, st.dictionaries(tokens, values, max_size=4)), max_size=3))
def test_discover_parse_www_authenticate_round_trips(
    challenges: list[tuple[str, dict[str, str]]],
) -> None:
    header = ", ".join(render(s, p) for s, p in challenges)
    got = [(c.scheme, dict(c.params)) for c in dsc.parse_www_authenticate(header)]
    assert got == [(s.lower(), p) for s, p in challenges]


@given(st.text(max_size=200))
def test_discover_parse_www_authenticate_never_raises(header: str) -> None:
    for c in dsc.parse_www_authenticate(header):
        assert c.scheme and c.scheme == c.scheme.lower()
        assert all(k == k.lower() for k in c.params)


@given(st.dictionaries(tokens, values, min_size=1, max_size=4), st.text(max_size=30))
def test_discover_parse_www_authenticate_ignores_trailing_garbage_challenge(
    params: dict[str, str], tail: str
) -> None:
    """Whatever follows, the first challenge's params are parsed exactly."""
    header = render("Bearer", params) + ", " + tail
    first = dsc.parse_www_authenticate(header)[0]
    assert first.scheme == "bearer"
    assert {k: first.params.get(k) for k in params} == params


@pytest.mark.parametrize(
    ("host", "api", "expected"),
    [
        ("cdn03.quay.io", "quay.io", ("suffix", "quay.io")),
        ("cdn.fake.localhost", "registry.fake.localhost", ("suffix", "fake.localhost")),
        ("auth.example.co.uk", "registry.example.co.uk", ("suffix", "example.co.uk")),
        ("evil.co.uk", "registry.example.co.uk", ("domain", "evil.co.uk")),
        (
            "production.cloudflare.docker.com",
            "registry-1.docker.io",
            ("domain", "production.cloudflare.docker.com"),
        ),
        ("d1.cloudfront.net", "x.cloudfront.net", ("domain", "d1.cloudfront.net")),
        ("a.s3.amazonaws.com", "b.s3.amazonaws.com", ("domain", "a.s3.amazonaws.com")),
        (
            "acct.blob.core.windows.net",
            "reg.core.windows.net",
            ("domain", "acct.blob.core.windows.net"),
        ),
        ("gitlab.com", "registry.gitlab.com", ("domain", "gitlab.com")),
        ("10.0.0.5", "registry.example.com", ("domain", "10.0.0.5")),
        ("cdn.example.com", "10.0.0.5", ("domain", "cdn.example.com")),
    ],
    ids=[
        "quay-family",
        "fake-family",
        "cctld-3-labels",
        "cctld-public-2nd-level",
        "different-domain",
        "cloudfront",
        "amazonaws",
        "under-tenant-parent",
        "parent-itself",
        "ip-host",
        "ip-api",
    ],
)
def test_discover_suggest_matcher(host: str, api: str, expected: tuple[str, str]) -> None:
    assert dsc.suggest_matcher(host, api) == expected


@given(
    st.sampled_from(
        [
            "cloudfront.net",
            "amazonaws.com",
            "r2.cloudflarestorage.com",
            "googleapis.com",
            "blob.core.windows.net",
        ]
    ),
    st.lists(st.sampled_from(["a", "b1", "cdn", "s3", "x-y"]), min_size=1, max_size=3),
    st.lists(st.sampled_from(["a", "reg", "eu", "q"]), min_size=1, max_size=3),
)
def test_discover_suggest_matcher_never_suffixes_multi_tenant_parents(
    parent: str, left: list[str], right: list[str]
) -> None:
    host, api = ".".join([*left, parent]), ".".join([*right, parent])
    kind, value = dsc.suggest_matcher(host, api)
    assert (kind, value) == ("domain", host) or not (
        value == parent or value.endswith("." + parent) or parent.endswith("." + value)
    )


def test_discover_suggested_rules_group_by_kind_and_check_accepts_them(tmp_path: Path) -> None:
    rules = dsc.suggested_rules(
        "quay",
        "tunnel",
        [
            ("domain", "b.example"),
            ("suffix", "quay.io"),
            ("domain", "a.example"),
            ("suffix", "quay.io"),
        ],
    )
    assert rules == [
        {
            "name": "discovered-quay",
            "domain": ["a.example", "b.example"],
            "suffix": ["quay.io"],
            "via": "tunnel",
        }
    ]
    text = dsc.rules_yaml(rules)
    assert text.startswith("- name: discovered-quay\n") and "domain: [a.example, b.example]" in text
    assert dsc.suggested_rules("x", "tunnel", []) == []
    cfg = tmp_path / "rules.yaml"
    cfg.write_text("upstreams: {tunnel: socks5://127.0.0.1:1080}\nrules:\n" + text)
    decision = load_config(cfg, env={}).router.decide("cdn04.quay.io", 443)
    assert (decision.rule, decision.upstream) == ("discovered-quay", "tunnel")


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ("library/alpine", ("library/alpine", "latest")),
        ("pause:3.10", ("pause", "3.10")),
        ("a/b@sha256:" + "0" * 64, ("a/b", "sha256:" + "0" * 64)),
    ],
    ids=["default-tag", "tag", "digest"],
)
def test_discover_split_probe(probe: str, expected: tuple[str, str]) -> None:
    assert dsc.split_probe(probe) == expected


def test_discover_split_probe_rejects_bad_repository() -> None:
    with pytest.raises(dsc.SelectError, match="invalid probe"):
        dsc.split_probe("Upper/Case")


def test_discover_select_targets_by_name_host_and_image() -> None:
    catalog = builtin_catalog()
    all_targets, problems = dsc.select_targets(catalog, [])
    assert problems == [] and {t.name for t in all_targets} == {
        r.name for r in catalog.values() if r.probe
    }
    found, problems = dsc.select_targets(
        catalog,
        [
            "dockerhub",
            "quay.io",
            "k8s.gcr.io",
            "ghcr.io/org/app:v1",
            "gitlab",
            "example.com",
            "harbor.corp:8443/team/app",
        ],
    )
    assert [(t.name, t.api, t.repository, t.reference) for t in found] == [
        ("dockerhub", "registry-1.docker.io", "library/alpine", "latest"),
        ("quay", "quay.io", "prometheus/busybox", "latest"),
        ("k8s", "registry.k8s.io", "pause", "latest"),
        ("ghcr", "ghcr.io", "org/app", "v1"),
        ("harbor.corp:8443", "harbor.corp:8443", "team/app", "latest"),
    ]
    assert found[-1].registry is None
    assert len(problems) == 2
    assert problems[0].startswith("gitlab: no probe repository")
    assert problems[1].startswith("example.com: not a registry name or host in the catalog")


def test_discover_pick_platform_and_blob() -> None:
    amd = {"digest": "sha256:b", "platform": {"os": "linux", "architecture": "amd64"}}
    arm = {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "arm64"}}
    att = {"digest": "sha256:u", "platform": {"os": "unknown", "architecture": "unknown"}}
    assert dsc.pick_platform([arm, amd, att]) == "sha256:b"
    assert dsc.pick_platform([att, arm]) == "sha256:a"
    assert dsc.pick_platform([att, {"nodigest": 1}]) == "sha256:u"
    assert dsc.pick_platform([]) is None
    layers = [{"digest": "sha256:big", "size": 9}, {"digest": "sha256:small", "size": 2}]
    assert dsc.pick_blob({"config": {"digest": "sha256:c"}, "layers": layers}) == "sha256:c"
    assert dsc.pick_blob({"layers": layers}) == "sha256:small"
    assert dsc.pick_blob({"fsLayers": [{"blobSum": "sha256:s1"}]}) == "sha256:s1"
    assert dsc.pick_blob([]) is None and dsc.pick_blob({}) is None


def _report(**decisions: Decision) -> dsc.Report:
    t = dsc.Target("r", "R", "api.example", 443, "x/y", "latest")
    rep = dsc.Report(t)
    for host, d in decisions.items():
        rep.hosts[(host.replace("_", "."), 443)] = dsc.HostSeen(host.replace("_", "."), 443, d)
    return rep


VIA = Decision("via", "tunnel", "registries", 3)
VIA_B = Decision("via", "backup", "other", 4)
DIRECT = Decision("direct", None, "default")


def test_discover_analyse_suggests_for_every_host_not_in_the_api_upstream() -> None:
    rep = _report(api_example=VIA, cdn_api_example=DIRECT, other_net=VIA_B, ok_api_example=VIA)
    dsc.analyse(rep)
    assert [s.host for s in rep.hosts.values() if s.split] == ["cdn.api.example", "other.net"]
    assert rep.rules == [
        {
            "name": "discovered-r",
            "domain": ["other.net"],
            "suffix": ["api.example"],
            "via": "tunnel",
        }
    ]
    assert rep.status == "split" and len(rep.problems) == 2
    assert dsc.exit_code([rep]) == 1
    text = dsc.format_reports([rep])
    assert "direct !" in text and "r: SPLIT (x/y:latest): 2 host(s)" in text


def test_discover_analyse_direct_api_host_needs_no_rule() -> None:
    rep = _report(api_example=DIRECT, cdn_api_example=VIA)
    dsc.analyse(rep)
    assert rep.rules == [] and rep.status == "ok" and dsc.exit_code([rep]) == 0


def test_discover_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["discover", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "examples:",
        "exit status:",
        "fwdproxy discover dockerhub ghcr",
        "--ca-file",
        "--insecure",
        "--timeout",
        "--json",
        "REGISTRY",
    ):
        assert needle in out


def test_discover_module_import_is_light() -> None:
    code = (
        "import sys, fwdproxy.cli.discover; "
        "print(sorted(m for m in ('aiohttp', 'fwdproxy.server', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- docs ----------------------------------------------------------------------------------------


def _yaml_block_after(marker: str, text: str) -> str:
    start = text.index(marker)
    m = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert m is not None, f"no yaml block after {marker}"
    return m.group(1)


def test_docs_harbor_example_is_accepted_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = (ROOT / "README.md").read_text()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(_yaml_block_after("<!-- harbor-example -->", docs))
    assert cli_main(["check", "-c", str(cfg)]) == 0, capsys.readouterr().err
    assert f"registries in catalog: {len(builtin_catalog()) + 1}" in capsys.readouterr().out
    regs = parse_registries(yaml.safe_load(cfg.read_text()))
    assert list(regs) == ["harbor"]
    assert cli_main(["explain", "-c", str(cfg), "harbor.corp.example/team/app:1.0"]) == 0
    out = capsys.readouterr().out
    assert "registry: harbor (Harbor (corporate))" in out and "verdict: OK" in out


def test_docs_catalog_table_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "catalog_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = (ROOT / "README.md").read_text()
    assert out.strip() in docs, "README.md: re-run tools/catalog_table.py and paste its table"
