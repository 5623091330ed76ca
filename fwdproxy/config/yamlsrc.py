"""YAML loading that remembers line numbers, so config errors can say `file:line`.

PyYAML's safe loader is used as-is; mappings and sequences come back as dict/list subclasses
that carry the line of every key and item. Values stay plain Python scalars.

Big domain lists (gfwlist/geosite conversions) are a `rules:` section of thousands of one-line
flow mappings such as `- {suffix: [a.com], via: tunnel}`. Building YAML nodes and marks for
them costs seconds per load even with libyaml, so such a section, when every line of it has
that simple shape, is read by a strict line parser (scalars resolved by PyYAML's own resolver,
so `443` is still an int and `yes` would still not be a string) and the rest of the file by
PyYAML. Anything else in the section sends the whole file through PyYAML.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import MutableSequence
from typing import Any, Final

import yaml


class LineDict(dict):  # type: ignore[type-arg]
    """A mapping with `line` (1-based) and `key_lines` {key: line}."""

    __slots__ = ("key_lines", "line")  # no per-instance __dict__: big files hold 100k of these

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.line = 0
        self.key_lines: dict[Any, int] = {}


class LineList(list):  # type: ignore[type-arg]
    """A sequence with `line` and `item_lines` [line, ...]."""

    __slots__ = ("item_lines", "line")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.line = 0
        self.item_lines: MutableSequence[int] = []


# libyaml's C parser when available (much faster); the constructors below are the same.
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable or complex mapping key", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(text: str) -> Any:
    """Parse YAML text; raises yaml.YAMLError (with a mark) on syntax errors."""
    fast = _load_with_fast_rules(text)
    return fast if fast is not None else yaml.load(text, Loader=_Loader)


# -- the fast path for big one-line-per-rule sections ------------------------------------------

FAST_MIN_RULES: Final = 256  # smaller files always go through PyYAML alone
_RULES_KEY: Final = re.compile(r"^rules:[ ]*(?:#.*)?$", re.MULTILINE)
_PLAIN: Final = r"[A-Za-z0-9_./](?:[A-Za-z0-9_./*-]|:(?=[A-Za-z0-9_./:]))*"
_SCALAR: Final = rf"(?:'[^'\n]*'|\"[^\"\\\n]*\"|{_PLAIN})"
_SEQ: Final = rf"\[ *(?:{_SCALAR} *(?:, *{_SCALAR} *)*)?\]"
_PAIR: Final = rf"([a-z_]+): +({_SEQ}|{_SCALAR})"
_ITEM: Final = re.compile(rf"( *)- \{{ *({_PAIR} *(?:, *{_PAIR} *)*)\}} *(?:#.*)?")
_PAIRS: Final = re.compile(_PAIR)
# The commonest line of all, `- {suffix: [a.com], via: tunnel}`, read in one match.
_COMMON: Final = re.compile(
    rf"( *)- \{{ *([a-z_]+): +\[ *({_SCALAR}) *\] *, *([a-z_]+): +({_SCALAR}) *\}} *(?:#.*)?"
)
_SCALARS: Final = re.compile(_SCALAR)
_SKIP: Final = re.compile(r" *(?:#.*)?")
_RESOLVER: Final = yaml.resolver.Resolver()
_STR_TAG: Final = "tag:yaml.org,2002:str"
_INT_TAG: Final = "tag:yaml.org,2002:int"


class _NotPlain(Exception):
    """The section is not of the simple shape: PyYAML reads the whole file."""


def _scalar(token: str, memo: dict[str, Any]) -> Any:
    value = memo.get(token, memo)
    if value is not memo:
        return value
    if token[0] in "'\"":
        value = token[1:-1]
    elif token[0] not in _RESOLVER.yaml_implicit_resolvers:
        value = token  # no implicit type starts with this character: a string
    else:
        tag = _RESOLVER.resolve(yaml.ScalarNode, token, (True, False))
        if tag == _STR_TAG:
            value = token
        elif tag == _INT_TAG and token.isdigit() and (token == "0" or token[0] != "0"):
            value = int(token)
        else:
            raise _NotPlain(token)
    if len(memo) < 4096:  # keys and actions repeat on every line; names mostly do not
        memo[token] = value
    return value


# One-line mappings and sequences: every key and item is on the container's own line, which
# line_of() falls back to when these (shared, never written) tables have no entry.
_SAME_LINE_KEYS: Final[dict[Any, int]] = {}
_SAME_LINE_ITEMS: Final[list[int]] = []


def _fast_rule(inner: str, line: int, memo: dict[str, Any]) -> LineDict:
    rule = LineDict.__new__(LineDict)
    rule.line, rule.key_lines = line, _SAME_LINE_KEYS
    for key_token, value in _PAIRS.findall(inner):
        key = _scalar(key_token, memo)
        if key in rule:
            raise _NotPlain(key)  # PyYAML reports the duplicate
        if value[0] == "[":
            items = LineList.__new__(LineList)
            items.extend([_scalar(t, memo) for t in _SCALARS.findall(value, 1, len(value) - 1)])
            items.line, items.item_lines = line, _SAME_LINE_ITEMS
            rule[key] = items
        else:
            rule[key] = _scalar(value, memo)
    return rule


def _common_rule(c: re.Match[str], line: int, memo: dict[str, Any]) -> LineDict:
    """`_fast_rule` for a line matched by _COMMON: one list of one item, one scalar."""
    key1, item, key2, value = c.group(2, 3, 4, 5)
    rule = LineDict.__new__(LineDict)
    rule.line, rule.key_lines = line, _SAME_LINE_KEYS
    items = LineList.__new__(LineList)
    items.append(_scalar(item, memo))
    items.line, items.item_lines = line, _SAME_LINE_ITEMS
    key1, key2 = _scalar(key1, memo), _scalar(key2, memo)
    if key1 == key2:
        raise _NotPlain(key1)  # PyYAML reports the duplicate
    rule[key1] = items
    rule[key2] = _scalar(value, memo)
    return rule


def _fast_rules(lines: list[str], start: int) -> tuple[LineList, int]:
    """The rules after line index `start`, and the index of the first line after them."""
    out = LineList()
    # A compact table: line numbers as machine ints, not 100k int objects that would outlive
    # the parsed text (rules keep their line) and pin its memory after the load.
    out.item_lines = array("l")
    indent = None
    memo: dict[str, Any] = {}
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end][0] in " -#"):
        line = lines[end]
        c = _COMMON.fullmatch(line)
        if c is not None and c.group(1) == indent:
            out.append(_common_rule(c, end + 1, memo))
            out.item_lines.append(end + 1)
            end += 1
            continue
        m = _ITEM.fullmatch(line)
        if m is None:
            if not _SKIP.fullmatch(line):
                raise _NotPlain(line)
        else:
            if indent is None:
                indent, out.line = m.group(1), end + 1
            elif m.group(1) != indent:
                raise _NotPlain(line)
            out.append(_fast_rule(m.group(2), end + 1, memo))
            out.item_lines.append(end + 1)
        end += 1
    return out, end


def _load_with_fast_rules(text: str) -> Any:
    m = _RULES_KEY.search(text)
    if m is None or any(c in text for c in "\r\t\x85\u2028\u2029"):
        return None
    lines = text.split("\n")
    start = text.count("\n", 0, m.start())
    try:
        rules, end = _fast_rules(lines, start)
    except _NotPlain:
        return None
    if len(rules) < FAST_MIN_RULES:
        return None
    rest = "\n".join([*lines[: start + 1], *([""] * (end - start - 1)), *lines[end:]])
    data = yaml.load(rest, Loader=_Loader)
    if not isinstance(data, LineDict) or data.get("rules", 0) is not None:
        return None
    if data.key_lines.get("rules") != start + 1:
        return None
    data["rules"] = rules
    return data


def line_of(container: Any, key: Any = None) -> int | None:
    """The line of `container[key]` (or of the container itself), if known."""
    if key is not None:
        if isinstance(container, LineDict):
            return container.key_lines.get(key, container.line)
        if isinstance(container, LineList) and isinstance(key, int):
            if 0 <= key < len(container.item_lines):
                return container.item_lines[key]
            return container.line
    return getattr(container, "line", None) or None
