"""`fwdproxy discover [REGISTRY…]`: pull-check registries through the tunnel, list every host met.

The catalog says which hosts a pull touches, but registries move their token and blob hosts
without notice, and a proxy cannot see a redirect inside TLS. So this command does what a pull
does — `/v2/`, the anonymous token, the manifest (and the platform manifest of an index), one
blob request without following its redirect — through an in-process fwdproxy that uses the
loaded rules and the proxy's own dialer, so the traffic leaves exactly as a real pull's would.
Every host met is printed with the route the current rules give it; a host that would not leave
through the API host's upstream gets a paste-able rule, and the exit status says so.

Kept import-light: aiohttp and the server stack load only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from fwdproxy.config import Config
    from fwdproxy.routing.catalog import Registry
    from fwdproxy.routing.rules import Decision

EXIT_OK: Final = 0
EXIT_SPLIT: Final = 1
EXIT_UNCHECKED: Final = 2
DEFAULT_TIMEOUT_S: Final = 20.0
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # manifests and tokens; blob bodies are never read
MAX_REDIRECTS: Final = 5
MANIFEST_ACCEPT: Final = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
# Second-level labels under a two-letter country TLD that are public suffixes themselves.
_PUBLIC_SECOND_LEVEL: Final = frozenset({"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne"})

# -- WWW-Authenticate (RFC 7235 §4.1), pure ------------------------------------------------------

_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE: Final = re.compile(_TOKEN)
_PARAM_RE: Final = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*")
_TOKEN68_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*(?=[ \t]*(?:,|$))")
_BARE_VALUE_RE: Final = re.compile(r'[^,\s"]*')


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: scheme (lower case), params (names lower case), or a token68."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None


def parse_www_authenticate(header: str) -> list[Challenge]:
    """All challenges in a WWW-Authenticate value; lenient, never raises.

    Registries send `Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`,
    some with unquoted URLs or several challenges in one header; junk is skipped, not fatal.
    """
    out: list[Challenge] = []
    pos, n = 0, len(header)
    while pos < n:
        pos = _skip(header, pos, " \t,")
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            pos = _skip_past_comma(header, pos)
            continue
        pos = _skip(header, m.end(), " \t")
        spaced = pos > m.end()
        if not spaced and pos < n and header[pos] != ",":
            pos = _skip_past_comma(header, pos)  # "Bearer=x" or 'Bearer"x"': not a challenge
            continue
        t68 = _TOKEN68_RE.match(header, pos) if spaced else None
        if t68 is not None:
            out.append(Challenge(m.group().lower(), {}, t68.group()))
            pos = t68.end()
            continue
        params: dict[str, str] = {}
        if spaced:
            pos = _parse_params(header, pos, params)
        out.append(Challenge(m.group().lower(), params))
    return out


def _skip(s: str, pos: int, chars: str) -> int:
    while pos < len(s) and s[pos] in chars:
        pos += 1
    return pos


def _skip_past_comma(s: str, pos: int) -> int:
    end = s.find(",", pos)
    return len(s) if end < 0 else end + 1


def _parse_params(s: str, pos: int, params: dict[str, str]) -> int:
    """auth-params from pos; stops before the next challenge's scheme. Returns the new pos."""
    while pos < len(s):
        m = _PARAM_RE.match(s, pos)
        if m is None:
            return pos
        name, pos = m.group(1).lower(), m.end()
        if pos < len(s) and s[pos] == '"':
            value, pos = _quoted(s, pos + 1)
        else:
            v = _BARE_VALUE_RE.match(s, pos)
            value, pos = (v.group(), v.end()) if v else ("", pos)
        params.setdefault(name, value)
        after = _skip(s, pos, " \t")
        if after < len(s) and s[after] != ",":
            after = _skip_past_comma(s, after)  # garbage after a value: drop it
        pos = _skip(s, after, " \t,")
    return pos


def _quoted(s: str, pos: int) -> tuple[str, int]:
    """The body of a quoted-string starting after its quote; unterminated runs to the end."""
    out: list[str] = []
    while pos < len(s):
        ch = s[pos]
        if ch == "\\" and pos + 1 < len(s):
            out.append(s[pos + 1])
            pos += 2
        elif ch == '"':
            return "".join(out), pos + 1
        else:
            out.append(ch)
            pos += 1
    return "".join(out), pos


def bearer_challenge(headers: Iterable[str]) -> Challenge | None:
    """The first Bearer challenge with a realm among all WWW-Authenticate header values."""
    for value in headers:
        for ch in parse_www_authenticate(value):
            if ch.scheme == "bearer" and ch.params.get("realm"):
                return ch
    return None


# -- suggestions, pure ---------------------------------------------------------------------------


def suggest_matcher(host: str, api_host: str) -> tuple[str, str]:
    """("suffix", parent) for a host family under the registry's own domain, else ("domain", host).

    cdn03.quay.io next to quay.io gives suffix quay.io. Never a suffix on a multi-tenant parent
    (cloudfront.net, amazonaws.com, ...) or a public suffix: that would tunnel other people's
    buckets and sites too.
    """
    from fwdproxy.core.addr import ip_of
    from fwdproxy.routing.catalog import MULTI_TENANT_PARENTS

    if ip_of(host) is not None or ip_of(api_host) is not None:
        return "domain", host
    a, b = host.split("."), api_host.split(".")
    common: list[str] = []
    while a and b and a[-1] == b[-1]:
        common.insert(0, a.pop())
        b.pop()
    need = 3 if len(common) >= 2 and _public_second_level(common) else 2
    parent = ".".join(common)
    if len(common) < need or parent == host:
        return "domain", host  # a suffix on the host itself would only add its subdomains
    for tenant in MULTI_TENANT_PARENTS:
        if parent == tenant or parent.endswith("." + tenant) or tenant.endswith("." + parent):
            return "domain", host
    return "suffix", parent


def _public_second_level(labels: Sequence[str]) -> bool:
    return len(labels[-1]) == 2 and labels[-2] in _PUBLIC_SECOND_LEVEL


def suggested_rules(
    registry: str, upstream: str, matchers: Iterable[tuple[str, str]]
) -> list[dict[str, Any]]:
    """One rule per registry for the hosts that must follow the API host into `upstream`."""
    rule: dict[str, Any] = {"name": f"discovered-{registry}"}
    for kind in ("domain", "suffix"):
        values = sorted({v for k, v in matchers if k == kind})
        if values:
            rule[kind] = values
    if len(rule) == 1:
        return []
    rule["via"] = upstream
    return [rule]


def rules_yaml(rules: list[dict[str, Any]]) -> str:
    """Rules as YAML to paste under `rules:` (block list, flow-style host lists)."""
    import yaml

    return str(yaml.safe_dump(rules, sort_keys=False, default_flow_style=None))


# -- what to check -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One registry to check: where its API is and which repository to pull."""

    name: str
    title: str
    api_host: str
    api_port: int
    repository: str
    reference: str  # tag or digest
    registry: Registry | None = None

    @property
    def api(self) -> str:
        return _hostport(self.api_host, self.api_port)


class SelectError(ValueError):
    """A command-line argument names no registry that can be checked."""


def split_probe(probe: str) -> tuple[str, str]:
    """`repo`, `repo:tag` or `repo@digest` -> (repository, tag or digest); default tag latest."""
    from fwdproxy.routing.imageref import REPOSITORY_RE

    repo, at, digest = probe.partition("@")
    ref = digest if at else "latest"
    if not at:
        head, colon, tag = repo.rpartition(":")
        if colon and "/" not in tag:
            repo, ref = head, tag
    if not REPOSITORY_RE.fullmatch(repo) or not ref:
        raise SelectError(f"invalid probe {probe!r}: expected REPOSITORY[:TAG|@DIGEST]")
    return repo, ref


def target_for(registry: Registry) -> Target:
    """The check of a catalog registry; SelectError when it has no probe repository."""
    from fwdproxy.core.addr import split_host_port

    if not registry.probe:
        raise SelectError(
            f"{registry.name}: no probe repository in the catalog; "
            "name an image instead, e.g. fwdproxy discover HOST/REPOSITORY:TAG"
        )
    host, port = split_host_port(registry.api, 443)
    repo, ref = split_probe(registry.probe)
    return Target(registry.name, registry.title, host, port, repo, ref, registry)


def select_targets(
    catalog: Mapping[str, Registry], args: Sequence[str]
) -> tuple[list[Target], list[str]]:
    """Targets for NAME / HOST / IMAGE arguments (all probed registries when none) and problems."""
    if not args:
        return [target_for(r) for r in catalog.values() if r.probe], []
    targets: list[Target] = []
    problems: list[str] = []
    for arg in args:
        try:
            targets.append(_target_for_arg(catalog, arg))
        except SelectError as e:
            problems.append(str(e))
    return targets, problems


def _target_for_arg(catalog: Mapping[str, Registry], arg: str) -> Target:
    from fwdproxy.routing.catalog import registry_for_ref_host
    from fwdproxy.routing.imageref import ImageRefError, parse_image_ref

    if arg in catalog:
        return target_for(catalog[arg])
    if "/" not in arg:
        reg = registry_for_ref_host(catalog, arg)
        if reg is None:
            raise SelectError(
                f"{arg}: not a registry name or host in the catalog (names: "
                f"{', '.join(catalog)}); to check another registry name an image, "
                "e.g. HOST/REPOSITORY:TAG"
            )
        return target_for(reg)
    try:
        ref = parse_image_ref(arg)
    except ImageRefError as e:
        raise SelectError(f"{arg}: {e}") from None
    reg = registry_for_ref_host(catalog, ref.registry)
    name = reg.name if reg else ref.registry
    title = reg.title if reg else "not in the catalog"
    reference = ref.digest or ref.tag or "latest"
    return Target(name, title, ref.host, ref.port, ref.repository, reference, reg)


# -- results -------------------------------------------------------------------------------------


@dataclass
class HostSeen:
    """A host the pull met, in which roles and steps, and how the current rules route it."""

    host: str
    port: int
    decision: Decision
    roles: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    in_catalog: bool = True
    split: bool = False

    @property
    def hostport(self) -> str:
        return _hostport(self.host, self.port)

    @property
    def role(self) -> str:
        return "+".join(self.roles)


@dataclass
class Report:
    target: Target
    hosts: dict[tuple[str, int], HostSeen] = field(default_factory=dict)
    error: str | None = None
    rules: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "error" if self.error else "split" if self.rules or self.problems else "ok"


def _hostport(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == 443 else f"{h}:{port}"


def _route(d: Decision) -> str:
    if d.action == "via":
        return f"via {d.upstream}"
    return "rejected" if d.action == "reject" else d.action


def _rule(d: Decision) -> str:
    return d.rule if d.line is None else f"{d.rule} (line {d.line})"


def analyse(report: Report) -> None:
    """Mark hosts that do not follow the API host into its upstream and suggest rules for them."""
    t = report.target
    api = report.hosts.get((t.api_host, t.api_port))
    if api is None or api.decision.action != "via":
        return
    matchers = []
    for seen in report.hosts.values():
        d = seen.decision
        if d.action == "via" and d.upstream == api.decision.upstream:
            continue
        seen.split = True
        matchers.append(suggest_matcher(seen.host, t.api_host))
        report.problems.append(
            f"{seen.role} host {seen.hostport} goes {_route(d)} by rule {_rule(d)}, while the "
            f"API host goes via {api.decision.upstream}: the pull will hang or fail at that step"
        )
    report.rules = suggested_rules(t.name, str(api.decision.upstream), matchers)


# -- the live check ------------------------------------------------------------------------------


class CheckError(Exception):
    """A step of the pull failed; the message says which and why."""


class _Check:
    """One registry's pull, through the in-process proxy; records every host it meets."""

    def __init__(self, env: _Env, target: Target) -> None:
        self.env = env
        self.t = target
        self.report = Report(target)
        self.token: str | None = None
        self.step = "start"

    async def run(self) -> None:
        t = self.t
        base = f"https://{t.api}/v2/"
        self.step = "/v2/"
        status, headers, _, _ = await self.fetch("GET", base, "api")
        challenge = bearer_challenge(headers.getall("WWW-Authenticate", []))
        if status == 401:
            await self.authenticate(challenge, headers)
        elif status >= 400:
            raise CheckError(f"GET {base} answered {status}; is {t.api} a registry?")
        digest = await self.manifest(t.reference, top=True)
        if digest:
            await self.blob(digest)

    async def authenticate(self, challenge: Challenge | None, headers: Any) -> None:
        if challenge is None:
            schemes = ", ".join(headers.getall("WWW-Authenticate", [])) or "no challenge"
            raise CheckError(
                f"{self.t.api} wants credentials ({schemes}); discover checks anonymous pulls"
            )
        from yarl import URL

        self.step = "token"
        query = {"scope": f"repository:{self.t.repository}:pull"}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        url = URL(challenge.params["realm"]).update_query(query)
        status, _, body, _ = await self.fetch("GET", str(url), "token")
        if status != 200:
            raise CheckError(f"anonymous token request to {url.host} answered {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise CheckError(f"the token endpoint {url.host} sent no token")
        self.token = token

    async def manifest(self, reference: str, top: bool) -> str | None:
        """GET the manifest (an index leads to one platform manifest); the blob to fetch."""
        t = self.t
        self.step = "manifest" if top else "platform manifest"
        url = f"https://{t.api}/v2/{t.repository}/manifests/{reference}"
        head = {"Accept": MANIFEST_ACCEPT}
        status, headers, body, _ = await self.fetch("GET", url, "api", head, auth=True)
        if status == 401 and self.token is None:
            await self.authenticate(
                bearer_challenge(headers.getall("WWW-Authenticate", [])), headers
            )
            status, headers, body, _ = await self.fetch("GET", url, "api", head, auth=True)
        if status == 404:
            raise CheckError(f"probe {t.repository}:{reference} not found on {t.api} (404)")
        if status != 200:
            raise CheckError(f"manifest {t.repository}:{reference} answered {status}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise CheckError(f"manifest of {t.repository}:{reference} is not JSON") from None
        if isinstance(doc, dict) and isinstance(doc.get("manifests"), list) and top:
            child = pick_platform(doc["manifests"])
            if child is None:
                raise CheckError(f"index of {t.repository}:{reference} lists no manifest")
            return await self.manifest(child, top=False)
        return pick_blob(doc)

    async def blob(self, digest: str) -> None:
        """GET one blob without following its redirect; HEAD the redirect target if routed alike."""
        from yarl import URL

        self.step = "blob"
        url = f"https://{self.t.api}/v2/{self.t.repository}/blobs/{digest}"
        status, headers, _, final = await self.fetch("GET", url, "api", auth=True, follow=False)
        if status == 200:  # served by the API host itself (no CDN)
            self.env.seen(self.report, final, "blob", "")
        location = headers.get("Location")
        if status in (301, 302, 303, 307, 308) and location:
            where = final.join(URL(location, encoded=True))
            seen = self.env.seen(self.report, where, "blob", f"redirect from GET blob {status}")
            if not self.env.head or not self._routed_like_api(seen):
                why = "--no-head" if not self.env.head else "not routed like the API host"
                seen.steps.append(f"HEAD skipped ({why})")
                return
            self.step = "blob redirect"
            hs, hh, _, _ = await self.fetch("HEAD", str(where), "blob", follow=False)
            if hs in (301, 302, 303, 307, 308) and hh.get("Location"):
                nxt = where.join(URL(hh["Location"], encoded=True))
                self.env.seen(self.report, nxt, "blob", f"redirect from HEAD {hs} (not followed)")
        elif status >= 400:
            raise CheckError(f"blob {digest[:19]}… answered {status}")

    def _routed_like_api(self, seen: HostSeen) -> bool:
        api = self.report.hosts[(self.t.api_host, self.t.api_port)].decision
        d = seen.decision
        return (d.action, d.upstream) == (api.action, api.upstream) and d.action != "reject"

    async def fetch(
        self,
        method: str,
        url: str,
        role: str,
        headers: dict[str, str] | None = None,
        *,
        auth: bool = False,
        follow: bool = True,
    ) -> tuple[int, Any, bytes, Any]:
        """One request, following redirects by hand so that every host is recorded."""
        from yarl import URL

        current = URL(url, encoded=True)
        first_host = current.host
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers or {})
            if auth and self.token and current.host == first_host:
                hdrs["Authorization"] = f"Bearer {self.token}"
            seen = self.env.seen(self.report, current, role, "")
            read = follow and method != "HEAD"
            status, resp_headers, body = await self.env.request(method, current, hdrs, read)
            seen.steps.append(f"{method} {self.step} {status}")
            location = resp_headers.get("Location")
            if not follow or status not in (301, 302, 303, 307, 308) or not location:
                return status, resp_headers, body, current
            current = current.join(URL(location, encoded=True))
        raise CheckError(f"{self.step}: more than {MAX_REDIRECTS} redirects")


def pick_platform(manifests: list[Any]) -> str | None:
    """The digest of linux/amd64 in an index, else the first real platform, else the first."""
    entries = [m for m in manifests if isinstance(m, dict) and isinstance(m.get("digest"), str)]

    def platform(m: dict[str, Any]) -> tuple[str, str]:
        raw = m.get("platform")
        p: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return str(p.get("os", "")), str(p.get("architecture", ""))

    for want in (lambda p: p == ("linux", "amd64"), lambda p: p[0] not in ("", "unknown")):
        for m in entries:
            if want(platform(m)):
                return str(m["digest"])
    return str(entries[0]["digest"]) if entries else None


def pick_blob(doc: Any) -> str | None:
    """The config blob, else the smallest layer (schema 1: the first fsLayer)."""
    if not isinstance(doc, dict):
        return None
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        return str(config["digest"])
    layers = [x for x in doc.get("layers") or [] if isinstance(x, dict) and "digest" in x]
    if layers:
        return str(min(layers, key=lambda x: int(x.get("size") or 0))["digest"])
    fs = [x.get("blobSum") for x in doc.get("fsLayers") or [] if isinstance(x, dict)]
    return str(fs[0]) if fs and isinstance(fs[0], str) else None


class _Env:
    """The in-process proxy and HTTP client shared by all checks of one run."""

    def __init__(self, cfg: Config, session: Any, proxy_url: str, ssl: Any, head: bool) -> None:
        self.cfg = cfg
        self.session = session
        self.proxy_url = proxy_url
        self.ssl = ssl
        self.head = head
        self.proxy_errors: dict[str, str] = {}

    def seen(self, report: Report, url: Any, role: str, step: str) -> HostSeen:
        from fwdproxy.core.addr import normalise_host

        host = normalise_host(str(url.host))
        port = int(url.port or (443 if url.scheme == "https" else 80))
        entry = report.hosts.get((host, port))
        if entry is None:
            reg = report.target.registry
            covered = reg is not None and any(h.matches(host) for h in reg.hosts)
            entry = HostSeen(host, port, self.cfg.router.decide(host, port), in_catalog=covered)
            report.hosts[(host, port)] = entry
        if role not in entry.roles:
            entry.roles.append(role)
        if step:
            entry.steps.append(step)
        return entry

    async def request(
        self, method: str, url: Any, headers: dict[str, str], read: bool
    ) -> tuple[int, Any, bytes]:
        import aiohttp

        where = _hostport(str(url.host), int(url.port or 443))
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                proxy=self.proxy_url,
                ssl=self.ssl,
                allow_redirects=False,
            ) as resp:
                if not read:
                    resp.close()  # never download a layer: the headers are all we want
                    return resp.status, resp.headers, b""
                return resp.status, resp.headers, await _read_capped(resp.content)
        except aiohttp.ClientHttpProxyError as e:
            why = self.proxy_errors.get(_target_key(url)) or f"{e.status} {e.message}"
            raise CheckError(f"the proxy could not open {where}: {why}") from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise CheckError(
                f"TLS certificate of {where} is not trusted ({e.certificate_error}); "
                "use --ca-file FILE for a private CA, or --insecure"
            ) from None
        except aiohttp.ClientSSLError as e:
            raise CheckError(f"TLS handshake with {where} failed: {e}") from None
        except (aiohttp.ClientError, OSError) as e:
            extra = self.proxy_errors.get(_target_key(url))
            raise CheckError(
                f"connection to {where} failed: {type(e).__name__}: {e}"
                + (f" (proxy: {extra})" if extra else "")
            ) from None


async def _read_capped(stream: Any) -> bytes:
    """The body up to MAX_BODY_BYTES: a manifest or a token, never worth more memory."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_BODY_BYTES:
        data = await stream.read(MAX_BODY_BYTES - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def _target_key(url: Any) -> str:
    from fwdproxy.core.addr import format_host_port

    return format_host_port(str(url.host), int(url.port or 443))


async def check_one(env: _Env, target: Target, timeout_s: float) -> Report:
    """Run one registry's check within its timeout; failures land in report.error."""
    check = _Check(env, target)
    try:
        await asyncio.wait_for(check.run(), timeout_s)
    except asyncio.TimeoutError:
        check.report.error = f"timed out after {timeout_s:g}s during {check.step}"
    except CheckError as e:
        check.report.error = str(e)
    analyse(check.report)
    return check.report


async def discover(
    cfg: Config,
    targets: Sequence[Target],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ssl: Any = True,
    head: bool = True,
) -> list[Report]:
    """Check every target concurrently through an in-process proxy running `cfg`'s rules."""
    import dataclasses

    import aiohttp

    from fwdproxy.config import Listener
    from fwdproxy.proxy.state import Observer
    from fwdproxy.server import Server

    local = dataclasses.replace(
        cfg, listeners=(Listener("127.0.0.1", 0),), admin=None, users={}, allow_any_client=False
    )
    server = Server(local, allow_any_client=False)
    await server.start()
    try:
        host, port = server.addresses[0]
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
            env = _Env(cfg, session, f"http://{host}:{port}", ssl, head)

            class Errors(Observer):
                def closed(self, info: Any) -> None:
                    if info.error:
                        env.proxy_errors[info.target] = info.error

            server.state.observers.append(Errors())
            return list(await asyncio.gather(*(check_one(env, t, timeout_s) for t in targets)))
    finally:
        await server.stop(1)


def exit_code(reports: Sequence[Report], problems: Sequence[str] = ()) -> int:
    """2 if some registry could not be checked, else 1 if a host needs a rule, else 0."""
    if problems or any(r.error for r in reports):
        return EXIT_UNCHECKED
    return EXIT_SPLIT if any(r.status == "split" for r in reports) else EXIT_OK


# -- output --------------------------------------------------------------------------------------


def format_reports(reports: Sequence[Report], cfg_path: str = "rules.yaml") -> str:
    """The table (REGISTRY ROLE HOST ROUTE RULE), then per registry a verdict and any rule."""
    header = ("REGISTRY", "ROLE", "HOST", "ROUTE", "RULE")
    rows = [header]
    for r in reports:
        for s in r.hosts.values():
            mark = " !" if s.split else ""
            rows.append(
                (r.target.name, s.role, s.hostport, _route(s.decision) + mark, _rule(s.decision))
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in rows
    ]
    lines.append("")
    for r in reports:
        lines += _verdict(r, cfg_path)
    return "\n".join(lines) + "\n"


def _verdict(r: Report, cfg_path: str) -> list[str]:
    name = r.target.name
    probe = f"{r.target.repository}:{r.target.reference}"
    out = []
    if r.error:
        out.append(f"{name}: ERROR ({probe}): {r.error}")
    elif r.status == "ok":
        routes = sorted({_route(s.decision) for s in r.hosts.values()})
        out.append(f"{name}: OK ({probe}): {len(r.hosts)} host(s), all {' / '.join(routes)}")
    else:
        out.append(f"{name}: SPLIT ({probe}): {len(r.problems)} host(s) leave another way")
    out += [f"  - {p}" for p in r.problems]
    unknown = [s.hostport for s in r.hosts.values() if not s.in_catalog]
    if unknown and r.target.registry is not None:
        out.append(f"  note: not in the catalog entry {name}: {', '.join(unknown)}")
    if r.rules:
        out.append(
            f"  suggested rule (put it first under rules: in {cfg_path}, then `fwdproxy check`):"
        )
        out += rules_yaml(r.rules).rstrip("\n").split("\n")
    return out


def reports_json(reports: Sequence[Report], problems: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "registries": [
            {
                "registry": r.target.name,
                "title": r.target.title,
                "api": r.target.api,
                "probe": f"{r.target.repository}:{r.target.reference}",
                "status": r.status,
                "error": r.error,
                "hosts": [
                    {
                        "host": s.host,
                        "port": s.port,
                        "roles": s.roles,
                        "steps": s.steps,
                        "action": s.decision.action,
                        "upstream": s.decision.upstream,
                        "route": s.decision.route,
                        "rule": s.decision.rule,
                        "line": s.decision.line,
                        "in_catalog": s.in_catalog,
                        "split": s.split,
                    }
                    for s in r.hosts.values()
                ],
                "problems": r.problems,
                "suggested_rules": r.rules,
                "suggested_yaml": rules_yaml(r.rules) if r.rules else None,
            }
            for r in reports
        ],
        "problems": list(problems),
        "exit_code": exit_code(reports, problems),
    }


# -- command line --------------------------------------------------------------------------------

EPILOG: Final = """\
what it does, per registry (through an in-process fwdproxy with your rules and upstreams):
  1. GET https://API/v2/; on 401 read the Bearer challenge and fetch an anonymous token from
     its realm (service, scope=repository:PROBE:pull)
  2. GET the probe's manifest (an index leads to the linux/amd64 manifest)
  3. GET one blob WITHOUT following the redirect; record the redirect host, HEAD it only if
     your rules route it like the API host
  Every host met is listed with the route your rules give it. A host that does not leave
  through the API host's upstream gets a rule to paste under rules:.

exit status: 0 all hosts routed like the API host, 1 a rule is suggested,
             2 some registry could not be checked (its error is printed; the others still are)

examples:
  fwdproxy discover                          # every catalog registry with a probe
  fwdproxy discover dockerhub ghcr           # by catalog name
  fwdproxy discover quay.io registry.k8s.io  # by registry host
  fwdproxy discover harbor.example.com/library/nginx:1.27   # any registry, by image
  fwdproxy discover --upstream socks5://127.0.0.1:7890 --json k8s
  fwdproxy discover --ca-file /etc/ssl/private-ca.pem harbor.corp/team/app:1
"""


def register(subparsers: Any) -> None:
    """Add `discover` to the fwdproxy command line."""
    from fwdproxy.cli.main import add_config_arg, formatter

    p = subparsers.add_parser(
        "discover",
        help="live pull check: every host a registry sends you to, and its route",
        formatter_class=formatter,
        description="Pull-check registries through the configured tunnel and report every "
        "host met (API, token realm, redirects) with its route; suggest rules for hosts that "
        "would leave another way than the API host.",
        epilog=EPILOG,
    )
    add_config_arg(p)
    p.add_argument(
        "registries",
        nargs="*",
        metavar="REGISTRY",
        help="catalog name, registry host, or image HOST/REPOSITORY[:TAG]",
    )
    p.add_argument("--upstream", metavar="[NAME=]URL", help="as for serve")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"per registry (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    p.add_argument("--ca-file", metavar="FILE", help="also trust this CA (PEM)")
    p.add_argument("--no-head", action="store_true", help="do not HEAD blob redirect targets")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="show the in-process proxy's log on stderr",
    )
    p.set_defaults(func=cmd_discover)


def cmd_discover(args: argparse.Namespace) -> int:
    from fwdproxy.config import load_config
    from fwdproxy.core.errors import ConfigError

    try:
        cfg = load_config(args.config, upstream_override=args.upstream)
    except ConfigError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        return EXIT_UNCHECKED
    targets, problems = select_targets(cfg.catalog, args.registries)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    try:
        ssl = _ssl_context(args.insecure, args.ca_file)
    except OSError as e:
        print(f"error: --ca-file {args.ca_file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_UNCHECKED
    _quiet_proxy_log(args.log_level)
    reports: list[Report] = []
    try:
        if targets:
            run = discover(cfg, targets, timeout_s=args.timeout, ssl=ssl, head=not args.no_head)
            reports = asyncio.run(run)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(reports_json(reports, problems), indent=2))
    elif reports:
        print(format_reports(reports, cfg.path), end="")
    return exit_code(reports, problems)


def _ssl_context(insecure: bool, ca_file: str | None) -> Any:
    import ssl

    if insecure:
        return False
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _quiet_proxy_log(level: str | None) -> None:
    """The in-process proxy logs like `serve` only when asked; otherwise it stays silent."""
    if level:
        from fwdproxy.cli.logsetup import setup_logging

        setup_logging(level, "text")
        return
    log = logging.getLogger("fwdproxy")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
