"""systemd/fwdproxy.service and the drop-in examples pass `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fwdproxy.cli import doctor, gen

REPO = Path(__file__).parent.parent
UNIT = REPO / "systemd" / "fwdproxy.service"
STUB = "#!/bin/sh\nexit 0\n"


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install the Debian package `systemd`")
    return exe


def verify(unit: Path) -> list[str]:
    """Diagnostics systemd-analyze prints about files in unit's directory (empty = clean)."""
    res = subprocess.run(
        [analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    ours = [ln for ln in lines if str(unit.parent) in ln or unit.name in ln]
    assert res.returncode == 0 or ours, lines
    return ours


def unit_items(text: str) -> dict[str, list[str]]:
    items: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            items.setdefault(key.strip(), []).append(value.strip())
    return items


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    stub = tmp_path / "fwdproxy-stub"
    stub.write_text(STUB, encoding="utf-8")
    stub.chmod(0o755)
    copy = tmp_path / "fwdproxy.service"
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/usr/local/bin/fwdproxy serve -c /etc/fwdproxy/rules.yaml" in text
    copy.write_text(text.replace("/usr/local/bin/fwdproxy", str(stub)), encoding="utf-8")
    return copy


def test_unit_verifies_clean(unit_copy: Path) -> None:
    assert verify(unit_copy) == []


def test_verify_catches_a_broken_unit(unit_copy: Path) -> None:
    text = unit_copy.read_text(encoding="utf-8").replace("ProtectSystem=", "ProtectSystm=")
    unit_copy.write_text(text, encoding="utf-8")
    assert any("ProtectSystm" in line for line in verify(unit_copy))


def test_unit_settings() -> None:
    items = unit_items(UNIT.read_text(encoding="utf-8"))
    one = {k: v[-1] for k, v in items.items()}
    expected = {
        "Type": "notify",
        "ExecStart": "/usr/local/bin/fwdproxy serve -c /etc/fwdproxy/rules.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LimitNOFILE": "65536",
        "Restart": "on-failure",
        "After": "network-online.target",
        "Wants": "network-online.target",
        "TimeoutStopSec": "45s",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
        "WantedBy": "multi-user.target",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert items["SystemCallFilter"][0] == "@system-service"
    before = " ".join(items["Before"]).split()
    assert {"docker.service", "containerd.service"} <= set(before)
    assert "HTTPS_PROXY" in one["UnsetEnvironment"].split()


@pytest.mark.parametrize(
    ("unit", "example"),
    [
        ("docker.service", "systemd/docker.service.d/http-proxy.conf"),
        ("containerd.service", "systemd/containerd.service.d/http-proxy.conf"),
    ],
)
def test_dropin_examples_verify_with_dummy_unit(tmp_path: Path, unit: str, example: str) -> None:
    (tmp_path / unit).write_text("[Unit]\nDescription=dummy\n[Service]\nExecStart=/bin/true\n")
    dropin = tmp_path / f"{unit}.d" / "http-proxy.conf"
    dropin.parent.mkdir()
    shutil.copy(REPO / example, dropin)
    assert verify(tmp_path / unit) == []
    env, _ = doctor.parse_unit_env(dropin.read_text(encoding="utf-8"))
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    # the same check notices a broken drop-in
    dropin.write_text(dropin.read_text() + 'Environment="BROKEN=\\q\n', encoding="utf-8")
    assert any("BROKEN" in line for line in verify(tmp_path / unit))


def test_generated_dropin_with_percent_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`%` must be doubled, or systemd reads it as a specifier (%4 is not one: a warning)."""
    proxy = "http://user:p%40ss@127.0.0.1:3128"
    assert (
        gen.run(
            ["crio-dropin", "--no-detect", "--proxy", proxy, "--root", str(tmp_path), "--write"]
        )
        == 0
    )
    capsys.readouterr()
    units = tmp_path / "etc/systemd/system"
    (units / "crio.service").write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
    assert verify(units / "crio.service") == []
    dropin = units / "crio.service.d/00-proxy.conf"
    env, _ = doctor.parse_unit_env(dropin.read_text(encoding="utf-8"))
    assert env["HTTPS_PROXY"] == proxy
    dropin.write_text(dropin.read_text().replace("%%40", "%40"), encoding="utf-8")
    assert verify(units / "crio.service") != []
