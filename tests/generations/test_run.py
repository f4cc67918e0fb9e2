"""`metatrain generations run|report` with real stages: a tiny model trained on a known-answer
corpus, evaluated, annotating the next generation; resumed after kills at every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metatrain.generations.manifest import compared_part

from .conftest import child_env, manifest, run_loop, spec_data, write_spec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _main(monkeypatch, *args: str) -> int:
    """`metatrain ARGS` in this process (its stages are child processes with `child_env()`)."""
    from metatrain.cli import main

    for name, value in child_env().items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("METATRAIN_GENERATIONS_STOP_AT", raising=False)
    return main(list(args))


def _error_line(stderr: str) -> str:
    [line] = [l for l in stderr.splitlines() if l.startswith("metatrain generations")
              and ("error:" in l or "fault:" in l)]
    return line


def test_a_failing_stage_stops_the_loop_in_one_line_and_a_rerun_retries_it(tmp_path, corpus, monkeypatch, capsys):
    data = spec_data(corpus)
    data["train"]["set"].append("model.vocab_size=4000")  # the trainer refuses it at once
    spec = write_spec(tmp_path / "spec.yaml", data)
    out = tmp_path / "loop"
    for attempt in (1, 2):
        assert _main(monkeypatch, "generations", "run", str(spec), "--out", str(out)) == 2
        line = _error_line(capsys.readouterr().err)
        assert "gen-0/train failed: `metatrain train` exited with status 2: metatrain train: error: " \
               "model.vocab_size=4000 but the tokenizer" in line
        state = manifest(out)
        assert state["status"] == "failed" and state["error"] in line and state["current"] is None
        gen0 = state["generations"][0]
        assert [gen0["stages"][s]["status"] for s in ("corpus", "train", "eval")] == ["done", "failed", "pending"]
        assert state["timings"]["gen-0/corpus"]["attempts"] == 1  # done once, never redone
        assert state["timings"]["gen-0/train"]["attempts"] == attempt
    # the copied teacher corpus: every known point's thought carries its answer
    teacher = [json.loads(line) for line in corpus["train"].read_text().splitlines()]
    assert (out / "gen-0" / "corpus.jsonl").read_text() == corpus["train"].read_text()
    results = gen0["results"]["corpus"]
    assert results["documents"] == len(teacher) and results["path"] == "gen-0/corpus.jsonl"
    assert results["answers"] == {"carried": results["answers"]["total"], "total": sum(len(r["known"]) for r in teacher),
                                  "share": 1.0}
    assert "model.vocab_size=4000" in (out / "gen-0" / "train.log").read_text()
    assert "vocab_size: 4000" in (out / "gen-0" / "config.yaml").read_text()

    changed = write_spec(tmp_path / "changed.yaml", {**data, "generations": 2,
                                                     "annotate": {"max_blocks": 3, "max_tokens": 8, "seed": 0}})
    assert _main(monkeypatch, "generations", "run", str(changed), "--out", str(out)) == 2
    line = _error_line(capsys.readouterr().err)
    assert "the spec changed" in line and "annotate.max_blocks: 2 -> 3" in line and "generations" not in line.split("(")[1]
    assert manifest(out) == state  # refused before anything was written

    assert _main(monkeypatch, "generations", "report", str(out)) == 0
    table = capsys.readouterr().out
    assert "generations: failed" in table and "train:failed eval:pending" in table
    assert (out / "generations.png").stat().st_size > 0


def test_an_out_holding_something_else_is_refused_untouched(tmp_path, corpus, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", spec_data(corpus))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "a sweep"}\n')
    for out, words in ((other, "holds no manifest.json"), (tmp_path / "file", "is not a directory"),
                       (foreign, "is not the manifest of `metatrain generations run`")):
        before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()
        assert _main(monkeypatch, "generations", "run", str(spec), "--out", str(out)) == 2
        assert words in _error_line(capsys.readouterr().err)
        assert before == ({p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes())


@pytest.mark.slow
def test_one_generation_runs_and_a_rerun_is_a_no_op(tmp_path, corpus, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", spec_data(corpus, generations=1))
    out = tmp_path / "loop"
    assert _main(monkeypatch, "generations", "run", str(spec), "--out", str(out)) == 0
    printed = capsys.readouterr()
    done = manifest(out)
    assert done["status"] == "done" and done["current"] is None
    [gen0] = done["generations"]
    assert {s["status"] for s in gen0["stages"].values()} == {"done"}
    results = gen0["results"]
    report = json.loads((out / "gen-0" / "eval" / "report.json").read_text())
    assert results["eval"]["bpb/text"] == report["bpb/text"]
    assert results["eval"]["removed_minus_kept"]["bpb/text"] == report["ablation"]["removed"]["minus_kept"]["bpb/text"]
    assert results["train"]["step"] == 4 and results["train"]["loss"] is not None
    config = (out / "gen-0" / "config.yaml").read_text()
    assert str(out / "gen-0" / "corpus.jsonl") in config and "steps: 4" in config
    assert "0    done" in printed.out

    assert _main(monkeypatch, "generations", "run", str(spec), "--out", str(out)) == 0  # nothing runs again
    assert "starting" not in capsys.readouterr().err
    assert compared_part(manifest(out)) == compared_part(done)
    assert manifest(out)["timings"] == done["timings"]

    assert _main(monkeypatch, "generations", "report", str(out)) == 0
    assert f"{results['eval']['bpb/text']:.4f}" in capsys.readouterr().out
    assert _main(monkeypatch, "generations", "report", str(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["generations"] == done["generations"]


# -- two generations, killed at every stage -------------------------------------------------------


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory, corpus):
    """A 2-generation loop (gen 1 annotated by gen 0's model, self-thinking eval) run once
    without a stop: its spec and final manifest."""
    tmp = tmp_path_factory.mktemp("loop")
    data = spec_data(corpus, generations=2, eval={
        "self_think": True, "self_think_tokens": 8, "max_documents": 8,
        "args": ["--no-generation", "--no-probes", "--bootstrap", "20"]})
    spec = write_spec(tmp / "spec.yaml", data)
    result = run_loop(spec, tmp / "reference")
    assert result.returncode == 0, result.stderr[-3000:]
    return spec, manifest(tmp / "reference")


@pytest.mark.slow
def test_a_loop_killed_at_every_stage_ends_with_the_same_manifest(tmp_path, two_generations):
    spec, reference = two_generations
    gen1 = reference["generations"][1]["results"]
    assert gen1["corpus"]["made_by"] == {"generation": 0}
    assert gen1["corpus"]["documents"] == reference["generations"][0]["results"]["corpus"]["documents"]
    assert gen1["corpus"]["answers"]["total"] > 0  # the known points survive annotation
    assert gen1["eval"]["self_think"]["self"]["bpb/text"] is not None
    assert gen1["eval"]["self_think"]["answers"]["total"] > 0

    out = tmp_path / "loop"
    # The loop kills itself (-SIGKILL; its child dies with it) or the stage's child (the
    # loop reports the stage failed: 74), at each stage that runs a child.
    stops = [("gen-0/train@6", -signal.SIGKILL), ("gen-0/eval@1:child", 74), ("gen-1/corpus@5", -signal.SIGKILL),
             ("gen-1/corpus@2:child", 74), ("gen-1/train@0", -signal.SIGKILL), ("gen-1/train@8:child", 74),
             ("gen-1/eval@3", -signal.SIGKILL)]
    for stop, status in stops:
        result = run_loop(spec, out, stop_at=stop)
        assert result.returncode == status, (stop, result.stderr[-3000:])
        state = manifest(out)
        stage = stop.split("@")[0]
        n, name = int(stage.split("/")[0].removeprefix("gen-")), stage.split("/")[1]
        if status == 74:
            assert state["status"] == "failed" and state["generations"][n]["stages"][name]["status"] == "failed"
            assert f"{stage} failed" in state["error"] and "killed by SIGKILL" in state["error"]
        else:
            assert state["current"]["stage"] == stage and state["generations"][n]["stages"][name]["status"] == "running"
            pid = state["current"]["pid"]
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(pid), f"{stage}'s child outlived the loop"
    final = run_loop(spec, out)
    assert final.returncode == 0, final.stderr[-3000:]
    finished = manifest(out)
    assert finished["timings"]["gen-1/train"]["attempts"] == 3
    assert compared_part(finished)["generations"] == compared_part(reference)["generations"]
    assert compared_part(finished)["status"] == "done"


@pytest.mark.slow
def test_sigterm_stops_the_stage_and_a_rerun_finishes_the_same(tmp_path, two_generations):
    spec, reference = two_generations
    out = tmp_path / "loop"
    process = subprocess.Popen([sys.executable, "-m", "metatrain.cli", "generations", "run", str(spec), "--out",
                                str(out)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = out / "gen-0" / "work" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    state = manifest(out)
    assert state["status"] == "stopped" and "stopped by SIGTERM at gen-0/" in state["error"]
    stopped = state["error"].split(" at ")[1].split(":")[0].split("/")[1]  # train, or eval if training had just ended
    assert state["generations"][0]["stages"][stopped]["status"] == "pending"
    assert state["current"] is None
    final = run_loop(spec, out)
    assert final.returncode == 0, final.stderr[-3000:]
    assert compared_part(manifest(out))["generations"] == compared_part(reference)["generations"]
