"""The inference mesh (`metatrain.parallel.mesh`): rows over `data` only, the layout the
`--set mesh.KEY=VALUE` settings choose (and the default when there are none), a mesh on
fewer devices than there are, and the one-line refusal of a model it cannot split."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from metatrain.cli.options import add_mesh_option
from metatrain.errors import UserError
from metatrain.models import ModelConfig
from metatrain.parallel.mesh import (
    DEFAULT_RULES,
    MeshConfig,
    build_inference_mesh,
    check_inference_fits,
    inference_axis_sizes,
    inference_mesh_config,
    inference_rules,
    kv_cache_spec,
    mesh_axes_of,
    parse_mesh_setting,
)

# d_model 36: fsdp 8 does not divide it, fsdp 4 does.
CFG = ModelConfig(
    vocab_size=40, d_model=36, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=64, max_seq_len=16,
)


def sizes_of(settings, cfg=CFG, devices=8):
    return inference_axis_sizes(inference_mesh_config(settings, cfg, devices), devices)


def test_inference_rules_split_rows_over_data_only_and_keep_every_other_rule():
    rules = inference_rules()
    assert dict(rules)["batch"] == "data"
    assert [r for r in rules if r[0] != "batch"] == [r for r in DEFAULT_RULES if r[0] != "batch"]
    assert mesh_axes_of(("batch", "seq", "embed"), rules) == P("data", None, "fsdp")  # `embed` no longer lost to batch
    assert inference_rules(rules) == rules
    assert dict(inference_rules((("embed", "fsdp"),))) == {"batch": "data", "embed": "fsdp"}


def test_kv_cache_rows_over_data_and_kv_heads_over_tensor():
    assert kv_cache_spec() == P(None, "data", None, "tensor", None)


@pytest.mark.parametrize(
    "d_model, devices, expected",
    [
        (64, 8, {"data": 1, "fsdp": 8, "tensor": 1}),
        (48, 8, {"data": 1, "fsdp": 8, "tensor": 1}),
        (36, 8, {"data": 2, "fsdp": 4, "tensor": 1}),
        (50, 8, {"data": 4, "fsdp": 2, "tensor": 1}),
        (45, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        (36, 6, {"data": 1, "fsdp": 6, "tensor": 1}),
        (36, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_the_default_shards_parameters_over_the_largest_fsdp_that_divides_d_model(d_model, devices, expected):
    cfg = dataclasses.replace(CFG, d_model=d_model)
    config = inference_mesh_config([], cfg, devices)
    assert inference_axis_sizes(config, devices) == expected
    assert config.rules == inference_rules()
    check_inference_fits(cfg, expected, config.rules)


@pytest.mark.parametrize(
    "settings, expected",
    [
        (["mesh.tensor=2"], {"data": 4, "fsdp": 1, "tensor": 2}),  # data=-1 absorbs the rest
        (["mesh.fsdp=-1", "mesh.tensor=2"], {"data": 1, "fsdp": 4, "tensor": 2}),
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], {"data": 2, "fsdp": 2, "tensor": 2}),
        (["mesh.tensor=2", "mesh.tensor=1"], {"data": 8, "fsdp": 1, "tensor": 1}),  # the later wins
        (["mesh.data=1"], {"data": 1, "fsdp": 1, "tensor": 1}),  # fewer devices: the first only
        (["mesh.data=2", "mesh.tensor=2"], {"data": 2, "fsdp": 1, "tensor": 2}),
    ],
)
def test_settings_choose_the_axes_and_the_rest_take_mesh_config_defaults(settings, expected):
    assert sizes_of(settings) == expected


@pytest.mark.parametrize("settings, used", [(["mesh.data=1"], 1), (["mesh.data=2", "mesh.tensor=2"], 4), ([], 8)])
def test_a_mesh_without_a_minus_one_axis_uses_the_first_devices(settings, used):
    mesh = build_inference_mesh(inference_mesh_config(settings, CFG, jax.device_count()))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in jax.devices()[:used]]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("tensor=2", ["--set tensor=2", "not a mesh setting", "mesh.KEY=VALUE"]),
        ("mesh.rules=[]", ["--set mesh.rules=[]", "mesh.rules is not a mesh axis", "mesh.data, mesh.fsdp, mesh.tensor"]),
        ("mesh.dcn_data=2", ["mesh.dcn_data is not a mesh axis"]),
        ("mesh.tensor=two", ["--set mesh.tensor=two", "'two' is not an integer", "--set mesh.tensor=2"]),
        ("mesh.tensor", ["--set mesh.tensor", "not a mesh setting"]),
        ("mesh.data=0", ["--set mesh.data=0", ">= 1, or -1"]),
        ("mesh.data=-2", ["--set mesh.data=-2", ">= 1, or -1"]),
    ],
)
def test_a_malformed_setting_is_refused_in_one_line_naming_it(setting, words):
    with pytest.raises(UserError) as e:
        inference_mesh_config([setting], CFG, 8)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "settings, first_words",
    [
        (["mesh.tensor=4"], "model.n_kv_heads=2 is not divisible by mesh tensor=4"),
        (["mesh.fsdp=8"], ("model.d_model=36 is not divisible by mesh fsdp=8 (its 'embed' axis is split over it); "
                           "give --set mesh.fsdp=6, 4, 3 or 1")),
        (["mesh.data=4", "mesh.fsdp=4"], "mesh data=4 x fsdp=4 x tensor=1 needs 16 devices but 8 are visible"),
        (["mesh.tensor=3"], "mesh data=-1 x fsdp=1 x tensor=3: the fixed axes (3 devices) do not divide"),
        (["mesh.fsdp=-1", "mesh.tensor=-1"], "--set mesh.fsdp=-1 and mesh.tensor=-1: only one mesh axis"),
    ],
)
def test_sizes_the_model_or_the_host_cannot_take_are_refused_in_one_line(settings, first_words):
    with pytest.raises(UserError) as e:
        inference_mesh_config(settings, CFG, 8)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(first_words)


def test_the_refusal_names_the_dimension_and_the_sizes_that_fit():
    with pytest.raises(UserError) as e:
        check_inference_fits(CFG, {"data": 1, "fsdp": 1, "tensor": 4}, inference_rules())
    assert str(e.value) == (
        "model.n_kv_heads=2 is not divisible by mesh tensor=4 (its 'kv_heads' axis is split over it); "
        "give --set mesh.tensor=2 or 1"
    )
    with pytest.raises(UserError) as e:  # several dimensions: one line, the first names one
        check_inference_fits(dataclasses.replace(CFG, vocab_size=42), {"data": 1, "fsdp": 1, "tensor": 4},
                             inference_rules())
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("model.vocab_size=42 is not divisible by mesh tensor=4")
    assert "; also model.n_kv_heads=2" in str(e.value)


def test_no_batch_check_but_the_kv_cache_heads_even_when_the_rules_do_not_split_them():
    rules = inference_rules(tuple(r for r in DEFAULT_RULES if r[0] != "kv_heads") + (("kv_heads", None),))
    check_inference_fits(CFG, {"data": 3, "fsdp": 1, "tensor": 1}, rules)  # rows: the engine's job
    with pytest.raises(UserError, match=r"^model.n_kv_heads=2 is not divisible by mesh tensor=4 \(the KV cache"):
        check_inference_fits(CFG, {"data": 1, "fsdp": 1, "tensor": 4}, rules)


def test_a_mesh_object_is_checked_like_its_sizes():
    mesh = build_inference_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    with pytest.raises(UserError, match="model.n_kv_heads=2"):
        check_inference_fits(CFG, mesh, inference_rules())
    check_inference_fits(CFG, build_inference_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), inference_rules())


def test_the_settings_parse_one_by_one():
    assert parse_mesh_setting("mesh.fsdp=4") == ("fsdp", 4)
    assert parse_mesh_setting("mesh.data=-1") == ("data", -1)


def parser():
    p = argparse.ArgumentParser(prog="metatrain generate")
    add_mesh_option(p)
    return p


def test_the_option_collects_settings_and_refuses_a_non_mesh_one_at_parse_time(capsys):
    assert parser().parse_args([]).mesh_settings == []
    args = parser().parse_args(["--set", "mesh.tensor=2", "--set", "mesh.data=-1"])
    assert args.mesh_settings == ["mesh.tensor=2", "mesh.data=-1"]
    for bad, word in [("trainer.steps=5", "not a mesh setting"), ("mesh.tensor=x", "is not an integer")]:
        with pytest.raises(SystemExit) as e:
            parser().parse_args(["--set", bad])
        assert e.value.code == 2
        error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metatrain generate: error")]
        assert len(error) == 1 and f"argument --set: {bad}: " in error[0] and word in error[0]
