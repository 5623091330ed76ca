"""Image-reference normalisation, matching docker/containerd (distribution/reference).

`fwdproxy explain nginx` must name the same registry host that dockerd would dial, so this follows
`ParseNormalizedNamed` + `TagNameOnly`: the first path component is a registry only if it is
`localhost`, contains `.` or `:`, or has an uppercase letter; `docker.io` / `index.docker.io`
become `docker.io` and one-component Docker Hub names get `library/`.

Deliberately stricter than distribution/reference, because an ImageRef must be dialable:
- a first component that looks like a registry but is not a valid host (`my_reg.com/x`) is an
  error (Go would silently keep it as a path with an empty domain);
- ports must be 1-65535, IPv6 literals must parse, hosts obey DNS length limits.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from fwdproxy.core.errors import FwdProxyError

DEFAULT_REGISTRY: Final = "docker.io"
LEGACY_DEFAULT_REGISTRY: Final = "index.docker.io"
DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX: Final = "library/"
DEFAULT_TAG: Final = "latest"
DEFAULT_PORT: Final = 443
MAX_REPOSITORY_LENGTH: Final = 255
MAX_REFERENCE_LENGTH: Final = 1024  # far above any valid reference; keeps hostile input cheap

# The grammar of distribution/reference regexp.go, spelled with ASCII-only classes.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
REPOSITORY_RE: Final = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_REGISTRY_RE = re.compile(
    rf"(?P<host>{_DOMAIN_NAME}|\[(?P<ipv6>[a-fA-F0-9:]+)\])(?::(?P<port>[0-9]+))?"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(
    r"(?P<algorithm>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*)"
    r":(?P<encoded>[0-9a-fA-F]{32,})"
)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
# The algorithms Go clients register (crypto/sha256, crypto/sha512) and their hex lengths.
DIGEST_HEX_LENGTHS: Final = {"sha256": 64, "sha384": 96, "sha512": 128}


class ImageRefError(FwdProxyError, ValueError):
    """The text is not a valid image reference; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A fully normalised reference plus the endpoint a client dials for it.

    `registry` is the registry as written after normalisation (`docker.io`, `localhost:5000`,
    `[::1]:5000`); `host` and `port` are what a client connects to (`registry-1.docker.io`, 443).
    """

    registry: str
    host: str
    port: int
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_ref(reference: str) -> ImageRef:
    """Normalise `reference` as `docker pull` does, or raise ImageRefError saying why not."""
    if not isinstance(reference, str):
        raise ImageRefError(f"image reference must be a string, not {type(reference).__name__}")
    if not reference:
        raise ImageRefError("image reference is empty")
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise ImageRefError(
            f"image reference is too long ({len(reference)} > {MAX_REFERENCE_LENGTH} characters)"
        )
    if _IDENTIFIER_RE.fullmatch(reference):
        raise ImageRefError(
            f"{reference!r} is a 64-hex image ID, not a reference; prefix a repository name"
        )
    registry, remainder = _split_registry(reference)
    host, port = _registry_endpoint(registry)
    repository, tag, digest = _split_remainder(remainder)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry, host, port, repository, tag, digest)


normalise = parse_image_ref  # the name docker's docs use for this operation


def _split_registry(reference: str) -> tuple[str, str]:
    """First-component rules of splitDockerDomain: is it a registry or a Docker Hub namespace?"""
    first, slash, rest = reference.partition("/")
    if not slash:
        return DEFAULT_REGISTRY, OFFICIAL_REPO_PREFIX + reference
    if first == LEGACY_DEFAULT_REGISTRY:
        registry, remainder = DEFAULT_REGISTRY, rest
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        registry, remainder = first, rest
    else:
        registry, remainder = DEFAULT_REGISTRY, reference
    if registry == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return registry, remainder


def _registry_endpoint(registry: str) -> tuple[str, int]:
    """The (host, port) a client dials for `registry`; validates it on the way."""
    match = _REGISTRY_RE.fullmatch(registry)
    if match is None:
        raise ImageRefError(
            f"invalid registry {registry!r}: expected host[:port] with letters, digits, '-' "
            "and '.', or [ipv6]:port"
        )
    port = DEFAULT_PORT
    if match["port"] is not None:
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ImageRefError(f"invalid registry {registry!r}: port {port} is out of range")
    if match["ipv6"] is not None:
        try:
            address = ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            raise ImageRefError(
                f"invalid registry {registry!r}: {match['ipv6']!r} is not an IPv6 address"
            ) from None
        return address.compressed, port
    host = match["host"].lower()
    if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
        raise ImageRefError(f"invalid registry {registry!r}: host name is too long")
    if registry == DEFAULT_REGISTRY:
        host = DOCKER_HUB_API_HOST
    return host, port


def _split_remainder(remainder: str) -> tuple[str, str | None, str | None]:
    """path[:tag][@digest] → its parts, each checked with a message naming the bad part."""
    cut = min((i for i in (remainder.find(":"), remainder.find("@")) if i >= 0), default=-1)
    path = remainder if cut < 0 else remainder[:cut]
    rest = "" if cut < 0 else remainder[cut:]
    if path.lower() != path:
        raise ImageRefError(f"invalid repository {path!r}: repository names must be lowercase")
    if not REPOSITORY_RE.fullmatch(path):
        raise ImageRefError(
            f"invalid repository {path!r}: components are lowercase letters and digits "
            "separated by '.', '_', '__' or '-', joined by single '/'"
        )
    if len(path) > MAX_REPOSITORY_LENGTH:
        raise ImageRefError(
            f"invalid repository: {len(path)} characters, at most {MAX_REPOSITORY_LENGTH}"
        )
    tag: str | None = None
    digest: str | None = None
    if rest.startswith(":"):
        tag, at, digest_text = rest[1:].partition("@")
        _check_tag(tag)
        digest = _check_digest(digest_text) if at else None
    elif rest.startswith("@"):
        digest = _check_digest(rest[1:])
    return path, tag, digest


def _check_tag(tag: str) -> None:
    if not tag:
        raise ImageRefError("empty tag after ':'")
    if not _TAG_RE.fullmatch(tag):
        raise ImageRefError(
            f"invalid tag {tag!r}: 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )


def _check_digest(text: str) -> str:
    match = _DIGEST_RE.fullmatch(text)
    if match is None:
        raise ImageRefError(
            f"invalid digest {text!r}: expected algorithm:hex, e.g. sha256:<64 hex digits>"
        )
    algorithm, encoded = match["algorithm"], match["encoded"]
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise ImageRefError(
            f"unsupported digest algorithm {algorithm!r}: use one of "
            + ", ".join(DIGEST_HEX_LENGTHS)
        )
    if len(encoded) != expected or encoded.lower() != encoded:
        raise ImageRefError(
            f"invalid {algorithm} digest: needs exactly {expected} lowercase hex digits, "
            f"got {len(encoded)}"
        )
    return text
