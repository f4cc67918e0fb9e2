"""YAML files as frozen dataclasses: one typed loader for every YAML file metatrain reads.

    load_typed(cls, path, overrides)        a file (and its `base:` chain) -> an instance of `cls`
    load_typed_dict(cls, raw, overrides)    an already resolved mapping -> an instance of `cls`
    build_typed(cls, raw)                   a mapping -> `cls`, every value type-checked
    to_plain_data(config)                   an instance -> plain YAML-ready data
    save_typed(config, path)                written so that `load_typed` reads it back equal

`cls` is a frozen dataclass whose fields may be other dataclasses (nested mappings),
`X | None`, `Literal[...]`, lists, tuples, mappings, enums, numbers, strings and `Path`s.
A YAML file may name a `base:` file it overlays, merged key by key (mappings merge,
anything else, lists too, is replaced). `KEY=VALUE` overrides (`--set a.b=value`,
values parsed as YAML scalars or flow collections) are applied after the merge. An
unknown key anywhere is an error that names the full dotted key and the closest valid
one; a value of the wrong type names its key and the expected type.

Hostile files cost little: files are read through `metatrain.io.yaml_files` (regular
files only, bounded in size, UTF-8, nesting and aliases bounded), and a value quoted in
a message is cut to a readable length (`shown`).
Integers are bounded to 64 bits, what numpy and jax can hold.

Paths: a relative path written in a YAML file is relative to *the directory of that
file*; a relative path given in an override is relative to the current working
directory. Loaded instances hold absolute paths (a `gs://` URL stays a URL), so a saved
file loads back equal from anywhere.

The schemas live with what they configure (the run config in `metatrain.config`, sweep
specs in `metatrain.sweep.spec`); nothing here knows any of them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import yaml

from metatrain.errors import UserError
from metatrain.io.outputs import write_atomically
from metatrain.io.storage import absolute, as_path, is_remote
from metatrain.io.strict_parsing import (
    DuplicateKeyError,
    describe_yaml_error,
    load_yaml,
)
from metatrain.io.yaml_files import read_yaml

#: The key of a YAML file that names the file it overlays.
BASE_KEY = "base"


# -- loading ------------------------------------------------------------------------------


def load_typed(cls: type, path: str | os.PathLike, overrides: Sequence[str] = (), *,
               override_example: str | None = None) -> Any:
    """Read YAML file `path` as an instance of dataclass `cls`.

    Args:
        cls: the frozen dataclass the file maps onto.
        path: the YAML file (local or `gs://`); its `base:` chain is followed.
        overrides: `"section.key=value"` strings (values parsed as YAML scalars or flow
            collections, e.g. `trainer.steps=50`, `mesh.rules=[[batch, data]]`).
        override_example: an override shown in the message for a malformed one.

    Returns:
        The instance, its relative paths made absolute.

    Raises:
        UserError: missing file, bad YAML, a `base:` cycle, an unknown key (with the
            closest valid one), a value of the wrong type, or a failed invariant.
    """
    path = absolute(path)  # may be gs://
    raw = read_tree(cls, path)
    for override in overrides:
        apply_override(cls, raw, override, example=override_example)
    where = str(path) + _with_overrides(overrides)
    return build_typed(cls, raw, prefix="", where=where)


def load_typed_dict(cls: type, raw: Mapping[str, Any], overrides: Sequence[str] = (), *, where: str,
                    override_example: str | None = None) -> Any:
    """An instance of `cls` from an already resolved mapping (its paths absolute), with overrides.

    Args:
        cls: the frozen dataclass the mapping maps onto.
        raw: the mapping (not modified).
        overrides: `"section.key=value"` strings, as for `load_typed`.
        where: where the mapping came from, for the messages.
        override_example: an override shown in the message for a malformed one.

    Raises:
        UserError: an unknown key, a value of the wrong type, or a failed invariant.
    """
    tree = copy.deepcopy(dict(raw))
    for override in overrides:
        apply_override(cls, tree, override, example=override_example)
    return build_typed(cls, tree, prefix="", where=where + _with_overrides(overrides))


def to_plain_data(config: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, str, numbers) for a dataclass instance (or any
    value holding some)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: to_plain_data(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.init
        }
    if isinstance(config, Mapping):
        return {str(k): to_plain_data(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain_data(v) for v in config]
    if isinstance(config, os.PathLike):  # a local Path or a remote epath.Path
        return str(config)
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, np.generic):
        return config.item()
    return config


def save_typed(config: Any, path: str | os.PathLike, *, option: str = "config") -> None:
    """Write `config` as YAML (no `base:`, absolute paths), atomically, so that `load_typed`
    reads it back equal.

    Args:
        config: a dataclass instance.
        path: the file (local or `gs://`).
        option: what names `path`, for the messages of the output checks.
    """
    text = yaml.safe_dump(to_plain_data(config), sort_keys=False, default_flow_style=None)
    write_atomically(path, text, option=option)


def read_tree(cls: type, path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """YAML file `path` merged over its `base:` chain, with the relative values of
    `cls`'s `Path` fields made absolute against the directory of the file that wrote them.

    Args:
        cls: the dataclass the file maps onto (which fields are paths).
        path: the file (absolute).
        chain: the files whose `base:` led here (for the messages and loop detection).

    Raises:
        UserError: a file cannot be read, a `base:` is not a file name, or the chain loops.
    """
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"config `base:` chain loops: {cycle}")
    data = read_yaml(path, f"{chain[-1]}: `base:`" if chain else "config file")
    _resolve_paths(cls, data, path.parent)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: `base:` must be a file name, got {shown(base)}")
    base_path = absolute(base if is_remote(base) else path.parent / base)  # a bucket URL stays one
    return _merge(read_tree(cls, base_path, (*chain, path)), data)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay wins; mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(cls: type, raw: dict[str, Any], override: str, *, example: str | None = None) -> None:
    """Place `"a.b=value"` into the raw mapping `raw` of dataclass `cls` (in place).

    The key path is checked against `cls` first; a relative path value is made absolute
    against the current working directory.

    Args:
        cls: the dataclass `raw` maps onto.
        raw: the merged mapping read from YAML.
        override: `KEY=VALUE`, the value a YAML scalar or flow collection.
        example: an override shown in the message for a malformed one.

    Raises:
        UserError: not `KEY=VALUE`, a value that is not YAML, or an unknown key.
    """
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        hint = f", e.g. --set {example}" if example else ""
        raise UserError(f"--set {shown(override)}: expected KEY=VALUE{hint}")
    try:
        value = load_yaml(text) if text.strip() else None
    except DuplicateKeyError as e:
        raise UserError(f"--set {shown(override)}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--set {shown(override)}: value is not valid YAML: {describe_yaml_error(e)}") from None
    parts = key.split(".")
    _check_key_path(cls, parts, key)
    value = _resolve_paths_in_value(_field_type_at(cls, parts), value, Path.cwd())
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


# -- typed construction --------------------------------------------------------------------


def _dataclass_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, valid: Sequence[str], prefix: str, where: str) -> UserError:
    full = f"{prefix}{key}"
    if _is_secret(key):
        return UserError(f"{where}: '{full}' is not a config key: credentials are never read from a config (it is "
                         "saved with every checkpoint); set them in the environment, e.g. WANDB_API_KEY for W&B")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    return UserError(
        f"{where}: unknown config key '{full}'{hint} (valid keys at {section}: {', '.join(valid)})"
    )


def _check_key_path(cls: type, parts: Sequence[str], key: str) -> None:
    """Unknown-key error for an override path, before its value is placed."""
    prefix = ""
    current: Any = cls
    for part in parts:
        current = _dataclass_of(current)
        if current is None:
            return  # inside a mapping or list: checked when the value is built
        fields = _dataclass_fields(current)
        if part not in fields:
            raise _unknown_key(part, list(fields), prefix, f"--set {key}")
        current = fields[part][1]
        prefix += part + "."


def _field_type_at(cls: type, parts: Sequence[str]) -> Any:
    current: Any = cls
    for part in parts:
        dc = _dataclass_of(current)
        if dc is None:
            return Any
        current = _dataclass_fields(dc)[part][1]
    return current


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in `tp` (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def build_typed(cls: type, raw: Any, prefix: str = "", where: str = "<memory>") -> Any:
    """A frozen dataclass `cls` from a YAML mapping, every value type-checked.

    Used for the run config and for other typed YAML files (sweep specs), so their
    errors read alike: an unknown key names the closest valid one, a bad value its key.

    Args:
        cls: the dataclass; nested dataclass fields are built from nested mappings.
        raw: the mapping read from YAML.
        prefix: dotted key prefix for messages (e.g. "model.").
        where: the file, for messages.

    Raises:
        UserError: an unknown or missing key, or a value of the wrong type.
    """
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: '{prefix[:-1] or 'config'}' must be a mapping of keys, got {shown(raw)}")
    fields = _dataclass_fields(cls)
    for key in raw:
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix, where)
    kwargs = {}
    for name, (field, tp) in fields.items():
        if name in raw:
            kwargs[name] = _convert(tp, raw[name], f"{prefix}{name}", where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: '{prefix}{name}' is required but not set")
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{where}: {prefix[:-1] or 'config'}: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {prefix[:-1] or 'config'}: {e}") from None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlong = 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 8
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """`repr(value)` cut to a readable length (nested and long values elided with `...`), so
    a message about a value of 100,000 items, or one a YAML alias bomb built, stays a line."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int past Python's 4,300-digit str limit
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"


def _kind(value: Any) -> str:
    """`list`, or `list of 100000` when its items were elided."""
    name = type(value).__name__
    if isinstance(value, (list, tuple, dict, set)) and len(value) > _SHOWN.maxlist:
        return f"{name} of {len(value)}"
    return name


#: Words of a key that holds a credential. No config has one (a credential is read from
#: the environment); an override naming one is never echoed back in a message.
SECRET_WORDS: tuple[str, ...] = ("api_key", "apikey", "secret", "password")


def _is_secret(text: str) -> bool:
    return any(word in text.lower() for word in SECRET_WORDS)


def _with_overrides(overrides: Sequence[str]) -> str:
    """` with --set a=1 b=2` for a message's `where`, each override cut to a readable length
    (the value of one that names a credential left out)."""
    def show(o: str) -> str:
        return f"{o.partition('=')[0]}=<not shown>" if _is_secret(o) else shown(o)[1:-1]

    return " with --set " + " ".join(show(o) for o in overrides) if overrides else ""


def _wrong_type(tp: Any, value: Any, key: str, where: str) -> UserError:
    return UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {shown(value)} ({_kind(value)})")


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    """`value` (from YAML) as type `tp`, or a UserError naming `key` and the expected type."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # `X | None`: X's own error is the useful one
            return _convert(alternatives[0], value, key, where)
        for alt in alternatives:
            try:
                return _convert(alt, value, key, where)
            except UserError:
                continue
        raise _wrong_type(tp, value, key, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {shown(value)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_typed(tp, value, f"{key}.", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong_type(tp, value, key, where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(tp, value, key, where)
        if not -(2**63) <= value < 2**63:
            raise UserError(f"{where}: '{key}' must be an integer in [-2**63, 2**63) (numpy and jax hold no "
                            f"more), got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise _wrong_type(tp, value, key, where) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(tp, value, key, where)
        else:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                number = math.inf
        if not math.isfinite(number):  # `.inf`, `.nan`, 1e400: NaN by step 2, never a setting
            raise UserError(f"{where}: '{key}' must be a finite number, got {shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _wrong_type(tp, value, key, where)
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise _wrong_type(tp, value, key, where)
        try:
            return as_path(value)  # a `gs://` value stays a URL (`metatrain.io.storage`)
        except UserError as e:  # an unsupported scheme, a malformed bucket URL
            raise UserError(f"{where}: '{key}': {e}") from None
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(tp, value, key, where)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(f"{where}: '{key}' must be a list of {len(args)} items, got {shown(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(tp, value, key, where)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, f"{key}", where): _convert(val_tp, v, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _wrong_type(tp, value, key, where) from None
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _wrong_type(tp, value, key, where)
        return value
    return value


# -- relative paths --------------------------------------------------------------------------


def _resolve_paths(cls: type, raw: Any, base_dir: Path) -> None:
    """Make relative values of `Path`-typed fields absolute (in place), against `base_dir`."""
    if not isinstance(raw, dict):
        return
    fields = _dataclass_fields(cls)
    for name, value in raw.items():
        if name in fields:
            raw[name] = _resolve_paths_in_value(fields[name][1], value, base_dir)


def _resolve_paths_in_value(tp: Any, value: Any, base_dir: Path) -> Any:
    """`value` with every string in a `Path` position made absolute against `base_dir`."""
    if tp is Any or value is None:
        return value
    dc = _dataclass_of(tp)
    if dc is not None:
        _resolve_paths(dc, value, base_dir)
        return value
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if tp is Path or (_is_union(tp) and Path in args):
        if isinstance(value, str) and not is_remote(value):
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else absolute(base_dir / str(path)))
        return value
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence) and isinstance(value, list) and args:
        return [_resolve_paths_in_value(args[0], v, base_dir) for v in value]
    if origin in (dict, Mapping) and isinstance(value, dict) and len(args) == 2:
        return {k: _resolve_paths_in_value(args[1], v, base_dir) for k, v in value.items()}
    return value
