"""Catalog integrity: the packaged data loads, is self-consistent, covers the documented hosts,
and the validator refuses entries that would tunnel other tenants' traffic."""

from __future__ import annotations

import copy
import fnmatch
from importlib import resources
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.errors import ConfigError
from fwdproxy.routing.catalog import (
    MULTI_TENANT_PARENTS,
    CatalogHost,
    Registry,
    builtin_catalog,
    builtin_catalog_version,
    merge_catalog,
    parse_registries,
    registry_for_ref_host,
)

REQUIRED_REGISTRIES = (
    *("dockerhub", "ghcr", "lscr", "quay", "redhat", "gcr", "artifact-registry", "k8s"),
    *("mcr", "nvcr", "ecr-public", "gitlab", "elastic", "cgr"),
)

# registries.md §1.2 "Proposed default tunnel rules", copied by hand so a catalog edit that drops
# a documented host fails here. Suffix rules are checked on the bare domain and two subdomains,
# glob rules on concrete hosts of the documented shape.
DOC_EXACT = (
    "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com",
    "dseasb33srnrn.cloudfront.net",
    "ghcr.io",
    "pkg-containers.githubusercontent.com",
    "lscr.io",
    "quayio-production-s3.s3.amazonaws.com",
    "quay-registry.s3.amazonaws.com",
    "ocm-quay-production-s3.s3.amazonaws.com",
    "registry.redhat.io",
    "registry.access.redhat.com",
    "pull.q1w2.quay.rhcloud.com",
    "storage.googleapis.com",
    "registry.k8s.io",
    "d1be1w964nk82h.cloudfront.net",
    "d39mqg4b1dx9z1.cloudfront.net",
    "mcr.microsoft.com",
    "nvcr.io",
    "authn.nvidia.com",
    "public.ecr.aws",
    "d2glxqk2uabbnd.cloudfront.net",
    "d5l0dvt14r5h8.cloudfront.net",
    "docker.elastic.co",
    "docker-auth.elastic.co",
    "docker-registry-production.d24a988e385e0074d717b6bdaea58f0d.r2.cloudflarestorage.com",
    "registry.gitlab.com",
    "gitlab.com",
    "cdn.registry.gitlab-static.net",
)
DOC_SUFFIX = (
    "docker.io",
    "docker.com",
    "quay.io",
    "gcr.io",
    "pkg.dev",
    "data.mcr.microsoft.com",
    "ngc.nvidia.com",
)
DOC_GLOB_INSTANCES = (
    "docker-images-prod.s3.dualstack.us-east-1.amazonaws.com",
    "docker-images-prod.s3.dualstack.eu-west-1.amazonaws.com",
    "prod-registry-k8s-io-us-east-1.s3.dualstack.us-east-1.amazonaws.com",
    "prod-registry-k8s-io-ap-south-1.s3.dualstack.ap-south-1.amazonaws.com",
)
# Hosts named in registries.md §1.1 that §1.2 only covers through a suffix.
DOC_TABLE_HOSTS = (
    "registry-1.docker.io",
    "index.docker.io",
    "auth.docker.io",
    "production.cloudfront.docker.com",
    "production.cloudflare.docker.com",
    "cdn.quay.io",
    "cdn01.quay.io",
    "cdn06.quay.io",
    "sso.redhat.com",
    "k8s.gcr.io",
    "mirror.gcr.io",
    "us-docker.pkg.dev",
    "us-central1-docker.pkg.dev",
    "westus.data.mcr.microsoft.com",
    "cgr.dev",
    "9236a389bd48b984df91adc1bc924620.r2.cloudflarestorage.com",
)
UNRELATED_HOSTS = (
    "example.cloudfront.net",
    "evil-docker.io",
    "docker.io.evil.com",
    "notquay.io",
    "evilgcr.io",
    "github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
    "mybucket.s3.amazonaws.com",
    "s3.amazonaws.com",
    "amazonaws.com",
    "prod-registry-k8s-io.s3.amazonaws.com",
    "x.blob.core.windows.net",
    "other.r2.cloudflarestorage.com",
    "r2.cloudflarestorage.com",
    "mybucket.storage.googleapis.com",
    "www.googleapis.com",
    "cloudfront.net",
    "example.com",
    "pkg.dev.evil.com",
    "storage.googleapis.com.evil.net",
)


def all_entries() -> list[tuple[str, int, CatalogHost]]:
    return [
        (reg.name, i, host)
        for reg in builtin_catalog().values()
        for i, host in enumerate(reg.hosts)
    ]


def raw_catalog() -> dict[str, Any]:
    text = resources.files("fwdproxy.routing").joinpath("catalog.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def matching(host: str) -> list[tuple[str, CatalogHost]]:
    return [(name, h) for name, _, h in all_entries() if h.matches(host)]


def test_catalog_loads_every_required_registry() -> None:
    catalog = builtin_catalog()
    assert set(REQUIRED_REGISTRIES) <= set(catalog)
    for name, reg in catalog.items():
        assert reg.name == name
        assert reg.refs and reg.hosts and reg.title


def test_catalog_version_is_stamped() -> None:
    assert builtin_catalog_version()


def test_catalog_returns_independent_dicts() -> None:
    first = builtin_catalog()
    first.pop("dockerhub")
    assert "dockerhub" in builtin_catalog()


def test_catalog_parses_the_packaged_file_as_user_config_would() -> None:
    parsed = parse_registries(raw_catalog(), where="catalog.yaml")
    assert parsed == builtin_catalog()


@pytest.mark.parametrize(
    ("registry", "index", "entry"),
    [e for e in all_entries() if e[2].kind != "domain"],
    ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else v.label,
)
def test_catalog_examples_match_their_entry(registry: str, index: int, entry: CatalogHost) -> None:
    assert entry.examples, f"{registry}.hosts[{index}] has no examples"
    for example in entry.examples:
        assert entry.matches(example), f"{example} vs {entry.label}"


def test_catalog_domain_entries_have_no_examples() -> None:
    assert all(not h.examples for _, _, h in all_entries() if h.kind == "domain")


def under_parent(host_or_suffix: str, parent: str) -> bool:
    return host_or_suffix == parent or host_or_suffix.endswith("." + parent)


@pytest.mark.parametrize("parent", MULTI_TENANT_PARENTS, ids=str)
def test_catalog_has_no_suffix_or_loose_glob_on_multi_tenant_parent(parent: str) -> None:
    for name, i, h in all_entries():
        where = f"{name}.hosts[{i}] {h.label}"
        if h.kind == "suffix":
            assert not under_parent(h.pattern, parent), where
            assert not under_parent(parent, h.pattern), where
        elif h.kind == "glob" and h.pattern.endswith(parent):
            prefix = len(h.pattern) - len(
                h.pattern.lstrip("abcdefghijklmnopqrstuvwxyz0123456789.-")
            )
            assert prefix >= 8, where
        elif h.kind == "regex":
            for probe in (f"x.{parent}", f"tenant-{i}.{parent}", parent):
                assert not h.matches(probe), where


def test_catalog_marks_every_entry_with_a_source_and_a_known_level() -> None:
    for name, i, h in all_entries():
        assert h.source, f"{name}.hosts[{i}]"
        assert h.verified in ("true", "weak", "false")
        assert h.role in ("api", "token", "blob")


@pytest.mark.parametrize("host", DOC_EXACT + DOC_TABLE_HOSTS + DOC_GLOB_INSTANCES, ids=str)
def test_catalog_covers_documented_host(host: str) -> None:
    assert matching(host), f"{host} is documented in registries.md but matches no catalog entry"


@pytest.mark.parametrize("suffix", DOC_SUFFIX, ids=str)
def test_catalog_covers_documented_suffix(suffix: str) -> None:
    for host in (suffix, f"new-cdn.{suffix}", f"a.b.{suffix}"):
        assert matching(host), host


@pytest.mark.parametrize("host", UNRELATED_HOSTS, ids=str)
def test_catalog_matches_no_unrelated_host(host: str) -> None:
    assert matching(host) == []


@pytest.mark.parametrize(
    ("host", "role"),
    [
        ("registry-1.docker.io", "api"),
        ("auth.docker.io", "token"),
        ("production.cloudfront.docker.com", "blob"),
        ("pkg-containers.githubusercontent.com", "blob"),
        ("docker-auth.elastic.co", "token"),
        ("gitlab.com", "token"),
        ("registry.k8s.io", "api"),
    ],
    ids=lambda v: v,
)
def test_catalog_first_matching_entry_has_documented_role(host: str, role: str) -> None:
    assert matching(host)[0][1].role == role


# --------------------------------------------------------------------------- lookups


@pytest.mark.parametrize(
    ("ref_host", "expected"),
    [
        ("docker.io", "dockerhub"),
        ("index.docker.io", "dockerhub"),
        ("registry-1.docker.io", "dockerhub"),
        ("DOCKER.IO.", "dockerhub"),
        ("ghcr.io", "ghcr"),
        ("lscr.io", "lscr"),
        ("quay.io", "quay"),
        ("registry.redhat.io", "redhat"),
        ("registry.access.redhat.com", "redhat"),
        ("gcr.io", "gcr"),
        ("eu.gcr.io", "gcr"),
        ("marketplace.gcr.io", "gcr"),
        ("k8s.gcr.io", "k8s"),
        ("registry.k8s.io", "k8s"),
        ("us-central1-docker.pkg.dev", "artifact-registry"),
        ("mcr.microsoft.com", "mcr"),
        ("nvcr.io", "nvcr"),
        ("public.ecr.aws", "ecr-public"),
        ("registry.gitlab.com", "gitlab"),
        ("docker.elastic.co", "elastic"),
        ("cgr.dev", "cgr"),
        ("ghcr.io:443", "ghcr"),
        ("localhost:5000", None),
        ("harbor.example.com", None),
        ("[::1]:5000", None),
        ("auth.docker.io", "dockerhub"),
        ("production.cloudfront.docker.com", None),
    ],
    ids=lambda v: str(v),
)
def test_registry_for_ref_host(ref_host: str, expected: str | None) -> None:
    reg = registry_for_ref_host(builtin_catalog(), ref_host)
    assert (reg.name if reg else None) == expected


HARBOR = {
    "harbor": {
        "refs": ["harbor.corp.example:8443"],
        "hosts": [
            {"domain": "harbor.corp.example", "role": "api"},
            {"suffix": "blobs.corp.example", "role": "blob", "examples": ["s3.blobs.corp.example"]},
        ],
    }
}


def test_parse_user_registry_defaults() -> None:
    reg = parse_registries({"registries": HARBOR}, where="rules.yaml")["harbor"]
    assert reg.title == "harbor"
    assert reg.api == "harbor.corp.example:8443"
    assert reg.probe is None
    assert reg.hosts[0] == CatalogHost("domain", "harbor.corp.example", "api")
    assert reg.hosts[1].examples == ("s3.blobs.corp.example",)
    assert reg.hosts_with_role("blob") == (reg.hosts[1],)


def test_merge_catalog_user_entries_override_and_take_priority() -> None:
    base = builtin_catalog()
    mine = Registry(
        "my-ghcr",
        "GHCR mirror",
        ("ghcr.io",),
        "ghcr.io",
        (CatalogHost("domain", "ghcr.io", "api"),),
    )
    quay = Registry(
        "quay", "my quay", ("quay.io",), "quay.io", (CatalogHost("domain", "quay.io", "api"),)
    )
    merged = merge_catalog(base, {"my-ghcr": mine, "quay": quay})
    assert registry_for_ref_host(merged, "ghcr.io") is mine
    assert merged["quay"] is quay
    assert set(merged) == set(base) | {"my-ghcr"}
    assert registry_for_ref_host(base, "ghcr.io") is base["ghcr"]
    harbor = parse_registries({"registries": HARBOR})
    assert (
        registry_for_ref_host(merge_catalog(base, harbor), "harbor.corp.example:8443")
        is harbor["harbor"]
    )


# --------------------------------------------------------------------------- matcher semantics


@pytest.mark.parametrize(
    ("entry", "host", "expected"),
    [
        (CatalogHost("domain", "ghcr.io", "api"), "ghcr.io", True),
        (CatalogHost("domain", "ghcr.io", "api"), "x.ghcr.io", False),
        (CatalogHost("suffix", "gcr.io", "api"), "gcr.io", True),
        (CatalogHost("suffix", "gcr.io", "api"), "a.b.gcr.io", True),
        (CatalogHost("suffix", "gcr.io", "api"), "evilgcr.io", False),
        (CatalogHost("glob", "cdn*.quay.io", "blob"), "cdn.quay.io", True),
        (CatalogHost("glob", "cdn*.quay.io", "blob"), "cdn05.quay.io", True),
        (CatalogHost("glob", "cdn*.quay.io", "blob"), "xcdn.quay.io", False),
        (CatalogHost("glob", "cdn?.quay.io", "blob"), "cdn1.quay.io", True),
        (CatalogHost("glob", "cdn?.quay.io", "blob"), "cdn12.quay.io", False),
        (CatalogHost("glob", "a.b*.example.com", "blob"), "aXb.example.com", False),
        (CatalogHost("regex", r"cdn0[1-6]\.quay\.io", "blob"), "cdn03.quay.io", True),
        (CatalogHost("regex", r"cdn0[1-6]\.quay\.io", "blob"), "cdn03.quay.io.x", False),
    ],
    ids=lambda v: v.label if isinstance(v, CatalogHost) else str(v),
)
def test_catalog_host_matches(entry: CatalogHost, host: str, expected: bool) -> None:
    assert entry.matches(host) is expected


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOST = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


@given(suffix=st.lists(LABEL, min_size=2, max_size=3).map(".".join), host=HOST)
def test_suffix_matches_on_label_boundary(suffix: str, host: str) -> None:
    entry = CatalogHost("suffix", suffix, "blob")
    assert entry.matches(host) == (host == suffix or host.endswith("." + suffix))
    assert entry.matches(f"{host}.{suffix}")
    assert not entry.matches("x" + suffix)


@given(glob=st.from_regex(r"[a-z0-9*?.-]{1,20}", fullmatch=True), host=HOST)
def test_glob_agrees_with_fnmatch(glob: str, host: str) -> None:
    entry = CatalogHost("glob", glob, "blob")
    assert entry.matches(host) == fnmatch.fnmatchcase(host, glob)


# --------------------------------------------------------------------------- validator


def mutated(path: tuple[str, ...], host_entry: dict[str, Any]) -> dict[str, Any]:
    """The packaged registries with one host entry appended to registries[path[0]]."""
    data = copy.deepcopy(raw_catalog()["registries"])
    data[path[0]]["hosts"].append(host_entry)
    return data


def next_index(name: str) -> int:
    return len(raw_catalog()["registries"][name]["hosts"])


BAD_ENTRIES = [
    pytest.param(
        "ecr-public",
        {"suffix": "cloudfront.net", "role": "blob", "examples": ["d2glxqk2uabbnd.cloudfront.net"]},
        "multi-tenant parent cloudfront.net",
        id="suffix-cloudfront",
    ),
    pytest.param(
        "ghcr",
        {
            "suffix": "githubusercontent.com",
            "role": "blob",
            "examples": ["pkg-containers.githubusercontent.com"],
        },
        "githubusercontent.com",
        id="suffix-githubusercontent",
    ),
    pytest.param(
        "dockerhub",
        {
            "suffix": "r2.cloudflarestorage.com",
            "role": "blob",
            "examples": ["x.r2.cloudflarestorage.com"],
        },
        "multi-tenant parent",
        id="suffix-r2",
    ),
    pytest.param(
        "dockerhub",
        {"suffix": "s3.amazonaws.com", "role": "blob", "examples": ["docker.s3.amazonaws.com"]},
        "amazonaws.com",
        id="suffix-under-parent",
    ),
    pytest.param(
        "dockerhub",
        {"suffix": "windows.net", "role": "blob", "examples": ["x.windows.net"]},
        "blob.core.windows.net",
        id="suffix-above-parent",
    ),
    pytest.param(
        "dockerhub",
        {"glob": "*.amazonaws.com", "role": "blob", "examples": ["x.amazonaws.com"]},
        "multi-tenant parent amazonaws.com needs a literal",
        id="glob-star-amazonaws",
    ),
    pytest.param(
        "dockerhub",
        {
            "glob": "docker*.s3.amazonaws.com",
            "role": "blob",
            "examples": ["docker-x.s3.amazonaws.com"],
        },
        "at least 8",
        id="glob-short-prefix",
    ),
    pytest.param(
        "k8s",
        {
            "glob": "d1*.cloudfront.net",
            "role": "blob",
            "examples": ["d1be1w964nk82h.cloudfront.net"],
        },
        "cloudfront.net",
        id="glob-cloudfront",
    ),
    pytest.param(
        "gcr",
        {"glob": "*googleapis.com", "role": "blob", "examples": ["storage.googleapis.com"]},
        "googleapis.com",
        id="glob-no-dot",
    ),
    pytest.param(
        "dockerhub",
        {"glob": "*.com", "role": "blob", "examples": ["docker.com"]},
        "too broad",
        id="glob-tld",
    ),
    pytest.param(
        "dockerhub",
        {"glob": "docker-images-prod*", "role": "blob", "examples": ["docker-images-prod.x.y"]},
        "too broad",
        id="glob-open-end",
    ),
    pytest.param(
        "ecr-public",
        {
            "regex": r"d[a-z0-9]+\.cloudfront\.net",
            "role": "blob",
            "examples": ["d2glxqk2uabbnd.cloudfront.net"],
        },
        "unrelated host",
        id="regex-cdn",
    ),
    pytest.param(
        "dockerhub",
        {"regex": ".*", "role": "blob", "examples": ["docker.com"]},
        "unrelated host",
        id="regex-everything",
    ),
    pytest.param(
        "dockerhub",
        {"suffix": "io", "role": "blob", "examples": ["docker.io"]},
        "top-level",
        id="suffix-tld",
    ),
]


@pytest.mark.parametrize(("registry", "entry", "message"), BAD_ENTRIES)
def test_validator_rejects_tunnelling_other_tenants(
    registry: str, entry: dict[str, Any], message: str
) -> None:
    index = next_index(registry)
    with pytest.raises(ConfigError) as info:
        parse_registries({"registries": mutated((registry,), entry)})
    assert len(info.value.problems) == 1, info.value.problems
    problem = info.value.problems[0]
    assert problem.startswith(f"registries.{registry}.hosts[{index}]"), problem
    assert message in problem


def test_validator_accepts_tight_regex_on_parent() -> None:
    entry = {
        "regex": r"d2glxqk2uabbnd\.cloudfront\.net",
        "role": "blob",
        "examples": ["d2glxqk2uabbnd.cloudfront.net"],
    }
    assert (
        parse_registries({"registries": mutated(("ecr-public",), entry)})["ecr-public"]
        .hosts[-1]
        .kind
        == "regex"
    )


def test_validator_accepts_tight_glob_on_parent() -> None:
    entry = {
        "glob": "prod-registry-k8s-io-*.s3.*.amazonaws.com",
        "role": "blob",
        "examples": ["prod-registry-k8s-io-x.s3.y.amazonaws.com"],
    }
    assert (
        parse_registries({"registries": mutated(("k8s",), entry)})["k8s"].hosts[-1].kind == "glob"
    )


def reg(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "refs": ["r.example.com"],
        "hosts": [{"domain": "r.example.com", "role": "api"}],
    }
    base.update(fields)
    return base


INVALID = [
    pytest.param([], "registries", "must be a mapping of registry name", id="not-a-mapping"),
    pytest.param({"Bad_Name": reg()}, "registries.Bad_Name", "lowercase", id="bad-name"),
    pytest.param({"x": "y"}, "registries.x", "must be a mapping", id="entry-not-mapping"),
    pytest.param({"x": reg(colour="red")}, "registries.x.colour", "unknown key", id="unknown-key"),
    pytest.param({"x": reg(refs=[])}, "registries.x.refs", "non-empty", id="no-refs"),
    pytest.param(
        {"x": reg(refs=["bad host"])}, "registries.x.refs[0]", "not a registry", id="bad-ref"
    ),
    pytest.param(
        {"x": reg(refs=["r.example.com:99999"])},
        "registries.x.refs[0]",
        "not a registry",
        id="bad-ref-port",
    ),
    pytest.param({"x": reg(title="")}, "registries.x.title", "non-empty", id="empty-title"),
    pytest.param(
        {"x": reg(probe="Library/Alpine:3")}, "registries.x.probe", "repository", id="bad-probe"
    ),
    pytest.param({"x": reg(hosts=[])}, "registries.x.hosts", "non-empty", id="no-hosts"),
    pytest.param(
        {"x": reg(hosts=["r.example.com"])},
        "registries.x.hosts[0]",
        "mapping",
        id="host-not-mapping",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com", "suffix": "example.com", "role": "api"}])},
        "registries.x.hosts[0]",
        "exactly one",
        id="two-matchers",
    ),
    pytest.param(
        {"x": reg(hosts=[{"role": "api"}])}, "registries.x.hosts[0]", "exactly one", id="no-matcher"
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com"}])},
        "registries.x.hosts[0].role",
        "one of",
        id="no-role",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com", "role": "cdn"}])},
        "registries.x.hosts[0].role",
        "one of",
        id="bad-role",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com", "role": "api", "verified": "maybe"}])},
        "registries.x.hosts[0].verified",
        "weak",
        id="bad-verified",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com", "role": "api", "examples": ["a"]}])},
        "registries.x.hosts[0].examples",
        "only suffix",
        id="domain-examples",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"suffix": "example.com", "role": "blob"},
                ]
            )
        },
        "registries.x.hosts[1].examples",
        "non-empty",
        id="suffix-no-examples",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"suffix": "example.com", "role": "blob", "examples": ["example.org"]},
                ]
            )
        },
        "registries.x.hosts[1].examples[0]",
        "does not match",
        id="example-mismatch",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"suffix": ".example.com", "role": "blob", "examples": ["a.example.com"]},
                ]
            )
        },
        "registries.x.hosts[1].suffix",
        "bare domain",
        id="suffix-leading-dot",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"glob": "cdn.example.com", "role": "blob", "examples": ["cdn.example.com"]},
                ]
            )
        },
        "registries.x.hosts[1].glob",
        "use domain",
        id="glob-without-wildcard",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"regex": "(", "role": "blob", "examples": ["a.example.com"]},
                ]
            )
        },
        "registries.x.hosts[1].regex",
        "invalid regular expression",
        id="bad-regex",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r..example.com", "role": "api"}])},
        "registries.x.hosts[0].domain",
        "not a host",
        id="bad-domain",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "other.example.com", "role": "api"}])},
        "registries.x.refs[0]",
        "role api",
        id="ref-not-routed",
    ),
    pytest.param(
        {"x": reg(hosts=[{"domain": "r.example.com", "role": "token"}])},
        "registries.x.refs[0]",
        "role api",
        id="ref-routed-as-token",
    ),
    pytest.param(
        {
            "x": reg(
                hosts=[
                    {"domain": "r.example.com", "role": "api"},
                    {"domain": "r.example.com", "role": "api"},
                ]
            )
        },
        "registries.x.hosts[1]",
        "duplicate",
        id="duplicate-host",
    ),
    pytest.param(
        {"x": reg(), "y": reg()}, "registries.y.refs[0]", "already a ref of x", id="duplicate-ref"
    ),
]


@pytest.mark.parametrize(("data", "path", "message"), INVALID)
def test_validator_rejects_invalid_entry(data: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registries({"registries": data}, where="rules.yaml")
    assert any(p.startswith(path) and message in p for p in info.value.problems), (
        info.value.problems
    )


def test_validator_document_shapes() -> None:
    assert parse_registries({}) == {}
    assert parse_registries({"registries": None, "rules": []}) == {}
    with pytest.raises(ConfigError) as info:
        parse_registries(["registries"], where="rules.yaml")
    assert info.value.problems == ["rules.yaml: must be a mapping with a 'registries' key"]


def test_validator_reports_every_problem_in_one_pass() -> None:
    data = {
        "a": reg(colour="red"),
        "b": reg(refs=["b.example.com"], hosts=[{"domain": "b.example.com", "role": "cdn"}]),
        "c": reg(
            refs=["c.example.com"],
            hosts=[{"suffix": "cloudfront.net", "role": "api", "examples": ["c.cloudfront.net"]}],
        ),
    }
    with pytest.raises(ConfigError) as info:
        parse_registries({"registries": data}, where="rules.yaml")
    paths = [p.split(":")[0] for p in info.value.problems]
    assert paths == [
        "registries.a.colour",
        "registries.b.hosts[0].role",
        "registries.c.hosts[0].suffix",
    ]


def test_validator_normalises_case_trailing_dot_and_verified() -> None:
    data = {
        "x": {
            "refs": ["R.Example.COM."],
            "hosts": [
                {"domain": "R.EXAMPLE.com.", "role": "api", "verified": False},
                {
                    "suffix": "CDN.Example.com",
                    "role": "blob",
                    "verified": "weak",
                    "examples": ["A.cdn.example.com"],
                },
            ],
        }
    }
    x = parse_registries({"registries": data})["x"]
    assert x.refs == ("r.example.com",)
    assert x.hosts[0] == CatalogHost("domain", "r.example.com", "api", "", "false")
    assert x.hosts[1].verified == "weak"
    assert x.hosts[1].examples == ("a.cdn.example.com",)
