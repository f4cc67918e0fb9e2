"""The pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`.

Metrics leave the step as *sums* (negative log-likelihood, token counts and correct
predictions per role) so that they can be added across steps, micro-batches and
hosts before being turned into means; see `metatrain.run.metrics`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metatrain.config import LossConfig
from metatrain.kernels import LossSharding
from metatrain.loss import joint_loss
from metatrain.models import ModelConfig, Transformer, output_projection
from metatrain.roles import Role
from metatrain.run.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _loss_and_stats(
    params,
    batch: Batch,
    model: Transformer,
    model_config: ModelConfig,
    loss_config: LossConfig,
    loss_sharding: LossSharding | None = None,
) -> tuple[jax.Array, Metrics]:
    hidden = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )  # [B, T, D] in the compute dtype
    projection = output_projection(params, model_config)  # [D, V] in the parameter dtype
    if loss_config.precision == "float32":
        hidden, projection = hidden.astype(jnp.float32), projection.astype(jnp.float32)
    else:
        projection = projection.astype(hidden.dtype)
    loss, stats = joint_loss(
        hidden,
        projection,
        batch["targets"],
        batch["target_roles"],
        jnp.asarray(loss_config.weights.as_array()),
        z_loss=loss_config.z_loss,
        impl=loss_config.impl,
        sharding=loss_sharding,
    )
    return loss, stats


def _split_microbatches(batch: Batch, grad_accum: int) -> Batch:
    """[B, T] -> [A, B/A, T]; row r of micro-batch a is global row a + A*r (keeps shards local)."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch,
    )


def make_train_step(
    model: Transformer,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    loss_sharding: LossSharding | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build the step. Gradients are of the global weighted mean, however it is split.

    `loss_sharding` runs the fused loss under `shard_map` with that layout (required for
    Pallas kernels on a multi-device mesh; see `metatrain.run.program`).

    With `grad_accum = A`, the batch is processed as A micro-batches in a `lax.scan`;
    each contributes (its weighted-mean loss x its weight sum / the batch's weight sum),
    so the accumulated gradient equals the gradient of the whole batch's loss.
    """
    weights = jnp.asarray(loss_config.weights.as_array())

    def micro_loss(params, micro: Batch, total_weight: jax.Array):
        loss, stats = _loss_and_stats(params, micro, model, model_config, loss_config, loss_sharding)
        return loss * stats["weight_sum"] / total_weight, stats

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        total_weight = jnp.maximum(weights[batch["target_roles"].astype(jnp.int32)].sum(), 1e-9)
        if grad_accum == 1:
            (loss, stats), grads = grad_fn(state.params, batch, total_weight)
        else:
            micro = _split_microbatches(batch, grad_accum)

            def body(carry, mb):
                loss_acc, grads_acc, stats_acc = carry
                (loss, stats), grads = grad_fn(state.params, mb, total_weight)
                carry = (
                    loss_acc + loss,
                    jax.tree.map(jnp.add, grads_acc, grads),
                    jax.tree.map(jnp.add, stats_acc, stats),
                )
                return carry, None

            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            stats_shape = jax.eval_shape(
                lambda p, b: micro_loss(p, b, total_weight)[1],
                state.params,
                jax.tree.map(lambda x: x[0], micro),
            )
            zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
            (loss, grads, stats), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), zero_grads, zero_stats), micro
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(stats)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(
    model: Transformer,
    model_config: ModelConfig,
    loss_config: LossConfig,
    loss_sharding: LossSharding | None = None,
    token_bytes: np.ndarray | None = None,
) -> Callable[[object, Batch], Metrics]:
    """`eval_step(params, batch) -> metric sums`, same per-role statistics as training.

    With `token_bytes` (int [V], `metatrain.evaluation.text_bytes`), also `bytes/text`:
    the UTF-8 bytes of the text targets, the denominator of bits per byte.
    """
    table = None if token_bytes is None else jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch: Batch) -> Metrics:
        loss, stats = _loss_and_stats(params, batch, model, model_config, loss_config, loss_sharding)
        stats = dict(stats)
        stats["loss_weighted_sum"] = loss * stats["weight_sum"]
        if table is not None:
            is_text = batch["target_roles"] == Role.TEXT
            stats["bytes/text"] = jnp.sum(jnp.where(is_text, table[batch["targets"]], 0.0))
        return stats

    return eval_step
