"""Glob and regex matchers indexed by their literal text (pure; used by rules.Router).

A big rule file can hold thousands of globs and regexes under one domain. Trying each in turn
makes a lookup linear in their number, so every pattern is filed by literal text that any host
it matches must contain:

- its *literal suffix* (`edge7-*.cdn.example` -> `.cdn.example`): the label-aligned part
  (`cdn.example`) is a parent of every matching host, found by the walk over the host's parent
  names that suffix rules need anyway;
- failing that, its *literal prefix* up to a dot (`^ads\\.[a-z]+\\.com$` -> first label `ads`);
- within such a bucket, the whole literal prefix or suffix (whichever fewer patterns share),
  looked up by length: `host[:n]` / `host[-n:]` for each distinct length n in the bucket.

Only the few patterns a host can possibly match are then run. Globs without `[...]` classes are
matched by a small literal matcher, not by `re`: compiling 10,000 fnmatch regexes costs seconds
per load, and literal matching is as fast as the regex engine for these shapes.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

_GLOB_SPECIAL: Final = frozenset("*?[]")

Test = Callable[[str], Any]  # host -> truthy if the pattern matches the whole host


# -- literal affixes ---------------------------------------------------------------------------


_GLOB_LITERAL: Final = re.compile(r"[^*?\[\]\x80-\U0010ffff]*")


def glob_affixes(pattern: str) -> tuple[str, str]:
    """(prefix, suffix): literal text that every host matching the glob starts / ends with.

    Only ASCII characters outside `*`, `?` and `[...]` count: hosts are normalised to ASCII
    lower case, and IGNORECASE may let a non-ASCII pattern character match an ASCII one.
    """
    p = pattern.lower()
    head = _GLOB_LITERAL.match(p)
    tail = _GLOB_LITERAL.match(p[::-1])
    return (head.group() if head else ""), (tail.group()[::-1] if tail else "")


_PLAIN: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_QUANT: Final = frozenset("*+?{")


def _escaped(p: str, i: int) -> bool:
    """Whether p[i] is preceded by an odd number of backslashes."""
    n = 0
    while i - n > 0 and p[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _class_end(p: str, i: int) -> int:
    """The index of the `]` closing the class that opens at p[i] (len(p) if none)."""
    j = i + 1
    if p[j : j + 1] == "^":
        j += 1
    if p[j : j + 1] == "]":  # a `]` first in a class is literal
        j += 1
    while j < len(p) and p[j] != "]":
        j += 2 if p[j] == "\\" else 1
    return j


def _top_level_bar(p: str) -> bool:
    depth, i, n = 0, 0, len(p)
    while i < n:
        c = p[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _class_end(p, i)
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


def _regex_prefix(p: str) -> str:
    i = 2 if p.startswith("\\A") else 1 if p.startswith("^") else 0
    out = []
    while i < len(p):
        c = p[i].lower()
        if c == "\\" and i + 1 < len(p) and not p[i + 1].isalnum() and p[i + 1].isascii():
            c, step = p[i + 1], 2
        elif c in _PLAIN:
            step = 1
        else:
            break
        if p[i + step : i + step + 1] in _QUANT and i + step < len(p):
            break  # quantified: not certain to be there
        out.append(c)
        i += step
    return "".join(out)


def _regex_suffix(p: str) -> str:
    j = len(p)
    if p.endswith("\\Z") and not _escaped(p, j - 2):
        j -= 2
    elif p.endswith("$") and not _escaped(p, j - 1):
        j -= 1
    out = []
    while j > 0:
        c = p[j - 1].lower()
        if _escaped(p, j - 1):
            if c.isalnum() or not c.isascii():
                break  # \d, \w, \1, ...: not a literal
            j -= 2
        elif c in _PLAIN and not _in_escape(p, j - 1):
            j -= 1
        else:
            break
        out.append(c)
    return "".join(reversed(out))


_ESCAPE_TAIL: Final = {"x": 2, "u": 4, "U": 8}


def _in_escape(p: str, i: int) -> bool:
    """Whether p[i] is a digit of an escape such as \\x41, \\u0041 or \\101 (octal)."""
    k = p.rfind("\\", 0, i)
    if k < 0 or i - k > 9 or _escaped(p, k):
        return False
    e = p[k + 1]
    if e in _ESCAPE_TAIL:
        return i <= k + 1 + _ESCAPE_TAIL[e]
    return e.isdigit() and i <= k + 3 and p[k + 1 : i + 1].isdigit()


def regex_affixes(pattern: str) -> tuple[str, str]:
    """(prefix, suffix) of literal text every full match of the regex starts / ends with.

    A conservative reading of the pattern text (escapes, anchors, quantifiers, alternation):
    anything it is unsure of ends the literal run, which only makes the index coarser.
    """
    p = pattern
    if p.startswith("(?") and not p.startswith(("(?:", "(?P", "(?=", "(?!", "(?<", "(?#")):
        return "", ""  # global inline flags such as (?x) change how the text reads
    if "|" in p and _top_level_bar(p):
        return "", ""
    return _regex_prefix(p), _regex_suffix(p)


def _escape_end(p: str, i: int) -> int:
    """The index after the escape starting at p[i] (a backslash)."""
    e = p[i + 1 : i + 2]
    if e in _ESCAPE_TAIL:
        return i + 2 + _ESCAPE_TAIL[e]
    if e == "N" and p[i + 2 : i + 3] == "{":
        end = p.find("}", i)
        return len(p) if end < 0 else end + 1
    if e.isdigit():
        j = i + 2
        while j < len(p) and j < i + 4 and p[j].isdigit():
            j += 1
        return j
    return i + 2


def _skip(p: str, i: int) -> int:
    """The index after the group, class or `{m,n}` starting at p[i]."""
    if p[i] == "{":
        end = p.find("}", i)
        return len(p) if end < 0 else end + 1
    depth, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == "\\":
            i = _escape_end(p, i)
            continue
        if c == "[":
            i = _class_end(p, i)
            if depth == 0:
                return i + 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth <= 0:
                return i + 1
        i += 1
    return n


def regex_runs(pattern: str) -> list[str]:
    """Literal runs every full match contains, read as conservatively as regex_affixes.

    Only the top level of the pattern counts: groups, classes, escapes such as `\\d` and
    quantified characters end a run, and a top-level `|` means there are none.
    """
    p = pattern
    if p.startswith("(?") and not p.startswith(("(?:", "(?P", "(?=", "(?!", "(?<", "(?#")):
        return []
    if "|" in p and _top_level_bar(p):
        return []
    runs: list[str] = []
    cur: list[str] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == "\\" and i + 1 < n and p[i + 1].isascii() and not p[i + 1].isalnum():
            lit, step = p[i + 1], 2
        elif c.isascii() and c.lower() in _PLAIN:
            lit, step = c.lower(), 1
        else:
            runs.append("".join(cur))
            cur = []
            if c == "\\":
                i = _escape_end(p, i)
            elif c in "([{":
                i = _skip(p, i)
            else:
                i += 1
            continue
        if p[i + step : i + step + 1] in _QUANT and i + step < n:
            runs.append("".join(cur))  # a quantified character is not certain to be there
            cur = []
        else:
            cur.append(lit)
        i += step
    runs.append("".join(cur))
    return [r for r in runs if r]


def glob_runs(pattern: str) -> list[str]:
    """Literal runs between the wildcards of a glob (none if it has `[...]` classes)."""
    if "[" in pattern or not pattern.isascii():
        return []
    return [r for r in re.split(r"[*?]", pattern.lower()) if r]


# -- glob matching without re ------------------------------------------------------------------


class _Segment:
    """A run of a glob between two `*`: literal chunks at fixed offsets, `?` between them."""

    __slots__ = ("chunks", "first", "first_off", "size")

    def __init__(self, text: str) -> None:
        self.size = len(text)
        self.chunks: tuple[tuple[int, str], ...] = tuple(
            (off, lit) for off, lit in _split_q(text) if lit
        )
        self.first_off, self.first = self.chunks[0] if self.chunks else (0, "")

    def at(self, s: str, pos: int) -> bool:
        return all(s.startswith(lit, pos + off) for off, lit in self.chunks)

    def find(self, s: str, start: int, end: int) -> int:
        """Leftmost position >= start where the segment fits entirely before end, or -1."""
        last = end - self.size
        if not self.first:
            return start if start <= last else -1
        pos = start
        while pos <= last:
            i = s.find(self.first, pos + self.first_off, last + self.first_off + len(self.first))
            if i < 0:
                return -1
            pos = i - self.first_off
            if self.at(s, pos):
                return pos
            pos += 1
        return -1


def _split_q(text: str) -> list[tuple[int, str]]:
    out, off = [], 0
    for part in text.split("?"):
        out.append((off, part))
        off += len(part) + 1
    return out


class GlobMatcher:
    """fnmatch semantics (whole host, `*` and `?` match any character) for globs without `[`."""

    __slots__ = ("head", "mids", "min_len", "star", "tail")

    def __init__(self, pattern: str) -> None:
        parts = pattern.lower().split("*")
        self.star = len(parts) > 1
        self.head = _Segment(parts[0])
        self.tail = _Segment(parts[-1]) if self.star else self.head
        self.mids = tuple(_Segment(p) for p in parts[1:-1] if p)
        self.min_len = sum(len(p) for p in parts)

    def __call__(self, s: str) -> bool:
        n = len(s)
        if not self.star:
            return n == self.min_len and self.head.at(s, 0)
        if n < self.min_len or not self.head.at(s, 0):
            return False
        end = n - self.tail.size
        if not self.tail.at(s, end):
            return False
        pos = self.head.size
        for seg in self.mids:  # leftmost placement of each middle segment is always safe
            found = seg.find(s, pos, end)
            if found < 0:
                return False
            pos = found + seg.size
        return True


def compile_glob(pattern: str) -> Test:
    """A matcher for one glob: the literal matcher, or fnmatch's regex for `[...]` classes."""
    if "[" in pattern or not pattern.isascii():
        return re.compile(fnmatch.translate(pattern), re.IGNORECASE).fullmatch
    return GlobMatcher(pattern)


# -- the index ---------------------------------------------------------------------------------

Item = tuple[Any, Test]  # (rules._Entry, test); entries carry .index and .ports


def label_key(prefix: str, suffix: str) -> tuple[str, str]:
    """Where a pattern is filed: ("suffix", parent name), ("first", first label) or ("", "")."""
    dot = suffix.find(".")
    if dot >= 0 and suffix[dot + 1 :]:
        return "suffix", suffix[dot + 1 :]
    dot = prefix.find(".")
    if dot > 0:
        return "first", prefix[:dot]
    return "", ""


GRAM: Final = 4  # length of the substrings a pattern with only an inner literal is filed by
GRAM_AFTER: Final = 4  # ...when more patterns of its bucket share its prefix and its suffix
STRIDE: Final = 3  # a host is probed at every STRIDE-th position for literals this long:
WIDE: Final = GRAM + STRIDE - 1  # a pattern is then filed under STRIDE consecutive grams


def longest(runs: list[str]) -> str:
    return max(runs, key=len, default="")


def _grams(run: str) -> list[str]:
    return [run[k : k + GRAM] for k in range(len(run) - GRAM + 1)]


class PatternSet:
    """Patterns of one bucket, sub-indexed by literal text: whole prefix, whole suffix, or
    4-character pieces ("grams") of an inner literal, whichever the fewest patterns share.

    Grams cost dict lookups along the host, so they are only used for patterns whose prefix
    and suffix are shared by several others (`^[a-z]+-ads5\\.x\\.net$` next to hundreds of
    other `.net` regexes). A literal of at least WIDE characters is filed under STRIDE
    consecutive grams, so probing every STRIDE-th position of the host still meets one of
    them wherever the literal lies; shorter ones are filed under one gram, probed everywhere.
    """

    __slots__ = ("by_gram", "by_prefix", "by_suffix", "by_wide", "lowest", "rest")
    by_prefix: tuple[tuple[int, dict[str, Any]], ...]
    by_suffix: tuple[tuple[int, dict[str, Any]], ...]
    rest: tuple[Any, ...]

    def __init__(self, items: list[tuple[Item, str, str, str]]) -> None:
        """items: (item, prefix, suffix, longest inner literal) in rule order."""
        self.lowest = items[0][0][0].index  # no entry here can beat an earlier match
        if len(items) == 1:  # most buckets: nothing to weigh
            ((item, p, s, _),) = items
            self.by_prefix = ((len(p), {p: (item,)}),) if p else ()
            self.by_suffix = ((len(s), {s: (item,)}),) if s and not p else ()
            self.by_gram, self.by_wide = {}, {}
            self.rest = () if p or s else (item,)
            return
        pre = Counter(p for _, p, _, _ in items if p)
        suf = Counter(s for _, _, s, _ in items if s)
        shared = [min(pre[p] if p else _NONE, suf[s] if s else _NONE) for _, p, s, _ in items]
        runs = [r if n > GRAM_AFTER else "" for (_, _, _, r), n in zip(items, shared, strict=True)]
        count = Counter(g for r in runs for g in set(_grams(r)))
        prefixed: dict[int, dict[str, list[Item]]] = {}
        suffixed: dict[int, dict[str, list[Item]]] = {}
        by_gram: dict[str, list[Item]] = {}
        by_wide: dict[str, list[Item]] = {}
        rest: list[Item] = []
        for (item, p, s, _), run in zip(items, runs, strict=True):
            cp = pre[p] if p else _NONE
            cs = suf[s] if s else _NONE
            keys, cg = _gram_keys(run, count)
            if min(cp, cs, cg) == _NONE:
                rest.append(item)
            elif cp <= cs and cp <= cg:
                prefixed.setdefault(len(p), {}).setdefault(p, []).append(item)
            elif cs <= cg:
                suffixed.setdefault(len(s), {}).setdefault(s, []).append(item)
            else:
                table = by_wide if len(keys) > 1 else by_gram
                for key in keys:
                    table.setdefault(key, []).append(item)
        self.by_prefix = _freeze(prefixed)
        self.by_suffix = _freeze(suffixed)
        self.by_gram = {k: tuple(v) for k, v in by_gram.items()}
        self.by_wide = {k: tuple(v) for k, v in by_wide.items()}
        self.rest = tuple(rest)

    def first(self, host: str, port: int, best: Any) -> Any:
        """The lowest-index entry (below best's) whose pattern and ports accept host:port."""
        if best is not None and best.index <= self.lowest:
            return best
        n = len(host)
        for size, table in self.by_prefix:
            if size > n:
                break
            group = table.get(host[:size])
            if group:
                best = scan(group, host, port, best)
        for size, table in self.by_suffix:
            if size > n:
                break
            group = table.get(host[n - size :])
            if group:
                best = scan(group, host, port, best)
        for grams, step in ((self.by_wide, STRIDE), (self.by_gram, 1)):
            if grams:
                for k in range(0, n - GRAM + 1, step):
                    group = grams.get(host[k : k + GRAM])
                    if group:
                        best = scan(group, host, port, best)
        if self.rest:
            best = scan(self.rest, host, port, best)
        return best


def _gram_keys(run: str, count: Counter[str]) -> tuple[list[str], int]:
    """The grams to file a literal under (STRIDE of them if it is long enough), and how many
    patterns the busiest of them holds."""
    grams = _grams(run)
    if not grams:
        return [], _NONE
    if len(run) < WIDE:
        best = min(grams, key=count.__getitem__)
        return [best], count[best]
    windows = (grams[w : w + STRIDE] for w in range(len(grams) - STRIDE + 1))
    keys = min(windows, key=lambda ws: max(count[g] for g in ws))
    return keys, max(count[g] for g in keys)


_NONE: Final = 1 << 62


def _freeze(t: dict[int, dict[str, list[Item]]]) -> tuple[tuple[int, dict[str, Any]], ...]:
    return tuple(
        (size, {k: tuple(v) for k, v in table.items()}) for size, table in sorted(t.items())
    )


def scan(items: Iterable[Item], host: str, port: int, best: Any) -> Any:
    """First item (in rule order, below best) that matches host and whose ports allow port."""
    limit = best.index if best is not None else 1 << 62
    for e, test in items:
        if e.index >= limit:
            break
        if test(host) and (not e.ports or any(lo <= port <= hi for lo, hi in e.ports)):
            return e
    return best
