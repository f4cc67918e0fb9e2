"""`metatrain eval` end to end on a real checkpoint: the report's keys, files and refusals; a work
directory and data on local disk and in a bucket (`stored_run`)."""

import json

import pytest

from metatrain.cli import main
from metatrain.io.paths import REPO_ROOT
from metatrain.io.storage import as_path
from metatrain.roles import LOSS_ROLE_LABELS

SYNTHETIC = REPO_ROOT / "data" / "sample" / "synthetic.jsonl"
QUICK = ["--prompts", "2", "--samples", "2", "--max-new-tokens", "16", "--bootstrap", "200", "--batch-rows", "4"]


def _eval(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def report(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    assert main(["eval", "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(out), *QUICK]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_has_every_contract_key(report):
    out, r = report
    for role in LOSS_ROLE_LABELS:
        assert {f"loss/{role}", f"accuracy/{role}", f"tokens/{role}"} <= set(r)
    assert r["bpb/text"] > 0 and r["documents"] == 30
    ab = r["ablation"]
    assert set(ab) >= {"kept", "removed", "shuffled", "mantra_only"}
    for name in ("kept", "removed", "shuffled", "mantra_only"):
        assert set(ab[name]) >= {"loss/text", "bpb/text", "tokens/text"}
        assert ab[name]["tokens/text"] == r["tokens/text"]  # the same text tokens in every variant
    for name in ("removed", "shuffled", "mantra_only"):
        mk = ab[name]["minus_kept"]
        assert mk["bpb/text"] == pytest.approx(ab[name]["bpb/text"] - ab["kept"]["bpb/text"], abs=1e-9)
        assert len(mk["ci"]) == 2 and mk["ci"][0] <= mk["bpb/text"] <= mk["ci"][1]
        assert mk["documents"] == 30
    fg = r["free_generation"]
    assert fg["masked"]["illegal_transitions"] == 0 and fg["masked"]["ai_left"] == 0
    for key in ("illegal_per_1000_tokens", "mantra_exact", "ai_left_fraction"):
        assert key in fg["free"] and key in fg["masked"]
    for task in ("mode", "role"):
        assert len(r["probes"][task]["layers"]) == len(r["probes"]["layer_names"])
        assert 0 <= r["probes"][task]["baseline"] <= 1
    assert (out / "probes.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_and_json_agree(capsys, workdir, report, tmp_path):
    code, out, _ = _eval(capsys, "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(tmp_path / "o"),
                         "--no-probes", "--no-generation", "--json", *QUICK)
    assert code == 0
    printed = json.loads(out)
    assert printed == json.loads((tmp_path / "o" / "report.json").read_text())
    assert printed["ablation"] == report[1]["ablation"]  # deterministic: same seed, same numbers
    code, out, _ = _eval(capsys, "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(tmp_path / "o"),
                         "--no-probes", "--no-generation", *QUICK)
    assert code == 0
    assert "removed" in out and "bpb/text" in out and "95% interval" in out


def test_default_data_is_the_held_out_split_and_says_when_it_is_too_small(capsys, workdir):
    code, out, _ = _eval(capsys, "--workdir", str(workdir), "--no-probes", "--no-generation", "--json",
                         "--seq-len", "32", *QUICK)
    assert code == 0
    r = json.loads(out)
    assert r["documents"] == 9  # factbook's held-out split at eval_fraction 0.05
    assert "held-out split" in r["data"]
    removed = r["ablation"]["removed"]["minus_kept"]
    assert removed["ci"] is None and "too few documents" in removed["note"]
    assert (workdir / "eval" / str(r["step"]) / "report.json").is_file()


def test_missing_step_names_the_steps_there_are(capsys, workdir):
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--step", "999")
    assert code == 2
    assert "no checkpoint at step 999" in err and "checkpoints: 1" in err


def test_a_foreign_report_is_never_overwritten(capsys, workdir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.json").write_text('{"my": "data"}')
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(out))
    assert code == 2 and "not a `metatrain eval` report" in err
    assert (out / "report.json").read_text() == '{"my": "data"}'
    (tmp_path / "file").write_text("x")
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(tmp_path / "file"))
    assert code == 2 and "not a directory" in err


def test_bad_records_are_skipped_and_counted_or_stop_in_strict_mode(capsys, workdir, tmp_path):
    data = tmp_path / "docs.jsonl"
    lines = SYNTHETIC.read_text().splitlines()[:4]
    data.write_text("\n".join([lines[0], "{not json", lines[1], '{"id": "x", "segments": []}', *lines[2:]]) + "\n")
    code, out, _ = _eval(capsys, "--workdir", str(workdir), "--data", str(data), "--out", str(tmp_path / "o"),
                         "--no-probes", "--no-generation", "--json", *QUICK)
    assert code == 0
    r = json.loads(out)
    assert r["documents"] == 4 and r["skipped_records"] == 2
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--data", str(data), "--strict", "--no-probes")
    assert code == 2 and f"{data}:2" in err and len(err.strip().splitlines()) == 1


def test_workdir_without_checkpoints_is_one_line(capsys, tmp_path):
    code, _, err = _eval(capsys, "--workdir", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_eval_reads_a_store_and_writes_its_report_there(stored_run, report, capsys):
    stored_run.upload("docs/synthetic.jsonl", SYNTHETIC)
    code, _, err = _eval(capsys, "--workdir", f"{stored_run}/run", "--data", f"{stored_run}/docs/*.jsonl", *QUICK)
    assert code == 0, err
    assert {"1/report.json", "1/probes.png"} <= set(stored_run.files("run/eval"))
    remote = json.loads(as_path(f"{stored_run}/run/eval/1/report.json").read_text())
    _, local = report  # the same command on the session run, with the local file
    for key in ("bpb/text", "loss/text", "tokens/text", "documents", "ablation", "free_generation"):
        assert remote[key] == local[key], key


@pytest.mark.hostile
@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_a_seed_the_rng_cannot_take_is_refused_before_the_checkpoint_loads(capsys, tmp_path, seed):
    code, _, err = _eval(capsys, "--workdir", str(tmp_path), "--seed", seed)  # no checkpoint: refused first
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("metatrain eval: error: --seed") and f"{2**32 - 1}" in line


@pytest.mark.hostile
def test_more_free_generation_samples_than_memory_holds_are_refused_before_evaluating(capsys, workdir, tmp_path):
    out = tmp_path / "o"
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(out),
                         "--no-probes", *QUICK, "--samples", "1000000")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("metatrain eval: error: --prompts 2 x --samples 1000000") and "at most" in line
    assert not out.exists()  # refused before any work


def _interrupted_eval(workdir, out, delay: float):
    """`metatrain eval` in a fresh process, SIGINT after `delay` seconds: (status, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    process = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "eval", "--workdir", str(workdir), "--data", str(SYNTHETIC),
         "--out", str(out), *QUICK], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.hostile
@pytest.mark.slow
@pytest.mark.parametrize("delay", [4.0, 6.0, 8.0, 9.0, 10.0, 11.0, 12.0])
def test_ctrl_c_in_eval_ends_with_130_and_leaves_no_temporary(workdir, tmp_path, delay):
    out = tmp_path / "out"
    code, err = _interrupted_eval(workdir, out, delay)
    if code == 0:  # the evaluation ended before the signal: nothing to test at this delay
        return
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "metatrain eval: interrupted"
    left = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [name for name in left if name not in ("report.json", "probes.png")], left
