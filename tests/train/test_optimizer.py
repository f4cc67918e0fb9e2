import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.config import OptimizerConfig
from metatrain.train.optimizer import build_optimizer, decay_mask, learning_rate_schedule


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


def test_no_weight_decay_on_norms_and_biases():
    params = {"w": jnp.ones((3, 5)), "scale": jnp.ones((5,)), "b": jnp.ones((5,))}
    assert decay_mask(params) == {"w": True, "scale": False, "b": False}
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, decay="constant", weight_decay=0.5)
    opt = build_optimizer(cfg, total_steps=10)
    state = opt.init(params)
    zero_grads = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero_grads, state, params)
    # With zero gradients only weight decay moves parameters.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((3, 5)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    np.testing.assert_array_equal(updates["b"], 0.0)


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
