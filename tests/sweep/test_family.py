"""Size families: shapes, exact parameter counts and FLOPs against the compiled model."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.config import load_config
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR
from metatrain.loss import joint_loss
from metatrain.models import Transformer, init_params_shape, output_projection
from metatrain.roles import NUM_ROLES
from metatrain.sweep.family import FAMILIES, SizeFamily, get_family

TINY_RUN = load_config(CONFIGS_DIR / "tiny.yaml")


def test_tiny_2_is_the_tiny_preset():
    size = get_family("tiny").find("tiny-2")
    assert size.model_config(TINY_RUN.model) == TINY_RUN.model


def test_shapes_follow_the_family_ratios():
    for family in FAMILIES.values():
        for depth, size in zip(family.depths, family.sizes(), strict=True):
            assert size.d_model == family.width_per_layer * depth
            assert size.n_layers == (depth if family.n_layers is None else family.n_layers)
            assert size.n_heads * size.head_dim == size.d_model
            assert size.n_heads == size.n_kv_heads * family.q_per_kv
            assert size.d_ff % family.ffn_multiple == 0
            assert 0 <= size.d_ff - family.ffn_ratio * size.d_model < family.ffn_multiple


def test_a_fixed_depth_family_varies_only_the_width():
    family = get_family("tiny-width")
    sizes = family.sizes()
    assert {s.n_layers for s in sizes} == {2} and [s.name for s in sizes][:3] == [
        "tiny-width-32", "tiny-width-64", "tiny-width-128"]
    assert family.find("tiny-width-64").model_config(TINY_RUN.model) == TINY_RUN.model  # tiny-2 is its base width
    assert family.mup_base_width == 64
    with pytest.raises(UserError, match="n_layers must be a positive integer"):
        SizeFamily(name="odd", depths=(1,), width_per_layer=32, head_dim=16, n_layers=0)


@pytest.mark.parametrize(
    "name",
    [s.name for s in FAMILIES["tiny"].sizes()] + ["base-4", "base-12", "base-48", "tiny-width-1024"],
)
def test_parameter_counts_equal_the_built_model(name):
    """Embedding and non-embedding counts against the parameter tree of the real module."""
    family = get_family(name.rsplit("-", 1)[0])
    model = family.find(name).model_config(TINY_RUN.model)
    abstract = nn.unbox(init_params_shape(model))
    embedding = math.prod(abstract["embedding"]["table"].shape)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert embedding == model.num_embedding_params
    assert total - embedding == model.num_non_embedding_params
    assert total == model.num_params


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("name", ["tiny-2", "tiny-3"])
def test_flops_per_token_matches_xla_cost_analysis(name):
    """`ModelConfig.flops_per_token` (6 x matmul params + attention) vs XLA's count.

    XLA counts every operation of the compiled gradient computation (forward and
    backward of the model and of the cross entropy), the formula only the matmuls, so
    XLA's count is at least the formula's and exceeds it by the elementwise work (norms,
    rotary, softmax, SiLU, residuals, the loss over the vocabulary): about 2% at width 64
    (5% at width 32, where the vocabulary-wide softmax weighs most), shrinking as models
    grow; hence the bound of 4%. Layers are unrolled because XLA's cost analysis counts the
    body of a loop (the scanned layer stack) once, not once per layer.
    """
    model = dataclasses.replace(
        get_family("tiny").find(name).model_config(TINY_RUN.model), scan_layers=False, dtype="float32"
    )
    B, T = 2, TINY_RUN.trainer.seq_len
    module = Transformer(model)
    ids = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(lambda k: nn.unbox(module.init(k, ids, ids, ids + 1)["params"]), jax.random.key(0))
    roles = jnp.ones((B, T), jnp.int8)
    weights = jnp.ones((NUM_ROLES,), jnp.float32)

    def loss(p, ids):
        hidden = module.apply({"params": p}, ids, jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones_like(ids))
        return joint_loss(hidden, output_projection(p, model), ids, roles, weights, impl="naive")[0]

    ratio = _xla_flops(jax.grad(loss), params, ids) / (model.flops_per_token(T) * B * T)
    print(f"{name}: XLA / formula = {ratio:.4f}")
    assert 1.0 <= ratio < 1.04


def test_family_refuses_shapes_without_whole_heads():
    with pytest.raises(UserError, match="width_per_layer=40 must be a multiple of head_dim=16"):
        SizeFamily(name="odd", depths=(1, 2), width_per_layer=40, head_dim=16)
    with pytest.raises(UserError, match="not divisible by q_per_kv=4"):
        SizeFamily(name="odd", depths=(1,), width_per_layer=32, head_dim=16, q_per_kv=4)
    with pytest.raises(UserError, match="increasing"):
        SizeFamily(name="odd", depths=(2, 1), width_per_layer=32, head_dim=16)


def test_unknown_size_and_family_are_named():
    with pytest.raises(UserError, match=r"'tiny-7' is not in family 'tiny'; did you mean 'tiny-"):
        get_family("tiny").find("tiny-7")
    with pytest.raises(UserError, match="unknown size family 'huge'; known families: tiny, tiny-width, base"):
        get_family("huge")


def test_sizes_command_prints_exact_counts(capsys):
    import json

    from metatrain.cli import main

    assert main(["sweep", "sizes", "--family", "tiny", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-2"]["params"] == TINY_RUN.model.num_non_embedding_params
    assert rows["tiny-2"]["embedding_params"] == TINY_RUN.model.num_embedding_params
    assert rows["tiny-2"]["flops_per_token"] == TINY_RUN.model.flops_per_token(TINY_RUN.trainer.seq_len)
    assert np.all(np.diff([r["params"] for r in rows.values()]) > 0)
