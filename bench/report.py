"""Markdown report of one benchmark run: tables with ratios to direct and to each peer, targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FWD = "fwdproxy fast/uvloop"  # the configuration the targets are judged on


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _med(x: dict[str, Any] | None, key: str) -> float | None:
    if not x or key not in x or not x[key]:
        return None
    return float(x[key]["median"])


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _spread(x: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    if not x or key not in x or not x[key]:
        return "failed" if x and "failed" in x else "-"
    s = x[key]
    if s.get("n", 1) < 2:
        return _fmt(s["median"], digits)
    return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _targets(loads: dict[str, Any]) -> list[str]:
    return [n for n in loads if n != "direct" and "failed" not in loads[n]]


def bulk_table(loads: dict[str, Any]) -> list[str]:
    direct = _med(loads.get("direct", {}).get("bulk", {}).get("direct"), "mibps")
    fwd = loads.get(FWD, {}).get("bulk", {})
    out = [
        _row(
            "proxy",
            "protocol",
            "MiB/s median (min–max)",
            "x direct",
            "fwdproxy ÷ this",
            "proxy CPU s/GiB",
        ),
        "|---|---|---|---|---|---|",
        f"| direct | - | {_spread(loads.get('direct', {}).get('bulk', {}).get('direct'), 'mibps')} "
        "| 1.00x | - | - |",
    ]
    for name in _targets(loads):
        for proto, r in loads[name].get("bulk", {}).items():
            v = _med(r, "mibps")
            mine = _med(fwd.get(proto), "mibps")
            out.append(
                f"| {name} | {proto} | {_spread(r, 'mibps')} | {_ratio(v, direct)} | "
                f"{_ratio(mine, v) if not name.startswith('fwdproxy') else '-'} | "
                f"{_spread(r, 'cpu_s_per_gib', 2)} |"
            )
    return out


def short_table(loads: dict[str, Any], concs: list[int]) -> list[str]:
    d = loads.get("direct", {}).get("short", {})
    fwd = loads.get(FWD, {}).get("short", {})
    head = "| proxy | protocol | " + " | ".join(
        f"c={c} tunnels/s | c={c} p50/p99 ms | c={c} err" for c in concs
    )
    out = [
        head + " | fwdproxy ÷ this (c=64) | proxy CPU µs/tunnel (c=64) |",
        "|---|---|" + "---|---|---|" * len(concs) + "---|---|",
    ]

    def row(name: str, proto: str, results: dict[str, Any], key_proto: str) -> str:
        cells = []
        for c in concs:
            r = results.get(f"{key_proto}/c{c}")
            if not r or "failed" in r:
                cells += ["failed" if r else "-", "-", "-"]
                continue
            p50, p99 = _med(r, "p50_us"), _med(r, "p99_us")
            lat = f"{_fmt(p50 / 1000, 2)} / {_fmt(p99 / 1000, 2)}" if p50 and p99 else "-"
            cells += [_spread(r, "rate"), lat, str(r.get("errors", "-"))]
        mine = _med(fwd.get(f"{key_proto}/c64"), "rate")
        theirs = _med(results.get(f"{key_proto}/c64"), "rate")
        ratio = _ratio(mine, theirs) if not name.startswith(("fwdproxy", "direct")) else "-"
        cpu = _spread(results.get(f"{key_proto}/c64"), "cpu_us_per_tunnel")
        return f"| {name} | {proto} | " + " | ".join(cells) + f" | {ratio} | {cpu} |"

    out.append(row("direct", "-", d, "direct"))
    for name in _targets(loads):
        for proto in ("connect", "socks5"):
            if any(k.startswith(proto + "/") for k in loads[name].get("short", {})):
                out.append(row(name, proto, loads[name]["short"], proto))
    return out


def http_table(loads: dict[str, Any]) -> list[str]:
    direct = _med(loads.get("direct", {}).get("http", {}).get("c64"), "rate")
    mine = _med(loads.get(FWD, {}).get("http", {}).get("c64"), "rate")
    out = [
        _row(
            "proxy",
            "requests/s median (min–max)",
            "p50 / p99 ms",
            "errors",
            "x direct",
            "fwdproxy ÷ this",
            "proxy CPU µs/request",
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["direct", *_targets(loads)]:
        r = loads.get(name, {}).get("http", {}).get("c64")
        if not r:
            continue
        if "failed" in r:
            out.append(f"| {name} | failed: {r['failed'][:60]} | | | | | |")
            continue
        v = _med(r, "rate")
        p50, p99 = _med(r, "p50_us") or 0, _med(r, "p99_us") or 0
        rel = _ratio(mine, v) if not name.startswith(("fwdproxy", "direct")) else "-"
        out.append(
            f"| {name} | {_spread(r, 'rate')} | {p50 / 1000:.2f} / {p99 / 1000:.2f} | "
            f"{r.get('errors')} | {_ratio(v, direct)} | {rel} | {_spread(r, 'cpu_us_per_tunnel')} |"
        )
    return out


def memory_table(loads: dict[str, Any]) -> list[str]:
    out = [
        _row(
            "proxy",
            "baseline RSS/PSS MiB",
            "tunnels",
            "opened ok",
            "RSS MiB",
            "PSS MiB",
            "KiB/tunnel (RSS)",
            "KiB/tunnel (PSS)",
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in _targets(loads):
        idle = loads[name].get("idle") or {}
        base = idle.get("baseline")
        for st in idle.get("steps", []):
            out.append(
                f"| {name} | {base['rss_kib'] / 1024:.1f} / {base['pss_kib'] / 1024:.1f} | "
                f"{st['tunnels']:,} | {st['ok']:,} | {st['rss_kib'] / 1024:.1f} | "
                f"{st['pss_kib'] / 1024:.1f} | {st['per_tunnel_kib']['rss_kib']:.2f} | "
                f"{st['per_tunnel_kib']['pss_kib']:.2f} |"
            )
        if idle.get("failed"):
            out.append(f"| {name} | failed: {idle['failed']} | | | | | | |")
    return out


def rules_table(rules: dict[str, Any]) -> list[str]:
    if "failed" in rules:
        return [f"rule benchmark failed: {rules['failed']}"]
    out = [
        _row(
            "rules",
            "load+compile s",
            "hit µs (uncached)",
            "miss µs (uncached)",
            "domain / suffix / glob / CIDR hit µs",
            "hit / miss µs (cached)",
        ),
        "|---|---|---|---|---|---|",
    ]
    for n, r in rules.items():
        kinds = " / ".join(
            f"{r[f'hit_{k}_ns'] / 1000:.2f}" for k in ("domain", "suffix", "glob", "cidr")
        )
        out.append(
            f"| {int(n):,} | {r['load_s']} | {r['hit_ns'] / 1000:.2f} | "
            f"{r['miss_ns'] / 1000:.2f} | "
            f"{kinds} | {r['hit_cached_ns'] / 1000:.2f} / {r['miss_cached_ns'] / 1000:.2f} |"
        )
    return out


def cli_lines(cli: dict[str, Any]) -> list[str]:
    r = cli["route_s"]
    base = cli["python_startup_s"]
    out = [
        f"`fwdproxy route registry-1.docker.io` ({cli['config']}): median {r['median']:.3f} s "
        f"(min {r['min']:.3f}, max {r['max']:.3f}, n={r['n']}); bare `python -c pass`: "
        f"{base['median']:.3f} s.",
        "",
        "Largest cumulative imports (µs, `python -X importtime`): "
        + ", ".join(f"{i['module']} {i['us']:,}" for i in cli["imports_cumulative_us"][:8]),
    ]
    return out


def check_targets(data: dict[str, Any]) -> list[str]:
    """Each target of the performance issue, judged on this run's numbers."""
    loads, out = data.get("loads", {}), []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'MET' if ok else ('n/a' if ok is None else 'NOT MET')}: {text}")

    fwd = loads.get(FWD, {})
    direct_bulk = _med(loads.get("direct", {}).get("bulk", {}).get("direct"), "mibps")
    for proto, peers in (
        ("connect", ("tinyproxy", "pproxy")),
        ("socks5", ("dante", "microsocks", "pproxy")),
    ):
        mine = _med(fwd.get("bulk", {}).get(proto), "mibps")
        if mine is None or direct_bulk is None:
            line(None, f"bulk {proto}: not measured")
            continue
        best = max((_med(loads.get(p, {}).get("bulk", {}).get(proto), "mibps") or 0) for p in peers)
        line(
            mine >= 0.75 * direct_bulk,
            f"bulk {proto} {mine:,.0f} MiB/s = {mine / direct_bulk:.2f}x direct (target >= 0.75x)",
        )
        line(
            (mine > best) if best else None,
            f"bulk {proto} above every peer (best peer {best:,.0f} MiB/s; "
            f"fwdproxy {mine / best if best else 0:.2f}x)",
        )
        cpu = _med(fwd.get("bulk", {}).get(proto), "cpu_s_per_gib")
        if cpu is not None:
            line(cpu <= 0.5, f"bulk {proto} proxy CPU {cpu:.2f} s/GiB (target <= 0.5)")
    for proto, peer in (("connect", "tinyproxy"), ("socks5", "microsocks")):
        r = fwd.get("short", {}).get(f"{proto}/c64")
        p = loads.get(peer, {}).get("short", {}).get(f"{proto}/c64")
        pp = loads.get("pproxy", {}).get("short", {}).get(f"{proto}/c64")
        mine, theirs = _med(r, "rate"), _med(p, "rate")
        if mine is None or theirs is None:
            line(None, f"short {proto} c=64 vs {peer}: not measured")
            continue
        line(
            mine >= theirs,
            f"short {proto} c=64: {mine:,.0f}/s vs {peer} {theirs:,.0f}/s ({mine / theirs:.2f}x)",
        )
        ppr = _med(pp, "rate")
        if ppr:
            line(
                mine >= 2 * ppr,
                f"short {proto} c=64 vs pproxy {ppr:,.0f}/s: {mine / ppr:.2f}x (target >= 2x)",
            )
        mp99, tp99 = _med(r, "p99_us"), _med(p, "p99_us")
        if mp99 and tp99:
            line(
                mp99 <= tp99,
                f"short {proto} c=64 p99 {mp99 / 1000:.1f} ms vs {peer} {tp99 / 1000:.1f} ms",
            )
        r512 = fwd.get("short", {}).get(f"{proto}/c512")
        if r512 and "errors" in r512:
            line(r512["errors"] == 0, f"short {proto} c=512: {r512['errors']} dropped")
    steps = fwd.get("idle", {}).get("steps", [])
    if steps:
        last = steps[-1]
        per = last["per_tunnel_kib"]["pss_kib"]
        line(
            per <= 8,
            f"idle memory {per:.2f} KiB/tunnel (PSS) at {last['tunnels']:,} tunnels (target <= 8)",
        )
    rules = data.get("rules", {})
    sizes = sorted((int(k) for k in rules if k.isdigit()), key=int)
    if sizes:
        big, small = rules[str(sizes[-1])], rules[str(sizes[0])]
        worst = max(big["hit_ns"], big["miss_ns"]) / 1000
        line(
            worst <= 2,
            f"rule decision at {sizes[-1]:,} rules: hit {big['hit_ns'] / 1000:.2f} µs, "
            f"miss {big['miss_ns'] / 1000:.2f} µs uncached (target <= 2 µs)",
        )
        growth = max(big["hit_ns"] / small["hit_ns"], big["miss_ns"] / small["miss_ns"])
        line(
            growth <= 1.5,
            f"rule decision growth {sizes[0]} -> {sizes[-1]:,} rules: {growth:.2f}x "
            "(target <= 1.5x)",
        )
        cached = max(big["hit_cached_ns"], big["miss_cached_ns"]) / 1000
        out.append(f"- (cached decision, repeated host, at {sizes[-1]:,} rules: {cached:.2f} µs)")
    cli = data.get("cli")
    if cli:
        m = cli["route_s"]["median"]
        line(m <= 0.25, f"`fwdproxy route` {m:.3f} s wall (target <= 0.25 s)")
    return out


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    s = data["settings"]
    loads = data.get("loads", {})
    lines = [
        f"# fwdproxy benchmark, {m['date']}{' (quick mode)' if data.get('quick') else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; peers: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
        f"Proxy pinned to CPU 0, load generator + origin to CPU 1. {s['reps']} repeats per figure "
        f"(median, with min–max). Bulk: {s['bulk_bytes'] / (1 << 30):g} GiB per tunnel. Short "
        f"tunnels: {s['warmup_s']} s warm-up, {s['window_s']} s window. "
        f"Run took {data.get('elapsed_s')} s.",
    ]
    noise = data.get("noise")
    if noise:
        lines.append(
            f"Other processes on the machine used {noise['foreign_cpu_pct']:.0f}% of one CPU on "
            f"average during the loads (load average {noise['loadavg_start']:.2f} -> "
            f"{noise['loadavg_end']:.2f}); figures from a busy machine are noisier."
        )
    lines += ["", "## Targets", "", *check_targets(data), ""]
    if loads:
        concs = list(s["concurrency"])
        lines += ["## 1. Bulk: one tunnel, download", "", *bulk_table(loads), ""]
        lines += [
            "## 2. Short tunnels: open, tiny HTTP request/response, close",
            "",
            *short_table(loads, concs),
            "",
        ]
        lines += [
            "### Plain HTTP forwarding, c=64, one request per connection",
            "",
            *http_table(loads),
            "",
        ]
        lines += ["## 3. Memory: idle open tunnels", "", *memory_table(loads), ""]
    if data.get("rules"):
        lines += ["## 4. Rule engine: decision time per call", "", *rules_table(data["rules"]), ""]
    if data.get("cli"):
        lines += ["## 5. CLI latency", "", *cli_lines(data["cli"]), ""]
    return "\n".join(lines)


def write_report(data: dict[str, Any], stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    md = render_markdown(data)
    stem.with_suffix(".md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    import sys

    src = Path(sys.argv[1])
    print(render_markdown(json.loads(src.read_text())))
