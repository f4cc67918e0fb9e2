"""The run config: typed, frozen sections that YAML files map onto one to one.

    RunConfig
      model:      ModelConfig       (metatrain.models.config)
      data:       DataConfig        (metatrain.data.config)
      loss:       LossConfig
      optimizer:  OptimizerConfig
      trainer:    TrainerConfig
      mesh:       MeshConfig        (metatrain.parallel.mesh)
      checkpoint: CheckpointConfig

`load_config(path, overrides)` reads a YAML file, follows its `base:` chain (a preset
is a small overlay: `base: default.yaml` plus the keys it changes, merged key by key),
applies `--set a.b=value` overrides and builds the dataclasses, type-checking every
value. An unknown key anywhere is an error that names the full dotted key and the
closest valid one.

Paths: a relative path written in a YAML file is relative to *the directory of that
file* (so `configs/default.yaml` says `../data/sample/factbook.jsonl`, and a preset in
another directory can point at its own corpus); a relative path given with `--set` is
relative to the current working directory. Loaded configs hold absolute paths, and
`save_config` writes them that way, so a saved config loads back equal from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import yaml

from metatrain.data.config import DataConfig
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_CONFIG
from metatrain.io.storage import absolute, as_path, is_remote
from metatrain.io.strict_parsing import DuplicateKeyError, load_yaml
from metatrain.models.config import ModelConfig
from metatrain.parallel.mesh import MeshConfig
from metatrain.roles import LOSS_ROLE_LABELS, NUM_ROLES, Role

# -- sections owned here ----------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleWeights:
    """Weight of each role's next-token loss in the joint objective (docs/design.md section 3).

    A weight of 0 removes that role from loss and gradient (its loss is still reported).
    """

    text: float = 1.0
    thinking: float = 1.0
    mantra: float = 1.0
    tag: float = 1.0

    def __post_init__(self) -> None:
        for label in LOSS_ROLE_LABELS:
            if not getattr(self, label) >= 0:
                raise UserError(f"{label}={getattr(self, label)}: role weights must be >= 0")
        if not any(getattr(self, label) > 0 for label in LOSS_ROLE_LABELS):
            raise UserError("every role weight is 0, so nothing would be trained; make one positive")

    def as_array(self) -> np.ndarray:
        """[NUM_ROLES] float32 indexed by `Role` value; PAD (0) has weight 0."""
        weights = np.zeros(NUM_ROLES, np.float32)
        for label in LOSS_ROLE_LABELS:
            weights[Role.from_label(label)] = getattr(self, label)
        return weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The joint loss.

    Attributes:
        weights: per-role weights.
        z_loss: coefficient of the `log(Z)^2` penalty that keeps logits from drifting
            (PaLM); 0 disables it.
        impl: "pallas" (fused kernel), "chunked" (pure JAX, vocabulary in chunks),
            "naive" (full logits; reference) or "auto" (the best available).
        precision: dtype of the output projection's matmuls (always accumulated in f32):
            "compute" casts the f32 parameters to the model's compute dtype (`model.dtype`,
            bf16 in the presets), as the model's other matmuls do; "float32" casts the
            hidden states up instead (twice the VMEM and HBM traffic on TPU).
    """

    weights: RoleWeights = RoleWeights()
    z_loss: float = 1e-4
    impl: Literal["auto", "pallas", "chunked", "naive"] = "auto"
    precision: Literal["compute", "float32"] = "compute"

    def __post_init__(self) -> None:
        if not self.z_loss >= 0:
            raise UserError(f"z_loss={self.z_loss} must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup then decay, and global-norm gradient clipping.

    Attributes:
        learning_rate: peak learning rate, reached after `warmup_steps`.
        warmup_steps: linear warmup from 0.
        decay: shape of the decay from the peak to `min_lr_ratio * learning_rate` at
            the last step ("constant" keeps the peak).
        min_lr_ratio: final learning rate as a fraction of the peak.
        b1, b2, eps: Adam moments.
        weight_decay: decoupled weight decay (not applied to norm scales).
        clip_norm: gradients are scaled down to at most this global norm.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 50
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        _require(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0 <= self.b1 < 1, f"b1={self.b1} must be in [0, 1)")
        _require(0 <= self.b2 < 1, f"b2={self.b2} must be in [0, 1)")
        _require(self.eps > 0, f"eps={self.eps} must be > 0")
        _require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _require(self.clip_norm > 0, f"clip_norm={self.clip_norm} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """How long and on how much data to train.

    Attributes:
        steps: optimizer updates in the whole run (a resumed run continues to this).
        batch_size: global batch size in sequences (all devices and hosts together).
        seq_len: tokens per sequence.
        grad_accum: micro-batches per step (batch_size must be divisible by it).
        log_every: steps between metric lines.
        eval_every: steps between evaluations on the held-out split (0: never).
        eval_batches: batches per evaluation.
        eval_ablation: at every evaluation also score held-out documents with and without
            their thinking (`eval/ablation/removed_minus_kept`, bits per byte of text the
            thinking saves; `metatrain.evaluation.in_loop`), in at most `eval_batches`
            batches of each.
        seed: parameter initialisation (the data order has its own seed in `data`).
        progress: show a live progress bar on a terminal.
        profile: `[start, steps]`: a `jax.profiler` trace of steps `start .. start+steps-1`
            (1-based) in `WORKDIR/tensorboard/plugins/profile/`, for TensorBoard's profile
            plugin or xprof; null: no trace.
    """

    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    eval_ablation: bool = True
    seed: int = 0
    progress: bool = True
    profile: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"steps={self.steps} must be >= 1")
        if self.profile is not None:
            start, count = self.profile
            _require(start >= 1 and count >= 1, f"profile={list(self.profile)}: give [start step >= 1, steps >= 1]")
        _require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _require(self.seq_len >= 1, f"seq_len={self.seq_len} must be >= 1")
        _require(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}",
        )
        _require(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _require(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0: never)")
        _require(self.eval_batches >= 1, f"eval_batches={self.eval_batches} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints in the work directory (orbax CheckpointManager).

    Attributes:
        every: steps between saves (the last step is always saved).
        keep: how many recent checkpoints to keep.
        async_save: write in the background while training continues.
    """

    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"every={self.every} must be >= 1")
        _require(self.keep >= 1, f"keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs; the YAML sections map 1:1 onto these fields."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self) -> None:
        if self.trainer.seq_len > self.model.max_seq_len:
            raise UserError(
                f"trainer.seq_len={self.trainer.seq_len} is longer than model.max_seq_len="
                f"{self.model.max_seq_len}; shorten the sequences or raise model.max_seq_len"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens (padding included) consumed by one optimizer step."""
        return self.trainer.batch_size * self.trainer.seq_len

    @property
    def total_tokens(self) -> int:
        """Tokens over the whole run."""
        return self.tokens_per_step * self.trainer.steps

    @property
    def flops_per_step(self) -> int:
        """Model training FLOPs of one step (for MFU)."""
        return self.model.flops_per_token(self.trainer.seq_len) * self.tokens_per_step


# -- loading ------------------------------------------------------------------------------

_BASE_KEY = "base"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config.

    Args:
        path: YAML file; None means the embedded default, `configs/default.yaml`.
        overrides: `"section.key=value"` strings (values parsed as YAML scalars or flow
            collections, e.g. `trainer.steps=50`, `mesh.rules=[[batch, data]]`).

    Raises:
        UserError: missing file, bad YAML, a `base:` cycle, an unknown key (with the
            closest valid one), a value of the wrong type, or a failed invariant.
    """
    path = absolute(DEFAULT_CONFIG if path is None else path)  # may be gs://
    raw = _read_tree(path, chain=())
    for override in overrides:
        _apply_override(raw, override)
    where = str(path) + (" with --set " + " ".join(overrides) if overrides else "")
    return build_typed(RunConfig, raw, prefix="", where=where)


def load_config_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), *, where: str) -> RunConfig:
    """A run config from an already resolved mapping (a checkpoint's stored config, whose
    paths are absolute), with `--set` overrides; errors name `where`."""
    import copy

    tree = copy.deepcopy(dict(raw))
    for override in overrides:
        _apply_override(tree, override)
    return build_typed(RunConfig, tree, prefix="", where=where + (" with --set " + " ".join(overrides) if overrides else ""))


def config_to_dict(config: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, str, numbers) for a config dataclass."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: config_to_dict(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.init
        }
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, os.PathLike):  # a local Path or a remote epath.Path
        return str(config)
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, np.generic):
        return config.item()
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (no `base:`, absolute paths): `load_config(path) == config`."""
    from metatrain.io.outputs import write_atomically

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    write_atomically(path, text, option="config")


def _read_yaml(path: Path, named_by: str = "config file") -> dict[str, Any]:
    """The mapping in YAML file `path`; `named_by` says who named it, for the messages."""
    if path.is_dir():
        raise UserError(f"{named_by} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise UserError(f"{named_by} {path} does not exist")
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def _read_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The file merged over its `base:` chain, with its relative paths made absolute."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"config `base:` chain loops: {cycle}")
    data = _read_yaml(path, f"{chain[-1]}: `base:`" if chain else "config file")
    _resolve_paths(RunConfig, data, path.parent)
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: `base:` must be a file name, got {base!r}")
    return _merge(_read_tree(absolute(path.parent / base), (*chain, path)), data)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay wins; mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. --set trainer.steps=50")
    try:
        value = load_yaml(text) if text.strip() else None
    except DuplicateKeyError as e:
        raise UserError(f"--set {override!r}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--set {override!r}: value is not valid YAML: {e}") from None
    parts = key.split(".")
    _check_key_path(RunConfig, parts, key)
    value = _resolve_paths_in_value(_field_type_at(RunConfig, parts), value, Path.cwd())
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
        raise UserError(f"{where}: '{prefix[:-1] or 'config'}' must be a mapping of keys, got {raw!r}")
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


def _wrong_type(tp: Any, value: Any, key: str, where: str) -> UserError:
    return UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


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
            raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}{hint}")
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
            raise UserError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _wrong_type(tp, value, key, where)
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise _wrong_type(tp, value, key, where)
        return as_path(value)  # a `gs://` value stays a URL (`metatrain.io.storage`)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(tp, value, key, where)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(f"{where}: '{key}' must be a list of {len(args)} items, got {value!r}")
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
