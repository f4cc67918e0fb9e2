import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.config import OptimizerConfig
from metatrain.run.optimizer import (
    build_optimizer,
    cooldown_start,
    learning_rate_schedule,
    rewarm_warning,
)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_floor(decay):
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg, total_steps=110)
    lrs = np.array([float(sched(s)) for s in range(111)])
    assert lrs[0] == 0.0
    np.testing.assert_allclose(lrs[5], 5e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 1e-2, rtol=1e-6)
    assert np.all(np.diff(lrs[:11]) > 0)
    if decay == "constant":
        np.testing.assert_allclose(lrs[10:], 1e-2, rtol=1e-6)
    else:
        assert np.all(np.diff(lrs[10:]) <= 1e-12)
        np.testing.assert_allclose(lrs[110], 1e-3, rtol=1e-5)
    if decay == "linear":
        np.testing.assert_allclose(lrs[60], 5.5e-3, rtol=1e-5)


def test_scanned_norm_scales_are_not_decayed_and_matrices_are():
    """Every preset scans its layers, so norm scales are [L, D]: the mask must go by name."""
    import flax.linen as nn
    import jax

    from metatrain.config import load_config
    from metatrain.io.paths import CONFIGS_DIR
    from metatrain.models import Transformer

    model_config = load_config(CONFIGS_DIR / "tiny.yaml").model
    assert model_config.scan_layers
    ids = jnp.ones((1, 3), jnp.int32)
    params = nn.unbox(Transformer(model_config).init(jax.random.key(0), ids, ids, ids)["params"])
    assert params["layers"]["attention_norm"]["scale"].ndim == 2  # [L, D]: looks like a matrix
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, decay="constant", weight_decay=0.5)
    opt = build_optimizer(cfg, total_steps=10)
    state = opt.init(params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, state, params)
    # With zero gradients only weight decay moves parameters: -lr * wd * p.
    flat = {jax.tree_util.keystr(k): (u, p) for (k, u), p in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves(params))}
    scales = [k for k in flat if "scale" in k]
    assert len(scales) == 3  # attention_norm, mlp_norm (both [L, D]) and final_norm [D]
    for key, (update, param) in flat.items():
        if key in scales:
            np.testing.assert_array_equal(update, 0.0, err_msg=key)
        else:
            np.testing.assert_allclose(update, -0.1 * 0.5 * np.asarray(param), rtol=1e-5, err_msg=key)


def test_global_norm_clipping_happens_before_adam():
    params = {"w": jnp.zeros((2, 2))}
    # b1 = b2 = 0 makes Adam's update g / (|g| + eps) per coordinate, so with eps = 1 the
    # update reveals the magnitude of the (clipped) gradient it saw.
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, decay="constant", weight_decay=0.0, clip_norm=1.0, b1=0.0, b2=0.0, eps=1.0)
    opt = build_optimizer(cfg, total_steps=10)
    state = opt.init(params)
    grads = {"w": jnp.full((2, 2), 100.0)}  # global norm 200 -> clipped to 1: 0.5 per entry
    updates, _ = opt.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.5 / 1.5, rtol=1e-5)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_holds_the_peak_then_cools_down_over_its_fraction_to_the_floor(shape):
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay="wsd", decay_fraction=0.25,
                          cooldown_shape=shape, min_lr_ratio=0.1)
    assert cooldown_start(cfg, 100) == 75
    lrs = np.array([float(learning_rate_schedule(cfg, 100)(s)) for s in range(100)])
    np.testing.assert_allclose(lrs[:5], [0.0, 0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(lrs[4:75], 1.0, rtol=1e-6)
    assert np.all(np.diff(lrs[75:]) < 0)
    np.testing.assert_allclose(lrs[99], 0.1, rtol=1e-5)  # the last update is at the floor
    t = 13 / 25  # share of the cooldown done at update 87
    expected = 1 - (np.sqrt(t) if shape == "1-sqrt" else t)
    np.testing.assert_allclose(lrs[87], 0.1 + 0.9 * expected, rtol=1e-5)


def test_wsd_stable_phase_does_not_depend_on_the_run_length():
    """A resume with a longer trainer.steps, or a branch, sees the same learning rates up
    to the shorter run's cooldown."""
    cfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, decay="wsd", decay_fraction=0.2)
    short, long = learning_rate_schedule(cfg, 200), learning_rate_schedule(cfg, 1000)
    start = cooldown_start(cfg, 200)
    np.testing.assert_array_equal([float(short(s)) for s in range(start)], [float(long(s)) for s in range(start)])
    assert float(short(start)) < float(long(start))
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=3e-3, warmup_steps=10), 200)
    assert float(cosine(100)) != float(learning_rate_schedule(OptimizerConfig(learning_rate=3e-3, warmup_steps=10),
                                                              1000)(100))


def test_wsd_without_cooldown_stays_at_the_peak_and_short_runs_never_cool_inside_the_warmup():
    flat = OptimizerConfig(learning_rate=1.0, warmup_steps=2, decay="wsd", decay_fraction=0.0)
    assert [float(learning_rate_schedule(flat, 10)(s)) for s in range(10)] == [0.0, 0.5] + [1.0] * 8
    short = OptimizerConfig(learning_rate=1.0, warmup_steps=8, decay="wsd", decay_fraction=0.5)
    assert cooldown_start(short, 10) == 8


def test_the_cooldown_rounds_half_up_and_is_never_lost_to_rounding():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, decay="wsd", decay_fraction=0.1)
    assert [t - cooldown_start(cfg, t) for t in (5, 15, 25, 100)] == [1, 2, 3, 10]


def test_a_longer_resume_inside_the_cooldown_is_called_a_rewarm():
    cfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, decay="wsd", decay_fraction=0.2)
    start = cooldown_start(cfg, 200)
    line = rewarm_warning(200, cfg, 200, cfg, 400)
    assert line is not None and f"began at step {start}" in line and "branch_from at a step <= 160" in line
    assert f"from {float(learning_rate_schedule(cfg, 200)(199)):.4g} back to 0.003," in line
    assert "with trainer.steps=400" in line and "cut short" not in line
    assert rewarm_warning(start + 1, cfg, 200, cfg, 400) is not None  # one cooldown update is enough
    # Nothing to say: still in the stable phase, the same length, a shorter run, or no wsd.
    assert rewarm_warning(start, cfg, 200, cfg, 400) is None
    assert rewarm_warning(200, cfg, 200, cfg, 200) is None
    assert rewarm_warning(190, cfg, 200, cfg, 195) is None
    assert rewarm_warning(200, cfg, 200, cfg, 150) is None  # nothing left to train
    long_cooldown = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, decay="wsd", decay_fraction=0.1)
    assert rewarm_warning(9001, long_cooldown, 10_000, long_cooldown, 20_000) is None  # a rise under 1%
    assert rewarm_warning(9200, long_cooldown, 10_000, long_cooldown, 20_000) is not None
    # The same length with a changed recipe (--allow-change optimizer.*) names the recipe.
    hotter = OptimizerConfig(learning_rate=6e-3, warmup_steps=10, decay="wsd", decay_fraction=0.2)
    assert "with the changed optimizer settings" in rewarm_warning(190, cfg, 200, hotter, 200)
    # A run whose warmup its trainer.steps cut short had no stable phase to branch from.
    long_warmup = OptimizerConfig(learning_rate=3e-3, warmup_steps=50, decay="wsd", decay_fraction=0.2)
    line = rewarm_warning(20, long_warmup, 20, long_warmup, 100)
    assert "warmup_steps=50 updates was cut short at 19" in line and "branch_from" not in line
    cosine = OptimizerConfig(learning_rate=3e-3, warmup_steps=10)
    assert rewarm_warning(200, cosine, 200, cosine, 400) is None
