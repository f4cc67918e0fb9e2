"""`metatrain launch local -- eval ...`: one model sharded over the devices of two processes.

- 2 processes x 4 CPU devices (jax.distributed over gloo) write the report that one
  process writes with 8 devices, and with 1: the same documents, counts and free
  generation; losses, bits per byte, ablation differences and intervals equal to float
  rounding (`RTOL`, `ATOL`: the mesh's reductions add in another order); probe accuracies
  within a token or two (`probe_tolerance`). Only process 0 writes.
- What `launch local` accepts after `--` (train, eval, annotate) and refuses before any
  process starts; a forwarded SIGTERM that eval ends with 143 is a stop, not a failure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metatrain.cli import main
from metatrain.errors import EXIT_TERMINATED
from metatrain.evaluation import placement
from metatrain.evaluation.evaluate import EvalOptions, evaluate_workdir
from metatrain.evaluation.report import EvalSettings
from metatrain.io.paths import REPO_ROOT
from metatrain.launch import distributed as dist

from .test_local import child, sigterm_to_self_when, supervise

SYNTHETIC = REPO_ROOT / "data" / "sample" / "synthetic.jsonl"
#: Small enough for two cores: 20 documents, 2 prompts x 2 samples of 8 tokens, 500 probe tokens.
EVAL_ARGS = ["--data", str(SYNTHETIC), "--max-documents", "20", "--seq-len", "32", "--batch-rows", "4",
             "--bootstrap", "100", "--prompts", "2", "--samples", "2", "--max-new-tokens", "8",
             "--probe-tokens", "500", "--json"]
#: Floats of the report: the same sums added in another order (a mesh over 2 processes, 8
#: or 1 devices). Measured: losses and bpb agree to ~2e-8 relative, differences and
#: interval ends (about 1e-3 bits per byte) to ~2e-8 absolute.
RTOL, ATOL = 1e-6, 1e-6


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"ablation/removed/minus_kept/ci[0]": value, ...} of a JSON report."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}/{key}" if prefix else key).items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def probe_tolerance(report: dict, key: str) -> float | None:
    """For a probe accuracy (or its interval) the share of two held-out tokens: a probe
    fitted on features that differ in their last bits may flip a token on its boundary."""
    for task in ("mode", "role"):
        if key.startswith((f"probes/{task}/layers", f"probes/{task}/minus_baseline_ci")):
            return 2 / report["probes"][task]["test_tokens"]
    return None


def assert_same_report(actual: dict, expected: dict, what: str) -> None:
    """Equal keys; equal values, floats within RTOL/ATOL (probes: `probe_tolerance`);
    the paths of the outputs (`probes/plot`) aside."""
    a, e = flatten(actual), flatten(expected)
    assert a.keys() == e.keys(), f"{what}: keys differ: {sorted(a.keys() ^ e.keys())}"
    for key in e:
        if key == "probes/plot":
            continue
        x, y = a[key], e[key]
        if isinstance(y, float) and isinstance(x, float):
            tolerance = probe_tolerance(expected, key)
            close = (math.isclose(x, y, abs_tol=tolerance) if tolerance is not None
                     else math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL))
            assert close, f"{what}: {key} = {x}, expected {y}"
        else:
            assert x == y, f"{what}: {key} = {x!r}, expected {y!r}"


@pytest.mark.slow
def test_two_processes_write_the_report_of_one_process_with_8_devices_and_with_1(workdir, start, tmp_path):
    outs = {name: tmp_path / name for name in ("two_processes", "one_process", "one_device")}
    launched = start(["launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
                      "eval", "--workdir", str(workdir), "--out", str(outs["two_processes"]), *EVAL_ARGS], "launch")
    assert launched.wait() == 0, launched.output[-4000:]
    for name, devices in (("one_process", 8), ("one_device", 1)):
        single = start(["eval", "--workdir", str(workdir), "--out", str(outs[name]), *EVAL_ARGS], name,
                       env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
        assert single.wait() == 0, single.output[-4000:]
    reports = {name: json.loads((out / "report.json").read_text()) for name, out in outs.items()}
    two = reports["two_processes"]
    assert two["documents"] == 20 and {"ablation", "free_generation", "probes"} <= set(two)
    assert two["probes"]["plot"] == str(outs["two_processes"] / "probes.png")
    assert sorted(p.name for p in outs["two_processes"].iterdir()) == ["probes.png", "report.json"]
    assert_same_report(two, reports["one_process"], "2 processes x 4 devices vs 1 x 8")
    assert_same_report(two, reports["one_device"], "2 processes x 4 devices vs 1 device")
    output = launched.output
    assert "[launch] all 2 processes finished" in output
    printed = {i: [line.split(" ", 2)[2] for line in output.splitlines() if line.startswith(f"[process {i}] {{")]
               for i in range(2)}
    assert len(printed[0]) == 1 and len(printed[1]) <= 1, output[-4000:]  # process 1 may print its copy, or not
    for i, lines in printed.items():
        for line in lines:
            assert_same_report(json.loads(line), two, f"process {i}'s printed report")


def test_a_process_other_than_0_computes_the_report_and_writes_nothing(workdir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    settings = EvalSettings(batch_rows=4, resamples=50, generation=False, probe_tokens=200)
    options = EvalOptions(data=[str(SYNTHETIC)], out=out, max_documents=6, settings=settings, mesh_settings=())
    monkeypatch.setattr(placement, "writes_files", lambda: False)  # what jax.process_index() == 1 gives
    other = evaluate_workdir(workdir, options)
    assert not out.exists() and not other.wrote
    assert other.path == out / "report.json" and other.report["probes"]["plot"] == str(out / "probes.png")
    monkeypatch.undo()
    first = evaluate_workdir(workdir, options)
    assert first.wrote and json.loads(first.path.read_text()) == first.report
    assert_same_report(other.report, first.report, "process 1 vs process 0")


# -- what launch local starts -------------------------------------------------------------------


def launch_dry_run(capsys, *command: str) -> tuple[int, str, str]:
    code = main(["launch", "local", "--processes", "2", "--devices-per-process", "4", "--port", "9999",
                 "--dry-run", "--", *command])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_and_annotate_are_started_on_every_process_as_typed(capsys, tmp_path):
    annotate = ["annotate", "--input", "raw.jsonl", "--out", str(tmp_path / "docs.jsonl"), "--generator", "metatrain",
                "--workdir", str(tmp_path)]
    for command in (["eval", "--workdir", str(tmp_path), "--no-probes", "--set", "mesh.fsdp=4"], annotate):
        code, out, err = launch_dry_run(capsys, *command)
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 3 and lines[-1] == "wait"
        for i, line in enumerate(lines[:2]):
            assert f"{dist.ENV_PROCESS_ID}={i}" in line and "device_count=4" in line
            assert line.endswith(f"-m metatrain.cli {' '.join(command)} &")


def test_what_launch_local_refuses_before_starting_a_process(capsys, tmp_path):
    code, _, err = launch_dry_run(capsys, "generate", "--workdir", str(tmp_path))
    assert code == 2 and "can only launch `train`, `eval` or `annotate` on every process, got 'generate'" in err
    code, _, err = launch_dry_run(capsys, "eval", "--workdri", str(tmp_path))
    assert code == 2 and "the eval arguments are not valid" in err.splitlines()[-1]
    code, _, err = launch_dry_run(capsys, "eval", "--workdir", "a\nb")
    (line,) = [l for l in err.splitlines() if l.startswith("metatrain launch")]
    assert code == 2 and line.startswith("metatrain launch: error: --workdir 'a\\nb': control characters")
    code, _, err = launch_dry_run(capsys, "eval", "--workdir", str(tmp_path), "--set", "mesh.data=2\r")
    assert code == 2 and "--set 'mesh.data=2\\r'" in err
    with pytest.raises(SystemExit) as exited:  # `--help` is the command's help; nothing starts
        launch_dry_run(capsys, "eval", "--help")
    assert exited.value.code == 0 and "--max-documents" in capsys.readouterr().out


def test_a_forwarded_sigterm_that_ends_eval_with_143_is_a_stop_not_a_failure(tmp_path: Path):
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    specs = [
        child(i, f"""
            import pathlib, signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit({EXIT_TERMINATED}))
            pathlib.Path({str(ready[i])!r}).touch()
            time.sleep(60)
        """)
        for i in range(2)
    ]
    sigterm_to_self_when(*ready)
    result, out, elapsed = supervise(specs)
    assert result.exit_code == EXIT_TERMINATED and result.failure is None, out
    assert result.returncodes == (EXIT_TERMINATED, EXIT_TERMINATED)
    assert "stopped on SIGTERM without a checkpoint" in out and elapsed < 30


def test_143_without_a_forwarded_sigterm_is_a_failure():
    result, out, _ = supervise([child(0, f"import sys; sys.exit({EXIT_TERMINATED})"),
                                child(1, "import time; time.sleep(60)")])
    assert result.exit_code == EXIT_TERMINATED and result.failure.index == 0
    assert "exited with status 143" in out and result.stopped == (1,)
