"""`fwdproxy cache warm` against a fake mirror (aiohttp on 127.0.0.1:0), and the progress helper.

The fake serves real OCI images (real sha256 digests): an index, its platform manifests, and
their blobs, answering unknown names with the OCI error body a real mirror sends. Individual
blobs or manifests can be served corrupted, to check that warm verifies what it reads.
"""

from __future__ import annotations

import asyncio
import io
import json
import platform
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from oci_images import Image, digest_of, make_image

from fwdproxy.cli.main import main
from fwdproxy.cli.progress import Progress, format_duration, format_progress
from fwdproxy.cli.warm import ALL_PLATFORMS, WarmReport, host_platform, warm
from fwdproxy.proto.manifest import DOCKER_MANIFEST, OCI_INDEX, Platform
from fwdproxy.proto.oci import OCIError, error_body

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")


@dataclass
class FakeMirror:
    """Images by (ns, repo, tag); every blob and manifest by digest, whatever repo asks."""

    tags: dict[tuple[str, str, str], Image] = field(default_factory=dict)
    content: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    url: str = ""

    def add(self, ns: str, repo: str, tag: str, image: Image) -> None:
        self.tags[(ns, repo, tag)] = image
        self.content.update(image.blobs)

    def blob_gets(self) -> Counter[str]:
        return Counter(path.rsplit("/", 1)[1] for path, _, _ in self.requests if "/blobs/" in path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self.manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        return app

    def _log(self, request: web.Request) -> None:
        accept = request.headers.get("Accept")
        self.requests.append((request.path, request.query.get("ns"), accept))

    def _body(self, key: str) -> bytes:
        data = self.content[key][0]
        if key in self.corrupt:
            data = bytes([data[0] ^ 0x20]) + data[1:]  # same size, wrong bytes
        return data

    async def manifest(self, request: web.Request) -> web.Response:
        self._log(request)
        ns, name, ref = (
            request.query.get("ns", ""),
            request.match_info["name"],
            request.match_info["ref"],
        )
        if ":" in ref:
            key = ref
        elif (ns, name, ref) in self.tags:
            key = str(self.tags[(ns, name, ref)].digest)
        else:
            return oci_error(OCIError("MANIFEST_UNKNOWN", f"manifest unknown: {ns}/{name}:{ref}"))
        if key not in self.content:
            return oci_error(OCIError("MANIFEST_UNKNOWN", f"manifest unknown: {key}"))
        return web.Response(
            body=self._body(key),
            content_type=self.content[key][1],
            headers={"Docker-Content-Digest": key},
        )

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        key = request.match_info["digest"]
        if key not in self.content:
            return oci_error(OCIError("BLOB_UNKNOWN", f"blob unknown: {key}"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        data = self._body(key)
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 7000):  # several chunks, as a streaming mirror sends
            await resp.write(data[i : i + 7000])
        await resp.write_eof()
        return resp


def oci_error(err: OCIError) -> web.Response:
    return web.Response(body=error_body(err), status=err.status, content_type="application/json")


@asynccontextmanager
async def serving(mirror: FakeMirror) -> AsyncIterator[FakeMirror]:
    runner = web.AppRunner(mirror.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        mirror.url = f"http://{host}:{port}"
        yield mirror
    finally:
        await runner.cleanup()


@pytest.fixture
async def mirror() -> AsyncIterator[FakeMirror]:
    m = FakeMirror()
    shared = b"a base layer two images share " * 700
    m.add("docker.io", "library/alpine", "3.20", make_image("alpine", shared_layer=shared))
    m.add(
        "ghcr.io",
        "org/app",
        "1",
        make_image("app", layer_sizes=(9000, 40_000, 123), shared_layer=shared),
    )
    async with serving(m) as running:
        yield running


def image(m: FakeMirror, ns: str, repo: str, tag: str) -> Image:
    return m.tags[(ns, repo, tag)]


class Recorder:
    """A ProgressSink that remembers what it was told."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.first_total_at_done: int | None = None

    def add_total(self, n: int) -> None:
        self.total += n

    def advance(self, n: int) -> None:
        if self.first_total_at_done is None:
            self.first_total_at_done = self.total
        self.done += n


# -- the core ----------------------------------------------------------------------------------


async def test_warm_pulls_the_platform_manifest_and_its_blobs(mirror: FakeMirror) -> None:
    rec = Recorder()
    report = await warm(mirror.url, ["alpine:3.20"], [AMD64], rec)
    img = image(mirror, "docker.io", "library/alpine", "3.20")
    amd = img.platforms["linux/amd64"]
    assert report.ok, report.images[0].errors
    (r,) = report.images
    assert (r.reference, r.digest, r.platforms) == (
        "docker.io/library/alpine:3.20",
        str(img.digest),
        ["linux/amd64"],
    )
    assert (r.blobs, r.bytes) == (3, sum(len(b) for b in amd.blobs))
    assert (report.manifests, report.blobs, report.bytes) == (2, 3, r.bytes)
    assert mirror.blob_gets() == Counter(str(digest_of(b)) for b in amd.blobs)
    # The request shape a mirror expects: repository path, ns=, an Accept of manifest types.
    path, ns, accept = mirror.requests[0]
    assert (path, ns) == ("/v2/library/alpine/manifests/3.20", "docker.io")
    assert accept is not None and OCI_INDEX in accept and DOCKER_MANIFEST in accept
    assert mirror.requests[1][0] == f"/v2/library/alpine/manifests/{amd.digest}"
    assert all(ns == "docker.io" for _, ns, _ in mirror.requests)
    # Progress knew the whole total before the first byte and ended there.
    assert rec.first_total_at_done == rec.total == rec.done == r.bytes


async def test_warm_fetches_each_blob_once_across_images(mirror: FakeMirror) -> None:
    images = ["alpine:3.20", "ghcr.io/org/app:1", "docker.io/library/alpine:3.20"]
    report = await warm(mirror.url, images, [AMD64, ARM64])
    assert report.ok, [r.errors for r in report.images]
    gets = mirror.blob_gets()
    assert set(gets.values()) == {1}, gets
    alpine = image(mirror, "docker.io", "library/alpine", "3.20")
    app = image(mirror, "ghcr.io", "org/app", "1")
    unique = {
        str(digest_of(b)): len(b)
        for img in (alpine, app)
        for plat in img.platforms.values()
        for b in plat.blobs
    }
    assert set(gets) == set(unique)
    assert (report.blobs, report.bytes) == (len(unique), sum(unique.values()))
    assert report.images[0].platforms == ["linux/amd64", "linux/arm64"]
    assert report.images[1].blobs == 2 * 4 - 1  # the shared layer is in both platforms
    assert any(ns == "ghcr.io" for _, ns, _ in mirror.requests)


async def test_warm_host_platform_by_default(
    mirror: FakeMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert host_platform() == ARM64
    report = await warm(mirror.url, ["alpine:3.20"])
    assert report.images[0].platforms == ["linux/arm64"]
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert host_platform() == AMD64
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert host_platform() == Platform("linux", "arm", "v7")


async def test_warm_all_platforms_and_a_missing_one(mirror: FakeMirror) -> None:
    report = await warm(mirror.url, ["alpine:3.20"], ALL_PLATFORMS)
    assert report.ok and report.images[0].platforms == ["linux/amd64", "linux/arm64"]
    report = await warm(mirror.url, ["alpine:3.20"], [Platform("linux", "s390x"), AMD64])
    (r,) = report.images
    assert not r.ok and r.platforms == ["linux/amd64"]  # what exists was still warmed
    assert r.errors == ["no linux/s390x image in the index (has: linux/amd64, linux/arm64)"]


async def test_warm_by_digest_of_a_single_manifest(mirror: FakeMirror) -> None:
    arm = image(mirror, "ghcr.io", "org/app", "1").platforms["linux/arm64"]
    report = await warm(mirror.url, [f"ghcr.io/org/app@{arm.digest}"], [AMD64])
    (r,) = report.images
    assert r.ok and r.digest == str(arm.digest) and r.platforms == []  # not an index
    assert r.blobs == 4 and report.blobs == 4
    assert mirror.requests[0][0] == f"/v2/org/app/manifests/{arm.digest}"


async def test_warm_reports_a_corrupt_blob(mirror: FakeMirror) -> None:
    amd = image(mirror, "docker.io", "library/alpine", "3.20").platforms["linux/amd64"]
    bad = str(digest_of(amd.layers[1]))
    mirror.corrupt.add(bad)
    rec = Recorder()
    report = await warm(mirror.url, ["alpine:3.20", "ghcr.io/org/app:1"], [AMD64], rec)
    alpine, app = report.images
    assert app.ok  # its blobs are fine, including the shared layer
    assert not alpine.ok and not report.ok
    (err,) = alpine.errors
    assert err.startswith(f"blob sha256:{bad[7:19]}: content hashes to sha256:")
    assert err.endswith("..., not to its digest (the mirror served corrupt bytes)")
    assert report.blobs == len(mirror.blob_gets()) - 1
    assert rec.done == rec.total  # the bad blob's bytes came in full


async def test_warm_reports_a_corrupt_manifest(mirror: FakeMirror) -> None:
    amd = image(mirror, "docker.io", "library/alpine", "3.20").platforms["linux/amd64"]
    mirror.corrupt.add(str(amd.digest))
    report = await warm(mirror.url, ["alpine:3.20"], [AMD64])
    (err,) = report.images[0].errors
    assert err.startswith(f"linux/amd64: manifest {amd.digest} hashes to sha256:")
    assert err.endswith("not the reference")
    assert mirror.blob_gets() == Counter()


async def test_warm_shows_the_mirrors_error_message(mirror: FakeMirror) -> None:
    report = await warm(mirror.url, ["nope:1", "alpine:3.20"], [AMD64])
    nope, alpine = report.images
    assert nope.errors == [
        "mirror answered 404 Not Found: MANIFEST_UNKNOWN: manifest unknown: "
        "docker.io/library/nope:1"
    ]
    assert alpine.ok


async def test_warm_reports_an_unreachable_mirror() -> None:
    async with serving(FakeMirror()) as gone:
        url = gone.url
    report = await warm(url, ["alpine"], [AMD64])
    (err,) = report.images[0].errors
    assert err.startswith(f"cannot talk to the mirror at {url}: ")


async def test_warm_rejects_a_bad_reference_without_asking(mirror: FakeMirror) -> None:
    report = await warm(mirror.url, ["library/Alpine"], [AMD64])
    assert not report.ok and "repository" in report.images[0].errors[0]
    assert mirror.requests == []


# -- the command -------------------------------------------------------------------------------


async def cli(*argv: str) -> int:
    """main() in a thread: it runs its own event loop while ours serves the fake mirror."""
    return await asyncio.to_thread(main, list(argv))


async def test_cli_warm_ok_summary_and_json(
    mirror: FakeMirror, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await cli(
        "cache",
        "warm",
        "alpine:3.20",
        "ghcr.io/org/app:1",
        "--mirror",
        mirror.url,
        "--platform",
        "linux/amd64",
        "-q",
    )
    out, err = capsys.readouterr()
    assert code == 0, out + err
    lines = out.splitlines()
    alpine = image(mirror, "docker.io", "library/alpine", "3.20")
    assert lines[0].split()[:4] == [
        "ok",
        "docker.io/library/alpine:3.20",
        f"sha256:{alpine.digest.hex[:12]}",
        "linux/amd64",
    ]
    assert lines[1].split()[:2] == ["ok", "ghcr.io/org/app:1"]
    assert lines[2].startswith("warmed 2 of 2 image(s): 6 blob(s), ")
    code = await cli(
        "cache", "warm", "alpine:3.20", "--mirror", mirror.url, "--json", "--all-platforms", "-q"
    )
    body = json.loads(capsys.readouterr().out)
    assert (
        code == 0
        and body["ok"]
        and body["images"][0]["platforms"]
        == [
            "linux/amd64",
            "linux/arm64",
        ]
    )


async def test_cli_warm_failure_exits_1_with_the_reason(
    mirror: FakeMirror, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    amd = image(mirror, "docker.io", "library/alpine", "3.20").platforms["linux/amd64"]
    mirror.corrupt.add(str(digest_of(amd.config)))
    port = mirror.url.rsplit(":", 1)[1]
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(f"default: direct\nadmin: false\nmirror: {{listen: '0.0.0.0:{port}'}}\n")
    code = await cli(
        "cache", "warm", "alpine:3.20", "nope", "-c", str(cfg), "--platform", "linux/amd64"
    )
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("FAILED  docker.io/library/alpine:3.20")
    config = digest_of(amd.config)
    assert lines[1].startswith(f"        error: blob sha256:{config.hex[:12]}: content hashes to ")
    assert "(the mirror served corrupt bytes)" in lines[1]
    assert lines[2] == "FAILED  docker.io/library/nope:latest"
    assert lines[3] == (
        "        error: mirror answered 404 Not Found: MANIFEST_UNKNOWN: manifest unknown: "
        "docker.io/library/nope:latest"
    )
    assert lines[4].startswith("warmed 0 of 2 image(s): 2 blob(s), ")
    assert lines[4].endswith("; 2 failed")
    assert "warm:" not in out and "%" not in out  # progress goes to stderr only


async def test_cli_warm_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "rules.yaml"
    cfg.write_text("default: direct\nadmin: false\n")
    assert await cli("cache", "warm", "alpine", "-c", str(cfg)) == 2
    assert "--mirror URL, or set mirror:" in capsys.readouterr().err
    assert await cli("cache", "warm", "Bad/Name", "--mirror", "http://127.0.0.1:1") == 2
    assert "Bad/Name" in capsys.readouterr().err
    assert await cli("cache", "warm", "a", "--mirror", "x:1", "--platform", "linux") == 2
    assert "--platform" in capsys.readouterr().err
    argv = ["cache", "warm", "a", "--mirror", "x:1", "--platform", "linux/amd64", "--all-platforms"]
    assert await cli(*argv) == 2


def test_warm_report_summary() -> None:
    report = WarmReport([], blobs=3, bytes=3 * 1024 * 1024, seconds=2.0)
    assert report.summary() == "warmed 0 of 0 image(s): 3 blob(s), 3.0 MiB in 2.0s, 1.5 MiB/s"


# -- progress ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_progress_plain_and_bar() -> None:
    mib = 1024 * 1024
    assert format_progress(0, 0, 0.0) == "0 B / 0 B  100%"
    assert format_progress(10 * mib, 40 * mib, 5.0, label="warm") == (
        "warm: 10.0 MiB / 40.0 MiB   25%  2.0 MiB/s  ETA 15s"
    )
    line = format_progress(10 * mib, 40 * mib, 5.0, label="warm", width=80)
    assert len(line) == 79 and line.startswith("warm [") and "]  10.0 MiB / 40.0 MiB" in line
    bar = line[line.index("[") + 1 : line.index("]")]
    assert bar.count("#") == len(bar) // 4
    assert len(format_progress(1, 2, 1.0, label="x" * 100, width=40)) == 39  # cut, never wrapped
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 * 2 + 420)] == [
        "0s",
        "59s",
        "1m01s",
        "2h07m",
    ]


def test_progress_plain_lines_are_periodic() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = Progress(1000, "verify", stream=out, tty=False, interval_s=10, clock=clock)
    for _ in range(30):
        clock.now += 1
        p.advance(10)
    p.add_total(-100)
    p.close()
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 10 s, 20 s, 30 s and the final line
    assert lines[0] == "verify: 100 B / 1000 B   10%  10 B/s  ETA 1m30s"
    assert lines[-1].startswith("verify: 300 B / 900 B   33%")


def test_progress_short_plain_run_leaves_the_log_alone() -> None:
    out, clock = io.StringIO(), FakeClock()
    with Progress(10, "warm", stream=out, tty=False, clock=clock) as p:
        p.advance(10)
    assert out.getvalue() == ""


def test_progress_tty_redraws_in_place_and_notes_above() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = Progress(100, "warm", stream=out, tty=True, clock=clock)
    clock.now += 1
    p.advance(50)
    p.note("error: something")
    p.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 4  # draw, clear for the note, redraw, final
    assert "\r\x1b[Kerror: something\n" in text and text.endswith("\n")
    assert "50 B / 100 B" in text
