"""Reading a trained run: one checkpoint's parameters, its stored config, the run's encoder.

Everything that uses a trained model without training it (`metatrain generate`, the
serving engine, `metatrain eval`, `metatrain export`, `metatrain annotate --generator
metatrain`) reads the run through `load_checkpoint`:

  * which checkpoint: `--workdir W` (its newest intact one, or `step`) or
    `--checkpoint W/checkpoints/<step>` (`resolve_checkpoint`);
  * the parameters only (no optimizer moments are read), through
    `Checkpointer.restore_params` opened read-only: a damaged newer checkpoint is
    reported and skipped, never moved;
  * where they go: one device, or straight onto a device mesh (`mesh=`, or
    `mesh_settings=` from `--set mesh.KEY=VALUE`, the mesh then chosen for the stored
    model), each array read as its shards under the run's training sharding rules with
    the rows on `data` only (`metatrain.parallel.mesh.inference_rules`), never whole on
    one device; a model the mesh cannot split is refused first, in one line;
  * the model shape, mantra and mantra policy from the config stored in the checkpoint
    itself, so they are the ones the parameters were trained with;
  * the tokenizer and tag registry: the run's copies beside `checkpoints/`
    (`metatrain.run.layout`), else the paths its config names (`run_files`).

The work directory may be in a bucket (`gs://...`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh

from metatrain.errors import FaultError, UserError
from metatrain.io.storage import StoragePath, absolute, as_path
from metatrain.models import ModelConfig, init_params_shape
from metatrain.parallel.mesh import (
    DEFAULT_RULES,
    LogicalRules,
    MeshConfig,
    build_inference_mesh,
    check_inference_fits,
    inference_mesh_config,
    inference_rules,
    param_shardings,
)
from metatrain.run.checkpoint import Checkpointer, split_step_dir
from metatrain.run.layout import TAGS_FILE, TOKENIZER_FILE
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import DEFAULT_MANTRA


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready for decoding.

    Attributes:
        params: unboxed parameters, on one device or sharded over `mesh`.
        model_config: the model's shape.
        encoder: tokenizer, tag grammar and mantra (policy) of the run.
        step: the checkpoint's training step.
        path: the checkpoint's step directory.
        config: the resolved run config stored with the checkpoint (a dict).
        mesh: the mesh the parameters are on (None: one device).
        rules: the logical-to-mesh rules they were placed by (`inference_rules` of the
            training rules; None without a mesh): trace the model under these.
    """

    params: Any
    model_config: ModelConfig
    encoder: Encoder
    step: int
    path: StoragePath
    config: dict = dataclasses.field(default_factory=dict)
    mesh: Mesh | None = None
    rules: LogicalRules | None = None


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
    mesh: Mesh | None = None,
    mesh_settings: Sequence[str] | None = None,
    rules: LogicalRules | None = None,
) -> LoadedCheckpoint:
    """Restores a run's parameters (through the run's `Checkpointer`) and builds its encoder.

    Args:
        workdir: a `metatrain train` work directory: its checkpoint `step`, or its newest
            intact one (a damaged newer one is reported and skipped, never moved: this
            only reads).
        checkpoint: one step directory, `WORKDIR/checkpoints/<step>` (instead of
            `workdir`).
        step: with `workdir`, this checkpoint only.
        device: where the parameters go without a mesh (default: the first local device).
        mesh: restore each parameter straight onto this mesh, sharded by
            `inference_rules(rules)` (each device reads only its shards).
        mesh_settings: instead of `mesh`, the `--set mesh.KEY=VALUE` strings: the mesh is
            `inference_mesh_config(mesh_settings, stored model, len(jax.devices()))`,
            built once the stored model is known (an empty sequence: the default layout;
            None: no mesh).
        rules: the training rules to derive the inference rules from (None: the run's
            stored `mesh.rules`, else `DEFAULT_RULES`).

    Raises:
        UserError: no checkpoint (or none at `step`: the message names the steps there
            are); its tokenizer lacks a tag of its tag registry or has another
            vocabulary size than the model; a malformed mesh setting, or a model
            dimension the mesh cannot split (one line naming it).
        FaultError: the checkpoint (for `workdir` without `step`: every checkpoint)
            cannot be restored.
        ValueError: more than one of `device`, `mesh` and `mesh_settings`.
    """
    if sum(x is not None for x in (device, mesh, mesh_settings)) > 1:
        raise ValueError("give at most one of device, mesh and mesh_settings")
    run_dir, found = resolve_checkpoint(workdir, checkpoint)
    if step is not None:
        if checkpoint is not None:
            raise UserError("give --step with --workdir, not with --checkpoint (a step directory is one step)")
        found = step
    if mesh is None and mesh_settings is None:
        placement: _OnDevice | _OnMesh = _OnDevice(device or jax.local_devices()[0])
    else:
        placement = _OnMesh(mesh, mesh_settings, rules)
    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return _load(checkpointer, found, placement)
    finally:
        checkpointer.close()


def _model_config(stored: dict, where: StoragePath) -> ModelConfig:
    try:
        return ModelConfig(**stored["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint {where}: its saved config has no usable `model` section ({e})") from None


def _stored_rules(stored: dict, where: StoragePath) -> LogicalRules:
    """The training rules in the stored config's `mesh.rules` (DEFAULT_RULES when absent)."""
    raw = (stored.get("mesh") or {}).get("rules")
    if raw is None:
        return DEFAULT_RULES
    try:
        rules = tuple((logical, tuple(axes) if isinstance(axes, list) else axes) for logical, axes in raw)
        return MeshConfig(rules=rules).rules
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"checkpoint {where}: its saved config has no usable `mesh.rules` ({e})") from None


class _OnDevice:
    """Every parameter whole on one device: `abstract(stored config, step dir)` gives the
    unboxed ShapeDtypeStructs, each with its sharding, of the stored model's parameters."""

    mesh: None = None
    rules: None = None
    refusal: None = None

    def __init__(self, device: jax.Device) -> None:
        self.sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract(self, stored: dict, where: StoragePath) -> Any:
        shapes = nn.unbox(init_params_shape(_model_config(stored, where)))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.sharding), shapes)


class _OnMesh:
    """Every parameter sharded over a mesh (given, or chosen from settings for the stored
    model) by the inference rules of the training rules, the fit checked first; `mesh`
    and `rules` are those of the last `abstract` call, `refusal` the error it raised."""

    def __init__(self, mesh: Mesh | None, settings: Sequence[str] | None, rules: LogicalRules | None) -> None:
        self.given, self.settings, self.training_rules = mesh, settings, rules
        self.mesh: Mesh | None = None
        self.rules: LogicalRules | None = None
        self.refusal: UserError | None = None

    def abstract(self, stored: dict, where: StoragePath) -> Any:
        try:
            model_config = _model_config(stored, where)
            training = self.training_rules or _stored_rules(stored, where)
            self.rules = inference_rules(training)
            self.mesh = self.given if self.given is not None else build_inference_mesh(
                inference_mesh_config(self.settings or (), model_config, len(jax.devices()), rules=training)
            )
            check_inference_fits(model_config, self.mesh, self.rules)
        except UserError as e:
            self.refusal = e  # `restore_params` reports an error in `read(step)` as damage
            raise
        boxed = init_params_shape(model_config)
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            nn.unbox(boxed), param_shardings(boxed, self.mesh, self.rules),
        )


def _load(checkpointer: Checkpointer, step: int | None, placement: _OnDevice | _OnMesh) -> LoadedCheckpoint:
    """Read the parameters first (the newest that restores), then build the encoder for
    the config stored beside them."""
    try:
        step, params, config = checkpointer.restore_params(placement.abstract, step)
    except FaultError:
        if placement.refusal is not None:
            raise placement.refusal from None
        raise
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
    return LoadedCheckpoint(params, model_config, encoder, step, path, config, placement.mesh, placement.rules)
