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

This module is the schema (the sections above and their invariants) and the four thin
functions that load and save it. The general YAML -> frozen dataclass loader they call
(`base:` overlays, overrides, type checks, the messages) is `metatrain.io.dataclass_yaml`;
the sections owned elsewhere live with what they configure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from metatrain.data.config import DataConfig
from metatrain.errors import UserError
from metatrain.io.dataclass_yaml import load_typed, load_typed_dict, save_typed, to_plain_data
from metatrain.io.paths import DEFAULT_CONFIG
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
            the last step ("constant" keeps the peak). "wsd" (warmup-stable-decay) holds
            the peak and cools down over the last `decay_fraction` of the run only, so
            the learning rate of a step before the cooldown does not depend on
            `trainer.steps`: a run resumed with a longer `trainer.steps` keeps its stable
            phase, and one stable run can be branched into cooldowns of several lengths
            (`checkpoint.branch_from`).
        decay_fraction: with "wsd", the share of `trainer.steps` spent cooling down
            (rounded to whole steps; 0: no cooldown, the run stays at the peak).
        cooldown_shape: with "wsd", the cooldown from the peak to `min_lr_ratio` of it:
            "linear", or "1-sqrt" (Hägele et al. 2024, arXiv 2405.18392): at the share t
            of the cooldown done, lr = floor + (peak - floor) * (1 - t) or
            (1 - sqrt(t)), with floor = `min_lr_ratio * learning_rate`.
        min_lr_ratio: final learning rate as a fraction of the peak.
        b1, b2, eps: Adam moments.
        weight_decay: decoupled weight decay (not applied to norm scales).
        clip_norm: gradients are scaled down to at most this global norm.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 50
    decay: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        _require(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _require(0 <= self.decay_fraction <= 1, f"decay_fraction={self.decay_fraction} must be in [0, 1]")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0 <= self.b1 < 1, f"b1={self.b1} must be in [0, 1)")
        _require(0 <= self.b2 < 1, f"b2={self.b2} must be in [0, 1)")
        _require(self.eps > 0, f"eps={self.eps} must be > 0")
        _require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _require(self.clip_norm > 0, f"clip_norm={self.clip_norm} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Where a run logs in Weights & Biases (the optional `wandb` extra).

    The API key is read by `wandb` from the environment (`WANDB_API_KEY`) or its own
    login, never from this config, the work directory or the logs.

    Attributes:
        project: the W&B project.
        entity: the team or user owning the project (null: the key's default).
        name: the run's display name (null: the work directory's name).
        mode: "online", "offline" (written under `WORKDIR/wandb/`, uploaded later with
            `wandb sync`) or "disabled".
        tags: labels shown on the run.
    """

    project: str
    entity: str | None = None
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(self.project.strip()), "trainer.wandb.project is empty; name the W&B project")


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
        seed: parameter initialisation (the data order has its own seed in `data`), in
            [0, 2**32): what `jax.random.key` and numpy's generators take everywhere.
        progress: show progress: a live bar on a terminal, else a line every `log_every` steps on stderr.
        wandb: log every metric to Weights & Biases too (`WandbConfig`; null: not at all).
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
    wandb: WandbConfig | None = None

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"steps={self.steps} must be >= 1")
        _require(self.steps <= 2**31 - 1, f"steps={self.steps} is more than a run can count (the train state counts "
                                          f"steps in int32: at most 2147483647)")
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
        _require(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints in the work directory (orbax CheckpointManager).

    Attributes:
        every: steps between saves (the last step is always saved).
        keep: how many recent checkpoints to keep.
        async_save: write in the background while training continues.
        init_from: start a new run from another run's parameters: its work directory
            (the newest checkpoint) or one step directory (`W/checkpoints/<step>`). The
            optimizer, the step count and the data start afresh; the model's shape must be
            this run's. Read only when the work directory has no checkpoint yet (a resume
            restores its own).
        branch_from: continue another run's checkpoint in this work directory: one step
            directory (`W/checkpoints/<step>`) whose whole state (parameters, optimizer
            moments, step count and data position) this run starts from, checked like
            a resume (only keys that may change on resume may differ). A cooldown branch
            of a "wsd" run. Read only when the work directory has no checkpoint yet.
        keep_steps: steps whose checkpoints are saved even off the `every` cadence and
            never deleted by `keep` (where cooldown branches start).
    """

    every: int = 100
    keep: int = 3
    async_save: bool = True
    init_from: Path | None = None
    branch_from: Path | None = None
    keep_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"every={self.every} must be >= 1")
        _require(self.keep >= 1, f"keep={self.keep} must be >= 1")
        _require(all(s >= 1 for s in self.keep_steps), f"keep_steps={list(self.keep_steps)}: steps must be >= 1")
        _require(self.init_from is None or self.branch_from is None,
                 "checkpoint.init_from and checkpoint.branch_from are both set; a run starts from one of them")


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
        late = [s for s in self.checkpoint.keep_steps if s > self.trainer.steps]
        if late:
            raise UserError(f"checkpoint.keep_steps {late} are past trainer.steps={self.trainer.steps} and would never "
                            "be saved; keep steps of this run, or train longer")
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


# -- loading and saving ---------------------------------------------------------------------

#: The override shown when one is malformed.
_OVERRIDE_EXAMPLE = "trainer.steps=50"


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
    return load_typed(RunConfig, DEFAULT_CONFIG if path is None else path, overrides,
                      override_example=_OVERRIDE_EXAMPLE)


def load_config_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), *, where: str) -> RunConfig:
    """A run config from an already resolved mapping (a checkpoint's stored config, whose
    paths are absolute), with `--set` overrides; errors name `where`."""
    return load_typed_dict(RunConfig, raw, overrides, where=where, override_example=_OVERRIDE_EXAMPLE)


def config_to_dict(config: Any) -> Any:
    """Plain YAML-ready data (dicts, lists, str, numbers) for a config dataclass."""
    return to_plain_data(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (no `base:`, absolute paths): `load_config(path) == config`."""
    save_typed(config, path, option="config")
