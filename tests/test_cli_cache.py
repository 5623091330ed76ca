"""`fwdproxy cache ls | tags | du | verify | prune`, `explain` with a cache, and the admin API's
/api/cache endpoints that verify and prune go through while a running proxy owns the store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oci_images import OCI_CONFIG, OCI_LAYER, Image, digest_of, make_image, store_blob

from fwdproxy.admin.app import AdminServer
from fwdproxy.cache import BlobStore
from fwdproxy.cli.cacheview import format_age, media_kind, parse_platform, short_digest
from fwdproxy.cli.main import main
from fwdproxy.config import AdminSpec, parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.proto.digest import Digest
from fwdproxy.proto.manifest import OCI_INDEX, OCI_MANIFEST, Platform
from fwdproxy.server import Server

TOKEN = "cache-admin-token"
DAY = 86400.0
MiB = 1024 * 1024


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Filled:
    """A cache with two images from two registries sharing one layer, and its config file.

    8 blobs: alpine's index, amd64 manifest and config (40 days old), the shared layer (stored
    by both, so used an hour ago), app's index, manifest, config and second layer (read a minute
    ago). docker.io asked for 4 of them, ghcr.io for 5.
    """

    root: Path
    config: Path
    store: BlobStore  # held open: the CLI must work beside the owner
    alpine: Image
    app: Image
    shared: Digest
    old: list[Digest]  # blobs last used 40 days ago (alpine's index, manifest and config)
    total: int


def write_config(
    path: Path, cache_dir: Path | None, *, admin_port: int | None = None, max_size: str = "10MiB"
) -> Path:
    text = "default: direct\n"
    text += (
        "admin: false\n"
        if admin_port is None
        else (f'admin: {{listen: "127.0.0.1:{admin_port}", token: {TOKEN}}}\n')
    )
    if cache_dir is not None:
        text += f"cache: {{dir: {cache_dir}, max_size: {max_size}}}\n"
    path.write_text(text)
    return path


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Filled]:
    now = time.time()
    clock = Clock(now - 40 * DAY)
    root = tmp_path / "cache"
    store = BlobStore(root, 0, clock=clock)
    shared = b"shared base layer " * 3000
    alpine = make_image("alpine", layer_sizes=(50_000, 20_000), shared_layer=shared)
    app = make_image(
        "app", platforms=("linux/amd64",), layer_sizes=(50_000, 300_000), shared_layer=shared
    )
    hub, gh = ("docker.io", "library/alpine"), ("ghcr.io", "org/app")
    amd = alpine.platforms["linux/amd64"]
    old = [
        store_blob(store, alpine.index, OCI_INDEX, hub),
        store_blob(store, amd.manifest, OCI_MANIFEST, hub),
        store_blob(store, amd.config, OCI_CONFIG, hub),
    ]
    store_blob(store, amd.layers[0], OCI_LAYER, hub)  # the shared one
    clock.now = now - 3600
    a = app.platforms["linux/amd64"]
    for data, mt in [
        (app.index, OCI_INDEX),
        (a.manifest, OCI_MANIFEST),
        (a.config, OCI_CONFIG),
        (a.layers[0], OCI_LAYER),
        (a.layers[1], OCI_LAYER),
    ]:
        store_blob(store, data, mt, gh)
    store.put_tag(*hub, "3.20", alpine.digest, OCI_INDEX, now - 300)
    store.put_tag(*gh, "1", app.digest, OCI_INDEX, now - 7200)
    clock.now = now - 60
    with store.open_blob(digest_of(a.layers[1])) as handle:
        assert handle is not None
    config = write_config(tmp_path / "rules.yaml", root)
    yield Filled(root, config, store, alpine, app, digest_of(shared), old, store.usage().bytes)
    store.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- formatting helpers ------------------------------------------------------------------------


def test_media_kind_short_names() -> None:
    assert media_kind(OCI_LAYER) == "layer"
    assert media_kind("application/vnd.docker.image.rootfs.diff.tar.gzip") == "layer"
    assert media_kind("application/vnd.oci.image.layer.v1.tar+zstd") == "layer"
    assert media_kind(OCI_CONFIG) == "config"
    assert media_kind("application/vnd.docker.container.image.v1+json") == "config"
    assert media_kind(OCI_MANIFEST) == "manifest"
    assert media_kind("application/vnd.docker.distribution.manifest.list.v2+json") == "index"
    assert media_kind("application/vnd.in-toto+json") == "vnd.in-toto+json"
    assert media_kind(None) == "?"


def test_format_age_and_short_digest() -> None:
    assert [format_age(s) for s in (0, 59, 60, 3599, 3600, DAY * 3, -5)] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "1h",
        "3d",
        "0s",
    ]
    assert short_digest("sha256:" + "ab" * 32) == "sha256:abababababab"


@given(st.text(max_size=40))
def test_parse_platform_accepts_only_os_arch_variant(text: str) -> None:
    try:
        p = parse_platform(text)
    except ValueError:
        return
    parts = text.strip().lower().split("/")
    assert [p.os, p.architecture, *([p.variant] if p.variant else [])] == parts


@given(
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
    st.one_of(st.just(""), st.from_regex(r"v[0-9]", fullmatch=True)),
)
def test_parse_platform_round_trips(os_: str, arch: str, variant: str) -> None:
    text = "/".join(x for x in (os_, arch, variant) if x)
    assert parse_platform(text) == Platform(os_, arch, variant)
    assert parse_platform(text.upper()) == Platform(os_, arch, variant)


# -- ls / tags / du ----------------------------------------------------------------------------


def test_ls_lists_blobs_beside_the_owner(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "cache", "ls", "-c", str(filled.config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DIGEST", "SIZE", "TYPE", "LAST", "USED", "HITS", "REFS"]
    assert len(lines) == 1 + 8 + 1
    first = lines[1].split()
    assert first[0] == short_digest(digest_of(filled.app.platforms["linux/amd64"].layers[1]))
    assert first[1:4] == ["293.0", "KiB", "layer"] and first[4:7] == ["1m", "ago", "1"]
    shared = next(line for line in lines if short_digest(filled.shared) in line)
    assert shared.endswith("docker.io/library/alpine, ghcr.io/org/app")
    assert lines[-1] == f"8 blob(s), {filled.total / 1024:.1f} KiB"


def test_ls_sort_filter_and_json(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "cache",
        "ls",
        "--cache-dir",
        str(filled.root),
        "--json",
        "--sort",
        "size",
        "--registry",
        "index.docker.io",
    )
    assert code == 0
    body = json.loads(out)
    sizes = [b["size"] for b in body["blobs"]]
    assert sizes == sorted(sizes, reverse=True) and body["count"] == 4
    assert all(any(r.startswith("docker.io/") for r in b["refs"]) for b in body["blobs"])
    assert {b["kind"] for b in body["blobs"]} == {"index", "manifest", "config", "layer"}
    assert body["bytes"] == sum(sizes)
    code, out, _ = run(capsys, "cache", "ls", "--cache-dir", str(filled.root), "--sort", "hits")
    assert out.splitlines()[1].split()[6] == "1"
    code, _, err = run(capsys, "cache", "ls", "--cache-dir", str(filled.root), "--registry", "a_b")
    assert code == 2 and "--registry" in err


def test_tags_lists_cached_answers(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    filled.store.put_tag("quay.io", "x/gone", "1", digest_of(b"never stored"), OCI_MANIFEST)
    code, out, _ = run(capsys, "cache", "tags", "-c", str(filled.config))
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["IMAGE", "DIGEST", "TYPE", "FETCHED", "MANIFEST"]
    assert rows[1] == [
        "docker.io/library/alpine:3.20",
        short_digest(filled.alpine.digest),
        "index",
        "5m",
        "ago",
        "cached",
    ]
    assert rows[2][0] == "ghcr.io/org/app:1" and rows[2][3:5] == ["2h", "ago"]
    assert rows[3][-2:] == ["not", "cached"] and rows[-1] == ["3", "tag(s)"]
    code, out2, _ = run(capsys, "cache", "ls", "--tags", "-c", str(filled.config))
    assert out2 == out
    code, out, _ = run(capsys, "cache", "tags", "-c", str(filled.config), "--json")
    tags = json.loads(out)["tags"]
    assert [t["manifest_cached"] for t in tags] == [True, True, False]


def test_du_counts_a_shared_blob_once_and_under_both(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "cache", "du", "-c", str(filled.config), "--json")
    body = json.loads(out)
    shared = len(b"shared base layer " * 3000)
    hub, gh = body["registries"]["docker.io"], body["registries"]["ghcr.io"]
    assert body["count"] == 8 and body["bytes"] == filled.total
    assert (hub["count"], gh["count"]) == (4, 5)  # the shared layer is under both
    assert hub["bytes"] + gh["bytes"] == filled.total + shared
    assert body["max_size"] == 10 * MiB
    assert body["percent_full"] == round(100 * filled.total / (10 * MiB), 1)
    code, out, _ = run(capsys, "cache", "du", "-c", str(filled.config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"cache:  {filled.root}"
    assert lines[1].startswith("blobs:  8, ") and "of 10.0 MiB max_size (" in lines[1]
    assert lines[2] == "tags:   2"
    assert lines[4].split()[0] == "ghcr.io" and lines[5].split()[0] == "docker.io"
    assert "counts them once" in lines[-1]


def test_du_max_size_unknown_for_another_dir(
    filled: Filled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_config(tmp_path / "other.yaml", tmp_path / "elsewhere")
    code, out, _ = run(capsys, "cache", "du", "-c", str(other), "--cache-dir", str(filled.root))
    assert code == 0 and "max_size unknown: the config's cache.dir is " in out


def test_no_cache_dir_names_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "rules.yaml", None)
    code, _, err = run(capsys, "cache", "ls", "-c", str(cfg))
    assert code == 2
    assert "--cache-dir DIR" in err and "cache: {dir: DIR}" in err and str(cfg) in err
    code, _, err = run(capsys, "cache", "du", "--cache-dir", str(tmp_path / "none"))
    assert code == 1 and "no cache here" in err
    assert not (tmp_path / "none").exists()
    code, _, err = run(capsys, "cache", "verify", "--cache-dir", str(tmp_path / "none"))
    assert code == 1 and "no cache here" in err
    assert not (tmp_path / "none").exists()


def test_cache_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cache")
    assert code == 2 and "verify" in err and "warm" in err


# -- verify / prune with the lock ------------------------------------------------------------------


def test_verify_quarantines_and_exits_1(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    bad = digest_of(filled.app.platforms["linux/amd64"].layers[1])
    path = filled.store.path_of(bad)
    filled.store.close()  # the proxy is stopped
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "cache", "verify", "-c", str(filled.config))
    assert code == 1
    assert f"BAD      {bad}  moved to {filled.root / 'quarantine' / ('sha256-' + bad.hex)}" in err
    assert (filled.root / "quarantine" / f"sha256-{bad.hex}").is_file()
    assert out.startswith("verified 8 blob(s), ") and out.rstrip().endswith("1 bad, 0 missing")
    code, out, err = run(capsys, "cache", "verify", "-c", str(filled.config))
    assert code == 0 and out.startswith("verified 7 blob(s)") and "all good" in out
    code, out, err = run(capsys, "cache", "verify", "-c", str(filled.config), "--quiet")
    assert (code, out, err) == (0, "", "")


def test_verify_and_prune_refuse_a_locked_store_without_admin(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    for cmd in ("verify", "prune"):
        code, _, err = run(capsys, "cache", cmd, "-c", str(filled.config))
        assert code == 1
        assert f"in use by pid {os.getpid()} (" in err
        assert f"fwdproxy cache {cmd} --via-admin" in err and f"/api/cache/{cmd}" in err
    assert filled.store.usage().count == 8


def test_prune_dry_run_works_beside_the_owner(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    filled.store.put_tag("quay.io", "o/old", "1", filled.old[0], OCI_INDEX, time.time() - 31 * DAY)
    code, out, _ = run(capsys, "cache", "prune", "-c", str(filled.config), "--dry-run")
    assert code == 0
    lines = out.splitlines()
    assert {line.split()[2] for line in lines[:3]} == {short_digest(d) for d in filled.old}
    assert all(line.endswith("last used 40d ago") for line in lines[:3])
    assert lines[3].split() == [
        "would",
        "forget",
        "quay.io/o/old:1",
        "tag",
        "fetched",
        "31d",
        "ago",
    ]
    assert lines[-1].startswith(
        "dry run: would prune 3 of 8 blob(s) (blobs unused for 30d), freeing "
    )
    assert "forget 1 tag(s)" in lines[-1]
    assert filled.store.get_tag("quay.io", "o/old", "1") is not None
    assert filled.store.usage().count == 8


def test_prune_by_age_then_all(filled: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    old_bytes = sum(filled.store.path_of(d).stat().st_size for d in filled.old)
    filled.store.close()
    code, out, _ = run(capsys, "cache", "prune", "-c", str(filled.config), "--older-than", "7d")
    assert code == 0
    with BlobStore(filled.root, 0) as s:
        left = s.list()
    assert len(left) == 5 and not {r.digest for r in left} & set(filled.old)
    left_kib = (filled.total - old_bytes) / 1024
    assert out == (
        f"pruned 3 blob(s) (blobs unused for 7d), freed {old_bytes / 1024:.1f} KiB, "
        "forgot 0 tag(s); "
        f"5 blob(s), {left_kib:.1f} KiB left\n"
    )
    code, out, _ = run(capsys, "cache", "prune", "-c", str(filled.config), "--all")
    assert code == 0 and out.startswith("pruned 5 blob(s) (every unpinned blob)")
    assert "forgot 2 tag(s)" in out
    assert out.rstrip().endswith("0 blob(s), 0 B left")
    code, _, err = run(capsys, "cache", "prune", "-c", str(filled.config), "--older-than", "x")
    assert code == 2 and "--older-than" in err


# -- explain with the cache --------------------------------------------------------------------


def test_explain_says_which_blobs_are_cached(
    filled: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "explain", "alpine:3.20", "-c", str(filled.config), "--platform", "linux/amd64"
    )
    assert code == 0
    section = out[out.index("cache:    ") :].splitlines()
    amd = filled.alpine.platforms["linux/amd64"]
    assert section[0] == f"cache:    {filled.root} (platform linux/amd64)"
    assert section[1].startswith(f"  tag:      3.20 -> {filled.alpine.digest} (index, fetched 5m")
    assert section[2] == f"  platform: linux/amd64 -> {amd.digest}"
    config = ["config", short_digest(digest_of(amd.config)), str(len(amd.config)), "B", "cached"]
    assert section[3].split() == config
    assert section[4].split()[-1] == "cached" and section[5].split()[-1] == "-"
    assert section[6] == "  1 of 2 layers cached (52.7 KiB of 72.3 KiB); config cached"

    code, out, _ = run(
        capsys,
        "explain",
        "alpine:3.20",
        "--cache-dir",
        str(filled.root),
        "--platform",
        "linux/arm64",
        "--json",
    )
    cache = json.loads(out)["cache"]
    assert (
        cache["problem"] == f"manifest {filled.alpine.platforms['linux/arm64'].digest} not cached"
    )
    assert cache["digest"] == str(filled.alpine.digest) and cache["blobs"] == []

    code, out, _ = run(capsys, "explain", "nginx", "-c", str(filled.config))
    assert "  tag not cached (never pulled through the mirror, or pruned)" in out
    code, _, err = run(capsys, "explain", "nginx", "-c", str(filled.config), "--platform", "x")
    assert code == 2 and "--platform" in err


def test_explain_without_a_cache_is_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "rules.yaml", None)
    code, out, _ = run(capsys, "explain", "alpine", "-c", str(cfg))
    assert code == 0 and "cache:" not in out
    code, out, _ = run(capsys, "explain", "alpine", "-c", str(cfg), "--json")
    assert json.loads(out)["cache"] is None
    code, out, _ = run(
        capsys, "explain", "alpine", "-c", str(cfg), "--cache-dir", str(tmp_path / "none")
    )
    assert code == 0 and "cache:    not readable: " in out


# -- the admin API, and the CLI through it -------------------------------------------------------


@asynccontextmanager
async def proxy_with_admin(store: BlobStore | None) -> AsyncIterator[tuple[Server, str]]:
    cfg = parse_config(load_yaml("listen: 127.0.0.1:0\ndefault: direct\n"), "t.yaml")
    cfg = dataclasses.replace(cfg, admin=AdminSpec("127.0.0.1", 0, TOKEN))
    server = Server(cfg, admin_factory=AdminServer)
    server.store = store
    await server.start()
    try:
        assert server.admin is not None
        host, port = server.admin.addresses[0]
        yield server, f"http://{host}:{port}"
    finally:
        await server.stop(grace_s=0.5)


async def call(base: str, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, base + path, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_admin_cache_endpoints(filled: Filled) -> None:
    async with proxy_with_admin(None) as (_, base):
        status, body = await call(base, "GET", "/api/cache")
        assert status == 404 and "no layer cache is configured" in body["error"]
        status, body = await call(base, "POST", "/api/cache/verify")
        assert status == 404
    async with proxy_with_admin(filled.store) as (_, base):
        status, _ = await call(base, "GET", "/api/cache", token=None)
        assert status == 401
        status, _ = await call(base, "POST", "/api/cache/prune", token=None)
        assert status == 401
        status, body = await call(base, "GET", "/api/cache")
        assert status == 200
        assert body["dir"] == str(filled.root) and body["count"] == 8 and body["tags"] == 2
        assert body["bytes"] == filled.total and body["registries"]["ghcr.io"]["count"] == 5
        assert body["max_size"] is None and body["percent_full"] is None
        bad = digest_of(filled.app.platforms["linux/amd64"].config)
        path = filled.store.path_of(bad)
        path.write_bytes(b"x" * path.stat().st_size)
        status, body = await call(base, "POST", "/api/cache/verify")
        assert status == 200 and body["ok"] is False and body["bad"] == [str(bad)]
        assert body["checked"] == 8 and body["quarantine"] == str(filled.root / "quarantine")
        status, body = await call(base, "POST", "/api/cache/prune?older_than=soon")
        assert status == 400 and "older_than" in body["error"]
        status, body = await call(base, "POST", "/api/cache/prune?older_than=7d&all=1")
        assert status == 400
        status, body = await call(base, "POST", "/api/cache/prune?older_than=7d")
        assert status == 200 and body["count"] == 3
        assert sorted(body["pruned"]) == sorted(str(d) for d in filled.old)
        assert body["tags_forgotten"] == 0
        assert body["remaining"]["count"] == 4 and body["older_than_s"] == 7 * DAY


async def test_cli_verify_and_prune_go_through_the_admin_api(
    filled: Filled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with proxy_with_admin(filled.store) as (server, base):
        port = int(base.rsplit(":", 1)[1])
        cfg = write_config(tmp_path / "admin.yaml", filled.root, admin_port=port)
        code = await asyncio.to_thread(main, ["cache", "verify", "-c", str(cfg)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"in use by pid {os.getpid()}" in err and f"admin API at {base}" in err
        assert out.startswith("verified 8 blob(s), ") and "all good" in out
        argv = ["cache", "prune", "-c", str(cfg), "--older-than", "7d"]
        code = await asyncio.to_thread(main, argv)
        out, err = capsys.readouterr()
        assert code == 0 and out.startswith("pruned 3 blob(s) (blobs unused for 7d)")
        assert filled.store.usage().count == 5
        # Another directory than the proxy's: refused, nothing done.
        other = tmp_path / "other"
        with BlobStore(other, 0) as elsewhere:
            store_blob(elsewhere, b"keep me", OCI_LAYER)
            cfg2 = write_config(tmp_path / "other.yaml", other, admin_port=port)
            code = await asyncio.to_thread(main, ["cache", "prune", "--all", "-c", str(cfg2)])
            out, err = capsys.readouterr()
            assert code == 1 and f"caches in {filled.root}, not in {other}" in err
            assert elsewhere.usage().count == 1
        # A wrong token is a clear error, not a traceback.
        cfg.write_text(cfg.read_text().replace(TOKEN, "wrong"))
        code = await asyncio.to_thread(main, ["cache", "verify", "-c", str(cfg), "--via-admin"])
        out, err = capsys.readouterr()
        assert code == 1 and "401" in err and "admin.token" in err
        assert server.store is filled.store
