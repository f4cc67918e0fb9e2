"""Loading what generation needs from a training run: parameters, model shape, encoder.

A run's work directory (`metatrain train`) holds `checkpoints/<step>/` (orbax items
`state`, `data`, `config`), `tokenizer.model` and `tags.yaml`. Only the parameters are
restored from `state` (orbax partial restore: no optimizer moments are read), onto one
device. The model shape and the mantra come from the checkpoint's own `config` item,
so they are the ones the parameters were trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from metatrain.errors import UserError
from metatrain.models import ModelConfig, init_params_shape
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import DEFAULT_MANTRA


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready for decoding.

    Attributes:
        params: unboxed parameters on one device.
        model_config: the model's shape.
        encoder: tokenizer, tag grammar and mantra (policy) of the run.
        step: the checkpoint's training step.
        path: the checkpoint's step directory.
    """

    params: Any
    model_config: ModelConfig
    encoder: Encoder
    step: int
    path: Path


def resolve_checkpoint(workdir: Path | None = None, checkpoint: Path | None = None) -> Path:
    """The step directory meant by `--workdir DIR` (its latest) or `--checkpoint PATH`.

    Raises:
        UserError: neither or both given, or no checkpoint is there.
    """
    if (workdir is None) == (checkpoint is None):
        raise UserError("give exactly one of --workdir DIR (its latest checkpoint) or --checkpoint PATH")
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        if not (path / "state").is_dir() or not path.name.isdigit():
            raise UserError(
                f"{checkpoint} is not a checkpoint step directory (expected WORKDIR/checkpoints/<step> "
                "holding a `state` item, as written by `metatrain train`)"
            )
        return path
    directory = Path(workdir).resolve() / "checkpoints"
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit() and (p / "state").is_dir()]
    if not steps:
        raise UserError(f"no checkpoint in {directory}; train first with `metatrain train --workdir {workdir}`")
    return directory / str(max(steps))


def _run_file(path: Path, name: str, configured: str | None) -> Path:
    """The run's copy `WORKDIR/name` next to `checkpoints/`, else the configured path."""
    copy = path.parent.parent / name
    if copy.is_file():
        return copy
    if configured and Path(configured).is_file():
        return Path(configured)
    raise UserError(f"checkpoint {path}: cannot find the run's {name} (looked for {copy} and {configured})")


def _read_config(manager: ocp.CheckpointManager, path: Path) -> dict:
    try:
        config = manager.restore(int(path.name), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several kinds for a missing or unreadable item
        raise UserError(f"checkpoint {path}: cannot read its `config` item ({e})") from None
    return config["config"]


def _restore_params(manager: ocp.CheckpointManager, path: Path, config: ModelConfig) -> Any:
    """Only the `params` subtree of the `state` item, onto the first local device."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = nn.unbox(init_params_shape(config))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    state = ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
    )
    try:
        restored = manager.restore(int(path.name), args=ocp.args.Composite(state=state))
    except Exception as e:  # shape mismatches and unreadable files alike
        raise UserError(f"checkpoint {path}: cannot restore the model parameters ({e})") from None
    return restored["state"]["params"]


def load_checkpoint(workdir: Path | None = None, checkpoint: Path | None = None) -> LoadedCheckpoint:
    """Restores a run's parameters and builds its encoder.

    Args:
        workdir: a `metatrain train` work directory (its latest checkpoint is used).
        checkpoint: one step directory, `WORKDIR/checkpoints/<step>`.

    Raises:
        UserError: no checkpoint; its tokenizer lacks a tag of its tag registry or has
            another vocabulary size than the model; its files cannot be read.
    """
    path = resolve_checkpoint(workdir, checkpoint)
    with ocp.CheckpointManager(path.parent) as manager:
        return _load(manager, path)


def _load(manager: ocp.CheckpointManager, path: Path) -> LoadedCheckpoint:
    """`load_checkpoint` with the step directory's manager open."""
    config = _read_config(manager, path)
    try:
        model_config = ModelConfig(**config["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path}: its saved config has no usable `model` section ({e})") from None
    data = config.get("data", {})
    tokenizer = _run_file(path, "tokenizer.model", data.get("tokenizer"))
    tags = _run_file(path, "tags.yaml", data.get("tags"))
    try:
        encoder = Encoder.from_files(
            tokenizer, tags, mantra=data.get("mantra") or DEFAULT_MANTRA,
            mantra_policy=data.get("mantra_policy", "every"),
        )
    except UserError as e:
        raise UserError(f"checkpoint {path} cannot be decoded under its tag grammar: {e}") from None
    if encoder.vocab_size != model_config.vocab_size:
        raise UserError(
            f"checkpoint {path}: the tokenizer {tokenizer} has {encoder.vocab_size} tokens but the "
            f"model was trained for {model_config.vocab_size}; use the run's own tokenizer"
        )
    params = _restore_params(manager, path, model_config)
    return LoadedCheckpoint(params, model_config, encoder, int(path.name), path)
