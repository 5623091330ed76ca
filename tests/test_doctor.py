"""`fwdproxy doctor`: files written by `gen` pass; broken settings are reported with exit 1."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fwdproxy.cli import doctor, gen

TARGETS = [
    "docker-dropin",
    "daemon-json",
    "containerd-dropin",
    "podman",
    "crio-dropin",
    "k3s-env",
    "rke2-env",
]


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback TCP listener standing in for fwdproxy (connects complete via the backlog)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_all(root: Path, port: int, *targets: str) -> None:
    for target in targets or TARGETS:
        argv = [target, "--no-detect", "--proxy", f"http://127.0.0.1:{port}", "--root", str(root)]
        assert gen.run([*argv, "--cluster-cidr", "10.42.0.0/16", "--write"]) == 0


def diagnose(
    capsys: pytest.CaptureFixture[str], root: Path, port: int, *extra: str
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = doctor.run(
        ["--root", str(root), "--proxy", f"http://127.0.0.1:{port}", "--json", *extra]
    )
    out = capsys.readouterr().out
    return code, json.loads(out)


def messages(report: dict[str, Any], level: str = doctor.PROBLEM) -> list[str]:
    found = [f["message"] for f in report["findings"] if f["level"] == level]
    for r in report["runtimes"]:
        found += [f"{r['name']}: {f['message']}" for f in r["findings"] if f["level"] == level]
    return found


def test_doctor_all_good_on_files_written_by_gen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener)
    code, report = diagnose(capsys, tmp_path, listener)
    assert messages(report) == []
    assert code == 0 and report["ok"] is True
    assert report["listener"] == {
        "address": f"127.0.0.1:{listener}",
        "reachable": True,
        "error": None,
    }
    names = [r["name"] for r in report["runtimes"]]
    assert names == [
        "docker (systemd drop-in)",
        "docker (daemon.json)",
        "containerd (systemd drop-in)",
        "crio (systemd drop-in)",
        "podman (containers.conf [engine] env)",
        "k3s (env file)",
        "rke2-server (env file)",
    ]
    for r in report["runtimes"]:
        oks = [f["message"] for f in r["findings"] if f["level"] == doctor.OK]
        assert any(m.startswith("HTTPS_PROXY points at fwdproxy") for m in oks), r


def test_doctor_text_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin")
    capsys.readouterr()
    code = doctor.run(["--root", str(tmp_path), "--proxy", f"127.0.0.1:{listener}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"listener 127.0.0.1:{listener}: reachable" in out
    assert "docker (systemd drop-in): " in out
    assert "result: all good" in out


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


DROPIN = "etc/systemd/system/docker.service.d/http-proxy.conf"


@pytest.mark.parametrize(
    ("service", "fragment"),
    [
        ('Environment="HTTP_PROXY=http://127.0.0.1:{port}"', "HTTPS_PROXY missing"),
        ('Environment="HTTPS_PROXY=http://127.0.0.1:1"', "does not point at this fwdproxy"),
        ('Environment="HTTPS_PROXY=https://127.0.0.1:{port}"', "https:// to a plain listener"),
        ('Environment="HTTPS_PROXY=socks5h://127.0.0.1:{port}"', "socks5h"),
        (
            'Environment="HTTPS_PROXY=http://127.0.0.1:{port}" "NO_PROXY=*.corp.example"',
            "write 'corp.example'",
        ),
        ('Environment="HTTPS_PROXY=http://127.0.0.1:{port}" "NO_PROXY=10.*,.svc"', "IP wildcard"),
        (
            'Environment="HTTPS_PROXY=http://127.0.0.1:{port}" "NO_PROXY=docker.io,quay.io"',
            "bypasses fwdproxy for registry-1.docker.io, quay.io",
        ),
        ('Environment="HTTPS_PROXY=http://127.0.0.1:{port}" "NO_PROXY=*"', "nothing at all"),
        (
            'Environment="HTTPS_PROXY=http://127.0.0.1:{port}" "https_proxy=http://x:1"',
            "HTTPS_PROXY and https_proxy differ",
        ),
        ('Environment="NO_PROXY=.svc"', "HTTPS_PROXY missing"),
    ],
    ids=[
        "no-https",
        "wrong-port",
        "https-scheme",
        "socks5h",
        "star-dot",
        "ip-wildcard",
        "registry-bypassed",
        "star",
        "case-disagree",
        "only-no-proxy",
    ],
)
def test_doctor_reports_broken_dropin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int, service: str, fragment: str
) -> None:
    _write(tmp_path, DROPIN, "[Service]\n" + service.format(port=listener) + "\n")
    code, report = diagnose(capsys, tmp_path, listener)
    assert code == 1 and report["ok"] is False
    found = messages(report)
    assert any(fragment in m for m in found), found
    assert all(m.startswith("docker (systemd drop-in): ") for m in found)


def test_doctor_reports_broken_files_of_every_kind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    _write(
        tmp_path,
        "etc/docker/daemon.json",
        json.dumps({"proxies": {"http-proxy": f"http://127.0.0.1:{listener}"}}),
    )
    _write(
        tmp_path,
        "etc/systemd/system/containerd.service.d/http-proxy.conf",
        f'[Service]\nEnvironment="HTTPS_PROXY=http://127.0.0.1:{listener + 1}"\n',
    )
    _write(
        tmp_path,
        "etc/containers/containers.conf.d/fwdproxy.conf",
        f'[engine]\nenv = ["HTTPS_PROXY=http://127.0.0.1:{listener}", "NO_PROXY=*.corp.example"]\n',
    )
    _write(
        tmp_path,
        "etc/systemd/system/k3s.service.env",
        f"HTTPS_PROXY=http://127.0.0.1:{listener}\nCONTAINERD_HTTPS_PROXY=http://10.0.0.9:3128\n",
    )
    code, report = diagnose(capsys, tmp_path, listener)
    found = messages(report)
    assert code == 1
    assert any(m.startswith("docker (daemon.json): HTTPS_PROXY missing") for m in found)
    assert any(
        m.startswith("containerd (systemd drop-in): HTTPS_PROXY=")
        and "does not point at this fwdproxy" in m
        for m in found
    )
    assert any(m.startswith("podman") and "'*.corp.example'" in m for m in found)
    assert any(
        m.startswith("k3s (env file): CONTAINERD_HTTPS_PROXY=http://10.0.0.9:3128") for m in found
    )
    assert len(found) == 4, found


def test_doctor_invalid_daemon_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin")
    _write(tmp_path, "etc/docker/daemon.json", '{"proxies": {,}}')
    code, report = diagnose(capsys, tmp_path, listener)
    assert code == 1
    assert messages(report) == [
        "docker (daemon.json): invalid JSON at line 1, column 14: dockerd will not start"
    ]


def test_doctor_docker_sources_disagree(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin", "daemon-json")
    path = tmp_path / "etc/docker/daemon.json"
    data = json.loads(path.read_text())
    data["proxies"]["no-proxy"] = "localhost,.svc"
    path.write_text(json.dumps(data))
    code, report = diagnose(capsys, tmp_path, listener)
    assert code == 0
    assert any("disagree" in m for m in messages(report, doctor.WARNING))


def test_doctor_unreachable_listener(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dead_port: int
) -> None:
    write_all(tmp_path, dead_port, "docker-dropin")
    code, report = diagnose(capsys, tmp_path, dead_port)
    assert code == 1
    assert report["listener"]["reachable"] is False
    assert messages(report) == [
        f"fwdproxy listener 127.0.0.1:{dead_port} is not reachable: {report['listener']['error']}"
    ]


def test_doctor_nothing_configured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    _write(
        tmp_path,
        "etc/systemd/system/docker.service.d/override.conf",
        "[Service]\nLimitNOFILE=1048576\n",
    )
    code, report = diagnose(capsys, tmp_path, listener)
    assert code == 1
    assert any("no container runtime is configured" in m for m in messages(report))
    assert messages(report, doctor.NOTE) == ["docker (systemd drop-in): present, but sets no proxy"]


def test_doctor_reads_environment_file_and_later_dropins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    _write(
        tmp_path,
        "etc/systemd/system/docker.service.d/10-proxy.conf",
        '[Service]\nEnvironment="HTTPS_PROXY=http://127.0.0.1:1" "HTTP_PROXY=http://127.0.0.1:1"\n'
        "EnvironmentFile=-/etc/fwdproxy/proxy.env\n",
    )
    _write(tmp_path, "etc/fwdproxy/proxy.env", f"HTTPS_PROXY=http://127.0.0.1:{listener}\n")
    _write(
        tmp_path,
        "etc/systemd/system/docker.service.d/20-more.conf",
        f'[Service]\nEnvironment="HTTP_PROXY=http://localhost:{listener}"\n'
        'Environment="HTTPS_PROXY=http://127.0.0.1:2"\n',  # EnvironmentFile= still wins
    )
    code, report = diagnose(capsys, tmp_path, listener)
    assert messages(report) == []
    assert code == 0
    rt = report["runtimes"][0]
    assert rt["files"][-1].endswith("etc/fwdproxy/proxy.env")
    assert rt["settings"]["HTTPS_PROXY"] == f"http://127.0.0.1:{listener}"


def test_doctor_probe_is_injectable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_all(tmp_path, 3128, "docker-dropin")
    seen: list[tuple[str, int, float]] = []

    def probe(host: str, port: int, timeout_s: float) -> str | None:
        seen.append((host, port, timeout_s))
        return None

    capsys.readouterr()
    assert doctor.run(["--root", str(tmp_path)], probe) == 0
    assert seen == [("127.0.0.1", 3128, 1.0)]


def test_doctor_expects_the_config_listener(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    listener: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import fwdproxy.config

    cfg = SimpleNamespace(listeners=[SimpleNamespace(host="0.0.0.0", port=listener)])
    monkeypatch.setattr(fwdproxy.config, "load_config", lambda path: cfg)
    _write(tmp_path, DROPIN, f'[Service]\nEnvironment="HTTPS_PROXY=http://172.17.0.1:{listener}"\n')
    capsys.readouterr()
    assert doctor.run(["--root", str(tmp_path), "-c", "rules.yaml"]) == 0  # wildcard bind
    cfg.listeners[0].host = "127.0.0.1"
    assert doctor.run(["--root", str(tmp_path), "-c", "rules.yaml"]) == 1
    assert "does not point at this fwdproxy" in capsys.readouterr().out


def test_doctor_bad_config_is_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert doctor.run(["--root", str(tmp_path), "-c", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_doctor_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "fwdproxy doctor --root" in out


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("[Service]\nEnvironment=\"A=1\" B=2 'C=x y'\n", {"A": "1", "B": "2", "C": "x y"}),
        ("[Service]\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n", {"B": "2"}),
        (
            '[Unit]\nEnvironment=A=1\n[Service]\n# Environment=B=2\nEnvironment="D=\\x41\\"%%"\n',
            {"D": 'A"%'},
        ),
        ('[Service]\nEnvironment="A=1" \\\n  "B=2"\n', {"A": "1", "B": "2"}),
    ],
    ids=["quoting", "reset", "sections-escapes", "continuation"],
)
def test_parse_unit_env(text: str, want: dict[str, str]) -> None:
    assert doctor.parse_unit_env(text)[0] == want


def test_parse_env_file() -> None:
    text = '# c\n; c\nA=1\nexport B=\'x y\'\nC="q\\"z"\n  D = 4 \nbad line\nE=\n'
    assert doctor.parse_env_file(text) == {"A": "1", "B": "x y", "C": 'q"z', "D": "4", "E": ""}


@pytest.mark.parametrize(
    "text",
    [
        "[engine]\nenv = [\"A=1\", 'B=2']\n",
        '# x\n[containers]\nenv = ["X=0"]\n[engine]\nenv = [\n  "A=1",  # one\n  \'B=2\',\n]\n',
        '[engine]\nenv=["A=1","B=2"]\n[network]\n',
    ],
    ids=["inline", "multiline", "compact"],
)
def test_podman_env_parsers_agree(text: str) -> None:
    assert doctor.podman_engine_env(text) == ["A=1", "B=2"]
    assert doctor._podman_env_fallback(text) == ["A=1", "B=2"]


def test_podman_env_absent() -> None:
    assert doctor.podman_engine_env("[containers]\nenv = []\n") is None
    assert doctor._podman_env_fallback("[containers]\nenv = []\n") is None


# --- registry mirror -----------------------------------------------------------------------


class _V2Handler(http.server.BaseHTTPRequestHandler):
    """Answers GET /v2/ like a registry (or with `status` as configured on the server)."""

    def do_GET(self) -> None:
        status = getattr(self.server, "status", 200)
        self.send_response(status if self.path == "/v2/" else 404)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def v2_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A stand-in registry mirror on 127.0.0.1 (a free port), stopped after the test."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _V2Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _no_mirror_probe(host: str, port: int, timeout_s: float) -> tuple[None, None, str]:
    raise AssertionError(f"the mirror at {host}:{port} must not be probed")


CONTAINERD_V2 = (
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
    '  config_path = "/etc/containerd/certs.d"\n'
)


def write_mirror_all(root: Path, mirror: str) -> None:
    for target in ("containerd-mirror", "docker-mirror", "podman-mirror", "k3s-mirror"):
        assert gen.run([target, "--mirror", mirror, "--root", str(root), "--write"]) == 0
    assert (
        gen.run(["k3s-mirror", "--rke2", "--mirror", mirror, "--root", str(root), "--write"]) == 0
    )
    _write(root, "etc/containerd/config.toml", CONTAINERD_V2)


def mirror_diagnose(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    proxy_port: int,
    *extra: str,
    mirror_probe: doctor.MirrorProbe = doctor.probe_mirror,
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    argv = ["--root", str(root), "--proxy", f"http://127.0.0.1:{proxy_port}", "--json", *extra]
    code = doctor.run(argv, mirror_probe=mirror_probe)
    return code, json.loads(capsys.readouterr().out)


def test_doctor_mirror_all_good_on_files_written_by_gen(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    listener: int,
    v2_server: http.server.ThreadingHTTPServer,
) -> None:
    port = v2_server.server_address[1]
    write_all(tmp_path, listener)
    write_mirror_all(tmp_path, f"127.0.0.1:{port}")
    code, report = mirror_diagnose(capsys, tmp_path, listener, "--mirror", f"localhost:{port}")
    assert messages(report) == [] and messages(report, doctor.WARNING) == []
    assert code == 0
    assert report["mirror"] == {
        "address": f"localhost:{port}",
        "probed": True,
        "status": 200,
        "error": None,
        "pointed": True,
    }
    mirror = {r["name"]: r for r in report["runtimes"] if r["name"].endswith("(mirror)")}
    assert list(mirror) == [
        "containerd (mirror)",
        "docker (mirror)",
        "podman/CRI-O (mirror)",
        "k3s (mirror)",
        "rke2 (mirror)",
    ]
    for r in mirror.values():
        assert r["findings"] and all(f["level"] == doctor.OK for f in r["findings"]), r
    assert any("config_path" in f["message"] for f in mirror["containerd (mirror)"]["findings"])
    capsys.readouterr()
    assert (
        doctor.run(
            [
                "--root",
                str(tmp_path),
                "--proxy",
                f"127.0.0.1:{listener}",
                "--mirror",
                f"127.0.0.1:{port}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"mirror 127.0.0.1:{port}: GET /v2/ -> 200" in out
    assert "containerd (mirror): " in out and "result: all good" in out


def test_doctor_mirror_section_absent_when_nothing_points_at_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener)
    _write(tmp_path, "etc/containerd/config.toml", CONTAINERD_V2)
    code, report = mirror_diagnose(capsys, tmp_path, listener, mirror_probe=_no_mirror_probe)
    assert code == 0
    assert report["mirror"] is None
    assert not any(r["name"].endswith("(mirror)") for r in report["runtimes"])


def test_doctor_finds_the_default_mirror_without_being_told(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin")
    assert (
        gen.run(["podman-mirror", "--only-registry", "quay.io", "--root", str(tmp_path), "--write"])
        == 0
    )
    seen: list[tuple[str, int, float]] = []

    def probe(host: str, port: int, timeout_s: float) -> tuple[int | None, str | None, None]:
        seen.append((host, port, timeout_s))
        return 200, "registry/2.0", None

    code, report = mirror_diagnose(capsys, tmp_path, listener, mirror_probe=probe)
    assert code == 0
    assert seen == [("127.0.0.1", 5000, 2.0)]
    assert report["mirror"]["pointed"] is True
    assert [r["name"] for r in report["runtimes"] if "mirror" in r["name"]] == [
        "podman/CRI-O (mirror)"
    ]


def test_doctor_mirror_not_listening_is_skipped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int, dead_port: int
) -> None:
    write_all(tmp_path, listener)
    write_mirror_all(tmp_path, f"127.0.0.1:{dead_port}")
    code, report = mirror_diagnose(capsys, tmp_path, listener, "--mirror", f"127.0.0.1:{dead_port}")
    assert code == 0  # runtimes fall back to the registries: a warning, not a problem
    assert report["mirror"]["probed"] is True and report["mirror"]["status"] is None
    warned = messages(report, doctor.WARNING)
    assert len(warned) == 1 and "is not answering" in warned[0] and "fall back" in warned[0]
    # expected but nothing points at it: only a note
    other = tmp_path / "other"
    code, report = mirror_diagnose(capsys, other, listener, "--mirror", f"127.0.0.1:{dead_port}")
    assert report["mirror"]["pointed"] is False
    assert any("is not answering" in m for m in messages(report, doctor.NOTE))
    assert not any("is not answering" in m for m in messages(report, doctor.WARNING))


def test_doctor_mirror_address_answering_404_is_a_problem(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    listener: int,
    v2_server: http.server.ThreadingHTTPServer,
) -> None:
    v2_server.status = 404  # type: ignore[attr-defined]
    port = v2_server.server_address[1]
    write_all(tmp_path, listener, "docker-dropin")
    code, report = mirror_diagnose(capsys, tmp_path, listener, "--mirror", f"127.0.0.1:{port}")
    assert code == 1
    assert messages(report) == [
        f"127.0.0.1:{port} answers GET /v2/ with 404: not a registry mirror "
        "(another service on that port?)"
    ]


def test_doctor_non_loopback_mirror_is_not_probed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin")
    write_mirror_all(tmp_path, "192.0.2.10:5000")
    code, report = mirror_diagnose(
        capsys, tmp_path, listener, "--mirror", "192.0.2.10:5000", mirror_probe=_no_mirror_probe
    )
    assert code == 0
    assert report["mirror"]["probed"] is False
    assert "not probed (doctor only probes loopback addresses)" in messages(report, doctor.NOTE)[0]


def test_doctor_mirror_broken_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    write_all(tmp_path, listener, "docker-dropin")
    m = "127.0.0.1:5000"
    _write(
        tmp_path,
        "etc/containerd/certs.d/_default/hosts.toml",
        f'[host."http://{m}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    _write(tmp_path, "etc/containerd/certs.d/ghcr.io/hosts.toml", "[host\n")
    _write(tmp_path, "etc/containerd/certs.d/quay.io/ca.crt", "x")
    _write(tmp_path, "etc/containerd/config.toml", "version = 2\n")
    _write(
        tmp_path,
        "etc/containers/registries.conf.d/50-fwdproxy-mirror.conf",
        f'[[registry]]\nprefix = "quay.io"\n[[registry.mirror]]\nlocation = "{m}"\n'
        f'[[registry]]\nprefix = "docker.io"\n[[registry.mirror]]\nlocation = "{m}/docker.io"\n'
        "insecure = true\n",
    )
    _write(
        tmp_path,
        "etc/rancher/k3s/registries.yaml",
        f'mirrors:\n  "*": {{endpoint: ["http://{m}"]}}\n  docker.io: {{endpoint: ["https://x"]}}\n',
    )
    code, report = mirror_diagnose(capsys, tmp_path, listener, mirror_probe=_ok_probe)
    assert code == 1
    problems = messages(report)
    assert any(
        p.startswith(
            "containerd (mirror): /etc/containerd/certs.d/ghcr.io/hosts.toml: invalid TOML"
        )
        for p in problems
    ), problems
    assert any(
        p.startswith("containerd (mirror): /etc/containerd/config.toml: config_path not set")
        for p in problems
    ), problems
    assert any("lacks insecure = true" in p for p in problems)
    assert any("for quay.io has no /<registry> path" in p for p in problems)
    assert len(problems) == 4, problems
    warnings = messages(report, doctor.WARNING)
    assert any(
        "ghcr.io, quay.io have directories of their own without the mirror" in w for w in warnings
    ), warnings
    assert any(w.startswith("k3s (mirror): docker.io has an entry of its own") for w in warnings)
    assert any(w.startswith("docker (mirror)") for w in warnings) is False  # no etc/docker


def _ok_probe(host: str, port: int, timeout_s: float) -> tuple[int, str, None]:
    return 200, "registry/2.0", None


def test_doctor_mirror_from_config_with_wildcard_bind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listener: int
) -> None:
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{listener}\nmirror:\n  listen: 0.0.0.0:5005\n", encoding="utf-8"
    )
    root = tmp_path / "root"
    write_all(root, listener, "docker-dropin")
    assert (
        gen.run(["k3s-mirror", "--mirror", "172.17.0.1:5005", "--root", str(root), "--write"]) == 0
    )
    seen: list[tuple[str, int, float]] = []

    def probe(host: str, port: int, timeout_s: float) -> tuple[int, str, None]:
        seen.append((host, port, timeout_s))
        return 200, "registry/2.0", None

    capsys.readouterr()
    code = doctor.run(["--root", str(root), "-c", str(cfg), "--json"], mirror_probe=probe)
    report = json.loads(capsys.readouterr().out)
    assert messages(report) == []
    assert code == 0
    assert seen == [("127.0.0.1", 5005, 2.0)]
    k3s = next(r for r in report["runtimes"] if r["name"] == "k3s (mirror)")
    assert [f["level"] for f in k3s["findings"]] == [doctor.OK]


def test_doctor_bad_mirror_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert doctor.run(["--root", str(tmp_path), "--mirror", "https://x:1"]) == 2
    assert "speaks plain HTTP" in capsys.readouterr().err


def test_probe_mirror_against_the_stand_in(v2_server: http.server.ThreadingHTTPServer) -> None:
    port = v2_server.server_address[1]
    assert doctor.probe_mirror("127.0.0.1", port, 2.0) == (200, "registry/2.0", None)
