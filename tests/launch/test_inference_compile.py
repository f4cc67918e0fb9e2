"""`metatrain compile --inference`: the engine's prefill and decode compiled for a TPU topology.

The tiny preset's engine compiles for v5e:2x2 and fits; its report's numbers are checked
against the model (parameters, KV cache) and against each other (total), and the slots
are updated in place (donated) by both programs. A layout that cannot work is refused in
one line: a mesh that does not divide the model, slots that alone exceed HBM (before
compiling), programs that exceed it (after). The 7B preset's rows of the README's
inference table compile and fit v5e:2x4 (slow).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from metatrain.cli import main
from metatrain.config import load_config
from metatrain.engine.step import slot_spec
from metatrain.hardware import _NO_LOCAL_TPU, CHIPS
from metatrain.io.paths import CONFIGS_DIR, REPO_ROOT
from metatrain.launch import inference_compile
from metatrain.models import init_params_shape
from metatrain.parallel.mesh import (
    MeshConfig,
    build_mesh,
    inference_rules,
    param_bytes_per_device,
)

TINY = str(CONFIGS_DIR / "tiny.yaml")
SEVEN_B = str(CONFIGS_DIR / "7b.yaml")


@pytest.fixture
def libtpu(monkeypatch):
    """Skip without libtpu; keep the variables `compile` sets for libtpu out of other tests."""
    pytest.importorskip("libtpu", reason="needs libtpu (the `tpu` extra) for ahead-of-time TPU compiles")
    for name, value in {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", **_NO_LOCAL_TPU}.items():
        monkeypatch.setenv(name, value)


def tpu_test(fn):
    """A test that compiles for TPU: the `tpu` marker, skipped without libtpu."""
    return pytest.mark.tpu(pytest.mark.usefixtures("libtpu")(fn))


def size(report: str, name: str) -> float:
    """A memory line of the report, in its unit (GiB or MiB)."""
    match = re.search(rf"^\s+{name}\s+([\d.]+) [GM]iB", report, re.MULTILINE)
    assert match, f"no {name} line in:\n{report}"
    return float(match.group(1))


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def kv_cache_bytes(config, batch: int, context: int, shards: int = 1) -> int:
    """The KV cache's bytes a chip: keys and values [L, B, S, K / shards, H], segment ids
    [B, S] and positions [B] int32 (S = context + one prompt bucket of 16)."""
    m = config.model
    positions = context + 16
    layers = 2 * m.n_layers * batch * positions * (m.n_kv_heads // shards) * m.head_dim * np.dtype(m.dtype).itemsize
    return layers + batch * positions * 4 + batch * 4


@tpu_test
def test_the_tiny_engine_compiles_for_v5e_2x2_and_fits(capsys):
    assert main(["compile", "--inference", "--config", TINY, "--topology", "v5e:2x2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    config = load_config(TINY)
    assert "v5e:2x2: 4 chips (TPU v5e), 1 host(s)" in out
    # The default layout: parameters sharded along d_model over every chip, rows not split.
    assert "mesh         data=1 fsdp=4 tensor=1" in out
    assert "32 slots x 128 tokens (144 cache positions a row); prefill: 4 prompts x 128 tokens a call" in out
    assert "grammar      the grammar of" in out and "sample.model" in out
    mib = 2**20
    params = param_bytes_per_device(init_params_shape(config.model), {"data": 1, "fsdp": 4, "tensor": 1},
                                    inference_rules())
    assert size(out, "parameters") == pytest.approx(params / mib, abs=0.001)
    assert size(out, "KV cache") == pytest.approx(kv_cache_bytes(config, 32, 128) / mib, abs=0.001)
    parts = [size(out, n) for n in ("parameters", "KV cache", "row state", "temporaries", "other")]
    assert size(out, "total") == pytest.approx(sum(parts), abs=0.005)
    assert size(out, "HBM") == CHIPS["tpu v5e"].hbm_bytes / mib
    assert out.rstrip().endswith("fits: yes")


@tpu_test
def test_both_programs_update_the_slots_in_place_and_rows_round_up_to_the_data_axis():
    config = load_config(TINY)
    report = inference_compile.compile_inference(
        config, "v5e:2x2", batch=5, context=64, prompt=20, mesh_settings=["mesh.data=2", "mesh.tensor=2"])
    assert report.mesh == {"data": 2, "fsdp": 1, "tensor": 2}
    shape = report.shape
    assert (shape.batch, shape.context, shape.cache_length, shape.prompt, shape.admitted) == (6, 64, 80, 32, 4)
    # Rows over data (2), KV heads over tensor (2): each chip holds 3 rows of 1 KV head.
    assert report.kv_cache == kv_cache_bytes(config, 3, 64, shards=2)
    for program in (report.prefill, report.decode):
        assert program.arguments >= report.parameters + report.slots
        assert program.aliased >= report.slots  # donated: the cache is written where it is
        assert program.total >= report.parameters + report.slots + program.temporaries
    assert report.fits is True


def test_the_slot_layout_is_the_engines_and_its_bytes_are_the_shards():
    """What the compile assumes of the slots (shardings, bytes a device) is what the engine
    allocates: its own `new_slots` on a CPU mesh of 8 devices."""
    from metatrain.engine.step import SlotLayout, new_slots
    from metatrain.parallel.mesh import sharding_context

    config = load_config(TINY)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with sharding_context(mesh, inference_rules()):
        slots = new_slots(model_config=config.model, batch=4, context=32, layout=SlotLayout(mesh))
    abstract = inference_compile.abstract_slots(config.model, 4, 32)
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, shape), real in zip(paths, jax.tree.leaves(slots), strict=True):
        assert shape.shape == real.shape and shape.dtype == real.dtype, path
        expected = jax.sharding.NamedSharding(mesh, slot_spec(path, shape))
        assert real.sharding.is_equivalent_to(expected, real.ndim), (jax.tree_util.keystr(path), real.sharding)
    kv, other = inference_compile.slot_bytes(abstract, dict(mesh.shape))
    device = mesh.devices.flat[0]

    def on_device(tree) -> int:
        return sum(next(s.data.nbytes for s in a.addressable_shards if s.device == device) for a in jax.tree.leaves(tree))

    assert kv == on_device(slots.cache)
    assert kv + other == on_device(slots)


def test_the_grammar_without_its_tokenizer_has_the_shapes_of_the_real_one():
    from metatrain.engine.constraints import TagConstraints

    config = load_config(TINY)
    real, source = inference_compile.abstract_constraints(config)
    assert "sample.model" in source
    absent = load_config(TINY, ["data.tokenizer=/nonexistent/tokenizer.model"])
    shapes, source = inference_compile.abstract_constraints(absent)
    assert "is not here" in source
    for field in ("masked_ids", "masked_allowed", "token_to_tag", "transitions", "ends", "mantra_table",
                  "thinking_open", "eos_id"):
        assert getattr(shapes, field).shape == getattr(real, field).shape, field
        assert getattr(shapes, field).dtype == getattr(real, field).dtype, field
    assert isinstance(shapes, TagConstraints) and shapes.mantra_length >= 1


@tpu_test
def test_a_mesh_that_does_not_divide_the_kv_heads_is_refused_in_one_line(capsys):
    # tiny: n_kv_heads=2 (n_heads=4, d_ff=176 and the vocabulary divide by 4).
    argv = ["compile", "--inference", "--config", TINY, "--topology", "v5e:2x2", "--set", "mesh.tensor=4"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "model.n_kv_heads=2 is not divisible by mesh tensor=4" in line
    assert "--set mesh.tensor=2 or 1" in line


@tpu_test
def test_inference_mesh_settings_are_not_run_config_overrides(capsys):
    # As a run config override, mesh.fsdp=-1 would meet the default config's mesh.data=-1 and be
    # refused; here it chooses the inference mesh (data=1 when another axis absorbs the chips).
    argv = ["compile", "--inference", "--config", TINY, "--topology", "v5e:2x2", "--set", "mesh.fsdp=-1",
            "--set", "data.tokenizer=/nonexistent/tokenizer.model", "--batch", "3", "--context", "64"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "mesh         data=1 fsdp=4 tensor=1" in out
    assert "(the tokenizer /nonexistent/tokenizer.model is not here)" in out  # the other settings are the run's
    assert "3 slots x 64 tokens" in out and out.rstrip().endswith("fits: yes")


@tpu_test
def test_two_slices_split_the_rows_across_them(capsys):
    argv = ["compile", "--inference", "--config", TINY, "--topology", "v5e:2x2", "--num-slices", "2", "--batch", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "v5e:2x2 x 2 slices: 8 chips (TPU v5e), 2 host(s)" in out
    assert "mesh         data=2 fsdp=4 tensor=1 (data spans the 2 slices)" in out
    assert out.rstrip().endswith("fits: yes")


@tpu_test
def test_a_kv_cache_larger_than_the_chip_is_refused_before_compiling(capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled a layout whose slots alone exceed HBM")

    monkeypatch.setattr(inference_compile, "_compile", no_compile)
    argv = ["compile", "--inference", "--config", SEVEN_B, "--topology", "v5e:2x4", "--batch", "100000"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "100000 slots x 4096 tokens" in line and "16.00 GiB of HBM" in line
    assert "the KV cache is the largest part: give a smaller --batch or --context" in line
    # The default layout shards the parameters (fsdp=8) but not the cache: the mesh that
    # splits the cache over every chip is named.
    argv = ["compile", "--inference", "--config", SEVEN_B, "--topology", "v5e:2x4", "--batch", "32"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "on the mesh data=1 fsdp=8 tensor=1" in line and "KV cache 64.25 GiB" in line
    assert "the mesh --set mesh.tensor=8, where parameters and slots take 11.18 GiB a chip (they fit" in line


@tpu_test
def test_programs_larger_than_the_chip_are_refused_after_the_report(capsys):
    """The 7B preset at 44 slots of 4096 tokens on v5e:2x4: the slots fit when split over
    tensor=8, but not with the prefill's temporaries (XLA's own refusal)."""
    argv = ["compile", "--inference", "--config", SEVEN_B, "--topology", "v5e:2x4", "--batch", "44",
            "--context", "4096", "--set", "mesh.tensor=8"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "mesh         data=1 fsdp=1 tensor=8" in out and out.rstrip().endswith("fits: NO")
    assert "XLA: prefill: RESOURCE_EXHAUSTED" in out
    assert size(out, "KV cache") == pytest.approx(kv_cache_bytes(load_config(SEVEN_B), 44, 4096, 8) / 2**30, abs=0.001)
    assert size(out, "total") > size(out, "HBM") == 16.0
    assert len(err.strip().splitlines()) == 1
    assert "the prefill's temporaries are the largest part" in err and "--batch" in err


#: The README's inference table: (preset, topology, batch, context, mesh settings) -> GiB a chip measured.
README_ROWS = {
    ("7b", "v5e:2x4", 32, 4096, ("mesh.tensor=8",)): 14.85,
    ("7b", "v5e:2x4", 64, 2048, ("mesh.tensor=8",)): 14.01,
    ("7b", "v5e:4x4", 64, 4096, ("mesh.tensor=16",)): 11.65,
}


def test_the_readme_lists_the_inference_rows():
    readme = (REPO_ROOT / "README.md").read_text()
    for (preset, topology, batch, context, settings), gib in README_ROWS.items():
        sets = " ".join(f"--set {s}" for s in settings)
        command = (f"metatrain compile --inference --config configs/{preset}.yaml --topology {topology} "
                   f"--batch {batch} --context {context} {sets}")
        assert f"| `{command}` | {gib:.1f} | 16 |" in readme, command


@pytest.mark.slow  # 20 to 40 s each on the 2-core machine
@tpu_test
@pytest.mark.parametrize("row", sorted(README_ROWS))
def test_the_7b_engine_fits_as_the_readme_says(row, capsys):
    preset, topology, batch, context, settings = row
    argv = ["compile", "--inference", "--config", str(CONFIGS_DIR / f"{preset}.yaml"), "--topology", topology,
            "--batch", str(batch), "--context", str(context), *[w for s in settings for w in ("--set", s)]]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.rstrip().endswith("fits: yes")
    assert size(out, "total") <= README_ROWS[row] * 1.05, out
    config = load_config(CONFIGS_DIR / f"{preset}.yaml")
    chips = int(re.search(r"(\d+) chips", out).group(1))
    assert size(out, "parameters") == pytest.approx(4 * config.model.num_params / chips / 2**30, rel=0.01)


def test_engine_options_without_inference_and_out_of_range_shapes_exit_2(capsys):
    assert main(["compile", "--topology", "v5e:2x2", "--batch", "4", "--prompt", "3"]) == 2
    line = one_line_error(capsys)
    assert line.endswith("--batch, --prompt: options of the inference compile; add --inference (the training "
                         "compile takes trainer.batch_size and trainer.seq_len through --set)")
    assert main(["compile", "--inference", "--topology", "v5e:2x2", "--max-batch"]) == 2
    assert "--max-batch searches the training batch" in one_line_error(capsys)
    for flags, expected in (
        (["--context", "4096"], "--context 4096: a row holds 2 to model.max_seq_len=128 tokens"),
        (["--prompt", "128"], "--prompt 128: a prompt has 1 to context - 1 = 127 tokens"),
        (["--batch", "0"], "--batch 0: the engine needs at least 1 slot"),
    ):
        assert main(["compile", "--inference", "--config", TINY, "--topology", "v5e:2x2", *flags]) == 2
        assert expected in one_line_error(capsys)
