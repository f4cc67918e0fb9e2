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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping."""

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


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, raising `DuplicateKeyError` for a repeated mapping key."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


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
