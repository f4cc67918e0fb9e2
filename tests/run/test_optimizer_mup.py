"""μP's per-layer Adam learning rates in `build_optimizer`, and the standard optimizer
state kept exactly as checkpoints hold it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metatrain.config import OptimizerConfig
from metatrain.models import ModelConfig, Transformer, weight_decay_mask
from metatrain.models.transformer import hidden_matrix_mask
from metatrain.run.optimizer import build_optimizer, learning_rate_schedule

STANDARD = ModelConfig(
    vocab_size=37, d_model=26, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=10, d_ff=34,
    max_seq_len=16, dtype="float32",
)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay="cosine", weight_decay=0.1, clip_norm=1.0)


def _mup(base: int) -> ModelConfig:
    return dataclasses.replace(STANDARD, parametrization="mup", mup_base_width=base)


def _params(boxed: bool = False):
    ids = jnp.zeros((1, 3), jnp.int32)
    params = Transformer(STANDARD).init(jax.random.key(0), ids, ids, ids + 1)["params"]
    return params if boxed else nn.unbox(params)


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _previous_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """`build_optimizer` as it was before μP: the chain every existing checkpoint's state has."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask),
    )


@pytest.mark.parametrize("model", [None, STANDARD], ids=["no-model", "standard"])
def test_standard_state_keeps_its_structure_and_updates(model):
    params = _params(boxed=True)
    before, now = _previous_optimizer(OPT, 10), build_optimizer(OPT, 10, model)
    assert jax.tree.structure(now.init(params)) == jax.tree.structure(before.init(params))
    params = nn.unbox(params)
    grads = _grads(params)
    updates_before, _ = before.update(grads, before.init(params), params)
    updates_now, _ = now.update(grads, now.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, updates_now, updates_before)


def test_mup_at_the_base_width_updates_as_standard_exactly():
    params = _params()
    standard, mup = build_optimizer(OPT, 10, STANDARD), build_optimizer(OPT, 10, _mup(STANDARD.d_model))
    s_state, m_state = standard.init(params), mup.init(params)
    for step in range(3):  # past the warmup: the schedule and the Adam moments agree too
        grads = _grads(params, seed=step)
        s_updates, s_state = standard.update(grads, s_state, params)
        m_updates, m_state = mup.update(grads, m_state, params)
        jax.tree.map(np.testing.assert_array_equal, m_updates, s_updates)
    # The Adam moments sit where a standard state has them.
    jax.tree.map(np.testing.assert_array_equal, m_state[1][0], s_state[1][0])


def test_mup_divides_the_adam_step_of_hidden_matrices_by_the_width_multiplier():
    params = _params()
    no_decay = dataclasses.replace(OPT, weight_decay=0.0, warmup_steps=0, clip_norm=1e9)
    grads = _grads(params)
    standard, _ = build_optimizer(no_decay, 10, STANDARD).update(grads, build_optimizer(no_decay, 10).init(params), params)
    mup_opt = build_optimizer(no_decay, 10, _mup(13))  # m = 2
    mup, _ = mup_opt.update(grads, mup_opt.init(params), params)
    hidden = hidden_matrix_mask(params)
    assert sum(jax.tree.leaves(hidden)) == 7

    def check(is_hidden, u_mup, u_standard):
        np.testing.assert_allclose(u_mup, u_standard / 2 if is_hidden else u_standard, rtol=1e-6)

    jax.tree.map(check, hidden, mup, standard)


def test_mup_keeps_the_per_step_weight_decay_of_every_matrix():
    """As `mup.MuAdamW` (lr / m, weight_decay x m): decay per step stays lr * weight_decay."""
    params = _params()
    config = dataclasses.replace(OPT, warmup_steps=0, decay="constant", weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)  # zero gradients: only weight decay moves weights
    mup_opt = build_optimizer(config, 10, _mup(13))
    updates, _ = mup_opt.update(zero, mup_opt.init(params), params)
    decayed = weight_decay_mask(params)

    def check(is_decayed, update, p):
        np.testing.assert_allclose(update, -1e-2 * 0.5 * p if is_decayed else 0 * p, rtol=1e-6, atol=1e-12)

    jax.tree.map(check, decayed, updates, params)


def test_mup_state_restores_from_a_boxed_init():
    """The train state is initialised from boxed (logically partitioned) parameters."""
    mup_opt = build_optimizer(OPT, 10, _mup(13))
    boxed_state = mup_opt.init(_params(boxed=True))
    plain_state = mup_opt.init(_params())
    assert jax.tree.structure(nn.unbox(boxed_state)) == jax.tree.structure(plain_state)


def test_the_train_program_builds_the_mup_optimizer():
    """`build_train_program` passes the model config, so a μP run trains with μP's rates."""
    from metatrain.config import load_config
    from metatrain.io.paths import CONFIGS_DIR
    from metatrain.run.program import build_train_program

    config = load_config(CONFIGS_DIR / "tiny.yaml", ["model.parametrization=mup", "model.mup_base_width=32"])
    program = build_train_program(config, jax.devices()[:1])
    params = _params()
    wanted = build_optimizer(config.optimizer, config.trainer.steps, config.model).init(params)
    assert jax.tree.structure(wanted) != jax.tree.structure(build_optimizer(config.optimizer, 10).init(params))
    assert jax.tree.structure(program.optimizer.init(params)) == jax.tree.structure(wanted), (
        "the train program's optimizer lacks μP's scale: build_train_program must pass config.model"
    )
