"""A trained checkpoint restored straight onto a device mesh (`load_checkpoint(mesh=...)`
or `mesh_settings=`): the same values as on one device, each array split as the run's
training rules say with the rows on `data` only, and a mesh the model does not fit
refused in one line before anything is read."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from metatrain.errors import UserError
from metatrain.parallel.mesh import (
    DEFAULT_RULES,
    MeshConfig,
    build_inference_mesh,
    inference_rules,
)
from metatrain.run.reader import load_checkpoint

from ..conftest import leaves_by_name

TABLE, KEY, DOWN, NORM = "embedding/table", "layers/attention/key", "layers/mlp/down", "final_norm/scale"


@pytest.fixture(scope="module")
def unsharded(workdir):
    loaded = load_checkpoint(workdir)
    assert loaded.mesh is None and loaded.rules is None
    assert loaded.model_config.d_model == 64 and loaded.model_config.n_kv_heads == 2  # the layouts below
    return leaves_by_name(loaded.params)


def params_of(loaded):
    return {
        "/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(loaded.params)
    }


# (how the mesh is given, its axis sizes, the shard shape of TABLE [V=4096, D=64], KEY [L, D, K=2, H=16], DOWN [L, F=176, D])
LAYOUTS = [
    (dict(mesh_settings=["mesh.data=-1"]), {"data": 8, "fsdp": 1, "tensor": 1}, (4096, 64), (2, 64, 2, 16), (2, 176, 64)),
    (dict(mesh_settings=[]), {"data": 1, "fsdp": 8, "tensor": 1}, (4096, 8), (2, 8, 2, 16), (2, 176, 8)),
    (dict(mesh=MeshConfig(data=2, fsdp=2, tensor=2)), {"data": 2, "fsdp": 2, "tensor": 2},
     (2048, 32), (2, 32, 1, 16), (2, 88, 32)),
    (dict(mesh_settings=["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]), {"data": 1, "fsdp": 1, "tensor": 1},
     (4096, 64), (2, 64, 2, 16), (2, 176, 64)),
]


@pytest.mark.parametrize("how, sizes, table, key, down", LAYOUTS, ids=["data8", "fsdp8", "t2f2d2", "one-device"])
def test_a_checkpoint_restored_onto_a_mesh_holds_the_same_values_split_by_the_rules(
    workdir, unsharded, how, sizes, table, key, down
):
    if "mesh" in how:
        how = dict(mesh=build_inference_mesh(how["mesh"]))
    loaded = load_checkpoint(workdir, **how)
    assert dict(loaded.mesh.shape) == sizes and loaded.rules == inference_rules()
    used = np.prod(list(sizes.values()))
    assert sorted(d.id for d in loaded.mesh.devices.flat) == [d.id for d in jax.devices()[:used]]
    params = params_of(loaded)
    assert params.keys() == unsharded.keys()
    for name, leaf in params.items():
        assert leaf.sharding.mesh == loaded.mesh, name
        np.testing.assert_array_equal(np.asarray(jax.device_get(leaf)), unsharded[name], err_msg=name)
    assert params[TABLE].sharding.spec == P("tensor", "fsdp")
    assert params[KEY].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params[DOWN].sharding.spec == P(None, "tensor", "fsdp")
    assert params[NORM].sharding.is_fully_replicated
    for name, shard in [(TABLE, table), (KEY, key), (DOWN, down)]:
        assert params[name].sharding.shard_shape(params[name].shape) == shard, name
        assert {s.data.shape for s in params[name].addressable_shards} == {shard}, name
        assert len(params[name].sharding.device_set) == used, name


@pytest.mark.parametrize(
    "how, first_words",
    [
        (dict(mesh_settings=["mesh.tensor=4"]), "model.n_kv_heads=2 is not divisible by mesh tensor=4"),
        (dict(mesh_settings=["mesh.tensor=4"], step=1), "model.n_kv_heads=2 is not divisible by mesh tensor=4"),
        (dict(mesh=MeshConfig(data=2, tensor=4)), "model.n_kv_heads=2 is not divisible by mesh tensor=4"),
        (dict(mesh=MeshConfig(data=2, tensor=4), step=1), "model.n_kv_heads=2 is not divisible by mesh tensor=4"),
        (dict(mesh_settings=["mesh.fsdp=3", "mesh.data=2"]), "model.d_model=64 is not divisible by mesh fsdp=3"),
        (dict(mesh_settings=["mesh.bogus=2"], step=1), "--set mesh.bogus=2: mesh.bogus is not a mesh axis"),
        (dict(mesh_settings=["mesh.data=16"]), "mesh data=16 x fsdp=1 x tensor=1 needs 16 devices but 8"),
    ],
)
def test_a_mesh_the_model_does_not_fit_is_refused_in_one_line(workdir, how, first_words):
    if "mesh" in how:
        how = dict(how, mesh=build_inference_mesh(how["mesh"]))
    with pytest.raises(UserError) as e:
        load_checkpoint(workdir, **how)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(first_words)


def test_one_place_only(workdir):
    with pytest.raises(ValueError, match="at most one of device, mesh and mesh_settings"):
        load_checkpoint(workdir, device=jax.devices()[0], mesh_settings=[])


def embed_unsplit(rules):
    return tuple((logical, None if logical == "embed" else axes) for logical, axes in rules)


def test_the_runs_stored_training_rules_place_the_parameters(workdir, unsharded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    stored = run / "checkpoints" / "1" / "config" / "metadata"
    config = json.loads(stored.read_text())
    assert [tuple(r) if not isinstance(r[1], list) else (r[0], tuple(r[1])) for r in config["mesh"]["rules"]] == list(
        DEFAULT_RULES
    )
    config["mesh"]["rules"] = [list(r) for r in embed_unsplit(DEFAULT_RULES)]
    stored.write_text(json.dumps(config))
    loaded = load_checkpoint(run, mesh_settings=["mesh.fsdp=8"])
    assert loaded.rules == inference_rules(embed_unsplit(DEFAULT_RULES))
    table = params_of(loaded)[TABLE]
    assert table.sharding.spec == P("tensor", None) and table.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(table), unsharded[TABLE])
    given = load_checkpoint(run, mesh_settings=["mesh.fsdp=8"], rules=DEFAULT_RULES)  # the caller's rules win
    assert params_of(given)[TABLE].sharding.spec == P("tensor", "fsdp")
