"""`explain` lists every host a pull touches, routes each with the router, and spots split pulls."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fwdproxy.routing.catalog import builtin_catalog, merge_catalog, parse_registries
from fwdproxy.routing.explain import (
    Explanation,
    explain,
    explanation_json,
    format_explanation,
    verdict,
)
from fwdproxy.routing.imageref import ImageRefError, parse_image_ref


@dataclass(frozen=True)
class FakeDecision:
    """Same shape as fwdproxy.routing.rules.Decision."""

    action: str
    upstream: str | None
    rule: str
    line: int | None = None
    registry: str | None = None
    role: str | None = None

    @property
    def route(self) -> str:
        return self.upstream if self.action == "via" and self.upstream else self.action


VIA_TUNNEL = FakeDecision("via", "tunnel", "rules[0] registries: all", 7, "dockerhub", "api")
VIA_OTHER = FakeDecision("via", "backup", "rules[1] suffix docker.com", 9)
DIRECT = FakeDecision("direct", None, "default")
REJECT = FakeDecision("reject", None, "rules[2] reject", 11)


@dataclass
class FakeRouter:
    """Routes by a per-host override table, recording every question it is asked."""

    default: FakeDecision = VIA_TUNNEL
    overrides: dict[str, FakeDecision] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def decide(self, host: str, port: int) -> FakeDecision:
        self.calls.append((host, port))
        return self.overrides.get(host, self.default)


def hosts_of(e: Explanation) -> list[tuple[str, int, str]]:
    return [(p.host, p.port, p.role) for p in e.hosts]


def test_explain_all_tunnelled_is_not_split() -> None:
    router = FakeRouter()
    e = explain("nginx", router, builtin_catalog())
    assert e.registry is not None and e.registry.name == "dockerhub"
    assert str(e.image) == "docker.io/library/nginx:latest"
    assert e.hosts[0].host == "registry-1.docker.io" and e.hosts[0].role == "api"
    listed = hosts_of(e)
    assert ("auth.docker.io", 443, "token") in listed
    assert ("production.cloudfront.docker.com", 443, "blob") in listed
    assert ("docker-images-prod.s3.dualstack.us-east-1.amazonaws.com", 443, "blob") in listed
    assert len({(h, p) for h, p, _ in listed}) == len(listed)
    roles = [role for _, _, role in listed]
    assert roles == sorted(roles, key=["api", "token", "blob"].index)
    assert router.calls == [(h, p) for h, p, _ in listed]
    assert e.split is False and e.problems == ()
    assert verdict(e).startswith("OK: all")


def test_explain_blob_host_direct_is_split() -> None:
    router = FakeRouter(overrides={"production.cloudfront.docker.com": DIRECT})
    e = explain("nginx:1.27", router, builtin_catalog())
    assert e.split is True
    assert len(e.problems) == 1
    problem = e.problems[0]
    assert "production.cloudfront.docker.com:443" in problem
    assert "direct" in problem and "tunnel" in problem and "layer downloads" in problem
    assert verdict(e).startswith("SPLIT")


@pytest.mark.parametrize(
    ("decision", "word"),
    [(VIA_OTHER, "via backup"), (REJECT, "rejected"), (DIRECT, "direct")],
    ids=["other-upstream", "reject", "direct"],
)
def test_explain_token_host_not_on_same_upstream_is_split(
    decision: FakeDecision, word: str
) -> None:
    e = explain("ghcr.io/org/app", FakeRouter(), builtin_catalog())
    assert e.split is False
    e = explain(
        "lscr.io/linuxserver/nginx", FakeRouter(overrides={"ghcr.io": decision}), builtin_catalog()
    )
    assert e.split is True
    assert [p for p in e.problems if "token host ghcr.io:443" in p and word in p]
    assert "authentication" in e.problems[0]


def test_explain_all_direct_is_consistent() -> None:
    e = explain("quay.io/prometheus/busybox", FakeRouter(default=DIRECT), builtin_catalog())
    assert e.hosts[0].role == "api"  # suffix quay.io also covers quay.io, but lists the CDN hosts
    assert ("cdn01.quay.io", 443, "blob") in hosts_of(e)
    assert ("quayio-production-s3.s3.amazonaws.com", 443, "blob") in hosts_of(e)
    assert e.split is False and e.problems == ()
    assert verdict(e) == f"OK: all {len(e.hosts)} pull hosts go direct"


def test_explain_api_direct_blob_tunnelled_is_mixed_not_split() -> None:
    router = FakeRouter(default=DIRECT, overrides={"cdn.quay.io": VIA_TUNNEL})
    e = explain("quay.io/prometheus/busybox", router, builtin_catalog())
    assert e.split is False and e.problems == ()
    assert verdict(e).startswith("MIXED")


def test_explain_api_host_rejected() -> None:
    e = explain(
        "quay.io/x/y", FakeRouter(default=DIRECT, overrides={"quay.io": REJECT}), builtin_catalog()
    )
    assert e.split is False
    assert "quay.io:443 is rejected" in e.problems[0] and "line 11" in e.problems[0]
    assert verdict(e).startswith("REJECTED")


def test_explain_blob_rejected_with_direct_api_is_a_problem() -> None:
    router = FakeRouter(default=DIRECT, overrides={"cdn.registry.gitlab-static.net": REJECT})
    e = explain("registry.gitlab.com/group/app", router, builtin_catalog())
    assert e.split is False
    assert len(e.problems) == 1 and "cdn.registry.gitlab-static.net:443" in e.problems[0]
    assert verdict(e).startswith("BROKEN")


@pytest.mark.parametrize(
    ("image", "host", "port"),
    [
        ("localhost:5000/x", "localhost", 5000),
        ("[::1]:5000/x", "::1", 5000),
        ("harbor.corp.example/team/app:v2", "harbor.corp.example", 443),
    ],
    ids=["localhost", "ipv6", "private"],
)
def test_explain_unknown_registry_lists_only_api_host(image: str, host: str, port: int) -> None:
    router = FakeRouter(default=DIRECT)
    e = explain(image, router, builtin_catalog())
    assert e.registry is None
    assert hosts_of(e) == [(host, port, "api")]
    assert router.calls == [(host, port)]
    assert "unknown" in e.hosts[0].note and "fwdproxy discover" in e.hosts[0].note
    assert "discover" in verdict(e)


def test_explain_same_host_serving_blobs_is_one_row() -> None:
    e = explain("europe-west1-docker.pkg.dev/proj/repo/img:v1", FakeRouter(), builtin_catalog())
    assert e.registry is not None and e.registry.name == "artifact-registry"
    assert hosts_of(e) == [("europe-west1-docker.pkg.dev", 443, "api+blob")]
    assert "WEAK" in e.hosts[0].note


def test_explain_legacy_registry_lists_its_redirect_target() -> None:
    e = explain("k8s.gcr.io/pause:3.9", FakeRouter(), builtin_catalog())
    assert e.registry is not None and e.registry.name == "k8s"
    listed = hosts_of(e)
    assert listed[0] == ("k8s.gcr.io", 443, "api")
    assert ("registry.k8s.io", 443, "api") in listed
    assert ("d1be1w964nk82h.cloudfront.net", 443, "blob") in listed


def test_explain_notes_weak_and_unverified_hosts() -> None:
    e = explain("lscr.io/linuxserver/nginx", FakeRouter(), builtin_catalog())
    notes = {p.host: p.note for p in e.hosts}
    assert "UNVERIFIED" in notes["pkg-containers.githubusercontent.com"]
    e = explain("nginx", FakeRouter(), builtin_catalog())
    notes = {p.host: p.note for p in e.hosts}
    assert (
        "WEAK"
        in notes["docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com"]
    )
    assert "example of suffix docker.com" in notes["production.cloudfront.docker.com"]
    assert "WEAK" not in notes["auth.docker.io"]


def test_explain_user_registry_from_rules_yaml() -> None:
    extra = parse_registries(
        {
            "registries": {
                "harbor": {
                    "refs": ["harbor.corp.example:8443"],
                    "hosts": [
                        {"domain": "harbor.corp.example", "role": "api"},
                        {"domain": "sso.corp.example", "role": "token"},
                        {
                            "suffix": "blobs.corp.example",
                            "role": "blob",
                            "examples": ["s3.blobs.corp.example"],
                        },
                    ],
                }
            }
        }
    )
    catalog = merge_catalog(builtin_catalog(), extra)
    router = FakeRouter(overrides={"s3.blobs.corp.example": DIRECT})
    e = explain("harbor.corp.example:8443/team/app", router, catalog)
    assert e.registry is not None and e.registry.name == "harbor"
    assert hosts_of(e) == [
        ("harbor.corp.example", 8443, "api"),
        ("sso.corp.example", 443, "token"),
        ("s3.blobs.corp.example", 443, "blob"),
    ]
    assert e.split is True and "s3.blobs.corp.example:443" in e.problems[0]


def test_explain_accepts_parsed_reference_and_rejects_bad_one() -> None:
    ref = parse_image_ref("ghcr.io/org/app:v1")
    assert explain(ref, FakeRouter(), builtin_catalog()).image is ref
    with pytest.raises(ImageRefError):
        explain("ghcr.io/Org/App", FakeRouter(), builtin_catalog())


def render(image: str, router: FakeRouter, fmt: Callable[[Explanation], object]) -> object:
    return fmt(explain(image, router, builtin_catalog()))


def test_format_explanation_table() -> None:
    router = FakeRouter(overrides={"production.cloudflare.docker.com": DIRECT})
    text = render("nginx", router, format_explanation)
    assert isinstance(text, str)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("ROLE"))
    assert header.split() == ["ROLE", "HOST:PORT", "ROUTE", "RULE", "NOTE"]
    row = next(line for line in lines if "registry-1.docker.io:443" in line)
    assert (
        row.split()[0] == "api"
        and "via tunnel" in row
        and "rules[0] registries: all (line 7)" in row
    )
    direct_row = next(line for line in lines if "production.cloudflare.docker.com:443" in line)
    assert " direct " in direct_row and "default" in direct_row
    assert header.index("HOST:PORT") == row.index("registry-1.docker.io")
    verdict_line = next(line for line in lines if line.startswith("verdict:"))
    assert "SPLIT" in verdict_line
    assert any(line.startswith("  - blob host production.cloudflare.docker.com") for line in lines)


def test_format_explanation_brackets_ipv6() -> None:
    text = render("[::1]:5000/x", FakeRouter(default=DIRECT), format_explanation)
    assert isinstance(text, str) and "[::1]:5000" in text and "verdict: OK" in text


def test_explanation_json() -> None:
    router = FakeRouter(overrides={"auth.docker.io": DIRECT})
    e = explain("nginx", router, builtin_catalog())
    data = explanation_json(e)
    assert json.loads(json.dumps(data)) == data
    assert data["image"] == "docker.io/library/nginx:latest"
    assert data["reference"]["host"] == "registry-1.docker.io"
    assert data["registry"] == "dockerhub"
    assert data["split"] is True and len(data["problems"]) == 1
    assert len(data["hosts"]) == len(e.hosts)
    first = data["hosts"][0]
    assert first["host"] == "registry-1.docker.io" and first["route"] == "tunnel"
    assert first["line"] == 7 and first["rule_registry"] == "dockerhub"
    auth = next(h for h in data["hosts"] if h["host"] == "auth.docker.io")
    assert auth["action"] == "direct" and auth["upstream"] is None and auth["role"] == "token"
    assert data["verdict"].startswith("SPLIT")
    unknown = explanation_json(explain("localhost:5000/x", router, builtin_catalog()))
    assert unknown["registry"] is None and unknown["split"] is False
