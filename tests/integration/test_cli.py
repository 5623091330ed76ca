"""The real command line: `python -m fwdproxy serve | check | route`, --version and --help."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    LOOPBACK,
    TUNNEL_NAME,
    Origin,
    Proc,
    Upstream,
    clean_env,
    closed_port,
    curl,
    wait_port_sync,
)

import fwdproxy
from fwdproxy.cli.main import build_parser, main

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "rules.yaml"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fwdproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env if env is not None else clean_env(),
    )


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not found")


# -- serve ---------------------------------------------------------------------------------


def serve_config(tmp_path: Path, port: int, upstream_url: str) -> Path:
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(
        f"""\
listen: {LOOPBACK}:{port}
loopback_targets: true
upstreams:
  tunnel: {upstream_url}
hosts:
  {DIRECT_NAME}: {LOOPBACK}
rules:
  - name: tunnelled
    domain: [{TUNNEL_NAME}]
    via: tunnel
default: direct
"""
    )
    return cfg


def start_serve(tmp_path: Path, upstream_url: str, *args: str) -> tuple[Proc, int]:
    """`python -m fwdproxy serve` on a fresh port; retried if the port was taken meanwhile."""
    for attempt in range(5):
        port = closed_port()
        cfg = serve_config(tmp_path, port, upstream_url)
        proc = Proc(
            "fwdproxy",
            [sys.executable, "-m", "fwdproxy", "serve", "-c", str(cfg), *args],
            tmp_path / f"serve-{attempt}.log",
            env=clean_env(),
        )
        try:
            wait_port_sync(LOOPBACK, port, 20, proc)
            return proc, port
        except RuntimeError:  # exited: "cannot listen" when another process took the port
            proc.stop()
            if "cannot listen" not in proc.log():
                raise
        except BaseException:
            proc.stop()
            raise
    raise AssertionError("could not start fwdproxy serve on a free port")


@pytest.mark.parametrize("loop", ["auto", "asyncio"], ids=["default-loop", "asyncio-loop"])
async def test_cli_serve_routes_both_ways_and_exits_0_on_sigterm(
    tmp_path: Path, origin: Origin, socks_upstream: Upstream, loop: str
) -> None:
    proc, port = start_serve(tmp_path, socks_upstream.url, "--loop", loop)
    try:
        url = f"http://{LOOPBACK}:{port}"
        tunnelled = await curl("-p", "-x", url, origin.url("/echo/t", TUNNEL_NAME))
        assert tunnelled.rc == 0, tunnelled.err + proc.log()
        await socks_upstream.wait_carried(origin.port)
        direct = await curl("-x", url, origin.url("/echo/d", DIRECT_NAME))
        assert direct.rc == 0, direct.err
        assert json.loads(direct.out)["path"] == "/echo/d"
        assert socks_upstream.carried(origin.port) == 1
        socks = await curl(
            "--socks5-hostname", f"{LOOPBACK}:{port}", origin.url("/echo/s", DIRECT_NAME)
        )
        assert socks.rc == 0, socks.err
    finally:
        # Stop from a thread: the origin lives on this loop and must answer the drain.
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.stop, 10)
    assert rc == 0, proc.log()
    log = proc.log()
    assert f"listening on {LOOPBACK}:{port}" in log


async def test_cli_serve_upstream_override_flag(
    tmp_path: Path, origin: Origin, socks_upstream: Upstream
) -> None:
    dead = f"socks5://{LOOPBACK}:{closed_port()}"  # the config's upstream: dead on purpose
    proc, port = start_serve(tmp_path, dead, "--upstream", socks_upstream.url)
    try:
        res = await curl("-x", f"http://{LOOPBACK}:{port}", origin.url("/echo/o", TUNNEL_NAME))
        assert res.rc == 0 and b"/echo/o" in res.out, res.err + proc.log()
        await socks_upstream.wait_carried(origin.port)
    finally:
        # Stop from a thread: the origin lives on this loop and must answer the drain.
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.stop, 10)
    assert rc == 0


def test_cli_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nrules:\n  - domain: [x.test]\n    via: nowhere\n")
    res = run_cli("serve", "-c", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert f"{cfg}:3:" in res.stderr and "nowhere" in res.stderr


def test_cli_serve_refuses_to_be_an_open_proxy(tmp_path: Path) -> None:
    cfg = serve_config(tmp_path, closed_port(), f"socks5://{LOOPBACK}:1080")
    res = run_cli("serve", "-c", str(cfg), "--listen", f"0.0.0.0:{closed_port()}", cwd=tmp_path)
    assert res.returncode == 1
    assert "refusing to listen on 0.0.0.0" in res.stderr


# -- check ---------------------------------------------------------------------------------

BROKEN = """\
listen: 127.0.0.1:3128
upstreams:
  tunnel: socks5://127.0.0.1:1080
rules:
  - name: typo-upstream
    domain: [a.test]
    via: tunel
  - name: bad-cidr
    cidr: [10.0.0.0/33]
    action: direct
  - name: bad-regex
    regex: ['(unclosed']
    action: direct
  - name: good
    suffix: [docker.io]
    via: tunnel
default: direct
"""


def test_cli_check_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(BROKEN)
    res = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    err = res.stderr
    assert f"{cfg}:{line_of(BROKEN, 'typo-upstream')}: rules[0]" in err
    assert "unknown upstream 'tunel'" in err
    assert f"{cfg}:{line_of(BROKEN, '10.0.0.0/33')}: rules[1].cidr" in err
    assert f"{cfg}:{line_of(BROKEN, 'unclosed')}: rules[2].regex" in err
    assert "3 problem(s) found" in err
    assert res.stdout == ""


def test_cli_check_reports_yaml_syntax_errors_with_line(tmp_path: Path) -> None:
    cfg = tmp_path / "syntax.yaml"
    cfg.write_text("listen: 127.0.0.1:3128\nrules:\n  - domain: [a.test\n    via: x\n")
    res = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert re.search(rf"{re.escape(str(cfg))}:\d+: YAML syntax error", res.stderr), res.stderr


def test_cli_check_accepts_the_shipped_rules(tmp_path: Path) -> None:
    res = run_cli("check", "-c", str(SHIPPED), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"{SHIPPED}: OK" in res.stdout
    assert "tunnel=socks5://127.0.0.1:1080" in res.stdout


def test_cli_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read config" in capsys.readouterr().err


# -- route ---------------------------------------------------------------------------------


def test_cli_route_prints_rule_and_line(tmp_path: Path) -> None:
    text = SHIPPED.read_text()
    res = run_cli("route", "-c", str(SHIPPED), "registry-1.docker.io", "10.1.2.3:80", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "registry-1.docker.io:443 -> via tunnel (socks5://127.0.0.1:1080)" in out
    assert f"rule:     registries (line {line_of(text, '- name: registries')})" in out
    assert "registry: dockerhub (api)" in out
    assert "10.1.2.3:80 -> direct" in out
    assert f"private-ranges (line {line_of(text, '- name: private-ranges')})" in out


def test_cli_route_json(tmp_path: Path) -> None:
    res = run_cli(
        "route", "-c", str(SHIPPED), "--json", "https://ghcr.io/v2/", "example.org:80", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    first, second = (json.loads(line) for line in res.stdout.splitlines())
    assert first["host"] == "ghcr.io" and first["port"] == 443
    assert first["action"] == "via" and first["upstream"] == "tunnel"
    assert first["rule"] == "registries" and first["registry"] == "ghcr"
    assert first["members"] == ["socks5://127.0.0.1:1080"]
    assert second == {
        **second,
        "host": "example.org",
        "port": 80,
        "action": "direct",
        "rule": "default",
    }


def test_cli_route_upstream_override_env(tmp_path: Path) -> None:
    env = clean_env()
    env["FWDPROXY_UPSTREAM"] = "http://user:pw@127.0.0.1:8080"
    res = run_cli("route", "-c", str(SHIPPED), "--json", "quay.io", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["members"] == ["http://user:***@127.0.0.1:8080"]  # the password never printed


def test_cli_route_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "-c", str(SHIPPED), "bad host!"]) == 1
    assert "error: bad host!" in capsys.readouterr().err


# -- version and help ------------------------------------------------------------------------


def test_cli_version(tmp_path: Path) -> None:
    res = run_cli("--version", cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.strip() == f"fwdproxy {fwdproxy.__version__}"


def test_cli_help_lists_the_core_commands(tmp_path: Path) -> None:
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    for cmd in ("serve", "check", "route", "explain", "reload"):
        assert re.search(rf"^\s+{cmd}\s", res.stdout, re.M), cmd


def test_cli_without_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: fwdproxy" in capsys.readouterr().out


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        choices: Any = getattr(action, "choices", None)
        if choices:
            return sorted(choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("cmd", _subcommands())
def test_cli_help_of_each_subcommand(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fwdproxy {cmd}")
    assert "-h, --help" in out


@pytest.mark.parametrize("cmd", ["serve", "check", "route"])
def test_cli_help_of_core_subcommands_in_a_subprocess(cmd: str, tmp_path: Path) -> None:
    res = run_cli(cmd, "--help", cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.startswith(f"usage: fwdproxy {cmd}")
    assert "examples:" in res.stdout
