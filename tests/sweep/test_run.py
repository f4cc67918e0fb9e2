"""`sweep run`: results from metrics.jsonl, resume, skip, failures (a stand-in trainer), and one
point with the real trainer; results read from a sweep on local disk and in a bucket (`store`)."""

import json
from pathlib import Path

import pytest

from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR
from metatrain.io.storage import as_path
from metatrain.sweep.manifest import read_manifest, write_manifest
from metatrain.sweep.plan import plan_sweep
from metatrain.sweep.run import collect_results, collect_sweep, run_sweep

from .conftest import LAW, write_metrics

SPEC = f"""\
base: {CONFIGS_DIR / 'tiny.yaml'}
overrides: {{trainer.eval_every: 2}}
grid:
  sizes: [tiny-1, tiny-2]
  tokens: [2048, 4096]
"""


def fake_loss(config, step: int, role: str) -> float:
    offset = {"text": 0.0, "thinking": 0.5, "mantra": -1.0, "tag": 0.2}.get(role, 0.1)
    return 3.0 + 4.0 / config.model.n_layers + 8.0 / step + offset


class FakeTrainer:
    """Writes eval records the way the trainer does (every eval_every steps and the last)."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.trained: list[str] = []
        self.fail = fail

    def __call__(self, config, workdir: Path) -> None:
        self.trained.append(workdir.name)
        if workdir.name in self.fail:
            raise UserError(f"loss is nan at step 1; stopping ({workdir.name})")
        with open(workdir / "metrics.jsonl", "a") as f:
            for step in range(1, config.trainer.steps + 1):
                f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
                if step % config.trainer.eval_every == 0 or step == config.trainer.steps:
                    record = {"step": step, "eval/loss": fake_loss(config, step, "joint")}
                    for role in ("text", "thinking", "mantra", "tag"):
                        record[f"eval/loss/{role}"] = fake_loss(config, step, role)
                    record["eval/bpb/text"] = fake_loss(config, step, "text") / 4  # as if 4 bytes per nat
                    f.write(json.dumps(record) + "\n")


@pytest.fixture
def sweep(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC)
    plan_sweep(spec, tmp_path / "sweep")
    return tmp_path / "sweep"


def test_run_trains_every_point_and_records_final_and_best_losses(sweep):
    trainer = FakeTrainer()
    records = run_sweep(sweep, runner=trainer, log=lambda _: None)
    assert trainer.trained == [r["name"] for r in records]
    assert records == read_manifest(sweep)
    r = {r["name"]: r for r in records}["tiny-2.D4096"]  # 4 steps, evals at 2 and 4
    assert r["status"] == "done" and r["final_step"] == 4
    assert r["loss/text"] == pytest.approx(3.0 + 2.0 + 2.0)
    assert r["loss/thinking"] == pytest.approx(3.0 + 2.0 + 2.0 + 0.5)
    assert r["loss"] == pytest.approx(3.0 + 2.0 + 2.0 + 0.1)
    assert r["best_loss/text"] == r["loss/text"] and r["best_step"] == 4
    assert r["loss/mantra"] == pytest.approx(6.0)
    assert r["bpb/text"] == pytest.approx(7.0 / 4) and r["best_bpb/text"] == r["bpb/text"]


def test_best_loss_is_the_minimum_over_evaluations(tmp_path):
    lines = [
        {"step": 2, "eval/loss": 5.0, "eval/loss/text": 5.5, "eval/loss/thinking": None},
        {"step": 2, "loss": 6.0},
        {"step": 4, "eval/loss": 5.2, "eval/loss/text": 5.4, "eval/loss/thinking": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "ev')
    result = collect_results(tmp_path, steps=4)
    assert result["loss"] == 5.2 and result["best_loss"] == 5.0 and result["best_step"] == 2
    assert result["loss/text"] == 5.4 and result["best_loss/text"] == 5.4
    assert result["loss/thinking"] is None and result["best_loss/thinking"] is None
    assert collect_results(tmp_path, steps=6) is None  # not finished
    assert result["bpb/text"] is None and result["best_bpb/text"] is None  # not logged by this trainer


def test_bits_per_byte_of_text_are_recorded_final_and_best(tmp_path):
    lines = [
        {"step": 2, "eval/loss": 5.0, "eval/loss/text": 5.5, "eval/bpb/text": 2.5},
        {"step": 4, "eval/loss": 4.8, "eval/loss/text": 5.3, "eval/bpb/text": 2.25},
        {"step": 6, "eval/loss": 4.9, "eval/loss/text": 5.4, "eval/bpb/text": 2.375},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = collect_results(tmp_path, steps=6)
    assert result["bpb/text"] == 2.375 and result["best_bpb/text"] == 2.25
    assert result["loss"] == 4.9 and result["best_loss"] == 4.8 and result["best_step"] == 4  # loss keys kept
    assert result["loss/text"] == 5.4 and result["best_loss/text"] == 5.3
    assert result["loss/mantra"] is None and result["best_loss/mantra"] is None


def test_bits_per_byte_null_where_the_split_has_no_text(tmp_path):
    lines = [
        {"step": 2, "eval/loss": 5.0, "eval/loss/text": None, "eval/bpb/text": None},
        {"step": 4, "eval/loss": 4.0, "eval/loss/text": None, "eval/bpb/text": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = collect_results(tmp_path, steps=4)
    assert "bpb/text" in result and result["bpb/text"] is None and result["best_bpb/text"] is None


def test_resume_skips_done_points_and_collects_trained_ones(sweep):
    first = FakeTrainer()
    run_sweep(sweep, runner=first, only=["tiny-1.D2048"], log=lambda _: None)
    # trained elsewhere but never recorded: its metrics are collected, not retrained
    FakeTrainer()(load(sweep, "tiny-2.D2048"), sweep / "runs" / "tiny-2.D2048")
    second = FakeTrainer()
    lines = []
    records = run_sweep(sweep, runner=second, log=lines.append)
    assert second.trained == ["tiny-1.D4096", "tiny-2.D4096"]
    assert "tiny-1.D2048: done, skipped" in lines[0]
    assert all(r["status"] == "done" for r in records)
    third = FakeTrainer()
    run_sweep(sweep, runner=third, log=lambda _: None)
    assert third.trained == []


def load(sweep, name):
    from metatrain.config import load_config

    return load_config(sweep / "runs" / name / "config.yaml")


def test_a_failed_point_is_recorded_and_retried(sweep):
    failing = FakeTrainer(fail=("tiny-1.D4096",))
    records = {r["name"]: r for r in run_sweep(sweep, runner=failing, log=lambda _: None)}
    assert records["tiny-1.D4096"]["status"] == "failed"
    assert "loss is nan" in records["tiny-1.D4096"]["error"]
    assert records["tiny-2.D4096"]["status"] == "done"  # the sweep went on
    retry = FakeTrainer()
    records = {r["name"]: r for r in run_sweep(sweep, runner=retry, log=lambda _: None)}
    assert retry.trained == ["tiny-1.D4096"]
    assert records["tiny-1.D4096"]["status"] == "done" and records["tiny-1.D4096"]["error"] is None


def test_a_bug_in_the_trainer_stops_the_sweep_and_the_point_is_retried(sweep):
    def broken(config, workdir):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        run_sweep(sweep, runner=broken, log=lambda _: None)
    assert read_manifest(sweep)[0]["status"] == "running"
    retry = FakeTrainer()
    run_sweep(sweep, runner=retry, log=lambda _: None)
    assert len(retry.trained) == 4


def test_collect_marks_points_trained_elsewhere(sweep):
    trainer = FakeTrainer()
    for name in ("tiny-1.D2048", "tiny-2.D4096"):
        trainer(load(sweep, name), sweep / "runs" / name)
    records = {r["name"]: r["status"] for r in collect_sweep(sweep, log=lambda _: None)}
    assert records == {"tiny-1.D2048": "done", "tiny-1.D4096": "planned", "tiny-2.D2048": "planned", "tiny-2.D4096": "done"}


def test_run_refuses_unknown_points_and_hand_written_runs(sweep):
    with pytest.raises(UserError, match="--only tiny-9.D1: no such run"):
        run_sweep(sweep, runner=FakeTrainer(), only=["tiny-9.D1"])
    write_manifest(sweep, [{"name": "by-hand", "params": 1, "tokens": 2, "flops": 3, "status": "planned"}])
    with pytest.raises(UserError, match="has no workdir, config, steps"):
        run_sweep(sweep, runner=FakeTrainer())


def test_the_real_trainer_fills_the_manifest(tmp_path):
    """One point of one step with the real trainer: its eval losses reach the manifest."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: {CONFIGS_DIR / 'tiny.yaml'}\n"
        "overrides: {trainer.eval_batches: 1, trainer.progress: false, checkpoint.async_save: false}\n"
        "grid: {sizes: [tiny-1, tiny-2], tokens: [1024, 2048]}\n"
    )
    plan_sweep(spec, tmp_path / "sweep")
    (record,) = run_sweep(tmp_path / "sweep", only=["tiny-1.D1024"], log=lambda _: None)[:1]
    assert record["status"] == "done" and record["final_step"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "sweep/runs/tiny-1.D1024/metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [m for m in metrics if "eval/loss" in m]
    for key in ("loss", "loss/text", "loss/thinking", "loss/mantra", "loss/tag"):
        assert record[key] == evaluation[f"eval/{key}"] == record[f"best_{key}"]
        assert 0 < record[key] < 10
    assert record["bpb/text"] == evaluation["eval/bpb/text"] == record["best_bpb/text"]
    assert 0 < record["bpb/text"] < 10


def test_results_are_read_from_a_store_and_the_manifest_updated_there(grid_spec, store):
    out = f"{store}/sweep"
    records = {r.record["name"]: r.record for r in plan_sweep(grid_spec, out)}
    first = records["tiny-1.D2048"]
    assert collect_results(as_path(out) / first["workdir"], first["steps"]) is None
    write_metrics(out, first)
    write_metrics(out, records["tiny-2.D2048"], last=1)  # not finished
    result = collect_results(f"{out}/{first['workdir']}", first["steps"])
    assert result["final_step"] == first["steps"] and result["loss/text"] == pytest.approx(LAW(first["params"], first["tokens"]))

    collected = {r["name"]: r for r in collect_sweep(out, log=lambda _: None)}
    assert collected["tiny-1.D2048"]["status"] == "done" and collected["tiny-2.D2048"]["status"] == "planned"
    assert read_manifest(out) == list(collected.values())

    trained = []  # run_sweep collects what the store shows and trains the rest in the store
    records_after = run_sweep(out, runner=lambda config, workdir: trained.append(str(workdir)), log=lambda _: None)
    assert f"{out}/runs/tiny-1.D2048" not in trained and f"{out}/runs/tiny-2.D2048" in trained
    assert [r["status"] for r in records_after].count("failed") == 5  # the runner wrote no metrics
    assert "no evaluation at step" in records_after[1]["error"] and out in records_after[1]["error"]
    assert read_manifest(out) == records_after
