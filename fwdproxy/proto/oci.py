"""The pull side of the OCI Distribution API as a registry mirror sees it (pure).

Names, tags and references; the distribution error codes and their JSON body; and
`parse_mirror_request`, which turns the request line a container runtime sends to a mirror into
the upstream registry, repository and reference it means. Runtimes name the upstream in
different ways, tried in this order:

1. `ns` query parameter (containerd >= 1.4 on every manifest and blob request, so also k3s and
   Docker's containerd store): `/v2/library/alpine/manifests/latest?ns=docker.io`. The value is a
   registry host[:port], percent-encoded or not. It is a lookup key: callers must check it against
   their allow-list before dialling anything.
2. A configured path prefix (`prefixes={"dockerhub": "docker.io"}`), before `/v2`
   (`/dockerhub/v2/...`: Docker >= 25 `registry-mirrors` with a path, containerd host URL with a
   path), right after it (`/v2/dockerhub/...`: podman `location = "m/dockerhub"`, BuildKit in
   Docker 25-27), or with no `/v2` at all (`/dockerhub/library/...`: k3s endpoints with a path get
   `override_path = true`). With `ns` as well, both must name the same registry.
3. A registry host as the first name component (podman/CRI-O/skopeo `registries.conf` mirror
   `location = "mirror:5000/quay.io"` -> `/v2/quay.io/org/app/manifests/1`). A first component is
   a host when it contains `.` or `:`, is `localhost`, or has upper case, and more components
   follow: distribution/reference `splitDockerDomain`. Ambiguity: on a non-Docker-Hub default
   registry, a repository whose first component contains a dot (`team.a/app`) is read as a host;
   Docker Hub namespaces cannot contain dots, so the default Docker Hub case is unambiguous.
   With `ns`, a first component is stripped only when it names that same registry.
4. Otherwise the default registry (Docker `registry-mirrors` without a path: no `ns`, Docker Hub
   only).

Names are passed through unchanged: Docker, the CRI plugin and podman already send
`library/alpine`; a mirror that added or stripped `library/` would serve names the upstream does
not (`ctr` does not normalise, and Docker Hub refuses `/v2/alpine/...` too).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fwdproxy.proto.digest import Digest, DigestError, parse_digest

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_API_HOST",
    "ERROR_STATUS",
    "MAX_NAME_LENGTH",
    "NAME_RE",
    "TAG_RE",
    "Addressing",
    "MirrorRequest",
    "OCIError",
    "Registry",
    "RequestKind",
    "Tag",
    "error_body",
    "is_registry_component",
    "parse_mirror_request",
    "parse_reference",
    "parse_registry",
    "parse_tag",
    "validate_name",
]

# Default HTTP status per error code: distribution v3.1.1 `registry/api/errcode/register.go` and
# `registry/api/v2/errors.go`; the spec's "Error Codes" table lists the first fourteen.
ERROR_STATUS: Final[Mapping[str, int]] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
    "RANGE_INVALID": 416,
    "TAG_INVALID": 400,
    "PAGINATION_NUMBER_INVALID": 400,
}

# Spec "Pulling manifests": <name> grammar; distribution/reference limits host/name to 255.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH: Final = 255
MAX_PATH_LENGTH: Final = 2048
MAX_QUERY_LENGTH: Final = 2048
MAX_QUERY_FIELDS: Final = 32

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_PCT_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
# Percent-escapes that may be decoded in a path: nothing that changes its structure (`/`, `%`)
# and nothing the grammars refuse anyway, so `%2F` and `%252F` never become separators.
_DECODABLE: Final = frozenset(string.ascii_letters + string.digits + "-._~:@")
_MEDIA_TYPE_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_PULL_METHODS: Final = frozenset({"GET", "HEAD"})
_ALLOW: Final = (("Allow", "GET, HEAD"),)


class OCIError(Exception):
    """A distribution-spec error: `code` from ERROR_STATUS, the HTTP `status` to answer with.

    `headers` are extra response headers the status needs (`Allow` on 405, `Content-Range` on
    416), so that the server never has to know which error wants which header.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        detail: object = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown distribution error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = ERROR_STATUS[code] if status is None else status
        self.detail = detail
        self.headers = headers

    def __repr__(self) -> str:
        return f"OCIError({self.code!r}, {self.message!r}, {self.status})"


def error_body(*errors: OCIError) -> bytes:
    """`{"errors":[{"code","message","detail"?}]}` (spec "Error Codes"); detail only when set."""
    entries: list[dict[str, object]] = []
    for err in errors:
        entry: dict[str, object] = {"code": err.code, "message": err.message}
        if err.detail is not None:
            entry["detail"] = err.detail
        entries.append(entry)
    return json.dumps({"errors": entries}, separators=(",", ":"), default=str).encode()


def _name_invalid(message: str) -> OCIError:
    return OCIError("NAME_INVALID", message)


def _show(text: str, limit: int = 80) -> str:
    """Hostile text quoted for a message: bounded, escaped (`ascii`), never raw control bytes."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------------------------------------
# Names, tags, references


@dataclass(frozen=True, slots=True)
class Tag:
    """A validated tag; `str(tag)` is the tag itself, as Digest's `str` is its spelling."""

    name: str

    def __str__(self) -> str:
        return self.name


def validate_name(name: str) -> str:
    """Return `name` if it matches the spec's `<name>` grammar and length, else NAME_INVALID."""
    if len(name) > MAX_NAME_LENGTH:
        raise _name_invalid(f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.fullmatch(name):
        raise _name_invalid(
            f"invalid repository name {_show(name)}: lower-case components of [a-z0-9] "
            "separated by '.', '_', '__' or '-', joined by '/'"
        )
    return name


def parse_tag(text: str) -> Tag:
    if not TAG_RE.fullmatch(text):
        raise OCIError(
            "TAG_INVALID", f"invalid tag {_show(text)}: 1-128 of [A-Za-z0-9_.-], not led by . or -"
        )
    return Tag(text)


def parse_reference(text: str) -> Tag | Digest:
    """A manifest reference: a digest if it has a `:` (tags cannot), else a tag."""
    if ":" in text:
        try:
            return parse_digest(text)
        except DigestError as e:
            raise OCIError("DIGEST_INVALID", str(e)) from None
    return parse_tag(text)


# ---------------------------------------------------------------------------------------------
# Registries


@dataclass(frozen=True, slots=True)
class Registry:
    """An upstream registry: `name` identifies it (cache keys, allow-lists, logs, `ns`),
    `api_host` is the host[:port] its API is served from (`docker.io` -> registry-1.docker.io)."""

    name: str
    api_host: str

    def __str__(self) -> str:
        return self.name


def is_registry_component(component: str) -> bool:
    """Docker's rule (`splitDockerDomain`) for "the first path component is a registry host"."""
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def parse_registry(text: str) -> Registry:
    """host[:port] or [ipv6][:port] -> Registry, normalised; NAME_INVALID for anything else.

    Stricter than `fwdproxy.addr` on purpose: no `_` or `*` labels, no whitespace, no IDNA, and no
    all-numeric names that a resolver would read as inet_aton IPv4 (`2130706433`, `127.1`).
    """
    if not text or len(text) > 261 or not text.isascii():
        raise _name_invalid(f"invalid registry host {_show(text)}")
    host, port = _split_port(text)
    host = _normalise_host(host, text)
    if host in _DOCKER_HUB_ALIASES and port in ("", "443"):
        return Registry(DOCKER_HUB, DOCKER_HUB_API_HOST)
    name = f"{host}:{port}" if port else host
    return Registry(name, name)


def _split_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _name_invalid(f"unterminated IPv6 literal in registry host {_show(text)}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _name_invalid(f"invalid registry host {_show(text)}")
        port = rest[1:] if rest else ""
        if rest and not port:
            raise _name_invalid(f"empty port in registry host {_show(text)}")
    else:
        host, colon, port = text.partition(":")
        if colon and not port:
            raise _name_invalid(f"empty port in registry host {_show(text)}")
    if port and (not _PORT_RE.fullmatch(port) or int(port) > 65535):
        raise _name_invalid(f"invalid port in registry host {_show(text)}")
    return host, port


def _normalise_host(host: str, text: str) -> str:
    if host.startswith("["):
        if "%" in host:
            raise _name_invalid(f"IPv6 zone in registry host {_show(text)}")
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise _name_invalid(f"invalid IPv6 address in registry host {_show(text)}") from None
    host = host.lower()
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise _name_invalid(f"invalid registry host {_show(text)}")
    if host.rpartition(".")[2].isdigit():
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise _name_invalid(f"invalid IPv4 address in registry host {_show(text)}") from None
    return host


# ---------------------------------------------------------------------------------------------
# Mirror requests


class RequestKind(str, enum.Enum):
    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS_LIST = "tags-list"
    REFERRERS = "referrers"


class Addressing(str, enum.Enum):
    """How the request named its upstream registry (see the module docstring), for logs."""

    NS = "ns"
    PREFIX = "prefix"
    PATH_REGISTRY = "path-registry"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class MirrorRequest:
    """One pull request, resolved to its upstream.

    `repository` is the name on the upstream (without registry); `reference` is a Tag or Digest
    for manifests, a Digest for blobs and referrers, None for ping and tags list.
    `upstream_query` is the re-encoded query to forward (`n`/`last`, `artifactType`), `ns` removed.
    When `addressing` is NS, the spec (main, "Registry Proxying") asks the mirror to echo the
    registry name in an `OCI-Namespace` response header.
    """

    kind: RequestKind
    method: str
    registry: Registry
    repository: str | None = None
    reference: Tag | Digest | None = None
    addressing: Addressing = Addressing.DEFAULT
    prefix: str | None = None
    upstream_query: str = ""

    @property
    def name(self) -> str | None:
        """`registry/repository`: the name a cache and the logs key on."""
        return None if self.repository is None else f"{self.registry.name}/{self.repository}"

    @property
    def upstream_path(self) -> str:
        """The path (no query) to request from `registry.api_host`."""
        if self.kind is RequestKind.PING:
            return "/v2/"
        tail = {
            RequestKind.MANIFEST: f"manifests/{self.reference}",
            RequestKind.BLOB: f"blobs/{self.reference}",
            RequestKind.TAGS_LIST: "tags/list",
            RequestKind.REFERRERS: f"referrers/{self.reference}",
        }[self.kind]
        return f"/v2/{self.repository}/{tail}"

    def describe(self) -> str:
        """For logs: `manifest docker.io/library/alpine:latest via ns, prefix /dockerhub`."""
        what = self.registry.name if self.repository is None else self.name
        if isinstance(self.reference, Tag):
            what = f"{what}:{self.reference}"
        elif self.reference is not None:
            what = f"{what}@{self.reference}"
        via = self.addressing.value
        if self.prefix and self.addressing is not Addressing.PREFIX:
            via += f", prefix /{self.prefix}"
        elif self.prefix:
            via += f" /{self.prefix}"
        return f"{self.kind.value} {what} via {via}"


def _pull_only(method: str) -> OCIError:
    return OCIError(
        "UNSUPPORTED",
        f"this registry mirror is pull-only: {_show(method, 20)} is not supported",
        405,
        headers=_ALLOW,
    )


def _not_api(path: str) -> OCIError:
    return OCIError("UNSUPPORTED", f"not a registry API path: {_show(path)}", 404)


def parse_mirror_request(
    method: str,
    path: str,
    query: str = "",
    default_registry: str = DOCKER_HUB,
    *,
    prefixes: Mapping[str, str] | None = None,
) -> MirrorRequest:
    """Resolve one request line; OCIError (and only OCIError) for anything we will not serve.

    `path` is the raw (still percent-encoded) path and `query` the raw query, without `?`.
    `prefixes` maps a path prefix (`"dockerhub"`, `"mirrors/quay"`) to the registry it stands for;
    pick prefixes that cannot be repository namespaces, since `/v2/<prefix>/...` is stripped.
    """
    if method not in _PULL_METHODS:
        raise _pull_only(method)
    comps = _split_path(path)
    params = _parse_query(query)
    ns = _ns_registry(params)
    prefix, prefix_registry, api = _strip_prefix(comps, prefixes or {}, path)
    if ns is not None and prefix_registry is not None and ns != prefix_registry:
        raise OCIError(
            "NAME_UNKNOWN",
            f"path prefix {prefix!r} serves {prefix_registry.name}, but ns names {ns.name}",
        )
    if api in ([], [""]):
        registry, how = _registry_of(ns, prefix_registry, default_registry)
        return MirrorRequest(RequestKind.PING, method, registry, addressing=how, prefix=prefix)
    kind, name_comps, ref_text, upstream_query = _route(api, params, path)
    registry, how = _registry_of(ns, prefix_registry, default_registry)
    if len(name_comps) >= 2 and is_registry_component(name_comps[0]):
        if how is Addressing.DEFAULT:
            registry, how = parse_registry(name_comps[0]), Addressing.PATH_REGISTRY
            name_comps = name_comps[1:]
        elif how is Addressing.NS and _same_registry(name_comps[0], registry):
            name_comps = name_comps[1:]
    repository = validate_name("/".join(name_comps))
    if len(registry.name) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise _name_invalid(f"registry/repository longer than {MAX_NAME_LENGTH} characters")
    reference = _reference_for(kind, ref_text)
    return MirrorRequest(kind, method, registry, repository, reference, how, prefix, upstream_query)


def _registry_of(
    ns: Registry | None, prefix_registry: Registry | None, default_registry: str
) -> tuple[Registry, Addressing]:
    if ns is not None:
        return ns, Addressing.NS
    if prefix_registry is not None:
        return prefix_registry, Addressing.PREFIX
    return parse_registry(default_registry), Addressing.DEFAULT


def _same_registry(component: str, registry: Registry) -> bool:
    try:
        return parse_registry(component) == registry
    except OCIError:
        return False


def _split_path(path: str) -> list[str]:
    """Validated, restrictedly decoded path components (without the leading empty one)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise _name_invalid("request path must start with '/'")
    if len(path) > MAX_PATH_LENGTH:
        raise _name_invalid(f"request path longer than {MAX_PATH_LENGTH} characters")
    if not path.isascii() or not path.isprintable() or " " in path or "?" in path or "#" in path:
        raise _name_invalid(f"request path {_show(path)} has characters no registry path has")
    if "%" in path:
        path = _PCT_RE.sub(_decode_escape, path)
        if "%" in path:
            raise _name_invalid(f"malformed percent-encoding in {_show(path)}")
    comps = path[1:].split("/")
    if any(c in (".", "..") for c in comps):
        raise _name_invalid("dot segments are not allowed in a registry path")
    if any(not c for c in comps[:-1]):
        raise _name_invalid("empty component (double slash) in the request path")
    return comps


def _decode_escape(match: re.Match[str]) -> str:
    char = chr(int(match[1], 16))
    if char not in _DECODABLE:
        raise _name_invalid(f"percent-encoded {char!r} is not allowed in a registry path")
    return char


def _parse_query(query: str) -> dict[str, list[str]]:
    """Form-decoded query (Go's `url.ParseQuery`, which containerd's `url.Values.Encode` feeds)."""
    if not isinstance(query, str) or len(query) > MAX_QUERY_LENGTH:
        raise _name_invalid("query string too long")
    fields = [f for f in query.split("&") if f]
    if len(fields) > MAX_QUERY_FIELDS:
        raise _name_invalid("too many query parameters")
    params: dict[str, list[str]] = {}
    for field_ in fields:
        key, _, value = field_.partition("=")
        try:
            key = urllib.parse.unquote_plus(key, errors="strict")
            value = urllib.parse.unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise _name_invalid("query parameter is not valid percent-encoded UTF-8") from None
        params.setdefault(key, []).append(value)
    return params


def _ns_registry(params: dict[str, list[str]]) -> Registry | None:
    values = params.get("ns")
    if values is None:
        return None
    registries = {parse_registry(v) for v in values}
    if len(registries) != 1:
        raise _name_invalid("conflicting ns query parameters")
    return registries.pop()


def _strip_prefix(
    comps: list[str], prefixes: Mapping[str, str], path: str
) -> tuple[str | None, Registry | None, list[str]]:
    """Remove `/v2` and a configured prefix on either side of it; the rest is the API path."""
    after_v2 = comps[0] == "v2"
    rest = comps[1:] if after_v2 else comps
    for prefix in sorted(prefixes, key=lambda p: -p.count("/")):
        parts = prefix.strip("/").split("/")
        if rest[: len(parts)] != parts:
            continue
        registry = parse_registry(prefixes[prefix])
        tail = rest[len(parts) :]
        if after_v2:
            return prefix, registry, tail
        return prefix, registry, tail[1:] if tail[:1] == ["v2"] else tail
    if not after_v2:
        raise _not_api(path)
    return None, None, rest


def _route(
    api: list[str], params: dict[str, list[str]], path: str
) -> tuple[RequestKind, list[str], str, str]:
    """API path after `/v2/` -> (kind, name components, reference text, upstream query)."""
    if "uploads" in api[-2:] and "blobs" in api[-3:-1]:
        raise OCIError(
            "UNSUPPORTED", "this registry mirror is pull-only: no blob uploads", 405, headers=_ALLOW
        )
    if api == ["_catalog"]:
        raise OCIError("UNSUPPORTED", "this registry mirror does not list repositories", 404)
    if len(api) >= 3 and api[-2:] == ["tags", "list"]:
        return RequestKind.TAGS_LIST, api[:-2], "", _tags_query(params)
    if len(api) >= 3 and api[-2] in ("manifests", "blobs", "referrers"):
        kind = {
            "manifests": RequestKind.MANIFEST,
            "blobs": RequestKind.BLOB,
            "referrers": RequestKind.REFERRERS,
        }[api[-2]]
        extra = _referrers_query(params) if kind is RequestKind.REFERRERS else ""
        return kind, api[:-2], api[-1], extra
    raise _not_api(path)


def _reference_for(kind: RequestKind, text: str) -> Tag | Digest | None:
    if kind is RequestKind.MANIFEST:
        return parse_reference(text)
    if kind in (RequestKind.BLOB, RequestKind.REFERRERS):
        try:
            return parse_digest(text)
        except DigestError as e:
            raise OCIError("DIGEST_INVALID", str(e)) from None
    return None


def _tags_query(params: dict[str, list[str]]) -> str:
    """`n` and `last` for tags/list (spec "Listing Tags"), validated and re-encoded."""
    out: list[str] = []
    n = params.get("n")
    if n is not None:
        if len(n) != 1 or not (n[0].isascii() and n[0].isdigit()) or len(n[0]) > 6:
            raise OCIError("PAGINATION_NUMBER_INVALID", "n must be one decimal number")
        out.append(f"n={int(n[0])}")
    last = params.get("last")
    if last is not None:
        if len(last) != 1:
            raise OCIError("TAG_INVALID", "last must be given once")
        out.append(f"last={parse_tag(last[0])}")
    return "&".join(out)


def _referrers_query(params: dict[str, list[str]]) -> str:
    kinds = params.get("artifactType")
    if kinds is None:
        return ""
    if len(kinds) != 1 or not _MEDIA_TYPE_RE.fullmatch(kinds[0]):
        raise OCIError("UNSUPPORTED", "artifactType must be one media type", 400)
    return "artifactType=" + urllib.parse.quote(kinds[0], safe="")
