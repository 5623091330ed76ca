"""config: every error kind with file:line, one pass for all problems, upstream URLs and
overrides, users, and the shipped rules.yaml (pure: YAML text in, Config or ConfigError out)."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fwdproxy.config import (
    DEFAULT_DENY,
    Config,
    Limits,
    load_config,
    parse_config,
    parse_upstream_url,
)
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.core.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "rules.yaml"
MARK = "# <-"

BASE = """\
upstreams:
  tunnel: socks5://127.0.0.1:1080
"""


def parse(text: str, **kw: Any) -> Config:
    kw.setdefault("env", {})
    return parse_config(load_yaml(text), "test.yaml", **kw)


def problems_of(text: str, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(text, **kw)
    return e.value.problems


def marked_line(text: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if MARK in line]
    assert len(lines) == 1, "exactly one marked line per case"
    return lines[0]


# Each case: YAML with exactly one line marked `# <-` where the problem is, and a fragment of
# the message. The reported location must be `test.yaml:<that line>:`.
ERRORS = {
    "unknown-top-key": ("listen: 127.0.0.1:3128\nlisten_addr: x  # <-\n", "unknown key"),
    "upstreams-not-mapping": ("upstreams: [socks5://a:1]  # <-\n", "mapping of name"),
    "bad-upstream-name": ("upstreams:\n  'bad name': socks5://a:1  # <-\n", "letters, digits"),
    "upstream-named-direct": ("upstreams:\n  direct: socks5://a:1  # <-\n", "is an action"),
    "bad-scheme": ("upstreams:\n  t: ftp://a:1  # <-\n", "unsupported scheme"),
    "missing-host": ("upstreams:\n  t: socks5://:1080  # <-\n", "missing host"),
    "bad-port": ("upstreams:\n  t: socks5://a:99999  # <-\n", "invalid port"),
    "path-in-url": ("upstreams:\n  t: http://a:1/x  # <-\n", "unexpected path"),
    "group-unknown-key": (
        "upstreams:\n  t:  # <-\n    members: [socks5://a:1]\n    color: red\n",
        "unknown keys",
    ),
    "group-bad-policy": (
        "upstreams:\n  t:\n    members: [socks5://a:1]\n    policy: random  # <-\n",
        "one of",
    ),
    "group-no-url": ("upstreams:\n  t:  # <-\n    members: []\n", "no upstream URL"),
    "rule-not-mapping": (BASE + "rules:\n  - docker.io  # <-\n", "each rule is a mapping"),
    "rule-unknown-key": (
        BASE + "rules:\n  - sufix: [docker.io]  # <-\n    via: tunnel\n",
        "unknown keys",
    ),
    "rule-both-actions": (
        BASE + "rules:\n  - suffix: [a.io]  # <-\n    via: tunnel\n    action: direct\n",
        "not both",
    ),
    "rule-unknown-upstream": (
        BASE + "rules:\n  - suffix: [a.io]  # <-\n    via: tunel\n",
        "unknown upstream 'tunel'",
    ),
    "rule-unknown-action": (
        BASE + "rules:\n  - suffix: [a.io]  # <-\n    action: tunnel\n",
        "unknown action",
    ),
    "rule-missing-action": (BASE + "rules:\n  - suffix: [a.io]  # <-\n", "missing action"),
    "rule-bad-name": (
        BASE + "rules:\n  - action: direct\n    suffix: ['bad name.io']  # <-\n",
        "invalid host name",
    ),
    "rule-bad-regex": (
        BASE + "rules:\n  - action: direct\n    regex: ['(x']  # <-\n",
        "invalid regex",
    ),
    "rule-bad-cidr": (
        BASE + "rules:\n  - action: direct\n    cidr: [10.0.0.0/33]  # <-\n",
        "10.0.0.0/33",
    ),
    "rule-unknown-registry": (
        BASE + "rules:\n  - via: tunnel\n    registries: [dockrhub]  # <-\n",
        "unknown registry",
    ),
    "rule-bad-port": (
        BASE + "rules:\n  - action: direct\n    suffix: [a.io]\n    port: [http]  # <-\n",
        "invalid port",
    ),
    "rule-reversed-range": (
        BASE + "rules:\n  - action: direct\n    port: ['90-80']  # <-\n",
        "reversed",
    ),
    "rule-port-zero": (BASE + "rules:\n  - action: direct\n    port: [0]  # <-\n", "outside"),
    "rule-no-matcher": (BASE + "rules:\n  - action: direct  # <-\n", "needs a matcher"),
    "rules-not-list": ("rules:  # <-\n  a: b\n", "must be a list"),
    "bad-default": ("default: sideways  # <-\n", "use direct, reject"),
    "default-unknown-upstream": ("default: {via: nowhere}  # <-\n", "unknown upstream"),
    "bad-listen": ("listen:\n  - 127.0.0.1:3128\n  - nonsense  # <-\n", "HOST:PORT"),
    "bad-listen-allow": (
        "listen:\n  - {listen: 127.0.0.1:1, allow: [10.0.0.0/99]}  # <-\n",
        "10.0.0.0/99",
    ),
    "users-not-mapping": ("auth:\n  users: [alice]  # <-\n", "mapping of user"),
    "bad-sha256": ("auth:\n  users:\n    alice: {sha256: abc}  # <-\n", "64 hex digits"),
    "missing-env": ("auth:\n  users:\n    alice: {env: NO_SUCH_VAR_X}  # <-\n", "not set"),
    "unreadable-file": (
        "auth:\n  users:\n    alice: {file: /nonexistent/pw}  # <-\n",
        "cannot read password",
    ),
    "bad-user-secret": ("auth:\n  users:\n    alice: [1, 2]  # <-\n", "password string"),
    "limits-not-mapping": ("limits: [5]  # <-\n", "must be a mapping"),
    "unknown-limit": ("limits:\n  dial_timeout: 5  # <-\n", "unknown limit"),
    "limit-not-number": ("limits:\n  dial_timeout_s: soon  # <-\n", "not a number"),
    "limit-not-positive": ("limits:\n  max_connections: 0  # <-\n", "must be positive"),
    "hosts-not-mapping": ("hosts: [a]  # <-\n", "mapping of name"),
    "hosts-bad-ip": ("hosts:\n  a.test: 300.1.1.1  # <-\n", "300.1.1.1"),
    "bad-sniff": ("sniff_tls:\n  ports: [https]  # <-\n", "sniff_tls"),
    "bad-admin-listen": ("admin:\n  listen: nope  # <-\n", "admin.listen"),
    "bad-log-level": ("log:\n  level: loud  # <-\n", "log.level"),
    "bad-log-format": ("log:\n  format: xml  # <-\n", "log.format"),
    "bad-deny-targets": ("deny_targets: [not-a-net]  # <-\n", "deny_targets"),
}


@pytest.mark.parametrize("text, fragment", list(ERRORS.values()), ids=list(ERRORS))
def test_config_error_kinds_carry_file_and_line(text: str, fragment: str) -> None:
    problems = problems_of(text)
    line = marked_line(text)
    hits = [p for p in problems if fragment in p]
    assert hits, problems
    assert any(p.startswith(f"test.yaml:{line}: ") for p in hits), (line, problems)


SCALAR_SECTIONS = {
    "upstreams": "upstreams: 5  # <-\n",
    "limits": "limits: 5  # <-\n",
    "hosts": "hosts: 5  # <-\n",
    "sniff_tls": "sniff_tls: 5  # <-\n",
    "admin": "admin: 5  # <-\n",
    "auth.users": "auth:\n  users: 5  # <-\n",
    "check": "upstreams:\n  t:\n    members: [socks5://a:1]\n    check: 5  # <-\n",
}


@pytest.mark.parametrize("text", list(SCALAR_SECTIONS.values()), ids=list(SCALAR_SECTIONS))
def test_config_scalar_section_errors_carry_a_line(text: str) -> None:
    problems = problems_of(text)
    line = marked_line(text)
    assert all(p.startswith(f"test.yaml:{line}: ") for p in problems), problems


@pytest.mark.parametrize(
    "text",
    [
        "rules: 5\n",
        "rules: true\n",
        BASE + "rules:\n  - {domain: [a.io], via: [tunnel]}\n",
        BASE + "rules:\n  - {registries: [[dockerhub]], via: tunnel}\n",
    ],
    ids=["rules-int", "rules-bool", "via-list", "registries-nested-list"],
)
def test_config_wrong_types_are_config_errors_not_crashes(text: str) -> None:
    assert problems_of(text)


@pytest.mark.parametrize(
    "text",
    [
        "auth:\n  user:  # <-\n    alice: secret\n",
        "auth: alice:secret  # <-\n",
        "log: {levle: debug}  # <-\n",
        "sniff_tls: {enabled: true, port: [8443]}  # <-\n",
        "admin: {listen: 127.0.0.1:9128, tokn: x}  # <-\n",
    ],
    ids=["auth-user-typo", "auth-scalar", "log-typo", "sniff-typo", "admin-typo"],
)
def test_config_unknown_keys_in_sections_are_reported(text: str) -> None:
    problems = problems_of(text)
    assert any(p.startswith(f"test.yaml:{marked_line(text)}: ") for p in problems), problems


def test_config_reports_all_problems_in_one_pass() -> None:
    text = """\
listen: 127.0.0.1:3128
upstreams:
  tunnel: socks5://127.0.0.1:1080
  bad: gopher://x:1                # <- A
rules:
  - suffix: [a.io]                 # <- B
    via: tunel
  - cidr: [10.0.0.0/33]            # <- C
    action: direct
  - regex: ['(unclosed']           # <- D
    action: direct
  - suffix: [docker.io]
    via: tunnel
limits:
  dial_timeout_s: -1               # <- E
hosts:
  x.test: not-an-ip                # <- F
color: blue                        # <- G
"""
    problems = problems_of(text)
    lines = {
        tag: i
        for i, line in enumerate(text.splitlines(), 1)
        for tag in "ABCDEFG"
        if line.endswith(f"# <- {tag}")
    }
    assert len(problems) == 7, problems
    for tag, line in lines.items():
        assert any(p.startswith(f"test.yaml:{line}: ") for p in problems), (tag, problems)


def test_config_top_level_must_be_a_mapping() -> None:
    assert problems_of("- a\n- b\n") == [
        "test.yaml: the top level must be a mapping (listen:, upstreams:, rules:)"
    ]


def test_config_empty_file_gives_the_defaults() -> None:
    cfg = parse("")
    assert [(lst.host, lst.port) for lst in cfg.listeners] == [("127.0.0.1", 3128)]
    assert cfg.limits == Limits()
    assert cfg.deny_targets == DEFAULT_DENY
    assert "169.254.169.254/32" in cfg.deny_targets
    assert cfg.router.decide("example.com", 443).action == "direct"
    assert not cfg.auth_required and not cfg.loopback_targets


# -- YAML-level errors via load_config -------------------------------------------------------


def test_load_config_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("listen: 127.0.0.1:3128\nrules:\n  - suffix: [a.io\n    via: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    (problem,) = e.value.problems
    assert problem.startswith(f"{f}:") and "YAML syntax error" in problem
    line = int(problem.split(":")[1])
    assert 3 <= line <= 5


@pytest.mark.parametrize(
    "text",
    [
        "rules:\n  - {cidr: [10.0.0.0/8, ::1/128], action: direct}\n",
        "deny_targets: [::1/128]\n",
        "rules:\n  - name: x\n    cidr: [10.0.0.0/8, ::1/128]\n    action: direct\n",
    ],
    ids=["flow-mapping", "flow-list", "block-item"],
)
def test_load_config_unquoted_colon_in_a_flow_list_names_the_cause(
    tmp_path: Path, text: str
) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    (problem,) = e.value.problems
    assert "YAML syntax error" in problem
    assert "quote it" in problem and "':'" in problem, problem


def test_load_config_duplicate_key_is_an_error_with_line(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("listen: 127.0.0.1:1\ndefault: direct\ndefault: reject\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert e.value.problems[0].startswith(f"{f}:3:")
    assert "duplicate key" in e.value.problems[0]


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml", env={})
    assert "cannot read config" in e.value.problems[0]


def test_load_config_sets_a_digest(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(BASE)
    cfg = load_config(f, env={})
    assert cfg.digest == hashlib.sha256(BASE.encode()).hexdigest()[:12]
    assert cfg.path == str(f)


# -- upstream URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, scheme, host, port, user, password, rdns",
    [
        ("socks5://127.0.0.1:1080", "socks5", "127.0.0.1", 1080, None, None, True),
        ("SOCKS5H://Proxy.Example:7890", "socks5h", "proxy.example", 7890, None, None, True),
        ("socks4://10.0.0.1", "socks4", "10.0.0.1", 1080, None, None, False),
        ("socks4a://10.0.0.1:9050", "socks4a", "10.0.0.1", 9050, None, None, True),
        ("http://proxy.corp", "http", "proxy.corp", 8080, None, None, True),
        ("http://u:pw-secret@proxy.corp:3128", "http", "proxy.corp", 3128, "u", "pw-secret", True),
        ("socks5://alice:p%40ss%3Aw@[::1]:1080", "socks5", "::1", 1080, "alice", "p@ss:w", True),
        ("socks5://bob@h:1", "socks5", "h", 1, "bob", None, True),
    ],
)
def test_parse_upstream_url(
    url: str,
    scheme: str,
    host: str,
    port: int,
    user: str | None,
    password: str | None,
    rdns: bool,
) -> None:
    spec = parse_upstream_url("t", url)
    assert (spec.scheme, spec.host, spec.port, spec.username, spec.password) == (
        scheme,
        host,
        port,
        user,
        password,
    )
    assert spec.rdns is rdns
    assert spec.name == "t"
    if password:
        assert password not in spec.url and "***" in spec.url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://a:1",
        "https://a:1",
        "a:1080",
        "socks5://",
        "socks5://a:0x10",
        "socks5://a:1/path",
        "socks5://a:70000",
    ],
)
def test_parse_upstream_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream_url("t", url)


def test_upstream_group_members_and_policy() -> None:
    cfg = parse(
        "upstreams:\n  t:\n    members: [socks5://a:1, http://b:2]\n    policy: round-robin\n"
    )
    g = cfg.upstreams["t"]
    assert g.policy == "round-robin"
    assert [m.name for m in g.members] == ["t#0", "t#1"]
    assert g.check is not None  # several members: health-checked by default


# -- --upstream and FWDPROXY_UPSTREAM ------------------------------------------------------

TWO = """\
upstreams:
  tunnel: socks5://127.0.0.1:1080
  other: http://127.0.0.1:8080
rules:
  - suffix: [docker.io]
    via: tunnel
"""


def member_urls(cfg: Config, name: str) -> list[str]:
    return [m.url for m in cfg.upstreams[name].members]


def test_upstream_override_replaces_the_first_upstream() -> None:
    cfg = parse(TWO, upstream_override="socks5h://10.9.9.9:7890")
    assert member_urls(cfg, "tunnel") == ["socks5h://10.9.9.9:7890"]
    assert member_urls(cfg, "other") == ["http://127.0.0.1:8080"]


def test_upstream_override_by_name_and_new_name() -> None:
    cfg = parse(TWO, upstream_override="other=socks4a://u:pw@10.0.0.2:9050")
    assert member_urls(cfg, "other") == ["socks4a://u:***@10.0.0.2:9050"]
    assert cfg.upstreams["other"].members[0].password == "pw"
    cfg = parse(TWO, upstream_override="extra=http://10.0.0.3:3128")
    assert set(cfg.upstreams) == {"tunnel", "other", "extra"}


def test_upstream_override_without_upstreams_creates_tunnel() -> None:
    cfg = parse("rules:\n  - suffix: [a.io]\n    action: direct\n", upstream_override="http://h:1")
    assert member_urls(cfg, "tunnel") == ["http://h:1"]


def test_upstream_env_variable_and_flag_precedence() -> None:
    env = {"FWDPROXY_UPSTREAM": "http://10.1.1.1:3128"}
    assert member_urls(parse(TWO, env=env), "tunnel") == ["http://10.1.1.1:3128"]
    cfg = parse(TWO, env=env, upstream_override="socks5://10.2.2.2:1")
    assert member_urls(cfg, "tunnel") == ["socks5://10.2.2.2:1"]


def test_upstream_override_lets_rules_name_a_missing_upstream() -> None:
    text = "rules:\n  - suffix: [a.io]\n    via: tunnel\n"
    assert "unknown upstream" in problems_of(text)[0]
    cfg = parse(text, upstream_override="socks5://127.0.0.1:1")
    assert cfg.router.decide("x.a.io", 443).upstream == "tunnel"


@pytest.mark.parametrize("bad", ["gopher://x:1", "tunnel=nonsense", "socks5://"])
def test_bad_upstream_override_is_reported(bad: str) -> None:
    problems = problems_of(TWO, upstream_override=bad)
    assert any(p.startswith("test.yaml: --upstream / $FWDPROXY_UPSTREAM:") for p in problems)
    problems = problems_of(TWO, env={"FWDPROXY_UPSTREAM": bad})
    assert any("FWDPROXY_UPSTREAM" in p for p in problems)


def test_load_config_upstream_override(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(TWO)
    cfg = load_config(f, upstream_override="socks5://10.3.3.3:1", env={})
    assert member_urls(cfg, "tunnel") == ["socks5://10.3.3.3:1"]


# -- users, listeners, hosts, limits -----------------------------------------------------------


def test_users_all_secret_forms(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    digest = hashlib.sha256(b"hashed").hexdigest()
    text = f"""\
auth:
  users:
    plain: secret
    number: 1234
    hashed: {{sha256: {digest.upper()}}}
    envd: {{env: PW_VAR}}
    filed: {{file: pw}}
"""
    cfg = parse_config(load_yaml(text), str(tmp_path / "r.yaml"), env={"PW_VAR": "from-env"})
    assert dict(cfg.users) == {
        "plain": "plain:secret",
        "number": "plain:1234",
        "hashed": f"sha256:{digest}",
        "envd": "plain:from-env",
        "filed": "plain:from-file",
    }
    assert cfg.auth_required


def test_listeners_with_allow_lists() -> None:
    cfg = parse(
        "allow: [192.168.0.0/16]\nlisten:\n  - 127.0.0.1:3128\n"
        "  - {listen: '[::1]:3129', allow: [10.0.0.0/8, fd00::/8]}\n"
    )
    a, b = cfg.listeners
    assert (a.host, a.port, a.address) == ("127.0.0.1", 3128, "127.0.0.1:3128")
    assert a.allow == (ipaddress.ip_network("192.168.0.0/16"),)
    assert (b.host, b.port, b.address) == ("::1", 3129, "[::1]:3129")
    assert b.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def test_listen_override_wins() -> None:
    cfg = parse("listen: 127.0.0.1:1\n", listen_override=["127.0.0.2:2", "[::1]:3"])
    assert [lst.address for lst in cfg.listeners] == ["127.0.0.2:2", "[::1]:3"]


def test_hosts_and_limits_are_normalised() -> None:
    cfg = parse(
        "hosts:\n  Registry.Test.: 10.0.0.1\n  v6.test: '::0:1'\n"
        "limits:\n  dial_timeout_s: 2\n  max_head_bytes: '8192'\n"
    )
    assert dict(cfg.hosts) == {"registry.test": "10.0.0.1", "v6.test": "::1"}
    assert cfg.limits.dial_timeout_s == 2.0 and cfg.limits.max_head_bytes == 8192
    assert cfg.limits.idle_timeout_s == Limits().idle_timeout_s


def test_rule_names_are_normalised_at_load() -> None:
    cfg = parse(
        BASE + "rules:\n  - suffix: [Docker.IO., '*.Quay.io', bücher.de]\n    via: tunnel\n"
    )
    (rule,) = cfg.router.rules
    assert rule.suffix == ("docker.io", "*.quay.io", "xn--bcher-kva.de")
    assert rule.line == 4
    assert cfg.router.decide("quay.io", 443).rule == "default"
    assert cfg.router.decide("cdn.quay.io", 443).rule == "rules[0]"
    assert cfg.router.decide("xn--bcher-kva.de", 443).upstream == "tunnel"


def test_default_forms() -> None:
    assert parse(BASE + "default: reject\n").router.default.action == "reject"
    d = parse(BASE + "default: {via: tunnel}\n").router.default
    assert (d.action, d.upstream, d.rule, d.line) == ("via", "tunnel", "default", 3)
    assert parse(BASE + "default: tunnel\n").router.default.upstream == "tunnel"


# -- the shipped rules.yaml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Config:
    return load_config(SHIPPED, env={})


@pytest.mark.parametrize(
    "host, port, route, rule, registry",
    [
        ("registry-1.docker.io", 443, "tunnel", "registries", "dockerhub"),
        ("auth.docker.io", 443, "tunnel", "registries", "dockerhub"),
        ("production.cloudflare.docker.com", 443, "tunnel", "registries", "dockerhub"),
        ("ghcr.io", 443, "tunnel", "registries", "ghcr"),
        ("registry.k8s.io", 443, "tunnel", "registries", None),
        ("quay.io", 443, "tunnel", "registries", None),
        ("10.1.2.3", 443, "direct", "private-ranges", None),
        ("192.168.1.10", 5000, "direct", "private-ranges", None),
        ("fd12::1", 443, "direct", "private-ranges", None),
        ("127.0.0.1", 3128, "direct", "private-ranges", None),
        ("kubernetes.default.svc", 443, "direct", "local-names", None),
        ("localhost", 80, "direct", "local-names", None),
        ("example.com", 443, "direct", "default", None),
        ("evildocker.io", 443, "direct", "default", None),
        ("pypi.org", 443, "direct", "default", None),
    ],
)
def test_shipped_rules_route(
    shipped: Config, host: str, port: int, route: str, rule: str, registry: str | None
) -> None:
    d = shipped.router.decide(host, port)
    assert (d.route, d.rule) == (route, rule), d
    if registry is not None:
        assert d.registry == registry


def test_shipped_rules_defaults(shipped: Config) -> None:
    assert [lst.address for lst in shipped.listeners] == ["127.0.0.1:3128"]
    assert member_urls(shipped, "tunnel") == ["socks5://127.0.0.1:1080"]
    line = next(
        i for i, t in enumerate(SHIPPED.read_text().splitlines(), 1) if "- name: registries" in t
    )
    assert shipped.router.decide("registry-1.docker.io", 443).line == line


# -- robustness ----------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.sampled_from(
        [
            "direct",
            "reject",
            "tunnel",
            "socks5://127.0.0.1:1",
            "10.0.0.0/8",
            "127.0.0.1:0",
            "docker.io",
            "*.a",
            "[",
            "443",
            "1-2",
        ]
    ),
)
KEYS = st.sampled_from(
    [
        "listen",
        "upstreams",
        "rules",
        "default",
        "hosts",
        "limits",
        "auth",
        "users",
        "via",
        "action",
        "suffix",
        "domain",
        "cidr",
        "regex",
        "glob",
        "port",
        "registries",
        "allow",
        "tunnel",
        "members",
        "policy",
        "sniff_tls",
        "admin",
        "log",
        "deny_targets",
        "name",
    ]
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=60)
@given(st.dictionaries(KEYS, TREES, max_size=6))
def test_parse_config_never_crashes_on_arbitrary_structures(data: dict[str, Any]) -> None:
    """Any YAML-shaped input yields a Config or a ConfigError whose problems are all strings."""
    text = yaml.safe_dump(data)
    try:
        parse(text)
    except ConfigError as e:
        assert e.problems and all(
            isinstance(p, str) and p.startswith("test.yaml") for p in e.problems
        )


# -- big one-line-per-rule files: the fast YAML path gives what PyYAML gives --------------------


def _big_rules_text(extra: str = "") -> str:
    from fwdproxy.config.yamlsrc import FAST_MIN_RULES

    lines = ["upstreams:", "  tunnel: socks5://127.0.0.1:1080", "rules:  # big list"]
    shapes = [
        "  - {{domain: [h{i}.example.com], via: tunnel}}",
        "  - {{suffix: ['s{i}.example.net', .x{i}.org], action: direct}}  # note",
        '  - {{glob: ["edge{i}-*.cdn.example"], action: reject, name: "g{i}"}}',
        "  - {{regex: ['^(.+\\.)?ads{i}\\d*\\.example$'], via: tunnel}}",
        "  - {{cidr: [10.{j}.0.0/16, 'fd00:{i:x}::/32'], port: [443, '8000-8100'], via: tunnel}}",
        "",
        "  # a comment line",
    ]
    for i in range(FAST_MIN_RULES + 10):
        lines.append(shapes[i % len(shapes)].format(i=i, j=i % 256))
    return "\n".join(lines) + extra + "\ndefault: direct\n"


def _with_lines(x: Any) -> Any:
    from fwdproxy.config.yamlsrc import line_of

    if isinstance(x, dict):
        return [line_of(x), {k: [line_of(x, k), _with_lines(v)] for k, v in x.items()}]
    if isinstance(x, list):
        return [line_of(x), [[line_of(x, i), _with_lines(v)] for i, v in enumerate(x)]]
    return x


@pytest.mark.parametrize(
    "extra",
    ["", "\n  - {domain: [yes], via: tunnel}", "\n  - suffix: [block.example]\n    via: tunnel"],
    ids=["fast", "bool-scalar-falls-back", "block-rule-falls-back"],
)
def test_big_rule_files_load_exactly_as_pyyaml_reads_them(extra: str) -> None:
    import yaml

    from fwdproxy.config import yamlsrc

    text = _big_rules_text(extra)
    fast = yamlsrc.load_yaml(text)
    slow = yaml.load(text, Loader=yamlsrc._Loader)
    assert fast == slow
    assert _with_lines(fast) == _with_lines(slow)


def test_big_rule_file_errors_keep_their_line(tmp_path: Path) -> None:
    text = _big_rules_text().replace("h7.example.com], via: tunnel", "h7.example.com], via: tunel")
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    (problem,) = e.value.problems
    line = text.splitlines().index("  - {domain: [h7.example.com], via: tunel}") + 1
    # items 5 and 6 of the shapes are a blank and a comment line: h7 is the sixth rule
    assert problem.startswith(f"{path}:{line}: rules[5]: via: unknown upstream 'tunel'")


def test_big_rule_file_with_a_duplicate_key_is_refused_as_pyyaml_refuses_it() -> None:
    from fwdproxy.config.yamlsrc import load_yaml

    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        load_yaml(_big_rules_text("\n  - {domain: [a.example], domain: b.example}"))


def test_default_config_falls_back_to_the_shipped_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fwdproxy.config import default_config_path

    monkeypatch.chdir(tmp_path)  # no ./rules.yaml here
    if Path("/etc/fwdproxy/rules.yaml").is_file():
        pytest.skip("/etc/fwdproxy/rules.yaml exists on this machine and wins")
    assert default_config_path().resolve() == Path(SHIPPED).resolve()
    assert default_config_path().is_file()
