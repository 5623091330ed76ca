"""The mirror: and cache: sections, their defaults and their errors with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdproxy.config import load_config
from fwdproxy.core.errors import ConfigError


def _load(tmp_path: Path, text: str, **kw: object) -> object:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return load_config(p, env={"QPW": "s3cret"}, **kw)  # type: ignore[arg-type]


def test_mirror_off_by_default(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "listen: 127.0.0.1:3128\n")
    assert cfg.mirror is None and cfg.cache is None  # type: ignore[attr-defined]


def test_mirror_full_section(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = _load(tmp_path, """
mirror:
  listen: 127.0.0.1:5000
  allow: [10.0.0.0/8]
  prefixes: {dockerhub: docker.io, /mirrors/quay/: quay.io}
  only: [docker.io, Quay.IO]
  tag_ttl: 2m
  serve_stale: 1d
  retries: 3
  registries:
    quay.io: {username: bot, password: {env: QPW}}
    index.docker.io: {ca_file: ca.pem}
cache: {dir: cache, max_size: 10GiB}
""")
    m = cfg.mirror  # type: ignore[attr-defined]
    assert m.listeners[0].port == 5000 and str(m.listeners[0].allow[0]) == "10.0.0.0/8"
    assert m.prefixes == {"dockerhub": "docker.io", "mirrors/quay": "quay.io"}
    assert m.only == ("docker.io", "quay.io")
    assert m.tag_ttl_s == 120 and m.serve_stale_s == 86400 and m.retries == 3
    assert m.registries["quay.io"].password == "s3cret"
    assert "s3cret" not in repr(m)
    assert m.registries["docker.io"].ca_file == str(tmp_path / "ca.pem")
    assert cfg.cache.dir == str(tmp_path / "cache")  # type: ignore[attr-defined]
    assert cfg.cache.max_size == 10 * 1024**3  # type: ignore[attr-defined]


def test_mirror_shorthands_and_overrides(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "mirror: true\n")
    assert cfg.mirror.listeners[0].address == "127.0.0.1:5000"  # type: ignore[attr-defined]
    cfg = _load(tmp_path, "mirror: {tag_ttl: 5s}\n", mirror_override="127.0.0.1:5999",
                cache_dir_override=str(tmp_path / "c"))
    assert cfg.mirror.listeners[0].port == 5999  # type: ignore[attr-defined]
    assert cfg.mirror.tag_ttl_s == 5  # type: ignore[attr-defined]
    assert cfg.cache.dir == str(tmp_path / "c")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "line", "where", "what"),
    [
        ("mirror:\n  listen: nowhere\n", 2, "mirror.listen", "HOST:PORT"),
        ("mirror:\n  tag_ttl: soon\n", 2, "mirror.tag_ttl", "not a duration"),
        ("mirror:\n  retries: many\n", 2, "mirror.retries", "whole number"),
        ("mirror:\n  colour: blue\n", 2, "mirror.colour", "unknown key"),
        ("mirror:\n  prefixes: {v2: docker.io}\n", 2, "mirror.prefixes.v2", "v2"),
        ("mirror:\n  only: ['bad host!']\n", 2, "mirror.only[0]", "registry"),
        ("mirror:\n  registries:\n    quay.io: {password: {env: NOPE}}\n", 3,
         "mirror.registries.quay.io.password", "NOPE is not set"),
        ("mirror:\n  registries:\n    quay.io: {username: bot}\n", 3,
         "mirror.registries.quay.io", "go together"),
        ("mirror:\n  registries:\n    quay.io: {ca_file: /no/such.pem}\n", 3,
         "mirror.registries.quay.io.ca_file", "no such file"),
        ("cache:\n  dir: /tmp/x\n  max_size: lots\n", 3, "cache.max_size", "not a size"),
        ("cache: {max_size: 1G}\n", 1, "cache", "dir"),
        ("mirror: 12\n", 1, "mirror", "mapping"),
        ("mirror:\n  tls: {cert: /no/c.pem, key: /no/k.pem}\n", 2, "mirror.tls.cert",
         "no such file"),
        ("mirror:\n  parent: ftp://gw:5000\n", 2, "mirror.parent", "http://HOST:PORT"),
        ("mirror:\n  parent: [http://gw:5000/path]\n", 2, "mirror.parent[0]", "no path"),
    ],
)
def test_mirror_errors_name_file_line(tmp_path: Path, text: str, line: int, where: str,
                                      what: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    msg = "\n".join(e.value.problems)
    assert f"rules.yaml:{line}: {where}: " in msg, msg
    assert what in msg
