"""Reading a trained run: one checkpoint's parameters, its stored config, the run's encoder.

Everything that uses a trained model without training it (`metatrain generate`, the
serving engine, `metatrain eval`, `metatrain export`, `metatrain annotate --generator
metatrain`) reads the run through `load_checkpoint`:

  * which checkpoint: `--workdir W` (its newest intact one, or `step`) or
    `--checkpoint W/checkpoints/<step>` (`resolve_checkpoint`);
  * the parameters only (no optimizer moments are read), onto one device, through
    `Checkpointer.restore_params` opened read-only: a damaged newer checkpoint is
    reported and skipped, never moved;
  * the model shape, mantra and mantra policy from the config stored in the checkpoint
    itself, so they are the ones the parameters were trained with;
  * the tokenizer and tag registry: the run's copies beside `checkpoints/`
    (`metatrain.run.layout`), else the paths its config names (`run_files`).

The work directory may be in a bucket (`gs://...`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax

from metatrain.errors import UserError
from metatrain.io.storage import StoragePath, absolute, as_path
from metatrain.models import ModelConfig, init_params_shape
from metatrain.run.checkpoint import Checkpointer, split_step_dir
from metatrain.run.layout import TAGS_FILE, TOKENIZER_FILE
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
        config: the resolved run config stored with the checkpoint (a dict).
    """

    params: Any
    model_config: ModelConfig
    encoder: Encoder
    step: int
    path: StoragePath
    config: dict = dataclasses.field(default_factory=dict)


def resolve_checkpoint(
    workdir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None
) -> tuple[StoragePath, int | None]:
    """`(work directory, step)` meant by `--workdir DIR` (step None: its newest intact
    checkpoint) or `--checkpoint WORKDIR/checkpoints/<step>`.

    Raises:
        UserError: neither or both given, or the path is not a checkpoint step directory.
    """
    if (workdir is None) == (checkpoint is None):
        raise UserError("give exactly one of --workdir DIR (its latest checkpoint) or --checkpoint PATH")
    if checkpoint is None:
        return absolute(workdir), None
    found = split_step_dir(as_path(checkpoint))
    if found is None:
        raise UserError(
            f"{checkpoint} is not a checkpoint step directory (expected WORKDIR/checkpoints/<step>, "
            "as written by `metatrain train`)"
        )
    return found


def run_files(workdir: StoragePath, config: dict) -> tuple[StoragePath, StoragePath]:
    """`(tokenizer, tag registry)` of the run in `workdir` whose stored config is `config`.

    Each is the run's copy beside `checkpoints/` (`WORKDIR/tokenizer.model`,
    `WORKDIR/tags.yaml`), else the path the config's `data` section names (either may
    be in a bucket).

    Raises:
        UserError: neither exists.
    """
    data = config.get("data", {})

    def find(name: str, configured: str | None) -> StoragePath:
        copy = workdir / name
        if copy.is_file():
            return copy
        if configured and as_path(configured).is_file():
            return as_path(configured)
        raise UserError(f"work directory {workdir}: cannot find the run's {name} (looked for {copy} and {configured})")

    return find(TOKENIZER_FILE, data.get("tokenizer")), find(TAGS_FILE, data.get("tags"))


def load_checkpoint(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    step: int | None = None,
    device: jax.Device | None = None,
) -> LoadedCheckpoint:
    """Restores a run's parameters (through the run's `Checkpointer`) and builds its encoder.

    Args:
        workdir: a `metatrain train` work directory: its checkpoint `step`, or its newest
            intact one (a damaged newer one is reported and skipped, never moved: this
            only reads).
        checkpoint: one step directory, `WORKDIR/checkpoints/<step>` (instead of
            `workdir`).
        step: with `workdir`, this checkpoint only.
        device: where the parameters go (default: the first local device).

    Raises:
        UserError: no checkpoint (or none at `step`: the message names the steps there
            are); its tokenizer lacks a tag of its tag registry or has another
            vocabulary size than the model.
        FaultError: the checkpoint (for `workdir` without `step`: every checkpoint)
            cannot be restored.
    """
    run_dir, found = resolve_checkpoint(workdir, checkpoint)
    if step is not None:
        if checkpoint is not None:
            raise UserError("give --step with --workdir, not with --checkpoint (a step directory is one step)")
        found = step
    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return _load(checkpointer, found, device or jax.local_devices()[0])
    finally:
        checkpointer.close()


def _model_config(stored: dict, where: StoragePath) -> ModelConfig:
    try:
        return ModelConfig(**stored["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint {where}: its saved config has no usable `model` section ({e})") from None


def _load(checkpointer: Checkpointer, step: int | None, device: jax.Device) -> LoadedCheckpoint:
    """Read the parameters first (the newest that restores), then build the encoder for
    the config stored beside them."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract_params(stored: dict, where: StoragePath) -> Any:
        shapes = nn.unbox(init_params_shape(_model_config(stored, where)))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    step, params, config = checkpointer.restore_params(abstract_params, step)
    path = checkpointer.step_dir(step)
    model_config = _model_config(config, path)
    tokenizer, tags = run_files(checkpointer.directory.parent, config)
    data = config.get("data", {})
    try:
        encoder = Encoder.from_files(
            tokenizer, tags, mantra=data.get("mantra") or DEFAULT_MANTRA,
            mantra_policy=data.get("mantra_policy", "every"),
        )
    except UserError as e:
        raise UserError(f"checkpoint {path} cannot be decoded under its tag grammar: {e}") from None
    if encoder.vocab_size != model_config.vocab_size:
        raise UserError(
            f"checkpoint {path}: model.vocab_size={model_config.vocab_size} but the tokenizer {tokenizer} "
            f"has {encoder.vocab_size} pieces; use the run's own tokenizer (WORKDIR/tokenizer.model), or "
            "`metatrain tokenizer resize-checkpoint` to grow the model to a new one"
        )
    return LoadedCheckpoint(params, model_config, encoder, step, path, config)
