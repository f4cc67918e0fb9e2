"""YAML and JSON parsing that refuses duplicate keys (PyYAML and `json` keep the last).

A second `bad:` under `controls` in a tag registry, `steps` twice in a run config or
`"kind"` twice in a document would otherwise silently win over the first. Every YAML
file metatrain reads goes through `load_yaml`; every JSON document record through
`loads_json`.

`loads_json` also refuses records no document needs and that would otherwise stop a
run instead of being skipped (`JsonLimitError`): nesting deeper than `MAX_JSON_DEPTH`
(`json` recurses, so 3,000 levels raise RecursionError; the depth is measured by a
scan that does not recurse, before parsing), numbers longer than
`MAX_JSON_NUMBER_LENGTH` characters (Python refuses int strings over 4,300 digits with
a bare ValueError) or too large for a float (`1e400` would become inf), `NaN` and
`Infinity` (not JSON), and keys longer than `MAX_JSON_KEY_LENGTH` characters.

`load_yaml` bounds what a small hostile file can cost, each refusal a `yaml.YAMLError`
with the line and column (`describe_yaml_error` words it in one line): nesting deeper
than `MAX_YAML_DEPTH` (PyYAML's composer recurses, so 100,000 `[` raise RecursionError),
aliases that would expand to more than `MAX_YAML_ALIAS_NODES` nodes (a 300-byte
"billion laughs" file is 9**9 strings once a consumer walks or prints it), an alias
inside the node it names (a cycle), integers longer than `MAX_YAML_INT_DIGITS` digits,
and any value a constructor cannot build (`2020-13-45`, `!!int abc`), which PyYAML
lets escape as a bare ValueError.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping names the same key twice; `line` is 1-based (YAML) or None (JSON)."""

    def __init__(self, key: Any, line: int | None, first_line: int | None = None):
        self.key, self.line, self.first_line = key, line, first_line
        where = f"line {line}: " if line is not None else ""
        first = f" (first at line {first_line})" if first_line is not None else ""
        super().__init__(f"{where}duplicate key {key!r}{first}; a key may appear once in a mapping")


#: Deepest nesting of mappings and sequences in a YAML file. A run config needs 4
#: (`mesh.rules` is a list of lists in a mapping in a mapping), a sweep spec or a tag
#: registry a few more.
MAX_YAML_DEPTH: int = 100
#: Most nodes that aliases may add to a YAML document once expanded: the sum, over
#: every `*alias`, of the size of the node it names (nested aliases included). Shared
#: blocks in a real file add hundreds; a billion-laughs file adds 10**8.
MAX_YAML_ALIAS_NODES: int = 100_000
#: Longest integer in a YAML file, in digits: Python's own limit for int strings, which
#: it enforces with a bare ValueError. What a setting may hold is then the schema's check
#: (`1e400` written out is refused as "must be a finite number", with its key).
MAX_YAML_INT_DIGITS: int = 4300


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping, and
    documents past the limits above (before they are constructed)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0  # collections being composed
        self._complete: set[int] = set()  # ids of the collections composed in full
        self._expanded_sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, expanded
        self._alias_nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._count_alias(self.peek_event())
            return super().compose_node(parent, index)
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels; flatten the file",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._complete.add(id(node))
        return node

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        node = self.anchors.get(event.anchor)
        if node is None:
            return  # an undefined alias: PyYAML's composer reports it
        if isinstance(node, yaml.CollectionNode) and id(node) not in self._complete:
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is inside the node it names (a cycle); "
                "write the value out", event.start_mark)
        self._alias_nodes += self._expanded_size(node)
        if self._alias_nodes > MAX_YAML_ALIAS_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand to more than {MAX_YAML_ALIAS_NODES:,} nodes (a "
                "\"billion laughs\" file?); write the values out or use fewer aliases", event.start_mark)

    def _expanded_size(self, node: yaml.Node) -> int:
        """How many nodes `node` stands for with every alias in it expanded; memoized,
        so shared nodes cost one visit however often they are used. Recursion is bounded
        by `MAX_YAML_DEPTH`, and `node` is complete (no cycle reaches it)."""
        key = id(node)
        if key not in self._expanded_sizes:
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = []
            self._expanded_sizes[key] = 1 + sum(self._expanded_size(child) for child in children)
        return self._expanded_sizes[key]

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as e:
            if isinstance(e, DuplicateKeyError):
                raise
            raise yaml.constructor.ConstructorError(None, None, str(e), node.start_mark) from None

    def construct_yaml_int(self, node):
        digits = len(str(node.value).lstrip("+-").replace("_", ""))
        if digits > MAX_YAML_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits is too long (at most {MAX_YAML_INT_DIGITS})",
                node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<:` merges may repeat keys on purpose
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, raising `DuplicateKeyError` for a repeated mapping key.

    Raises:
        yaml.YAMLError: not YAML, or past one of the limits above (`describe_yaml_error`).
        DuplicateKeyError: a mapping names a key twice.
    """
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """`line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow
    sequence at line 2, column 10)`: PyYAML's message without its quoted snippet, on one line."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = error.problem or error.context or "not valid YAML"
    if error.problem and error.context:
        at = error.context_mark
        context_at = f" at line {at.line + 1}, column {at.column + 1}" if at is not None and at != mark else ""
        text += f" ({error.context}{context_at})"
    return where + " ".join(text.split())


#: Deepest nesting of objects and arrays in a JSON record. A document needs 3 (its
#: segments are objects in a list in an object; the shipped corpora use no more);
#: metadata may nest further, to a point.
MAX_JSON_DEPTH: int = 64
#: Longest number in a JSON record, in characters (sign, digits, point and exponent).
MAX_JSON_NUMBER_LENGTH: int = 100
#: Longest object key in a JSON record, in characters.
MAX_JSON_KEY_LENGTH: int = 256

# A JSON string, escapes included; `[^"\\]` and `\\.` never overlap, so no backtracking.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonLimitError(ValueError):
    """A JSON record exceeds one of the limits above; the message says which and by how much."""


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raises `JsonLimitError` if objects and arrays in `text` nest deeper than `limit`.

    Iterative, and stops at the first bracket past the limit, so a record a million
    levels deep costs no more than one `limit` deep. Brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") <= limit:  # cannot nest deeper: skip the scan
        return
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        if depth > limit:
            raise JsonLimitError(f"nested deeper than {limit} levels (a document needs 3; "
                                 "flatten the metadata)")


def _too_long_number(text: str) -> JsonLimitError:
    return JsonLimitError(f"number too large: {len(text)} characters ({text[:12]}...); "
                          f"at most {MAX_JSON_NUMBER_LENGTH}")


def _parse_int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_LENGTH:
        raise _too_long_number(text)
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_LENGTH:
        raise _too_long_number(text)
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"number too large: {text} does not fit a 64-bit float")
    return value


def _refuse_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not a JSON number (write null, or the number as a string)")


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if len(key) > MAX_JSON_KEY_LENGTH:
            raise JsonLimitError(f"key longer than {MAX_JSON_KEY_LENGTH} characters "
                                 f"({len(key)} characters, starting {key[:20]!r})")
        if key in out:
            raise DuplicateKeyError(key, None)
        out[key] = value
    return out


def loads_json(text: str) -> Any:
    """`json.loads(text)` for one record, refusing repeated keys and records past the limits.

    Raises:
        json.JSONDecodeError: `text` is not JSON (`describe_json_error` words it).
        DuplicateKeyError: an object names a key twice.
        JsonLimitError: too deep, a number too large, NaN or Infinity, or a key too long.
    """
    check_json_depth(text)
    return json.loads(text, object_pairs_hook=_checked_object, parse_int=_parse_int,
                      parse_float=_parse_float, parse_constant=_refuse_constant)


def describe_json_error(error: json.JSONDecodeError) -> str:
    """`Expecting value at column 31`; `json`'s messages that end in "at" get no second one."""
    where = "column" if error.msg.endswith(" at") else "at column"
    return f"{error.msg} {where} {error.colno}"
