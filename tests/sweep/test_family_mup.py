"""A size family names μP's base width, and every planned point carries it."""

import dataclasses

import pytest

from metatrain.config import load_config
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR
from metatrain.sweep.family import FAMILIES, SizeFamily, get_family
from metatrain.sweep.plan import plan_sweep

TINY_RUN = load_config(CONFIGS_DIR / "tiny.yaml")


def test_shipped_base_widths_are_the_tuned_presets():
    assert get_family("tiny").find("tiny-2").d_model == FAMILIES["tiny"].mup_base_width == 64
    assert get_family("base").find("base-12").d_model == FAMILIES["base"].mup_base_width == 768
    assert load_config(CONFIGS_DIR / "125m.yaml").model.d_model == 768
    for family in FAMILIES.values():
        assert all(size.mup_base_width == family.mup_base_width for size in family.sizes())


def test_a_family_without_one_uses_its_smallest_width_and_refuses_a_bad_one():
    assert SizeFamily(name="x", depths=(3, 5), width_per_layer=32, head_dim=16).mup_base_width == 96
    with pytest.raises(UserError, match="mup_base_width"):
        SizeFamily(name="x", depths=(3, 5), width_per_layer=32, head_dim=16, mup_base_width=0)


def test_model_config_gives_a_mup_model_the_family_base_width_unless_it_has_one():
    size = get_family("tiny").find("tiny-8")
    assert not any("mup_base_width" in o for o in size.overrides())
    own = dataclasses.replace(TINY_RUN.model, parametrization="mup", mup_base_width=128)
    assert size.model_config(own).mup_base_width == 128
    standard = size.model_config(TINY_RUN.model)
    assert standard.mup_base_width is None and standard.d_model == 256


def test_a_mup_variant_plans_with_the_family_base_width(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {CONFIGS_DIR / 'tiny.yaml'}\nfamily: tiny\ngrid: {{sizes: [tiny-2, tiny-4], tokens: [2048]}}\n"
        "variants:\n  standard: {}\n  mup: {model.parametrization: mup}\n"
    )
    runs = {run.record["name"]: run.config.model for run in plan_sweep(spec, tmp_path / "sweep")}
    mup = runs["mup.tiny-4.D2048"]
    assert (mup.parametrization, mup.mup_base_width, mup.mup_width_multiplier) == ("mup", 64, 2.0)
    assert runs["mup.tiny-2.D2048"].mup_width_multiplier == 1.0
    assert runs["standard.tiny-4.D2048"].parametrization == "standard"
    assert runs["standard.tiny-4.D2048"].mup_base_width is None  # the config of the same run planned by hand


def test_a_base_width_the_spec_gives_is_kept(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {CONFIGS_DIR / 'tiny.yaml'}\nfamily: tiny\ngrid: {{sizes: [tiny-4], tokens: [2048]}}\n"
        "variants:\n  mup: {model.parametrization: mup, model.mup_base_width: 128}\n"
    )
    [run] = plan_sweep(spec, tmp_path / "sweep")
    assert (run.config.model.mup_base_width, run.config.model.mup_width_multiplier) == (128, 1.0)
