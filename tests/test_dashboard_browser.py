"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

While two tunnels stream (one through the SOCKS5 upstream, one direct), the page must log in
with the token, list both tunnels with route and registry, draw the throughput chart, answer
the route box for a typed host and an image, close a tunnel from its button, fit a phone-size
screen and log no console error. Screenshots go to tests/artifacts/ (gitignored).

This test fails (never skips) when Chromium or Playwright is missing: CI must install
`apt-get install chromium` and `pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_metrics import (
    DEADLINE_S,
    admin_url,
    connect_tunnel,
    make_config,
    poll,
    running,
    socks_upstream,
    target_server,
)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "dashboard-token"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
EXTRA_RULES = "  - {name: docker-hub, registries: [dockerhub], via: tunnel}\n"


@pytest.fixture(scope="session")
def socks_port() -> Iterator[int]:
    yield from socks_upstream()


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "the dashboard browser test needs Debian's Chromium: apt-get install -y chromium",
            pytrace=False,
        )
    return path


def playwright_api() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "the dashboard browser test needs Playwright for Python: pip install playwright "
            "(the browser comes from apt: chromium; do not run `playwright install`)",
            pytrace=False,
        )
    return async_playwright


def varying_stream(base_pause_s: float, phase: float) -> Any:
    """A 'download' whose rate swings over a few seconds, so the chart has a shape."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not await r.read(1):  # client-first: see test_metrics.stream
            return
        chunk = b"x" * 16384
        start = time.monotonic()
        while not w.is_closing():
            w.write(chunk)
            await w.drain()
            swing = 1.0 + math.sin((time.monotonic() - start) * 1.3 + phase)
            await asyncio.sleep(base_pause_s * (0.3 + swing))

    return handler


async def drain(r: asyncio.StreamReader) -> int:
    got = 0
    while data := await r.read(65536):
        got += len(data)
    return got


@pytest.mark.browser
async def test_dashboard_in_chromium(socks_port: int) -> None:
    executable = chromium_path()
    async_playwright = playwright_api()
    ARTIFACTS.mkdir(exist_ok=True)
    cfg = make_config(socks_port, token=TOKEN, extra_rules=EXTRA_RULES)
    async with (
        running(cfg) as server,
        target_server(varying_stream(0.012, 0.0)) as fast,
        target_server(varying_stream(0.03, 2.0)) as slow,
    ):
        server.admin.sampler.interval_s = 0.25
        tunnelled = await connect_tunnel(server, "localhost", fast)
        direct = await connect_tunnel(server, "blobs.mirror.test", slow)
        readers = []
        for r, w in (tunnelled, direct):
            w.write(b"G")
            readers.append(asyncio.get_running_loop().create_task(drain(r)))
        with pytest.raises(ConnectionRefusedError, match="403"):
            await connect_tunnel(server, "blocked.test", 443)  # one entry for "recent errors"
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
                try:
                    await drive(browser, server, fast, socks_port)
                finally:
                    await browser.close()
            await asyncio.wait_for(readers[1], DEADLINE_S)  # closed from the page
        finally:
            for _, w in (tunnelled, direct):
                w.close()
            await asyncio.wait(readers, timeout=DEADLINE_S)


async def next_poll(page: Any) -> None:
    """Wait until the page has fetched and drawn fresh data once more."""
    polls = int(await page.evaluate("Number(document.body.dataset.polls || 0)"))
    await page.wait_for_function("(n) => Number(document.body.dataset.polls || 0) > n", arg=polls)


async def drive(browser: Any, server: Any, fast_port: int, socks_port: int) -> None:
    problems: list[str] = []
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(DEADLINE_S * 1000)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

    await page.goto(admin_url(server) + "/")
    await page.locator("#login").wait_for(state="visible")
    await page.fill("#token", "wrong")
    await page.click("#login-form button")
    await page.locator("#login-err", has_text="not accepted").wait_for()
    await page.fill("#token", TOKEN)
    await page.click("#login-form button")
    await page.locator("#login").wait_for(state="hidden")

    tunnel_row = page.locator('#conn-rows tr[data-route="tunnel"]')
    await tunnel_row.wait_for()
    assert await tunnel_row.locator("td.target").inner_text() == f"localhost:{fast_port}"
    assert await tunnel_row.locator("td.route").inner_text() == "via tunnel"
    assert await tunnel_row.locator("td.registry").inner_text() == "lab/api"
    direct_row = page.locator('#conn-rows tr[data-route="direct"]')
    assert await direct_row.locator("td.registry").inner_text() == "mirror/blob"
    await page.locator("#errors li", has_text="blocked.test:443").wait_for()
    await page.locator("#ups .member", has_text=f"socks5://127.0.0.1:{socks_port}").wait_for()

    await page.fill("#q", "blobs.mirror.test")
    await page.press("#q", "Enter")
    answer = page.locator('#route-answer[data-route="direct"]')
    await answer.wait_for()
    text = await answer.inner_text()
    assert "mirror-direct" in text
    assert "mirror (blob)" in text

    await page.fill("#q", "registry-1.docker.io")
    await page.click("#q-route")
    await page.locator('#route-answer[data-route="tunnel"]', has_text="docker-hub").wait_for()

    # Let the chart gather a few seconds of both series before the screenshot.
    await poll(lambda: len(server.admin.sampler.history) >= 24, "6 s of samples", 20)
    await page.wait_for_function("() => document.querySelectorAll('#chart polyline').length >= 2")
    legend = await page.locator("#legend").inner_text()
    assert "tunnel · lab" in legend
    assert "direct · mirror" in legend

    await page.fill("#q", "nginx:1.27")
    await page.press("#q", "Enter")  # a tag, not a port: explained as an image
    explained = page.locator("#explain-answer")
    await explained.wait_for()
    assert "\tregistry-1.docker.io\t" in await explained.inner_text()
    assert await explained.locator(".badge.via").count() >= 3

    await next_poll(page)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    await page.set_viewport_size({"width": 390, "height": 844})
    await next_poll(page)  # redrawn for the narrow width
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"page overflows a phone screen: {width}px wide"
    await page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)

    close = direct_row.locator("button.close")
    await close.click()
    await close.locator("text=Sure?").wait_for()
    await close.click()
    await direct_row.wait_for(state="detached")
    assert await page.locator("#conn-rows tr[data-route]").count() == 1

    await context.close()
    assert problems == []
