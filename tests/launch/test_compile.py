"""`metatrain compile`: the real train step compiled for a TPU topology on this CPU (libtpu).

The default config fits a v5e 2x2 slice by a wide margin; the 7B preset on it does
not, and is refused with the numbers. The report's numbers are checked against the
config (FLOPs), against each other (total) and against the hardware table (HBM).
"""

from __future__ import annotations

import re

import pytest

import metatrain.launch.compile as compile_module
from metatrain.cli import main
from metatrain.config import load_config
from metatrain.hardware import _NO_LOCAL_TPU, CHIPS
from metatrain.io.paths import CONFIGS_DIR
from metatrain.launch.compile import _XLA_OOM_TEMPS, _XLA_OOM_USED, DeviceMemory, _quoted_bytes, vmem_refusal

#: The pure-JAX loss instead of the Pallas (Mosaic) kernel that `loss.impl: auto` picks on TPU.
CHUNKED = ["--set", "loss.impl=chunked"]
#: A tokenizer that is not on this machine: its vocabulary cannot be checked here.
ABSENT_TOKENIZER = ["--set", "data.tokenizer=/nonexistent/tokenizer-32k.model"]


@pytest.fixture
def libtpu(monkeypatch):
    """Skip without libtpu; keep the variables `compile` sets for libtpu out of other tests."""
    pytest.importorskip("libtpu", reason="needs libtpu (the `tpu` extra) for ahead-of-time TPU compiles")
    for name, value in {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", **_NO_LOCAL_TPU}.items():
        monkeypatch.setenv(name, value)


def tpu_test(fn):
    """Mark a test that compiles for TPU: the `tpu` marker, and skipped without libtpu."""
    return pytest.mark.tpu(pytest.mark.usefixtures("libtpu")(fn))


def gib(report: str, name: str) -> float:
    match = re.search(rf"^\s+{name}\s+([\d.]+) GiB", report, re.MULTILINE)
    assert match, f"no {name} line in:\n{report}"
    return float(match.group(1))


@tpu_test
def test_the_default_config_compiles_for_v5e_2x2_and_fits(capsys):
    # The default loss.impl (auto) is the Pallas kernel under shard_map on TPU.
    assert main(["compile", "--topology", "v5e:2x2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "v5e:2x2: 4 chips (TPU v5e), 1 host(s)" in out
    assert "mesh         data=4 fsdp=1 tensor=1" in out
    parts = [gib(out, n) for n in ("arguments", "outputs", "temporaries", "code")]
    assert gib(out, "total") == pytest.approx(sum(parts), abs=0.002)
    assert gib(out, "HBM") == pytest.approx(CHIPS["tpu v5e"].hbm_bytes / 2**30)
    assert 0 < gib(out, "total") < gib(out, "HBM")
    # Data parallel: every chip holds all fp32 parameters and both Adam moments.
    params = load_config(CONFIGS_DIR / "default.yaml").model.num_params
    assert gib(out, "arguments") >= 3 * 4 * params / 2**30 - 0.001
    flops = load_config(CONFIGS_DIR / "default.yaml").flops_per_step
    assert f"model FLOPs per step  {flops / 1e9:.3f} GFLOP" in out
    assert out.rstrip().endswith("fits: yes")


@tpu_test
def test_the_default_config_compiles_for_tpu_with_the_chunked_loss_too(capsys):
    assert main(["compile", "--topology", "v5e:2x2", *CHUNKED]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith("fits: yes")


@tpu_test
def test_the_7b_preset_does_not_fit_v5e_2x2_and_is_refused_with_the_numbers(capsys):
    # The preset's 32k tokenizer (tokenizer/32k.model) is not shipped, so it is not checked.
    argv = ["compile", "--config", str(CONFIGS_DIR / "7b.yaml"), "--topology", "v5e:2x2"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "mesh         data=1 fsdp=4 tensor=1" in out
    assert "fits: NO" in out
    # fp32 parameters and two Adam moments of 6.7B parameters, over 4 chips: ~19 GiB each.
    params = load_config(CONFIGS_DIR / "7b.yaml").model.num_params
    assert gib(out, "arguments") == pytest.approx(3 * 4 * params / 4 / 2**30, rel=0.01)
    assert gib(out, "total") > gib(out, "HBM") == 16.0
    assert "does not fit v5e:2x2" in err and "GiB" in err and "16.00 GiB of HBM" in err


@pytest.mark.slow  # a minute on the 2-core machine
@tpu_test
def test_a_multi_slice_mesh_compiles_with_data_parallelism_across_slices(capsys):
    assert main(["compile", "--topology", "v5e:2x2", "--num-slices", "2", *CHUNKED]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "v5e:2x2 x 2 slices: 8 chips (TPU v5e), 2 host(s)" in out
    assert "mesh         data=8 fsdp=1 tensor=1 (data spans the 2 slices: mesh.dcn_data=2)" in out
    assert out.rstrip().endswith("fits: yes")


def test_slices_and_a_different_dcn_axis_are_refused_before_compiling(capsys):
    assert main(["compile", "--topology", "v5e:2x2", "--num-slices", "2", "--set", "mesh.dcn_data=4"]) == 2
    err = capsys.readouterr().err
    assert "--num-slices 2" in err and "mesh.dcn_data=4" in err


def test_a_vocabulary_that_is_not_the_tokenizers_is_refused_before_compiling(capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("libtpu was asked for the topology before the vocabulary was checked")

    monkeypatch.setattr(compile_module, "tpu_topology", no_compile)
    argv = ["compile", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--topology", "v5e:2x2", "--set", "model.vocab_size=4000"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "model.vocab_size=4000" in captured.err and "has 4096 pieces" in captured.err
    assert "--set model.vocab_size=4096" in captured.err
    # A preset sized for a 32k tokenizer, pointed at the bundled 4096-piece one, is refused the same way.
    sample = CONFIGS_DIR.parent / "tokenizer" / "sample.model"
    argv = ["compile", "--config", str(CONFIGS_DIR / "7b.yaml"), "--topology", "v5e:2x2", "--set", f"data.tokenizer={sample}"]
    assert main(argv) == 2
    assert "model.vocab_size=32768" in capsys.readouterr().err


@tpu_test
def test_a_tokenizer_that_is_not_here_is_not_checked(capsys):
    argv = ["compile", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--topology", "v5e:2x2", "--set", "model.vocab_size=4000",
            *ABSENT_TOKENIZER, *CHUNKED]
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith("fits: yes")


@tpu_test
def test_an_unknown_topology_is_refused(capsys):
    assert main(["compile", "--topology", "v5e:3x3x3x3"]) == 2
    assert "libtpu does not know this TPU topology" in capsys.readouterr().err


def test_memory_totals_and_xla_refusals_are_read():
    memory = DeviceMemory(arguments=10, outputs=8, aliased=6, temporaries=5, code=1)
    assert memory.total == 10 + 2 + 5 + 1
    assert DeviceMemory(arguments=10, outputs=0, aliased=0, temporaries=None).total is None
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
               "required for HLO temporaries (305.44G) exceeds available HBM (15.75G).")
    assert _quoted_bytes(_XLA_OOM_TEMPS, message) == int(305.44 * 2**30)
    assert _quoted_bytes(_XLA_OOM_USED, "Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm.") == int(
        20.5 * 2**30
    )


def test_a_kernel_that_does_not_fit_vmem_is_told_apart_from_hbm():
    """Mosaic's VMEM refusal (as XLA:TPU words it) names the kernel, XLA's sizes and a fix."""
    message = (
        "RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Ran out of memory in memory space vmem "
        "while allocating on stack for %cross_entropy_d_hidden.1 = f32[2048,2048]{1,0:T(8,128)} custom-call(...) "
        "Scoped allocation with size 39.24M and limit 38.00M exceeded scoped vmem limit by 1.24M."
    )
    line = vmem_refusal(message, "v5e:2x2", "TPU v5 lite")
    assert "kernel cross_entropy_d_hidden needs 39.24M of VMEM against a limit of 38.00M" in line
    assert "not HBM" in line and "--set loss.impl=chunked" in line


@tpu_test
def test_a_v4_topology_compiles_in_megacore_mode(capsys):
    argv = ["compile", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--topology", "v4:2x2x1"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "4 chips (TPU v4)" in out and out.rstrip().endswith("fits: yes")


@pytest.mark.tpu
def test_training_on_cpu_with_libtpu_installed_prints_no_tpu_errors(tmp_path):
    pytest.importorskip("libtpu")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    done = subprocess.run(
        [sys.executable, "-m", "metatrain.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"),
         "--workdir", str(tmp_path), "--set", "trainer.steps=1", "--set", "trainer.eval_every=0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr[-2000:]


def test_max_batch_doubles_then_bisects_to_the_largest_fitting_batch(monkeypatch):
    """The search alone, against a stand-in compile whose limit is known (37 sequences)."""
    import types

    from metatrain.launch import compile as compile_module

    monkeypatch.setattr(compile_module, "tpu_topology", lambda name, n=1: types.SimpleNamespace(devices=["chip"]))
    monkeypatch.setattr(compile_module, "batch_unit", lambda config, devices: 1)

    def fake_compile(config, topology, num_slices=1):
        batch = config.trainer.batch_size
        memory = types.SimpleNamespace(total=batch << 30)
        return types.SimpleNamespace(fits=batch <= 37, memory=memory)

    monkeypatch.setattr(compile_module, "compile_for_topology", fake_compile)
    config = load_config(CONFIGS_DIR / "tiny.yaml", ["data.tokenizer=/nonexistent/tok.model"])
    found = compile_module.find_max_batch(config, "v5e:1x1")
    assert found.batch_size == 37 and found.per_chip == 37
    batches = [b for b, _ in found.tried]
    assert batches[:7] == [1, 2, 4, 8, 16, 32, 64] and len(batches) <= 12


@pytest.mark.slow
@tpu_test
def test_max_batch_of_the_125m_preset_on_one_v5e_chip(capsys):
    argv = ["compile", "--config", str(CONFIGS_DIR / "125m.yaml"), "--topology", "v5e:1x1", "--max-batch"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "largest batch that fits: 50 sequences (50 a chip)" in out
