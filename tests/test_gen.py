"""`fwdproxy gen`: golden output per target, atomic idempotent writes, daemon.json merge."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fwdproxy.cli import doctor, gen, noproxy

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
UPDATE = os.environ.get("FWDPROXY_UPDATE_GOLDEN") == "1"
FIXED = [
    "--no-detect",
    "--proxy",
    "http://127.0.0.1:3128",
    "--cluster-cidr",
    "10.42.0.0/16",
    "--service-cidr",
    "10.43.0.0/16",
    "--no-proxy-extra",
    "registry.corp.example,.corp.example",
]
CASES = {
    "docker-dropin": ["docker-dropin"],
    "daemon-json": ["daemon-json"],
    "containerd-dropin": ["containerd-dropin"],
    "podman": ["podman"],
    "crio-dropin": ["crio-dropin"],
    "k3s-env": ["k3s-env"],
    "k3s-env-agent": ["k3s-env", "--agent"],
    "rke2-env": ["rke2-env"],
    "rke2-env-agent-containerd-only": ["rke2-env", "--agent", "--containerd-only"],
    "env": ["env"],
    "env-env-file": ["env", "--env-file"],
    "no-proxy": ["no-proxy"],
}


def run_gen(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = gen.run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gen_matches_golden(capsys: pytest.CaptureFixture[str], case: str) -> None:
    code, out, err = run_gen(capsys, *CASES[case], *FIXED)
    assert code == 0
    got = out + "--- stderr ---\n" + err
    path = GOLDEN / f"{case}.txt"
    if UPDATE:
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8"), (
        f"regenerate with FWDPROXY_UPDATE_GOLDEN=1: {path}"
    )


def test_every_target_has_a_golden_file() -> None:
    assert {argv[0] for argv in CASES.values()} == set(gen.TARGETS)


@pytest.mark.parametrize(
    ("example", "target"),
    [
        ("systemd/docker.service.d/http-proxy.conf", "docker-dropin"),
        ("systemd/containerd.service.d/http-proxy.conf", "containerd-dropin"),
    ],
)
def test_shipped_dropin_examples_are_gen_output(
    capsys: pytest.CaptureFixture[str], example: str, target: str
) -> None:
    _, out, _ = run_gen(capsys, target, "--no-detect")
    assert (REPO / example).read_text(encoding="utf-8") == out


def test_gen_dropin_environment_values_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_gen(capsys, "docker-dropin", *FIXED)
    env, files = doctor.parse_unit_env(out)
    value = "localhost,127.0.0.1,127.0.0.0/8,::1,10.42.0.0/16,10.43.0.0/16,.svc,.cluster.local,"
    value += "169.254.169.254,registry.corp.example,.corp.example"
    for key in ("NO_PROXY", "no_proxy"):
        assert env[key] == value
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[key] == "http://127.0.0.1:3128"
    assert files == []


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("http://u:p%40ss@h:1", 'Environment="K=http://u:p%%40ss@h:1"'),
        ('a"b', 'Environment="K=a\\"b"'),
        ("a\\b", 'Environment="K=a\\\\b"'),
        ("%n %% x", 'Environment="K=%%n %%%% x"'),
    ],
    ids=["percent", "quote", "backslash", "specifiers"],
)
def test_systemd_quote_escapes_and_parses_back(value: str, line: str) -> None:
    assert gen.systemd_quote("K", value) == line
    env, _ = doctor.parse_unit_env(f"[Service]\n{line}\n")
    assert env == {"K": value}


def test_gen_with_detection_adds_node_addresses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = noproxy.parse_ip_json(
        '[{"ifname":"eth0","flags":["UP"],"addr_info":[{"family":"inet","local":"192.0.2.7",'
        '"prefixlen":24,"scope":"global"}]}]'
    )
    monkeypatch.setattr(noproxy, "detect_node_addresses", lambda: (fake, None))
    code, out, _ = run_gen(capsys, "no-proxy")
    assert code == 0
    assert (
        out == "localhost,127.0.0.1,127.0.0.0/8,::1,192.0.2.7,192.0.2.0/24,.svc,.cluster.local,"
        "169.254.169.254\n"
    )


def test_gen_detection_failure_warns_and_continues(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(noproxy, "detect_node_addresses", lambda: ([], "no ip binary"))
    code, out, err = run_gen(capsys, "no-proxy")
    assert code == 0
    assert "warning: no ip binary" in err
    assert out.startswith("localhost,")


# --- proxy address ---


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("127.0.0.1:3128", "http://127.0.0.1:3128"),
        ("http://172.17.0.1:8080/", "http://172.17.0.1:8080"),
        ("http://[::1]:3128", "http://[::1]:3128"),
        ("http://user:p%40ss@proxy.lan:3128", "http://user:p%40ss@proxy.lan:3128"),
    ],
)
def test_proxy_url_normalised(given: str, want: str) -> None:
    assert gen.normalise_proxy_url(given) == want


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("https://127.0.0.1:3128", "use an http:// URL"),
        ("socks5://127.0.0.1:1080", "use an http:// URL"),
        ("http://127.0.0.1", "expected http://HOST:PORT"),
        ("http://127.0.0.1:99999", "invalid port"),
        ("http://127.0.0.1:3128/path", "expected http://HOST:PORT"),
        ("http://h:1/$x", "not allowed"),
    ],
)
def test_proxy_url_rejected_with_exit_2(
    capsys: pytest.CaptureFixture[str], given: str, fragment: str
) -> None:
    code, out, err = run_gen(capsys, "env", "--no-detect", "--proxy", given)
    assert code == 2
    assert out == ""
    assert fragment in err


def _fake_config(monkeypatch: pytest.MonkeyPatch, host: str, port: int) -> None:
    import fwdproxy.config

    cfg = SimpleNamespace(listeners=[SimpleNamespace(host=host, port=port)])
    monkeypatch.setattr(fwdproxy.config, "load_config", lambda path: cfg)


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("0.0.0.0", "http://127.0.0.1:3200"),
        ("::", "http://127.0.0.1:3200"),
        ("172.17.0.1", "http://172.17.0.1:3200"),
        ("::1", "http://[::1]:3200"),
    ],
)
def test_proxy_from_config_listener(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, host: str, want: str
) -> None:
    _fake_config(monkeypatch, host, 3200)
    code, out, _ = run_gen(capsys, "env", "--no-detect", "-c", "rules.yaml")
    assert code == 0
    assert f"export HTTPS_PROXY={shlex.quote(want)}\n" in out


def test_proxy_flag_wins_over_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_config(monkeypatch, "0.0.0.0", 3200)
    _, out, _ = run_gen(capsys, "env", "--no-detect", "-c", "x", "--proxy", "http://10.0.0.1:1")
    assert "export HTTPS_PROXY=http://10.0.0.1:1\n" in out


def test_unreadable_config_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_gen(capsys, "env", "--no-detect", "-c", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert out == ""
    assert "cannot read the listener from" in err and "--proxy URL" in err


def test_default_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_gen(capsys, "env", "--no-detect")
    assert "export HTTP_PROXY=http://127.0.0.1:3128\n" in out


def test_bad_no_proxy_extra_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_gen(capsys, "no-proxy", "--no-detect", "--no-proxy-extra", "*")
    assert code == 2
    assert "nothing through fwdproxy" in err


def test_help_teaches_by_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_gen(capsys, "--help")
    assert code == 0
    assert "examples:" in out and "fwdproxy gen docker-dropin --write" in out
    for name in gen.TARGETS:
        assert name in out


def test_unknown_target_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_gen(capsys, "kubelet")
    assert code == 2
    assert "invalid choice" in err


# --- writing ---


STANDARD = {
    "docker-dropin": "etc/systemd/system/docker.service.d/http-proxy.conf",
    "daemon-json": "etc/docker/daemon.json",
    "containerd-dropin": "etc/systemd/system/containerd.service.d/http-proxy.conf",
    "podman": "etc/containers/containers.conf.d/fwdproxy.conf",
    "crio-dropin": "etc/systemd/system/crio.service.d/00-proxy.conf",
    "k3s-env": "etc/systemd/system/k3s.service.env",
    "rke2-env": "etc/default/rke2-server",
}


@pytest.mark.parametrize("target", list(STANDARD))
def test_write_round_trips_under_root_and_is_idempotent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str
) -> None:
    _, printed, _ = run_gen(capsys, target, *FIXED)
    code, out, _ = run_gen(capsys, target, *FIXED, "--root", str(tmp_path), "--write")
    path = tmp_path / STANDARD[target]
    assert code == 0
    assert out.startswith(f"{path}: created\n")
    assert "to apply: systemctl" in out or "podman" in out
    assert path.read_text(encoding="utf-8") == printed
    before = path.stat()
    code, out, _ = run_gen(capsys, target, *FIXED, "--root", str(tmp_path), "--write")
    assert code == 0
    assert out == f"{path}: unchanged\n"
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .bak, no temp


def test_write_keeps_backup_of_a_different_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / STANDARD["docker-dropin"]
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\nEnvironment=HTTP_PROXY=http://old:1\n", encoding="utf-8")
    path.chmod(0o640)
    code, out, _ = run_gen(capsys, "docker-dropin", *FIXED, "--root", str(tmp_path), "--write")
    assert code == 0
    assert f"{path}: updated (previous file kept as {path}.bak)" in out
    assert "systemctl daemon-reload && systemctl restart docker" in out
    bak = path.with_name(path.name + ".bak")
    assert bak.read_text(encoding="utf-8") == "[Service]\nEnvironment=HTTP_PROXY=http://old:1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in path.read_text(encoding="utf-8")


def test_write_to_stdout_only_target_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for target in ("env", "no-proxy"):
        code, out, err = run_gen(capsys, target, "--no-detect", "--root", str(tmp_path), "--write")
        assert code == 2
        assert out == ""
        assert "stdout only" in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "etc").write_text("not a directory", encoding="utf-8")
    code, out, err = run_gen(capsys, "docker-dropin", *FIXED, "--root", str(tmp_path), "--write")
    assert code == 1
    assert out == ""
    assert "cannot write" in err and "docker.service.d" in err


def test_write_follows_a_symlink(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("{}", encoding="utf-8")
    link = tmp_path / STANDARD["daemon-json"]
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    assert run_gen(capsys, "daemon-json", *FIXED, "--root", str(tmp_path), "--write")[0] == 0
    assert link.is_symlink()
    assert "proxies" in json.loads(real.read_text(encoding="utf-8"))


# --- daemon.json merge ---

EXISTING_DAEMON_JSON = """{
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "3"},
  "proxies": {"no-proxy": "old", "extra-key": "kept"},
  "registry-mirrors": ["https://mirror.example"],
  "zzz": null
}
"""


def test_daemon_json_merge_keeps_other_keys_and_order(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / STANDARD["daemon-json"]
    path.parent.mkdir(parents=True)
    path.write_text(EXISTING_DAEMON_JSON, encoding="utf-8")
    code, out, err = run_gen(capsys, "daemon-json", *FIXED, "--root", str(tmp_path), "--write")
    assert code == 0
    assert "Docker Engine >= 23" in err and "20.10" in err and "docker-dropin" in err
    assert "to apply: systemctl restart docker" in out
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == ["log-driver", "log-opts", "proxies", "registry-mirrors", "zzz"]
    assert data["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert data["registry-mirrors"] == ["https://mirror.example"] and data["zzz"] is None
    assert list(data["proxies"]) == ["no-proxy", "extra-key", "http-proxy", "https-proxy"]
    assert data["proxies"]["extra-key"] == "kept"
    assert data["proxies"]["https-proxy"] == "http://127.0.0.1:3128"
    assert data["proxies"]["no-proxy"].startswith("localhost,127.0.0.1,")
    assert json.loads(path.with_name("daemon.json.bak").read_text()) == json.loads(
        EXISTING_DAEMON_JSON
    )
    assert run_gen(capsys, "daemon-json", *FIXED, "--root", str(tmp_path), "--write")[1].endswith(
        ": unchanged\n"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{\n  "log-driver": "json-file",\n  oops\n}\n', "invalid JSON at line 3, column 3"),
        ('{"a": 1,}', "invalid JSON at line 1, column 9"),
        ("[1, 2]", "top level is not a JSON object"),
    ],
    ids=["bare-word", "trailing-comma", "array"],
)
def test_daemon_json_invalid_is_left_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / STANDARD["daemon-json"]
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")
    before = path.stat()
    code, out, err = run_gen(capsys, "daemon-json", *FIXED, "--root", str(tmp_path), "--write")
    assert code == 1
    assert fragment in err and "file left untouched" in err
    assert out == ""
    assert path.read_text(encoding="utf-8") == content
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"]


def test_daemon_json_empty_file_is_treated_as_empty_object(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / STANDARD["daemon-json"]
    path.parent.mkdir(parents=True)
    path.write_text("\n", encoding="utf-8")
    assert run_gen(capsys, "daemon-json", *FIXED, "--root", str(tmp_path), "--write")[0] == 0
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["proxies"]


# --- k3s / rke2 env file merge ---

EXISTING_K3S_ENV = """K3S_TOKEN=K10abc::server:secret
K3S_URL='https://10.0.0.1:6443'
# proxy from an earlier setup
HTTP_PROXY=http://old-proxy:8080
CONTAINERD_HTTPS_PROXY=http://old-proxy:8080
no_proxy=old
export https_proxy=http://old-proxy:8080

"""


def test_k3s_env_merge_keeps_other_lines_and_drops_old_proxies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "etc/systemd/system/k3s-agent.service.env"
    path.parent.mkdir(parents=True)
    path.write_text(EXISTING_K3S_ENV, encoding="utf-8")
    path.chmod(0o600)
    argv = ["k3s-env", "--agent", *FIXED, "--root", str(tmp_path), "--write"]
    code, out, _ = run_gen(capsys, *argv)
    assert code == 0
    assert "to apply: systemctl restart k3s-agent" in out
    text = path.read_text(encoding="utf-8")
    assert text.startswith(
        "K3S_TOKEN=K10abc::server:secret\nK3S_URL='https://10.0.0.1:6443'\n"
        "# proxy from an earlier setup\n\n# BEGIN fwdproxy"
    )
    env = doctor.parse_env_file(text)
    assert env["K3S_TOKEN"] == "K10abc::server:secret"
    assert env["K3S_URL"] == "https://10.0.0.1:6443"
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://127.0.0.1:3128"
    assert not {"CONTAINERD_HTTPS_PROXY", "no_proxy", "https_proxy"} & set(env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run_gen(capsys, *argv)[1].endswith(": unchanged\n")
    # new values replace the managed block instead of adding a second one
    code, _, _ = run_gen(
        capsys, *argv[:-3], "--proxy", "http://127.0.0.1:9999", "--root", str(tmp_path), "--write"
    )
    text = path.read_text(encoding="utf-8")
    assert text.count("# BEGIN fwdproxy") == 1 and "127.0.0.1:9999" in text
    assert "127.0.0.1:3128" not in text


def test_new_env_file_is_private(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_gen(capsys, "rke2-env", *FIXED, "--root", str(tmp_path), "--write")[0] == 0
    assert stat.S_IMODE((tmp_path / STANDARD["rke2-env"]).stat().st_mode) == 0o600
    assert run_gen(capsys, "podman", *FIXED, "--root", str(tmp_path), "--write")[0] == 0
    assert stat.S_IMODE((tmp_path / STANDARD["podman"]).stat().st_mode) == 0o644


def test_podman_output_is_valid_toml(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_gen(capsys, "podman", *FIXED)
    env = doctor.podman_engine_env(out)
    assert env is not None and "HTTPS_PROXY=http://127.0.0.1:3128" in env
    assert doctor._podman_env_fallback(out) == env


def test_shell_output_runs_in_sh(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_gen(capsys, "env", *FIXED)
    res = subprocess.run(
        ["sh", "-c", out + 'printf "%s|%s" "$HTTPS_PROXY" "$no_proxy"'],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert res.stdout.startswith("http://127.0.0.1:3128|localhost,127.0.0.1,")


def test_modules_import_without_asyncio_or_aiohttp() -> None:
    code = (
        "import sys, fwdproxy.sdnotify;"
        "import fwdproxy.cli.gen, fwdproxy.cli.doctor, fwdproxy.cli.noproxy;"
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
