"""Every shipped preset, 7B included, is built abstractly (`jax.eval_shape`, no memory)."""

import json
import math

import flax.linen as nn
import jax
import pytest

from metatrain.cli import main
from metatrain.config import load_config
from metatrain.io.paths import CONFIGS_DIR
from metatrain.models import init_params_shape
from metatrain.run.model_info import model_info

CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_preset_eval_shape_count_equals_closed_form(path):
    model = load_config(path).model
    abstract = init_params_shape(model)
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract)))
    print(f"{path.name}: {counted:,} parameters ({model.num_non_embedding_params:,} non-embedding)")
    assert counted == model.num_params
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(abstract))} == {jax.numpy.dtype(model.param_dtype)}


def test_large_presets_have_their_advertised_sizes():
    sizes = {name: load_config(CONFIGS_DIR / f"{name}.yaml").model.num_params for name in ("125m", "1b", "7b")}
    assert 100e6 < sizes["125m"] < 130e6
    assert 0.95e9 < sizes["1b"] < 1.15e9
    assert 6.5e9 < sizes["7b"] < 7.0e9


def test_model_info_reports_counts_flops_and_sharded_memory():
    config = load_config(CONFIGS_DIR / "7b.yaml")
    info = model_info(config, num_devices=256)
    assert info["params"]["total"] == config.model.num_params
    assert info["params"]["embedding"] + info["params"]["non_embedding"] == info["params"]["total"]
    assert info["flops_per_token"] == config.model.flops_per_token(config.trainer.seq_len)
    assert info["mesh"] == {"devices": 256, "data": 1, "fsdp": 256, "tensor": 1}
    # fsdp=256 splits every matrix along d_model=4096; norm scales stay replicated.
    # 12 bytes per parameter: fp32 value + AdamW's two fp32 moments.
    m = config.model
    norms = (2 * m.n_layers + 1) * m.d_model
    assert info["per_device_bytes"]["total"] == 12 * ((m.num_params - norms) // 256 + norms)


def test_model_info_command_text_and_json(capsys):
    assert main(["model-info", "--config", str(CONFIGS_DIR / "1b.yaml"), "--devices", "8"]) == 0
    text = capsys.readouterr().out
    assert "1,040,254,976" in text and "FLOPs/token at seq_len 2048" in text and "fsdp=8" in text
    assert main(["model-info", "--set", "model.n_layers=5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == load_config(None, ["model.n_layers=5"]).model.num_params


def test_model_info_refuses_a_model_that_cannot_fit_the_mesh(capsys):
    code = main(["model-info", "--set", "mesh.tensor=8", "--set", "mesh.data=1", "--devices", "8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.n_heads=4 is not divisible by 8" in err and "mesh.tensor" in err
