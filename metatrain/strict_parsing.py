"""YAML and JSON parsing that refuses duplicate keys (PyYAML and `json` keep the last).

A second `bad:` under `controls` in a tag registry, `steps` twice in a run config or
`"kind"` twice in a document would otherwise silently win over the first. Every YAML
file metatrain reads goes through `load_yaml`; every JSON document record through
`loads_json`.
"""

from __future__ import annotations

import json
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key, None)
        out[key] = value
    return out


def loads_json(text: str) -> Any:
    """`json.loads(text)`, raising `DuplicateKeyError` for a repeated object key."""
    return json.loads(text, object_pairs_hook=_no_duplicates)
