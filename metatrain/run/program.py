"""The compiled side of a run: mesh, model, optimizer, shardings and the jitted steps.

`build_train_program(config, devices)` is the one place that turns a `RunConfig` into
the functions that run on devices; the trainer runs them on real data, and
`metatrain compile` lowers the same step ahead of time for a TPU topology. Nothing here
reads data, files or clocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from metatrain.config import RunConfig
from metatrain.data.packing import BATCH_FIELDS
from metatrain.kernels import LossSharding
from metatrain.models import Transformer
from metatrain.parallel.mesh import (
    LogicalRules,
    batch_sharding,
    build_mesh,
    check_fits,
    mesh_axes_of,
)
from metatrain.run.optimizer import build_optimizer, learning_rate_schedule
from metatrain.run.state import TrainState, abstract_state, state_shardings
from metatrain.run.step import make_eval_step, make_train_step


def loss_sharding_for(mesh: Mesh, rules: LogicalRules) -> LossSharding:
    """How the loss kernel sees the mesh: rows on the `batch` axes, vocabulary on `vocab`'s.

    Pallas (Mosaic) kernels are not partitioned automatically, so the loss runs inside
    `shard_map` with this layout on every backend.
    """
    batch_entry = mesh_axes_of(("batch",), rules)[0]
    vocab_entry = mesh_axes_of(("vocab",), rules)[0]
    batch_axes = () if batch_entry is None else (batch_entry,) if isinstance(batch_entry, str) else tuple(batch_entry)
    if isinstance(vocab_entry, tuple):
        vocab_entry = vocab_entry[0] if len(vocab_entry) == 1 else None
    vocab_axis = vocab_entry if vocab_entry and mesh.shape[vocab_entry] > 1 else None
    return LossSharding(mesh, batch_axes=batch_axes, vocab_axis=vocab_axis)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything compiled for one run config on one set of devices.

    Attributes:
        mesh: the device mesh.
        rules: logical-to-mesh axis rules (`config.mesh.rules`).
        model: the flax module.
        optimizer: the optax transformation.
        schedule: learning rate by step.
        shardings: a `TrainState` of `NamedSharding`s.
        batch_sharding: sharding of every `[B, T]` batch field.
        train_step: jitted, donating `(state, batch) -> (state, metric sums)`.
        eval_step: jitted `(params, batch) -> metric sums`.
    """

    config: RunConfig
    mesh: Mesh
    rules: LogicalRules
    model: Transformer
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the train state."""
        return abstract_state(self.model, self.optimizer, self.shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs (with shardings) of one global `[batch_size, seq_len]` batch."""
        tc = self.config.trainer
        return {
            name: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), dtype, sharding=self.batch_sharding)
            for name, dtype in BATCH_FIELDS.items()
        }


def build_train_program(
    config: RunConfig, devices: Sequence[Any] | None = None, *, token_bytes: np.ndarray | None = None
) -> TrainProgram:
    """Mesh, model, optimizer and jitted steps for `config` over `devices` (default: all).

    `token_bytes` (int [V], UTF-8 bytes per token) makes the eval step also sum the
    bytes of text targets (`bytes/text`), for bits per byte.

    Trace (first call, or `.lower`) the steps inside
    `metatrain.parallel.mesh.sharding_context(program.mesh, program.rules)`.

    Raises:
        UserError: the mesh does not fit the devices, or the model or batch the mesh.
    """
    tc, rules = config.trainer, config.mesh.rules
    mesh = build_mesh(config.mesh, devices)
    check_fits(config.model, mesh, tc.batch_size, rules, grad_accum=tc.grad_accum)
    model = Transformer(config.model)
    schedule = learning_rate_schedule(config.optimizer, tc.steps)
    optimizer = build_optimizer(config.optimizer, tc.steps, config.model)
    shardings = state_shardings(model, optimizer, mesh, rules)
    rows = batch_sharding(mesh, rules)
    loss_sharding = loss_sharding_for(mesh, rules)
    train_step = jax.jit(
        make_train_step(
            model, config.model, config.loss, optimizer, schedule, tc.grad_accum, loss_sharding
        ),
        in_shardings=(shardings, rows),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model, config.model, config.loss, loss_sharding, token_bytes),
        in_shardings=(shardings.params, rows),
    )
    return TrainProgram(
        config=config,
        mesh=mesh,
        rules=rules,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        shardings=shardings,
        batch_sharding=rows,
        train_step=train_step,
        eval_step=eval_step,
    )
