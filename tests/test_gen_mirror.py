"""`fwdproxy gen *-mirror`: golden output, merges, idempotent writes, the checks they print.

Every generated mirror address is also fed back through the mirror's own request parser, so
the generators and `fwdproxy.proto.oci.parse_mirror_request` cannot drift apart.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fwdproxy.cli import gen, genmirror, mirrorconf
from fwdproxy.proto.oci import parse_mirror_request

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: tomli is not a test dependency
    tomllib = pytest.importorskip("tomli")

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
UPDATE = os.environ.get("FWDPROXY_UPDATE_GOLDEN") == "1"
CASES = {
    "containerd-mirror": ["containerd-mirror"],
    "containerd-mirror-registries": [
        "containerd-mirror",
        "--registry",
        "docker.io",
        "--registry",
        "Quay.io",
        "--mirror",
        "http://[::1]:5000/",
    ],
    "docker-mirror": ["docker-mirror"],
    "podman-mirror": [
        "podman-mirror",
        "--only-registry",
        "docker.io",
        "--only-registry",
        "quay.io",
        "--only-registry",
        "registry.k8s.io",
    ],
    "k3s-mirror": ["k3s-mirror"],
    "k3s-mirror-rke2": ["k3s-mirror", "--rke2", "--agent", "--registry", "docker.io"],
}
STANDARD = {
    "containerd-mirror": ["etc/containerd/certs.d/_default/hosts.toml"],
    "docker-mirror": ["etc/docker/daemon.json", "etc/docker/certs.d/_default/hosts.toml"],
    "podman-mirror": ["etc/containers/registries.conf.d/50-fwdproxy-mirror.conf"],
    "k3s-mirror": ["etc/rancher/k3s/registries.yaml"],
}


def run_gen(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = gen.run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- golden output ---


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gen_mirror_matches_golden(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    # An empty --root: the config.toml/registries.conf checks see a host with nothing on it.
    code, out, err = run_gen(capsys, *CASES[case], "--root", str(tmp_path))
    assert code == 0, err
    got = out + "--- stderr ---\n" + err
    path = GOLDEN / f"{case}.txt"
    if UPDATE:
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8"), (
        f"regenerate with FWDPROXY_UPDATE_GOLDEN=1: {path}"
    )
    assert list(tmp_path.iterdir()) == []  # printing writes nothing


def test_every_mirror_target_has_a_golden_file() -> None:
    assert {argv[0] for argv in CASES.values()} == set(genmirror.TARGETS) == set(STANDARD)


def test_generated_files_parse(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, out, _ = run_gen(capsys, "containerd-mirror", "--root", str(tmp_path))
    assert tomllib.loads(out) == {
        "host": {"http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}}
    }
    _, out, _ = run_gen(capsys, "k3s-mirror", "--root", str(tmp_path))
    assert yaml.safe_load(out) == {"mirrors": {"*": {"endpoint": ["http://127.0.0.1:5000"]}}}
    _, out, _ = run_gen(capsys, *CASES["podman-mirror"], "--root", str(tmp_path))
    regs = tomllib.loads(out)["registry"]
    assert [r["prefix"] for r in regs] == ["docker.io", "quay.io", "registry.k8s.io"]
    for r in regs:
        assert r["location"] == r["prefix"]
        assert r["mirror"] == [{"location": f"127.0.0.1:5000/{r['prefix']}", "insecure": True}]


def test_podman_locations_resolve_to_their_registry_in_the_mirror(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """containers/image rewrites docker.io/library/alpine to <location>/library/alpine; the
    mirror must read the registry back from that path."""
    _, out, _ = run_gen(capsys, "podman-mirror", "--root", str(tmp_path))
    regs = tomllib.loads(out)["registry"]
    assert len(regs) >= 5
    for r in regs:
        path = r["mirror"][0]["location"].split("/", 1)[1]
        req = parse_mirror_request("GET", f"/v2/{path}/library/alpine/manifests/3")
        assert req.registry.name == r["prefix"], r
        assert req.repository == "library/alpine"


def test_podman_registries_come_from_the_catalog(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    names = genmirror.catalog_registries()
    assert {"docker.io", "quay.io", "ghcr.io", "gcr.io", "registry.k8s.io"} <= set(names)
    assert "index.docker.io" not in names and "registry-1.docker.io" not in names
    argv = ["podman-mirror", "--root", str(tmp_path), "--registry", "registry.corp.example"]
    _, out, _ = run_gen(capsys, *argv)
    prefixes = [r["prefix"] for r in tomllib.loads(out)["registry"]]
    assert prefixes == [*names, "registry.corp.example"]


# --- writing: idempotent, .bak, one error leaves every file alone ---


@pytest.mark.parametrize("target", list(STANDARD))
def test_write_under_root_is_idempotent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str
) -> None:
    code, out, _ = run_gen(capsys, target, "--root", str(tmp_path), "--write")
    assert code == 0
    paths = [tmp_path / rel for rel in STANDARD[target]]
    assert out.splitlines()[: len(paths)] == [f"{p}: created" for p in paths]
    assert out.splitlines()[-1].startswith("to apply: ")
    before = {p: p.stat() for p in paths}
    files = tree(tmp_path)
    code, out, _ = run_gen(capsys, target, "--root", str(tmp_path), "--write")
    assert code == 0
    assert out == "".join(f"{p}: unchanged\n" for p in paths)  # and no "to apply"
    assert tree(tmp_path) == files  # no .bak, no temp files
    for p, st in before.items():
        assert p.stat().st_ino == st.st_ino and p.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("target", ["containerd-mirror", "podman-mirror", "k3s-mirror"])
def test_written_file_is_what_print_shows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str
) -> None:
    _, printed, _ = run_gen(capsys, target, "--root", str(tmp_path))
    run_gen(capsys, target, "--root", str(tmp_path), "--write")
    assert (tmp_path / STANDARD[target][0]).read_text(encoding="utf-8") == printed


def test_new_mirror_address_updates_with_backup(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_gen(capsys, "containerd-mirror", "--root", str(tmp_path), "--write")
    path = tmp_path / STANDARD["containerd-mirror"][0]
    old = path.read_text(encoding="utf-8")
    code, out, _ = run_gen(
        capsys, "containerd-mirror", "--root", str(tmp_path), "--write", "--mirror", "[::1]:5001"
    )
    assert code == 0
    assert f"{path}: updated (previous file kept as {path}.bak)" in out
    assert path.with_name("hosts.toml.bak").read_text(encoding="utf-8") == old
    assert '[host."http://[::1]:5001"]' in path.read_text(encoding="utf-8")


def test_invalid_daemon_json_leaves_every_file_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(tmp_path, "etc/docker/daemon.json", '{"log-driver": "json-file",}')
    before = tree(tmp_path)
    code, out, err = run_gen(capsys, "docker-mirror", "--root", str(tmp_path), "--write")
    assert code == 1
    assert out == ""
    assert "invalid JSON at line 1, column 28" in err and "file left untouched" in err
    assert tree(tmp_path) == before  # the hosts.toml was not written either


# --- daemon.json ---

EXISTING_DAEMON_JSON = """{
  "log-driver": "json-file",
  "proxies": {"https-proxy": "http://127.0.0.1:3128"},
  "registry-mirrors": ["https://mirror.example"],
  "zzz": null
}
"""


def test_daemon_json_merge_keeps_other_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "etc/docker/daemon.json", EXISTING_DAEMON_JSON)
    argv = ["docker-mirror", "--store", "classic", "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv)
    assert code == 0
    assert out == (
        f"{path}: updated (previous file kept as {path}.bak)\n"
        "to apply: systemctl restart docker (daemon.json is read at start; hosts.toml on every "
        "pull)\n"
    )
    assert "Docker Hub only on the classic store" in err
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == ["log-driver", "proxies", "registry-mirrors", "zzz"]
    assert data["registry-mirrors"] == ["http://127.0.0.1:5000", "https://mirror.example"]
    assert data["proxies"] == {"https-proxy": "http://127.0.0.1:3128"}
    assert not (tmp_path / "etc/docker/certs.d").exists()  # --store classic
    assert run_gen(capsys, *argv)[1] == f"{path}: unchanged\n"


def test_daemon_json_already_naming_the_mirror_is_not_rewritten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = '{"registry-mirrors": ["https://a.example", "http://localhost:5000/"]}'
    path = write(tmp_path, "etc/docker/daemon.json", text)
    code, out, _ = run_gen(
        capsys, "docker-mirror", "--store", "classic", "--root", str(tmp_path), "--write"
    )
    assert code == 0 and out == f"{path}: unchanged\n"
    assert path.read_text(encoding="utf-8") == text


def test_daemon_json_registry_mirrors_not_a_list(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(tmp_path, "etc/docker/daemon.json", '{"registry-mirrors": "http://x:1"}')
    code, _, err = run_gen(capsys, "docker-mirror", "--root", str(tmp_path), "--write")
    assert code == 1 and '"registry-mirrors" is not a list' in err


# --- containerd hosts directories and config_path ---


def test_registry_directories_and_shadowing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(tmp_path, "etc/containerd/certs.d/ghcr.io/ca.crt", "x")
    write(tmp_path, "etc/containerd/certs.d/quay.io/hosts.toml", 'server = "https://quay.io"\n')
    argv = ["containerd-mirror", "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv)
    assert code == 0
    assert "ghcr.io, quay.io have directories of their own; such a directory hides" in err
    assert "(rerun with --registry ghcr.io --registry quay.io)" in err
    code, out, err = run_gen(
        capsys, *argv, "--registry", "ghcr.io", "--registry", "index.docker.io"
    )
    assert code == 0
    base = tmp_path / "etc/containerd/certs.d"
    assert out.splitlines()[:3] == [
        f"{base}/_default/hosts.toml: unchanged",
        f"{base}/ghcr.io/hosts.toml: created",
        f"{base}/docker.io/hosts.toml: created",
    ]
    assert "/etc/containerd/certs.d/ghcr.io: has certificate files" in err
    assert "certs.d: quay.io has a directory of its own;" in err and "ghcr.io," not in err
    text = (base / "ghcr.io/hosts.toml").read_text(encoding="utf-8")
    assert "Pulls from ghcr.io try fwdproxy's registry mirror first." in text
    assert mirrorconf.names_mirror(text, mirrorconf.parse_mirror_address("127.0.0.1:5000"))


CONFIG_CASES = {
    "v2-set": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n',
        "ok",
        'config_path = "/etc/containerd/certs.d" includes /etc/containerd/certs.d',
    ),
    "v2-list": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/other:/etc/containerd/certs.d/"\n',
        "ok",
        "includes",
    ),
    "v2-missing": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "x"\n',
        "problem",
        'add: [plugins."io.containerd.grpc.v1.cri".registry] config_path = '
        '"/etc/containerd/certs.d"',
    ),
    "v2-empty-table": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = ""\n',
        "problem",
        'in the existing [plugins."io.containerd.grpc.v1.cri".registry] table set:',
    ),
    "v2-other": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/x"\n',
        "problem",
        'config_path = "/x" does not include /etc/containerd/certs.d',
    ),
    "v2-legacy-mirrors": (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://m"]\n',
        "problem",
        "stops containerd from starting",
    ),
    "v3-missing": (
        'version = 3\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "x"\n',
        "warning",
        "containerd >= 2.2 then reads /etc/containerd/certs.d by default",
    ),
    "v3-set": (
        'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n',
        "ok",
        "includes",
    ),
    "no-version": ("# all defaults\n", "problem", "version = 2   # first line"),
    "cri-disabled": ('disabled_plugins = ["cri"]\n', "note", "the CRI plugin is disabled"),
    "invalid": ("version = 2\n[plugins\n", "problem", "invalid TOML"),
    "absent": (None, "warning", "not found: containerd >= 2.2 reads /etc/containerd/certs.d"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=list(CONFIG_CASES))
def test_containerd_config_path_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    text, level, fragment = CONFIG_CASES[case]
    check = mirrorconf.check_containerd_config(text)
    assert check.level == level
    assert fragment in " ".join([check.message, *(s.strip() for s in check.snippet)])
    if text is not None:
        write(tmp_path, "etc/containerd/config.toml", text)
    code, _, err = run_gen(capsys, "containerd-mirror", "--root", str(tmp_path))
    assert code == 0
    assert f"fwdproxy gen: {level}: /etc/containerd/config.toml" in err


def test_containerd_config_check_for_a_custom_certs_dir() -> None:
    assert mirrorconf.check_containerd_config(None, "/srv/certs.d").level == "problem"
    v3 = 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
    check = mirrorconf.check_containerd_config(v3, "/srv/certs.d")
    assert check.level == "problem" and check.snippet[-1].endswith('config_path = "/srv/certs.d"')


def test_certs_dir_for_docker_skips_the_containerd_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["containerd-mirror", "--certs-dir", "/etc/docker/certs.d", "--root", str(tmp_path)]
    code, _, err = run_gen(capsys, *argv, "--write")
    assert code == 0
    assert (tmp_path / "etc/docker/certs.d/_default/hosts.toml").is_file()
    assert "config.toml" not in err and "Docker Engine >= 28" in err


# --- podman: carry-over, later drop-ins, v1 ---

MAIN_REGISTRIES_CONF = """unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"
blocked = false

[[registry.mirror]]
location = "mirror.corp.example/dockerhub"
pull-from-mirror = "digest-only"

[[registry]]
location = "quay.io"
insecure = true
"""


def test_podman_carries_over_replaced_entries_and_names_later_dropins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(tmp_path, "etc/containers/registries.conf", MAIN_REGISTRIES_CONF)
    write(
        tmp_path,
        "etc/containers/registries.conf.d/90-local.conf",
        '[[registry]]\nprefix = "quay.io"\nlocation = "quay.example"\n',
    )
    argv = ["podman-mirror", "--only-registry", "docker.io", "--only-registry", "quay.io"]
    code, out, err = run_gen(capsys, *argv, "--root", str(tmp_path))
    assert code == 0
    regs = tomllib.loads(out)["registry"]
    assert regs[0] == {
        "prefix": "docker.io",
        "location": "docker.io",
        "blocked": False,
        "mirror": [
            {"location": "127.0.0.1:5000/docker.io", "insecure": True},
            {"location": "mirror.corp.example/dockerhub", "pull-from-mirror": "digest-only"},
        ],
    }
    assert regs[1] == {
        "prefix": "quay.io",
        "location": "quay.io",
        "insecure": True,
        "mirror": [{"location": "127.0.0.1:5000/quay.io", "insecure": True}],
    }
    assert "# settings carried over from /etc/containers/registries.conf" in out
    assert (
        "90-local.conf sorts after 50-fwdproxy-mirror.conf and replaces its entries for quay.io"
        in err
    )


def test_podman_refuses_a_v1_registries_conf(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write(tmp_path, "etc/containers/registries.conf", "[registries.search]\nregistries = []\n")
    code, out, err = run_gen(capsys, "podman-mirror", "--root", str(tmp_path), "--write")
    assert code == 1 and out == ""
    assert "v1 format" in err
    assert not (tmp_path / "etc/containers/registries.conf.d").exists()


def test_podman_registry_with_a_port_needs_a_prefix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["podman-mirror", "--only-registry", "myreg.example:5000", "--root", str(tmp_path)]
    code, out, err = run_gen(capsys, *argv)
    assert code == 2 and out == ""
    assert "myreg.example:5000: a registry with a port" in err and "prefixes" in err
    cfg = write(
        tmp_path,
        "rules.yaml",
        "listen: 127.0.0.1:3128\nmirror:\n  listen: 127.0.0.1:5000\n"
        '  prefixes: {myreg: "myreg.example:5000"}\n',
    )
    code, out, _ = run_gen(capsys, *argv, "-c", str(cfg))
    assert code == 0
    loc = tomllib.loads(out)["registry"][0]["mirror"][0]["location"]
    assert loc == "127.0.0.1:5000/myreg"
    req = parse_mirror_request(
        "GET", "/v2/myreg/app/manifests/1", prefixes={"myreg": "myreg.example:5000"}
    )
    assert req.registry.name == "myreg.example:5000"


# --- k3s / RKE2 ---

EXISTING_REGISTRIES_YAML = """# private registry
mirrors:
  docker.io:
    endpoint: ["https://reg.example"]
  "*":
    endpoint: ["https://fallback.example"]
configs:
  reg.example:
    auth: {username: u, password: p}
"""


def test_k3s_merge_keeps_other_mirrors_and_configs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "etc/rancher/rke2/registries.yaml", EXISTING_REGISTRIES_YAML)
    argv = ["k3s-mirror", "--rke2", "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv)
    assert code == 0
    assert out == (
        f"{path}: updated (previous file kept as {path}.bak)\n"
        "to apply: systemctl restart rke2-server (registries.yaml is read at start)\n"
    )
    assert "mirrors.docker.io has its own entry" in err and "--registry docker.io" in err
    assert "comments in the old file are not kept" in err
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == {
        "mirrors": {
            "docker.io": {"endpoint": ["https://reg.example"]},
            "*": {"endpoint": ["http://127.0.0.1:5000", "https://fallback.example"]},
        },
        "configs": {"reg.example": {"auth": {"username": "u", "password": "p"}}},
    }
    assert run_gen(capsys, *argv)[1] == f"{path}: unchanged\n"
    code, out, _ = run_gen(capsys, *argv, "--registry", "docker.io")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["mirrors"]["docker.io"]["endpoint"] == [
        "http://127.0.0.1:5000",
        "https://reg.example",
    ]


def test_k3s_file_already_pointing_keeps_its_comments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = '# mine\nmirrors:\n  "*":\n    endpoint:\n      - "http://127.0.0.1:5000"  # fwdproxy\n'
    path = write(tmp_path, "etc/rancher/k3s/registries.yaml", text)
    code, out, _ = run_gen(capsys, "k3s-mirror", "--agent", "--root", str(tmp_path), "--write")
    assert code == 0 and out == f"{path}: unchanged\n"
    assert path.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("mirrors: [\n", "invalid YAML"),
        ("- a\n", "top level is not a mapping"),
        ("mirrors: [a]\n", "mirrors: is not a mapping"),
        ('mirrors:\n  "*": {endpoint: http://x}\n', "mirrors.*.endpoint is not a list"),
    ],
    ids=["syntax", "list", "mirrors-list", "endpoint-string"],
)
def test_k3s_bad_registries_yaml_is_left_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, fragment: str
) -> None:
    path = write(tmp_path, "etc/rancher/k3s/registries.yaml", text)
    code, out, err = run_gen(capsys, "k3s-mirror", "--root", str(tmp_path), "--write")
    assert code == 1 and out == ""
    assert fragment in err and "file left untouched" in err
    assert path.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in path.parent.iterdir()) == ["registries.yaml"]


# --- the mirror address ---


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5001/", "127.0.0.1:5001"),
        ("[::1]:5000", "[::1]:5000"),
        ("http://[0:0:0:0:0:0:0:1]:5000", "[::1]:5000"),
        ("Mirror.LAN:5000", "mirror.lan:5000"),
    ],
)
def test_mirror_address_normalised(given: str, address: str) -> None:
    m = mirrorconf.parse_mirror_address(given)
    assert m.address == address and m.url == f"http://{address}"


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("https://127.0.0.1:5000", "speaks plain HTTP"),
        ("socks5://127.0.0.1:5000", "speaks plain HTTP"),
        ("127.0.0.1", "missing port"),
        ("::1:5000", "needs [brackets]:port"),
        ("127.0.0.1:99999", "port"),
        ("127.0.0.1:0", "port"),
        ("127.0.0.1:5000/v2", "expected HOST:PORT"),
        ("u:p@127.0.0.1:5000", "expected HOST:PORT"),
        ("0.0.0.0:5000", "wildcard"),
        ("[::]:5000", "wildcard"),
        ("a b:1", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
    ],
)
@pytest.mark.parametrize("target", list(STANDARD))
def test_bad_mirror_address_is_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, given: str, fragment: str, target: str
) -> None:
    argv = [target, "--mirror", given, "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert err.startswith("fwdproxy gen: error: --mirror") and fragment in err
    assert list(tmp_path.iterdir()) == []


def test_ipv6_mirror_is_bracketed_everywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for target in STANDARD:
        argv = [target, "--mirror", "[::1]:5000", "--root", str(tmp_path), "--write"]
        assert run_gen(capsys, *argv)[0] == 0
    files = tree(tmp_path)
    hosts = tomllib.loads(files["etc/containerd/certs.d/_default/hosts.toml"])
    assert list(hosts["host"]) == ["http://[::1]:5000"]
    assert json.loads(files["etc/docker/daemon.json"]) == {
        "registry-mirrors": ["http://[::1]:5000"]
    }
    k3s = yaml.safe_load(files["etc/rancher/k3s/registries.yaml"])
    assert k3s["mirrors"]["*"]["endpoint"] == ["http://[::1]:5000"]
    podman = tomllib.loads(files["etc/containers/registries.conf.d/50-fwdproxy-mirror.conf"])
    assert podman["registry"][0]["mirror"][0]["location"] == "[::1]:5000/docker.io"
    _, _, err = run_gen(capsys, "podman-mirror", "--mirror", "[::1]:5000", "--root", str(tmp_path))
    assert "IPv6" in err


def test_non_loopback_mirror_mentions_no_proxy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, _, err = run_gen(capsys, "k3s-mirror", "--mirror", "10.0.0.5:5000", "--root", str(tmp_path))
    assert "add 10.0.0.5 to NO_PROXY" in err and "every node must reach 10.0.0.5:5000" in err
    _, _, err = run_gen(capsys, "k3s-mirror", "--root", str(tmp_path))
    assert "NO_PROXY" not in err
    argv = ["docker-mirror", "--mirror", "10.0.0.5:5000", "--root", str(tmp_path)]
    _, _, err = run_gen(capsys, *argv)
    assert '"insecure-registries": ["10.0.0.5:5000"]' in err and "gen does not add it" in err
    _, _, err = run_gen(capsys, "docker-mirror", "--root", str(tmp_path))
    assert "insecure-registries" not in err


def test_mirror_address_from_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "rules.yaml",
        "listen: 127.0.0.1:3128\nmirror:\n  listen: 0.0.0.0:5001\n  only: [docker.io, quay.io]\n",
    )
    root = tmp_path / "root"
    _, out, err = run_gen(capsys, "podman-mirror", "-c", str(cfg), "--root", str(root))
    regs = tomllib.loads(out)["registry"]
    assert [r["prefix"] for r in regs] == ["docker.io", "quay.io"]  # mirror.only
    assert regs[0]["mirror"][0]["location"] == "127.0.0.1:5001/docker.io"  # wildcard: loopback
    argv = ["podman-mirror", "-c", str(cfg), "--root", str(root), "--registry", "ghcr.io"]
    _, out, err = run_gen(capsys, *argv)
    assert "mirror.only does not list ghcr.io" in err
    _, out, _ = run_gen(capsys, "k3s-mirror", "-c", str(cfg), "--mirror", "[::1]:7000")
    assert "http://[::1]:7000" in out  # --mirror wins


def test_config_without_mirror_section(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write(tmp_path, "rules.yaml", "listen: 127.0.0.1:3128\n")
    code, out, err = run_gen(capsys, "k3s-mirror", "-c", str(cfg), "--root", str(tmp_path))
    assert code == 0 and "http://127.0.0.1:5000" in out
    assert "has no mirror: section (the mirror is off)" in err


def test_unreadable_config_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_gen(capsys, "k3s-mirror", "-c", str(tmp_path / "missing.yaml"))
    assert code == 1 and out == ""
    assert "cannot read the mirror from" in err and "--mirror HOST:PORT" in err


# --- flags and help ---


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["k3s-mirror", "--proxy", "http://127.0.0.1:3128"], "--proxy is for the proxy targets"),
        (["podman-mirror", "--cluster-cidr", "10.0.0.0/8"], "--cluster-cidr is for the proxy"),
        (["docker-dropin", "--mirror", "127.0.0.1:5000"], "--mirror is for the *-mirror"),
        (["daemon-json", "--store", "classic"], "--store is for docker-mirror"),
        (["containerd-mirror", "--only-registry", "x.io"], "--only-registry does not apply"),
        (["podman-mirror", "--store", "classic"], "--store does not apply"),
        (["docker-mirror", "--rke2"], "--rke2 does not apply"),
        (["containerd-mirror", "--agent"], "--agent does not apply"),
        (["podman-mirror", "--registry", "a.io", "--only-registry", "b.io"], "do not go together"),
        (["containerd-mirror", "--registry", "not a host"], "not a registry host"),
    ],
)
def test_flags_of_the_other_kind_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], fragment: str
) -> None:
    code, out, err = run_gen(capsys, *argv, "--no-detect", "--root", str(tmp_path), "--write")
    assert code == 2 and out == ""
    assert fragment in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", list(STANDARD))
def test_target_help_teaches(capsys: pytest.CaptureFixture[str], target: str) -> None:
    code, out, _ = run_gen(capsys, target, "--help")
    assert code == 0
    assert out == genmirror.help_text(target)
    assert out.startswith(f"fwdproxy gen {target}") and "To apply" in out
    assert "restart" in out or "nothing" in out


def test_containerd_help_names_config_path_for_both_versions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run_gen(capsys, "containerd-mirror", "-h")
    assert '[plugins."io.containerd.grpc.v1.cri".registry]' in out
    assert '[plugins."io.containerd.cri.v1.images".registry]' in out
    assert "--hosts-dir" in out and "never edits config.toml" in out


def test_gen_help_lists_mirror_targets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_gen(capsys, "--help")
    assert code == 0
    for name in [*gen.TARGETS, *genmirror.TARGETS]:
        assert name in out
    assert "fwdproxy gen containerd-mirror --write" in out
    assert run_gen(capsys, "docker-dropin", "--help")[1] == out  # proxy targets: the usual help


def test_mirror_modules_import_without_asyncio_or_yaml() -> None:
    code = (
        "import sys, fwdproxy.cli.genmirror, fwdproxy.cli.mirrorconf;"
        "bad = sorted(m for m in ('asyncio', 'aiohttp', 'yaml') if m in sys.modules);"
        "print(','.join(bad))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=REPO,
    )
    assert res.stdout.strip() == ""


def test_registry_with_port_uses_the_directory_containerd_reads_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """containerd tries certs.d/<host>_<port>_ before certs.d/<host>:<port>: write where it
    looks, or the new file would be hidden by the old directory."""
    write(tmp_path, "etc/containerd/certs.d/reg.example_5000_/ca.crt", "x")
    argv = ["containerd-mirror", "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv, "--registry", "reg.example:5000")
    assert code == 0
    assert f"{tmp_path}/etc/containerd/certs.d/reg.example_5000_/hosts.toml: created" in out
    assert "has a directory of its own" not in err and "has certificate files" in err
    code, out, _ = run_gen(capsys, *argv, "--registry", "other.example:5000")
    assert f"{tmp_path}/etc/containerd/certs.d/other.example:5000/hosts.toml: created" in out


def test_certs_dir_must_be_absolute(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["docker-mirror", "--certs-dir", "certs.d", "--root", str(tmp_path), "--write"]
    code, out, err = run_gen(capsys, *argv)
    assert code == 2 and out == "" and "absolute path" in err
    assert list(tmp_path.iterdir()) == []


def test_new_registries_yaml_is_private(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_gen(capsys, "k3s-mirror", "--root", str(tmp_path), "--write")[0] == 0
    path = tmp_path / STANDARD["k3s-mirror"][0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    assert (
        run_gen(capsys, "k3s-mirror", "--registry", "quay.io", "--root", str(tmp_path), "--write")[
            0
        ]
        == 0
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
