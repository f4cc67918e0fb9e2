"""AdamW with warmup + decay, global-norm clipping and no weight decay on norm scales."""

from __future__ import annotations

import optax

from metatrain.config import OptimizerConfig
from metatrain.models import weight_decay_mask


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine/linear decay to `min_lr_ratio` of it."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
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


def build_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain used for training: clip -> AdamW(schedule, decay mask)."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,  # by name: scanned norm scales are [L, D], not matrices
        ),
    )
