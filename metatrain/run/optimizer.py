"""AdamW with warmup + decay, global-norm clipping, no weight decay on norm scales, and
μP's per-layer learning rates for a `parametrization: mup` model."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from metatrain.config import OptimizerConfig
from metatrain.models import ModelConfig, weight_decay_mask
from metatrain.models.transformer import hidden_matrix_mask


def warmup_length(config: OptimizerConfig, total_steps: int) -> int:
    """The warmup's updates: `warmup_steps`, cut short to leave a run its last update."""
    return min(config.warmup_steps, max(total_steps - 1, 0))


def cooldown_start(config: OptimizerConfig, total_steps: int) -> int:
    """The first update of a "wsd" run's cooldown (`total_steps` when it has none): the
    last `decay_fraction` of the run, rounded half up to whole steps (at least one when
    `decay_fraction` > 0), never inside the warmup.

    A cooldown branch of `total_steps` steps starts from the stable run's checkpoint at
    this step.
    """
    warmup = warmup_length(config, total_steps)
    length = math.floor(config.decay_fraction * total_steps + 0.5)
    if config.decay_fraction > 0:
        length = max(length, 1)
    return max(total_steps - length, warmup)


def rewarm_warning(step: int, before: OptimizerConfig, before_steps: int, after: OptimizerConfig,
                   after_steps: int) -> str | None:
    """The line to print when a resume at `step` raises the learning rate of a "wsd" run
    whose cooldown had begun (trained with `before` for `before_steps`, resumed with
    `after` for `after_steps`) by more than 1%, else None.

    A longer `trainer.steps` moves the cooldown later, so a checkpoint taken inside the old
    cooldown goes back towards the peak: a re-warm of a cooled model, not the longer stable
    run a cooldown branch gives. A checkpoint is at `step` after updates 0 .. step - 1.
    """
    if before.decay != "wsd" or after.decay != "wsd" or not 1 <= step < after_steps:
        return None
    start = cooldown_start(before, before_steps)
    if step <= start:
        return None
    was = float(learning_rate_schedule(before, before_steps)(step - 1))
    now = float(learning_rate_schedule(after, after_steps)(step))
    if now <= was * 1.01:
        return None
    cause = f"with trainer.steps={after_steps}" if after_steps != before_steps else "with the changed optimizer settings"
    line = (f"resuming at step {step}, inside the cooldown this run began at step {start} (trainer.steps="
            f"{before_steps}): {cause} the learning rate rises from {was:.4g} back to {now:.4g}, re-warming a "
            "cooled model")
    warmup = warmup_length(before, before_steps)
    if before.warmup_steps > warmup:
        line += (f" (its warmup of optimizer.warmup_steps={before.warmup_steps} updates was cut short at {warmup} "
                 "by trainer.steps, so it never reached its peak)")
    if start > warmup:  # it had a stable phase to branch from
        line += (f"; for a longer stable phase, train another --workdir with checkpoint.branch_from at a step "
                 f"<= {start} (checkpoint.keep_steps keeps one)")
    return line


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then its decay (`optimizer.decay`) to `min_lr_ratio` of it.

    The schedule is a function of the update count (0 for the first update). Under "wsd"
    its value before `cooldown_start` does not depend on `total_steps`.
    """
    peak = config.learning_rate
    warmup = warmup_length(config, total_steps)
    if config.decay == "wsd":
        return _wsd_schedule(config, total_steps, warmup)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * config.min_lr_ratio
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:  # constant
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup]
    )


def _wsd_schedule(config: OptimizerConfig, total_steps: int, warmup: int) -> optax.Schedule:
    peak = config.learning_rate
    floor = peak * config.min_lr_ratio
    start = cooldown_start(config, total_steps)
    length = total_steps - start

    def cooldown(count):
        done = jnp.clip((count + 1) / max(length, 1), 0.0, 1.0)  # the last update is at the floor
        left = 1.0 - (jnp.sqrt(done) if config.cooldown_shape == "1-sqrt" else done)
        return floor + (peak - floor) * left

    parts: list[optax.Schedule] = [optax.constant_schedule(peak)]
    boundaries: list[int] = []
    if warmup > 0:
        parts.insert(0, optax.linear_schedule(0.0, peak, warmup))
        boundaries.append(warmup)
    if length > 0:
        parts.append(cooldown)
        boundaries.append(start)
    return optax.join_schedules(parts, boundaries) if boundaries else parts[0]


def build_optimizer(
    config: OptimizerConfig, total_steps: int, model: ModelConfig | None = None
) -> optax.GradientTransformation:
    """The optax chain used for training: clip -> AdamW(schedule, decay mask).

    Under `model.parametrization: mup` (μP for Adam, Yang et al. 2022, Table 3) the Adam
    direction of every hidden matrix (`hidden_matrix_mask`: attention and MLP weights) is
    multiplied by 1 / m, m = `model.mup_width_multiplier`, before weight decay and the
    learning rate: their learning rate is lr / m, while the embedding, an untied output
    projection and norm scales keep lr. Weight decay keeps its per-step rate
    lr * weight_decay on every matrix, as `mup.MuAdamW` does (it multiplies those
    groups' weight_decay by m). At m = 1 the updates are AdamW's exactly.

    A standard model (or `model` None) gets `optax.adamw` as before, so its optimizer
    state, and every checkpoint's, keeps its structure; a μP model's state has one more
    (empty) entry, after the Adam moments, which stay at `opt_state[1][0]`.
    """
    schedule = learning_rate_schedule(config, total_steps)
    clip = optax.clip_by_global_norm(config.clip_norm)
    if model is None or model.parametrization == "standard":
        return optax.chain(
            clip,
            optax.adamw(
                schedule,
                b1=config.b1,
                b2=config.b2,
                eps=config.eps,
                weight_decay=config.weight_decay,
                mask=weight_decay_mask,  # by name: scanned norm scales are [L, D], not matrices
            ),
        )
    return optax.chain(
        clip,
        optax.chain(  # optax.adamw's own chain, with the μP scale after the Adam direction
            optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
            optax.masked(optax.scale(1.0 / model.mup_width_multiplier), hidden_matrix_mask),
            optax.add_decayed_weights(config.weight_decay, weight_decay_mask),
            optax.scale_by_learning_rate(schedule),
        ),
    )
