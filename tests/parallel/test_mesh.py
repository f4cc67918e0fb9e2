import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from metatrain.errors import UserError
from metatrain.models import ModelConfig, Transformer, init_params_shape
from metatrain.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    batch_sharding,
    build_mesh,
    check_fits,
    param_bytes_per_device,
    param_shardings,
    sharding_context,
)

# Prime-ish sizes that still divide by the 2-way axes of the test mesh.
CFG = ModelConfig(
    vocab_size=38, d_model=26, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=34,
    max_seq_len=16, dtype="float32",
)


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"


@pytest.mark.parametrize(
    "config, devices, expected",
    [
        (MeshConfig(), 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        (MeshConfig(data=2, fsdp=2, tensor=2), 8, {"data": 2, "fsdp": 2, "tensor": 2}),
        (MeshConfig(data=1, fsdp=-1, tensor=2), 8, {"data": 1, "fsdp": 4, "tensor": 2}),
        (MeshConfig(data=-1, dcn_data=2), 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        (MeshConfig(data=1, fsdp=2, dcn_data=2, tensor=2), 8, {"data": 2, "fsdp": 2, "tensor": 2}),
        (MeshConfig(data=1, fsdp=-1), 256, {"data": 1, "fsdp": 256, "tensor": 1}),
    ],
)
def test_axis_sizes_absorb_the_remaining_devices(config, devices, expected):
    assert config.axis_sizes(devices) == expected


@pytest.mark.parametrize(
    "config, devices, words",
    [
        (MeshConfig(data=2, fsdp=2, tensor=1), 8, ["uses 4 devices", "there are 8", "-1"]),
        (MeshConfig(data=-1, tensor=3), 8, ["3 devices", "do not divide", "8"]),
        (MeshConfig(dcn_data=3), 8, ["dcn_data=3", "8 devices"]),
    ],
)
def test_axis_sizes_that_cannot_multiply_to_the_device_count_are_refused(config, devices, words):
    with pytest.raises(UserError) as e:
        config.axis_sizes(devices)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(data=-1, fsdp=-1), ["data and fsdp", "only one"]),
        (dict(tensor=0), ["tensor=0", ">= 1"]),
        (dict(rules=(("batch", "pipeline"),)), ["unknown mesh axis 'pipeline'"]),
        (dict(rules=(("embed", "fsdp"), ("embed", None))), ["'embed' appears twice"]),
    ],
)
def test_invalid_mesh_configs_are_refused(kwargs, words):
    with pytest.raises(UserError) as e:
        MeshConfig(**kwargs)
    for word in words:
        assert word in str(e.value)


def test_build_mesh_names_axes_and_uses_every_device():
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    # multi-slice on devices without a slice index: consecutive blocks are the slices
    sliced = build_mesh(MeshConfig(data=1, fsdp=4, dcn_data=2))
    assert dict(sliced.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert {d.id for d in sliced.devices[0].flat} == {0, 1, 2, 3}
    with pytest.raises(UserError, match="uses 4 devices"):
        build_mesh(MeshConfig(data=4, fsdp=1), devices=jax.devices()[:2])


def test_default_rules_map_logical_axes_as_documented():
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    specs = jax.tree.map(lambda s: s.spec, param_shardings(init_params_shape(CFG), mesh))
    assert specs["embedding"]["table"] == P("tensor", "fsdp")
    assert specs["layers"]["attention"]["query"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["attention"]["key"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["attention"]["out"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["mlp"]["down"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["mlp_norm"]["scale"] == P(None, None)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert dict(DEFAULT_RULES)["batch"] == ("data", "fsdp")


def test_per_device_parameter_bytes_follow_the_sharding():
    abstract = init_params_shape(CFG)
    full = CFG.num_params * 4
    assert param_bytes_per_device(abstract, {"data": 8, "fsdp": 1, "tensor": 1}) == full
    sharded = param_bytes_per_device(abstract, {"data": 1, "fsdp": 2, "tensor": 1})
    norms = (2 * CFG.n_layers + 1) * CFG.d_model * 4  # replicated
    assert sharded == (full - norms) // 2 + norms


@pytest.mark.parametrize(
    "change, batch, sizes, words",
    [
        (dict(n_heads=6, n_kv_heads=3), 8, {"data": 1, "fsdp": 1, "tensor": 2},
         ["model.n_kv_heads=3", "tensor=2", "mesh.tensor"]),
        (dict(n_heads=9, n_kv_heads=3, head_dim=10), 8, {"data": 1, "fsdp": 1, "tensor": 3},
         ["model.d_ff=34", "model.vocab_size=38"]),
        (dict(), 6, {"data": 2, "fsdp": 2, "tensor": 1}, ["trainer.batch_size=6", "4"]),
        (dict(), (8, 4), {"data": 2, "fsdp": 2, "tensor": 1}, ["trainer.batch_size / trainer.grad_accum=2"]),
        (dict(d_model=27, head_dim=10), 8, {"data": 1, "fsdp": 2, "tensor": 1}, ["model.d_model=27", "fsdp=2"]),
    ],
)
def test_a_model_that_cannot_fit_the_mesh_is_refused_saying_why(change, batch, sizes, words):
    cfg = ModelConfig(**{**{f: getattr(CFG, f) for f in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                          "n_kv_heads", "head_dim", "d_ff", "max_seq_len")},
                         **change})
    batch, grad_accum = batch if isinstance(batch, tuple) else (batch, 1)
    with pytest.raises(UserError) as e:
        check_fits(cfg, sizes, batch, grad_accum=grad_accum)
    for word in words:
        assert word in str(e.value)


def test_fitting_model_passes_and_rules_are_honoured():
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    check_fits(CFG, mesh, batch_size=4)
    check_fits(CFG, mesh, batch_size=8, grad_accum=2)
    # replicating everything means nothing needs to divide
    check_fits(ModelConfig(vocab_size=37, d_model=13, n_layers=1, n_heads=3, head_dim=2, d_ff=7, max_seq_len=5),
               mesh, batch_size=1, rules=(("batch", None),))


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(init_params_shape(cfg))
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[-2] if a.ndim >= 2 else 1), a.dtype),
        abstract,
    )


def test_sharded_forward_and_gradients_equal_unsharded():
    B, T = 4, 11
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 4 + [0] * 2], B, axis=0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(5)) + list(range(4)) + [0, 0]], B, axis=0), jnp.int32)
    readout = jnp.asarray(rng.normal(size=(B, T, CFG.d_model)), jnp.float32)
    params = _random_params(CFG)
    model = Transformer(CFG)

    def loss(p, ids, pos, seg):
        hidden = model.apply({"params": p}, ids, pos, seg)
        return jnp.sum(hidden * readout), hidden

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    single = jax.devices()[0]
    (ref_loss, ref_hidden), ref_grads = step(*jax.device_put((params, ids, pos, seg), single))

    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    check_fits(CFG, mesh, B)
    shardings = param_shardings(init_params_shape(CFG), mesh)
    sharded_params = jax.device_put(params, shardings)
    table = sharded_params["embedding"]["table"]
    assert table.addressable_shards[0].data.shape == (19, 13)  # [V/tensor, D/fsdp]
    batch = jax.device_put((ids, pos, seg), batch_sharding(mesh))
    with sharding_context(mesh):
        (got_loss, got_hidden), got_grads = step(sharded_params, *batch)
    assert got_hidden.sharding.spec[0] == ("data", "fsdp")  # activation constraint applied

    np.testing.assert_allclose(np.asarray(got_hidden), np.asarray(ref_hidden), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-4)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
