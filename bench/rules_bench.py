"""Rule-engine decision time for generated configs (run by bench/run.py, prints JSON).

    python bench/rules_bench.py 10 1000 100000

Each config mixes the matcher kinds the way large real configs do: 40% exact domains, 30%
suffixes, 20% globs, 10% CIDRs (prefix lengths /8../32), alternating direct and via. The YAML
text is generated and loaded through `load_config`, exactly as `fwdproxy serve` loads a file.
Hosts are drawn from the rules (hits, one per matcher kind) and from names/IPs that match
nothing (misses). The engine is timed through `Router.decide_uncached` (what every new host
costs); the cached path (`Router.decide` on a host seen before) is timed separately.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fwdproxy.config import load_config

SAMPLE = 4000  # distinct hosts per timed batch
BATCHES = 5


def generate(n: int, seed: int = 7) -> tuple[str, dict[str, list[str]]]:
    """YAML text of n rules, and hosts that hit each matcher kind or miss every rule."""
    rnd = random.Random(seed)
    lines = ["listen: 127.0.0.1:3128", "upstreams:", "  tunnel: socks5://127.0.0.1:1080", "rules:"]
    hits: dict[str, list[str]] = {"domain": [], "suffix": [], "glob": [], "cidr": []}
    for i in range(n):
        act = "via: tunnel" if i % 2 else "action: direct"
        k = i % 10
        if k < 4:
            host = f"host{i}.zone{i % 97}.example{i % 13}.com"
            lines.append(f"  - {{domain: [{host}], {act}}}")
            hits["domain"].append(host)
        elif k < 7:
            suf = f"svc{i}.corp{i % 89}.net"
            lines.append(f"  - {{suffix: [{suf}], {act}}}")
            hits["suffix"].append(f"api.v{i % 3}.{suf}")
        elif k < 9:
            lines.append(f'  - {{glob: ["img-*.cdn{i}.glob.test"], {act}}}')
            hits["glob"].append(f"img-{rnd.randrange(10**6)}.cdn{i}.glob.test")
        else:
            plen = rnd.choice((8, 16, 24, 32))
            a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
            net = {
                8: f"{10 + a % 5}.0.0.0",
                16: f"172.{16 + a % 16}.{b}.0",
                24: f"100.{64 + a % 64}.{b}.{c}",
                32: f"198.{18 + a % 2}.{b}.{c}",
            }[plen]
            lines.append(f"  - {{cidr: [{net}/{plen}], {act}}}")
            hits["cidr"].append(net)
    return "\n".join(lines) + "\ndefault: direct\n", hits


def misses(n: int) -> list[str]:
    names = [f"n{i}.unmatched{i % 50}.example.org" for i in range(n // 2)]
    ips = [f"203.0.{(i >> 8) & 255}.{i & 255}" for i in range(n - len(names))]
    return [h for pair in zip(names, ips, strict=False) for h in pair]


def per_call_ns(fn: Any, hosts: list[str]) -> float:
    t0 = time.perf_counter_ns()
    for h in hosts:
        fn(h, 443)
    return (time.perf_counter_ns() - t0) / len(hosts)


def bench(n: int) -> dict[str, Any]:
    text, hits = generate(n)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    t0 = time.perf_counter()
    cfg = load_config(f.name)
    load_s = time.perf_counter() - t0
    Path(f.name).unlink()
    router = cfg.router
    res: dict[str, Any] = {"rules": len(router.rules), "load_s": round(load_s, 3)}
    mixed_hits = [h for kind in ("domain", "suffix", "glob", "cidr") for h in hits[kind][:SAMPLE]]
    random.Random(1).shuffle(mixed_hits)
    sets = {"hit": mixed_hits, "miss": misses(SAMPLE)}
    for kind in ("domain", "suffix", "glob", "cidr"):
        sets[f"hit_{kind}"] = hits[kind] or ["none.invalid"]
    for name, hosts in sets.items():
        # uncached: the engine itself (decide_uncached), distinct hosts each batch
        batch = hosts[:SAMPLE]
        times = [per_call_ns(router.decide_uncached, batch) for _ in range(BATCHES)]
        res[f"{name}_ns"] = round(statistics.median(times))
        if name in ("hit", "miss"):
            per_call_ns(router.decide, batch)  # fill the cache
            res[f"{name}_cached_ns"] = round(
                statistics.median(per_call_ns(router.decide, batch) for _ in range(BATCHES))
            )
    # correctness spot check: a hit really matches its rule kind
    d = router.decide_uncached(hits["suffix"][0], 443) if hits["suffix"] else None
    res["spot_check"] = d.matched if d else ""
    return res


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [10, 1000, 100_000]
    print(json.dumps({str(n): bench(n) for n in sizes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
