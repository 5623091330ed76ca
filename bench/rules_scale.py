"""Rule engine at gfwlist/geosite scale: load time, memory per rule, decision-time distribution.

    python bench/rules_scale.py                    # 100,000 rules, prints a table
    python bench/rules_scale.py -n 20000 --json bench/results/rules-scale.json

The generated file (fixed seed, so every run and every checkout sees the same text) mixes what
big domain lists contain: exact domains, suffixes, globs (10,000 of them under one shared literal
tail, half varying in their literal head and half in the literal before the tail), regexes in
the geosite `regexp:` style, IPv4/IPv6 CIDRs with overlapping prefixes, and port-restricted
rules. Each measurement runs in a fresh interpreter, as `fwdproxy check`, `route` and `serve`
each pay the load on start. Only public entry points are used (`load_config`,
`Router.decide_uncached`), so the same script measures older checkouts too.

Decision times are per call (perf_counter_ns around one uncached decision, each host timed
three times and its fastest kept, the GC off), so the max is the slowest host, not a
scheduler hiccup. Timings are never asserted anywhere: they depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SEED = 20240607
SHARED_TAIL = "shared.cdn-edge.example.net"
SHARED_GLOBS = 10_000
SAMPLE = 5000  # hosts timed per set
REPEATS = 3

# Shares of the rules that are not shared-tail globs (those are a fixed 10,000).
MIX = (("domain", 0.40), ("suffix", 0.28), ("glob", 0.04), ("regex", 0.06), ("cidr", 0.16))
# ... plus port-restricted rules: the rest.
WORDS = [
    "ads",
    "track",
    "cdn",
    "img",
    "static",
    "api",
    "push",
    "login",
    "mail",
    "news",
    "video",
    "stat",
    "metric",
    "pixel",
    "beacon",
    "edge",
    "node",
    "cache",
    "media",
    "assets",
    "files",
    "dl",
    "update",
    "sync",
    "auth",
    "id",
    "shop",
    "pay",
    "app",
    "m",
    "www",
]
TLDS = ("com", "net", "org", "io", "cn", "jp", "de", "co.uk", "info", "xyz")


def _name(rnd: random.Random, i: int) -> str:
    return f"{rnd.choice(WORDS)}{i}.{rnd.choice(WORDS)}{rnd.randrange(500)}.{rnd.choice(TLDS)}"


def _act(i: int) -> str:
    return ("via: tunnel", "action: direct", "action: reject")[i % 3]


def _rule_lines(n: int, rnd: random.Random, hits: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    plain = n - SHARED_GLOBS
    counts = {kind: int(plain * share) for kind, share in MIX}
    counts["port"] = plain - sum(counts.values())
    i = 0
    for kind, count in counts.items():
        for _ in range(count):
            out.append(_one_rule(kind, i, rnd, hits))
            i += 1
    for j in range(SHARED_GLOBS):  # one shared literal tail, the old engine's worst case
        if j % 2:
            out.append(f'  - {{glob: ["edge{j}-*.{SHARED_TAIL}"], {_act(j)}}}')
            hits["shared"].append(f"edge{j}-pop{rnd.randrange(99)}.{SHARED_TAIL}")
        else:
            out.append(f'  - {{glob: ["*-node{j}.{SHARED_TAIL}"], {_act(j)}}}')
            hits["shared"].append(f"r{rnd.randrange(99)}-node{j}.{SHARED_TAIL}")
    return out


def _one_rule(kind: str, i: int, rnd: random.Random, hits: dict[str, list[str]]) -> str:
    if kind == "domain":
        host = _name(rnd, i)
        hits[kind].append(host)
        return f"  - {{domain: [{host}], {_act(i)}}}"
    if kind == "suffix":
        suf = _name(rnd, i)
        hits[kind].append(f"{rnd.choice(WORDS)}.{suf}")
        return f"  - {{suffix: [{suf}], {_act(i)}}}"
    if kind == "glob":
        w, t = rnd.choice(WORDS), _name(rnd, i)
        hits[kind].append(f"{w}7.{t}")
        return f'  - {{glob: ["{w}?.{t}"], {_act(i)}}}'
    if kind == "regex":
        return _regex_rule(i, rnd, hits)
    if kind == "cidr":
        return _cidr_rule(i, rnd, hits)
    host = _name(rnd, i)
    hits["port"].append(host)
    return f'  - {{domain: [{host}], port: [443, "8000-8100"], {_act(i)}}}'


def _regex_rule(i: int, rnd: random.Random, hits: dict[str, list[str]]) -> str:
    w, tld = rnd.choice(WORDS), rnd.choice(("com", "net", "org"))
    form = i % 3
    if form == 0:  # literal tail: ^(.+\.)?ads12\d*\.example\.com$
        pat, host = rf"^(.+\.)?{w}{i}\d*\.zone{i % 700}\.{tld}$", f"x.{w}{i}7.zone{i % 700}.{tld}"
    elif form == 1:  # literal head only: ^adserver12\.[a-z]+\.(com|net)$
        pat, host = rf"^{w}{i}\.[a-z]+\.(com|net|org)$", f"{w}{i}.abc.{tld}"
    else:  # literal label in the middle
        pat, host = rf"^[a-z]+-{w}{i}\.[a-z0-9]+\.{tld}$", f"q-{w}{i}.z9.{tld}"
    hits["regex"].append(host)
    return f"  - {{regex: ['{pat}'], {_act(i)}}}"


def _cidr_rule(i: int, rnd: random.Random, hits: dict[str, list[str]]) -> str:
    if i % 8 == 0:
        plen = rnd.choice((32, 48, 64, 128))
        net = f"2001:db8:{i & 0xFFFF:x}:{rnd.randrange(1 << 16):x}::"
        hits["cidr"].append(f"2001:db8:{i & 0xFFFF:x}:{rnd.randrange(1 << 16):x}::1")
        return f"  - {{cidr: ['{net}/{plen}'], {_act(i)}}}"
    plen = rnd.choice((8, 12, 16, 20, 24, 28, 32))
    a, b, c, d = (rnd.randrange(1, 224), rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
    hits["cidr"].append(f"{a}.{b}.{c}.{d}")
    return f"  - {{cidr: [{a}.{b}.{c}.{d}/{plen}], {_act(i)}}}"


def generate(n: int, seed: int = SEED) -> tuple[str, dict[str, list[str]]]:
    """YAML text of n rules and, per matcher kind, hosts that hit one of them."""
    rnd = random.Random(seed)
    hits: dict[str, list[str]] = {
        k: [] for k in ("domain", "suffix", "glob", "regex", "cidr", "port", "shared")
    }
    head = ["listen: 127.0.0.1:3128", "upstreams:", "  tunnel: socks5://127.0.0.1:1080", "rules:"]
    body = _rule_lines(n, rnd, hits)
    return "\n".join([*head, *body]) + "\ndefault: direct\n", hits


def misses(n: int, seed: int = SEED + 1) -> list[str]:
    """Names and addresses that match no rule (names under the same TLDs and words)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(f"203.0.{rnd.randrange(256)}.{rnd.randrange(256)}")
        else:
            out.append(f"miss{i}.{rnd.choice(WORDS)}-none.{rnd.choice(TLDS)}")
    return out


# -- the measuring child -----------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _times_ns(decide: Any, hosts: list[str], port: int = 443) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for h in hosts:
        best = 1 << 62
        for _ in range(REPEATS):
            t0 = clock()
            decide(h, port)
            dt = clock() - t0
            best = dt if dt < best else best
        out.append(best)
    return out


def _stats(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {
        "median_us": round(s[len(s) // 2] / 1000, 2),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] / 1000, 2),
        "max_us": round(s[-1] / 1000, 2),
    }


def child(path: str, hits_path: str) -> dict[str, Any]:
    """Load like `fwdproxy check`, then time decisions; runs in a fresh interpreter."""
    import gc

    from fwdproxy.config import load_config

    hits: dict[str, list[str]] = json.loads(Path(hits_path).read_text())
    gc.collect()
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    cfg = load_config(path)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss_kib()
    router = cfg.router
    n = len(router.rules)
    decide = getattr(router, "decide_uncached", router.decide)
    rnd = random.Random(SEED + 2)
    mixed = [h for k in ("domain", "suffix", "glob", "regex", "cidr", "port") for h in hits[k]]
    sets = {
        "hit": rnd.sample(mixed, min(SAMPLE, len(mixed))),
        "miss": misses(SAMPLE),
        # Under the shared tail: hits on the first and last globs, and names that miss them all.
        "shared": [
            *hits["shared"][:50],
            *hits["shared"][-50:],
            *(f"nothing{i}.{SHARED_TAIL}" for i in range(100)),
        ],
    }
    out: dict[str, Any] = {
        "rules": n,
        "load_s": round(load_s, 3),
        "rss_kib": rss1 - rss0,
        "kib_per_rule": round((rss1 - rss0) / max(n, 1), 3),
    }
    # First lookup under the shared tail, before anything else touched that bucket (after one
    # unrelated decision, so that the first call's one-off interpreter costs are not counted).
    decide("warm-up.invalid", 443)
    t0 = time.perf_counter_ns()
    decide(f"first-ever.{SHARED_TAIL}", 443)
    out["shared_first_us"] = round((time.perf_counter_ns() - t0) / 1000, 2)
    gc.disable()
    for name, hosts in sets.items():
        out[name] = _stats(_times_ns(decide, hosts))
    gc.enable()
    return out


# -- the parent --------------------------------------------------------------------------------


def run(n: int, python: str, cwd: Path) -> dict[str, Any]:
    text, hits = generate(n)
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(text)
        hits_file = Path(tmp) / "hits.json"
        hits_file.write_text(json.dumps(hits))
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        argv = [python, str(Path(__file__).resolve()), "--child", str(rules), str(hits_file)]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def table(res: dict[str, Any]) -> str:
    lines = [
        f"rules: {res['rules']}   load: {res['load_s']:.2f} s   "
        f"RSS: {res['rss_kib'] / 1024:.1f} MiB ({res['kib_per_rule']:.2f} KiB/rule)   "
        f"first lookup under the shared tail: {res['shared_first_us']:.1f} µs",
        f"{'uncached decision':<26}{'median µs':>10}{'p99 µs':>10}{'max µs':>10}",
    ]
    for key, label in (
        ("hit", "hits (mixed)"),
        ("miss", "misses"),
        ("shared", "shared-tail globs"),
    ):
        s = res[key]
        lines.append(f"{label:<26}{s['median_us']:>10.2f}{s['p99_us']:>10.2f}{s['max_us']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1], argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--rules", type=int, default=100_000, help="rules in the file")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the child")
    ap.add_argument("--checkout", default=str(REPO), help="checkout whose fwdproxy is measured")
    args = ap.parse_args(argv)
    if args.rules < SHARED_GLOBS * 2:
        ap.error(f"--rules must be at least {SHARED_GLOBS * 2}")
    res = run(args.rules, args.python, Path(args.checkout))
    print(table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
