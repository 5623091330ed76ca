"""Markdown report of one benchmark run: targets, then every figure side by side.

python bench/report.py bench/results/STEM.json     # re-render the markdown of a run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINYPROXY, MICROSOCKS, SQUID = "tinyproxy", "microsocks", "squid"
PPROXY = "pproxy+uvloop"  # pproxy on uvloop (bench/peers/pproxy_uvloop.py)
IDLE_AT = 10_000  # the idle-memory target is judged with this many tunnels open


def fwd_name(data: dict[str, Any]) -> str:
    """The fwdproxy configuration the targets are judged on (run.judged_variant)."""
    variants = list(data.get("settings", {}).get("variants") or ["uvloop"])
    if "uvloop" in variants:
        return "fwdproxy uvloop"
    return f"fwdproxy {next((v for v in variants if v.startswith('uvloop')), variants[0])}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _sep(n: int) -> str:
    return "|" + "---|" * n


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


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _measured(loads: dict[str, Any]) -> list[str]:
    return [
        n
        for n in loads
        if n != "direct" and "failed" not in loads[n] and "not_installed" not in loads[n]
    ]


# -- targets --------------------------------------------------------------------------------


def _judge_min(ratio: float, want: float) -> tuple[bool, str]:
    """A ratio that must be at least `want`."""
    if ratio >= want:
        return True, f"{100 * (ratio / want - 1):.0f}% to spare"
    return False, f"by {100 * (1 - ratio / want):.0f}% (needs {want / ratio:.2f}x this)"


def _judge_max(value: float, limit: float) -> tuple[bool, str]:
    """A value that must be at most `limit`."""
    if value <= limit:
        return True, f"{100 * (1 - value / limit):.0f}% under"
    return False, f"by {100 * (value / limit - 1):.0f}% (needs {limit / value:.2f}x this)"


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, its requirement, the measured figure and whether it is met."""
    loads = data.get("loads", {})
    fwd = loads.get(fwd_name(data), {})
    out: list[dict[str, Any]] = []

    def peer(name: str) -> dict[str, Any]:
        return loads.get(name, {})

    def why_missing(name: str) -> str:
        r = loads.get(name)
        if r is None:
            return f"{name} not run"
        if r.get("not_installed"):
            return f"{name} not installed"
        if "failed" in r:
            return f"{name} failed"
        return f"{name}: not measured"

    def rate(r: dict[str, Any], section: str, key: str) -> float | None:
        return _med(r.get(section, {}).get(key), "rate")

    def ratio_target(
        label: str, want: float, mine: float | None, other: str, theirs: float | None, unit: str
    ) -> None:
        row = {"target": label, "required": f">= {want:g}x"}
        if theirs is None and loads.get(other, {}).get("not_installed"):
            row.update(measured="-", met=None, result=f"n/a ({other} not installed)")
        elif mine is None:
            row.update(measured="-", met=None, result=f"n/a ({fwd_name(data)}: not measured)")
        elif theirs is None:
            row.update(measured="-", met=None, result=f"n/a ({why_missing(other)})")
        else:
            r = mine / theirs
            met, text = _judge_min(r, want)
            row.update(
                measured=f"{r:.2f}x ({mine:,.0f} vs {theirs:,.0f} {unit})", met=met, result=text
            )
        out.append(row)

    for proto, label, peer_name in (
        ("connect", "CONNECT", TINYPROXY),
        ("socks5", "SOCKS5", MICROSOCKS),
    ):
        key = f"{proto}/c64"
        ratio_target(
            f"{label} c=64 tunnels/s vs {peer_name}",
            0.75,
            rate(fwd, "short", key),
            peer_name,
            rate(peer(peer_name), "short", key),
            "/s",
        )
    for proto, label in (("connect", "CONNECT"), ("socks5", "SOCKS5")):
        key = f"{proto}/c64"
        ratio_target(
            f"{label} c=64 tunnels/s vs {PPROXY}",
            2.0,
            rate(fwd, "short", key),
            PPROXY,
            rate(peer(PPROXY), "short", key),
            "/s",
        )
    # p99 latency at c=64, CONNECT (tinyproxy speaks no SOCKS5)
    mine = _med(fwd.get("short", {}).get("connect/c64"), "p99_us")
    theirs = _med(peer(TINYPROXY).get("short", {}).get("connect/c64"), "p99_us")
    row: dict[str, Any] = {"target": "CONNECT c=64 p99 latency vs tinyproxy", "required": "<= 1x"}
    if mine is None or theirs is None:
        why = why_missing(TINYPROXY) if mine is not None else f"{fwd_name(data)}: not measured"
        row.update(measured="-", met=None, result=f"n/a ({why})")
    else:
        met, text = _judge_max(mine / theirs, 1.0)
        row.update(
            measured=f"{mine / theirs:.2f}x ({mine / 1000:.1f} vs {theirs / 1000:.1f} ms)",
            met=met,
            result=text,
        )
    out.append(row)
    for other, want in ((PPROXY, 1.5), (SQUID, 0.75)):
        ratio_target(
            f"plain HTTP c=64 requests/s vs {other}",
            want,
            rate(fwd, "http", "c64"),
            other,
            rate(peer(other), "http", "c64"),
            "/s",
        )
    # idle memory
    idle = fwd.get("idle") or {}
    steps = idle.get("steps") or []
    row = {"target": f"PSS per idle tunnel, {IDLE_AT:,} open", "required": "<= 8 KiB"}
    if not steps:
        row.update(measured="-", met=None, result=f"n/a ({fwd_name(data)}: not measured)")
    else:
        last = steps[-1]
        per = last["per_tunnel_kib"]["pss_kib"]
        met, text = _judge_max(per, 8.0)
        measured = f"{per:.2f} KiB"
        if last["tunnels"] != IDLE_AT or last["ok"] < last["tunnels"]:
            measured += f" ({last['ok']:,} of {last['tunnels']:,} open)"
            if last["tunnels"] < IDLE_AT:
                text += f"; measured at {last['tunnels']:,}, not {IDLE_AT:,}"
        row.update(measured=measured, met=met, result=text)
    out.append(row)
    direct = _med(loads.get("direct", {}).get("bulk", {}).get("direct"), "mibps")
    for proto, label in (("connect", "CONNECT"), ("socks5", "SOCKS5")):
        ratio_target(
            f"bulk {label} MiB/s vs direct",
            0.8,
            _med(fwd.get("bulk", {}).get(proto), "mibps"),
            "direct",
            direct,
            "MiB/s",
        )
    return out


def targets_table(data: dict[str, Any]) -> list[str]:
    out = [_row("target", "required", "measured", "result"), _sep(4)]
    for t in targets(data):
        if t["met"] is None:
            result = t["result"]
        elif t["met"]:
            result = f"**met**, {t['result']}"
        else:
            result = f"**missed** {t['result']}"
        out.append(_row(t["target"], t["required"], t["measured"], result))
    return out


# -- figures --------------------------------------------------------------------------------


def bulk_table(loads: dict[str, Any], fwd_key: str) -> list[str]:
    d = loads.get("direct", {}).get("bulk", {}).get("direct")
    direct = _med(d, "mibps")
    fwd = loads.get(fwd_key, {}).get("bulk", {})
    out = [
        _row(
            "proxy",
            "protocol",
            "MiB/s median (min–max)",
            "x direct",
            "proxy CPU s/GiB",
            f"{fwd_key} ÷ this",
        ),
        _sep(6),
    ]
    if d:
        out.append(_row("direct", "-", _spread(d, "mibps"), "1.00x", "-", "-"))
    for name in _measured(loads):
        for proto, r in loads[name].get("bulk", {}).items():
            v = _med(r, "mibps")
            mine = _med(fwd.get(proto), "mibps")
            rel = _ratio(mine, v) if name != fwd_key else "-"
            out.append(
                _row(
                    name,
                    proto,
                    _spread(r, "mibps"),
                    _ratio(v, direct),
                    _spread(r, "cpu_s_per_gib", 2),
                    rel,
                )
            )
    return out


def _short_row(
    name: str, proto: str, c: int, r: dict[str, Any] | None, mine: float | None, fwd_key: str
) -> str:
    if not r:
        return ""
    if "failed" in r:
        return _row(name, proto, str(c), f"failed: {r['failed'][:60]}", "", "", "", "", "")
    v = _med(r, "rate")
    kinds = r.get("error_kinds", {})
    errs = str(r.get("errors", "-"))
    if r.get("errors"):
        errs += " (" + ", ".join(f"{k[4:]} {n}" for k, n in kinds.items() if n) + ")"
    empty = sum(1 for run in r.get("runs", []) if not run.get("ok"))
    if empty:
        errs += f"; {empty} run(s) completed nothing in the window"
    rel = "-" if name in (fwd_key, "direct") else _ratio(mine, v)
    return _row(
        name,
        proto,
        str(c),
        _spread(r, "rate"),
        _ms(_med(r, "p50_us")),
        _ms(_med(r, "p99_us")),
        errs,
        _spread(r, "cpu_us_per_tunnel"),
        rel,
    )


def short_table(loads: dict[str, Any], concs: list[int], fwd_key: str) -> list[str]:
    head = ["proxy", "protocol", "c", "tunnels/s median (min–max)", "p50 ms", "p99 ms"]
    head += ["errors", "proxy CPU µs/tunnel", f"{fwd_key} ÷ this"]
    out = [_row(*head), _sep(len(head))]
    fwd = loads.get(fwd_key, {}).get("short", {})
    for proto in ("connect", "socks5"):
        for c in concs:
            key = f"{proto}/c{c}"
            mine = _med(fwd.get(key), "rate")
            d = loads.get("direct", {}).get("short", {}).get(f"direct/c{c}")
            if proto == "connect" and d:
                out.append(_short_row("direct", "-", c, d, None, fwd_key))
            for name in _measured(loads):
                row = _short_row(
                    name, proto, c, loads[name].get("short", {}).get(key), mine, fwd_key
                )
                if row:
                    out.append(row)
    return out


def http_table(loads: dict[str, Any], fwd_key: str) -> list[str]:
    head = ["proxy", "protocol", "c", "requests/s median (min–max)", "p50 ms", "p99 ms"]
    head += ["errors", "proxy CPU µs/request", f"{fwd_key} ÷ this"]
    out = [_row(*head), _sep(len(head))]
    mine = _med(loads.get(fwd_key, {}).get("http", {}).get("c64"), "rate")
    for name in ["direct", *_measured(loads)]:
        r = loads.get(name, {}).get("http", {}).get("c64")
        row = _short_row(name, "http", 64, r, mine, fwd_key)
        if row:
            out.append(row)
    return out


def _opened(st: dict[str, Any]) -> str:
    extra = [f"{st[k]:,} {k}" for k in ("errors", "stalled") if st.get(k)]
    return f"{st['ok']:,}" + (f" ({', '.join(extra)})" if extra else "")


def memory_table(loads: dict[str, Any]) -> list[str]:
    head = ["proxy", "protocol", "tunnels", "opened ok", "opened in s", "baseline PSS MiB"]
    head += ["PSS MiB", "RSS MiB", "KiB/tunnel (PSS)", "KiB/tunnel (RSS)"]
    out = [_row(*head), _sep(len(head))]
    for name in _measured(loads):
        idle = loads[name].get("idle") or {}
        base = idle.get("baseline")
        for st in idle.get("steps", []):
            out.append(
                _row(
                    name,
                    idle.get("mode", "-"),
                    f"{st['tunnels']:,}",
                    _opened(st),
                    f"{st.get('open_s', 0):.1f}",
                    f"{base['pss_kib'] / 1024:.1f}",
                    f"{st['pss_kib'] / 1024:.1f}",
                    f"{st['rss_kib'] / 1024:.1f}",
                    f"{st['per_tunnel_kib']['pss_kib']:.2f}",
                    f"{st['per_tunnel_kib']['rss_kib']:.2f}",
                )
            )
        if idle.get("failed"):
            out.append(_row(name, f"failed: {idle['failed']}", *[""] * (len(head) - 2)))
    return out


def profile_lines(prof: dict[str, Any]) -> list[str]:
    if "failed" in prof:
        return [f"Not profiled: {prof['failed']}."]
    kinds = [
        "system calls",
        "fwdproxy (Python)",
        "logging (Python)",
        "asyncio (Python and C)",
        "other Python (stdlib)",
        "CPython interpreter",
        "uvloop / libuv / C extensions",
    ]
    head = ["load (c=64)", "CPU µs/tunnel", "under sampling", *kinds, "rest"]
    out = [
        "py-spy samples of the busy proxy under each c=64 load, own time by kind of leaf frame "
        "(share of the proxy's CPU). CPU µs/tunnel is the benchmark's figure above; py-spy "
        "slows the proxy, so the figure under sampling is higher. The full tables (top "
        "functions by own and by total time, and by innermost fwdproxy function, each with µs "
        f"per tunnel) are in `{Path(prof['file']).name}`.",
        "",
        _row(*head),
        _sep(len(head)),
    ]
    for mode, r in prof.get("loads", {}).items():
        if "failed" in r:
            out.append(_row(mode, f"failed: {r['failed'][:80]}", *[""] * (len(head) - 2)))
            continue
        shares = r.get("kinds", {})
        rest = 1 - sum(shares.get(k, 0) for k in kinds)
        cells = [f"{100 * shares.get(k, 0):.0f}%" for k in kinds]
        out.append(
            _row(
                mode,
                _fmt(r.get("cpu_us_per_tunnel")),
                _fmt(r.get("cpu_us_per_tunnel_sampled")),
                *cells,
                f"{100 * rest:.0f}%",
            )
        )
    out += ["", "Largest fwdproxy functions (innermost fwdproxy frame, with what it calls):", ""]
    for mode, r in prof.get("loads", {}).items():
        top = [f for f in r.get("top_fwdproxy", []) if not f[0].startswith("(")][:4]
        if top:
            out.append(
                f"- {mode}: " + ", ".join(f"`{f.split(' (')[0]}` {100 * v:.0f}%" for f, v in top)
            )
    return out


def rules_lines(rules: dict[str, Any]) -> list[str]:
    tool = rules.get("tool", "rules benchmark")
    if "failed" in rules:
        return [f"`bench/{tool}` failed: {rules['failed'].strip()[-300:]}"]
    if "table" in rules:  # rules_scale.py: its own table, as printed
        return [f"`bench/{tool} -n {rules['rules']}`:", "", "```", rules["table"], "```"]
    sizes = rules.get("sizes", rules)
    out = [
        f"`bench/{tool}`:",
        "",
        _row(
            "rules",
            "load+compile s",
            "hit µs (uncached)",
            "miss µs (uncached)",
            "domain / suffix / glob / CIDR hit µs",
            "hit / miss µs (cached)",
        ),
        _sep(6),
    ]
    for n, r in sizes.items():
        if not str(n).isdigit():
            continue
        kinds = " / ".join(
            f"{r[f'hit_{k}_ns'] / 1000:.2f}" for k in ("domain", "suffix", "glob", "cidr")
        )
        out.append(
            _row(
                f"{int(n):,}",
                str(r["load_s"]),
                f"{r['hit_ns'] / 1000:.2f}",
                f"{r['miss_ns'] / 1000:.2f}",
                kinds,
                f"{r['hit_cached_ns'] / 1000:.2f} / {r['miss_cached_ns'] / 1000:.2f}",
            )
        )
    return out


def cli_lines(cli: dict[str, Any]) -> list[str]:
    r = cli["route_s"]
    base = cli["python_startup_s"]
    return [
        f"`python -m fwdproxy route registry-1.docker.io` ({cli['config']}): median "
        f"{r['median']:.3f} s (min {r['min']:.3f}, max {r['max']:.3f}, n={r['n']}); bare "
        f"`python -c pass`: {base['median']:.3f} s.",
        "",
        "Largest cumulative imports (µs, `python -X importtime`): "
        + ", ".join(f"{i['module']} {i['us']:,}" for i in cli["imports_cumulative_us"][:8]),
    ]


def header(data: dict[str, Any], fwd_key: str) -> list[str]:
    m, s = data["machine"], data["settings"]
    loads = data.get("loads", {})
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines = [
        f"# fwdproxy benchmark, {m['date']}{' (quick mode)' if data.get('quick') else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; {versions}.",
        "",
        f"fwdproxy under test: `{m.get('tree', '?')}` at {m.get('revision', '?')}, started as a "
        "user starts it, `python -m fwdproxy serve -c bench/peers/fwdproxy.yaml --loop LOOP` "
        f"(variants: {', '.join(s['variants'])}; the targets are judged on `{fwd_key}`). The "
        "config keeps the default log level (info), so the access log is on: one line per "
        "connection, to stderr, which the harness writes to a file",
    ]
    counts = [
        f"{n}: {r['access_log_lines']:,} lines"
        for n, r in loads.items()
        if isinstance(r, dict) and "access_log_lines" in r
    ]
    lines[-1] += f" ({'; '.join(counts)})." if counts else "."
    pp = loads.get(PPROXY) or loads.get("pproxy+asyncio") or {}
    if pp.get("event_loop"):
        lines[-1] += (
            f" pproxy ran on `{pp['event_loop']}` (bench/peers/pproxy_uvloop.py: pproxy as "
            "shipped does not start with uvloop >= 0.22 installed)."
        )
    lines += [
        "",
        f"Proxy pinned to CPU 0, load generator + origin to CPU 1. {s['reps']} repeat(s) per "
        f"figure (median, with min–max). Bulk: {s['bulk_bytes'] / (1 << 20):,.0f} MiB per tunnel. "
        f"Short tunnels: {s['warmup_s']} s warm-up, {s['window_s']} s window; proxy CPU per "
        f"tunnel is the proxy's user+system CPU from the start of the load until it is idle "
        f"again (at most 3 s after), divided by the tunnels completed. "
        f"Run took {data.get('elapsed_s')} s"
        + (
            " (" + ", ".join(f"{k} {v:g} s" for k, v in data["step_s"].items()) + ")."
            if data.get("step_s")
            else "."
        ),
    ]
    noise = data.get("noise")
    if noise:
        extra = ""
        if "irq_cpu_pct" in noise:
            extra = (
                f"; the kernel's interrupt and softirq work, mostly moving the loads' own "
                f"loopback packets, took {noise['irq_cpu_pct']:.0f}%, and the hypervisor "
                f"stole {noise['steal_cpu_pct']:.0f}%"
            )
        lines.append(
            f"Other processes on the machine used {noise['foreign_cpu_pct']:.0f}% of one CPU on "
            f"average during the loads{extra} (load average {noise['loadavg_start']:.2f} -> "
            f"{noise['loadavg_end']:.2f}); figures from a busy machine are noisier, CPU per "
            "tunnel less so than rates."
        )
    missing = [n for n, r in loads.items() if isinstance(r, dict) and r.get("not_installed")]
    failed = [f"{n} ({r['failed'][:120]})" for n, r in loads.items() if "failed" in r]
    if missing:
        lines.append(f"Not installed, so not measured: {', '.join(missing)}.")
    if failed:
        lines.append(f"Failed to start: {'; '.join(failed)}.")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    loads = data.get("loads", {})
    fwd_key = fwd_name(data)
    lines = [*header(data, fwd_key), ""]
    if loads:
        lines += ["## Targets", "", *targets_table(data), ""]
        concs = list(s["concurrency"])
        lines += ["## 1. Bulk: one tunnel, download", "", *bulk_table(loads, fwd_key), ""]
        lines += [
            "## 2. Short tunnels: open, tiny HTTP request/response, close",
            "",
            *short_table(loads, concs, fwd_key),
            "",
            "### Plain HTTP forwarding: absolute-URI GET, one request per connection",
            "",
            *http_table(loads, fwd_key),
            "",
            "## 3. Memory: idle open tunnels",
            "",
            *memory_table(loads),
            "",
        ]
    if data.get("profile"):
        lines += [f"## 4. Where {fwd_key}'s CPU goes", "", *profile_lines(data["profile"]), ""]
    if data.get("rules"):
        lines += ["## 5. Rule engine", "", *rules_lines(data["rules"]), ""]
    if data.get("cli"):
        lines += ["## 6. CLI latency", "", *cli_lines(data["cli"]), ""]
    return "\n".join(lines)


def write_report(data: dict[str, Any], stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    md = render_markdown(data)
    Path(f"{stem}.md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    import sys

    src = Path(sys.argv[1])
    print(render_markdown(json.loads(src.read_text())))
