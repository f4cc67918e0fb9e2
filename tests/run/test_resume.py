"""A resume is validated against the checkpoint's config before anything is written, in a work
directory on local disk and in a bucket (`store`)."""

from __future__ import annotations

import re
import shutil

import pytest

from metatrain.config import load_config
from metatrain.io.paths import REPO_ROOT
from metatrain.run.resume import RESUMABLE_KEYS, ResumeRefused, config_differences, resumable_keys_doc
from metatrain.train.loop import train

from ..conftest import TINY, error_lines, run_cli, tiny_config

STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run checkpointed at step 3."""
    workdir = tmp_path_factory.mktemp("trained")
    train(tiny_config(f"trainer.steps={STEPS}", "trainer.eval_every=0"), workdir)
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _files(workdir):
    return {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.d_model=96"], ["model.d_model: 64 -> 96"]),
        (["trainer.batch_size=16", "loss.weights.thinking=0.0"],
         ["loss.weights.thinking: 1.0 -> 0.0", "trainer.batch_size: 8 -> 16"]),
        (["data.seed=7", "optimizer.learning_rate=0.001"], ["data.seed: 0 -> 7", "optimizer.learning_rate: 0.003 -> 0.001"]),
    ],
)
def test_a_refused_resume_names_each_key_and_changes_no_file(run, overrides, expected):
    before = _files(run)
    config = load_config(run / "config.yaml", [f"trainer.steps={STEPS + 1}", *overrides])
    with pytest.raises(ResumeRefused) as refused:
        train(config, run)
    message = str(refused.value)
    assert f"from its checkpoint at step {STEPS}" in message
    listed = [line.strip() for line in message.splitlines()[1:-1]]
    assert listed == expected
    assert "another --workdir" in message and "--set " + expected[0].split(":")[0] in message
    assert _files(run) == before  # config.yaml byte-identical, no metrics, no checkpoint


def test_the_plain_resume_works_after_a_refusal(run):
    refused = run_cli("train", "--workdir", str(run), "--set", "model.d_model=96", "--set", f"trainer.steps={STEPS + 1}")
    assert refused.returncode == 2
    lines = error_lines(refused.stderr)
    assert lines[0].startswith(f"metatrain train: error: cannot resume {run}") and lines[1].strip() == "model.d_model: 64 -> 96"
    assert "Traceback" not in refused.stderr
    # The command the preemption message prints: the same work directory, no --config.
    again = run_cli("train", "--workdir", str(run), "--set", f"trainer.steps={STEPS + 1}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"trained steps {STEPS} -> {STEPS + 1}" in again.stdout


def test_keys_that_say_how_to_train_may_change(run):
    config = load_config(run / "config.yaml", [
        f"trainer.steps={STEPS + 1}", "checkpoint.every=1", "trainer.log_every=2", "mesh.data=2", "mesh.fsdp=4",
        "loss.impl=naive", "model.remat=full", "data.strict=true",
    ])
    summary = train(config, run)
    assert summary.start_step == STEPS and summary.final_step == STEPS + 1
    assert load_config(run / "config.yaml") == config  # written once the run had started


def test_a_missing_config_yaml_resumes_from_the_checkpoints_config(run):
    (run / "config.yaml").unlink()
    # Another config on top of it is still checked against the checkpoint (and refused).
    other = run_cli("train", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--workdir", str(run))
    assert other.returncode == 2 and "model.d_model: 64 -> 128" in other.stderr
    assert not (run / "config.yaml").exists()
    plain = run_cli("train", "--workdir", str(run), "--set", f"trainer.steps={STEPS + 1}")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert f"trained steps {STEPS} -> {STEPS + 1}" in plain.stdout
    assert load_config(run / "config.yaml").model.d_model == 64


def test_tokenizer_paths_compare_by_content(run, tmp_path):
    config = load_config(run / "config.yaml")
    moved = tmp_path / "elsewhere.model"
    shutil.copyfile(config.data.tokenizer, moved)
    from metatrain.config import config_to_dict

    old = config_to_dict(config)
    new = config_to_dict(load_config(run / "config.yaml", [f"data.tokenizer={moved}"]))
    assert config_differences(old, new, run) == []
    moved.write_bytes(moved.read_bytes()[:-1] + b"x")
    assert [k for k, _, _ in config_differences(old, new, run)] == ["data.tokenizer"]


def test_the_training_reference_documents_the_keys_that_may_change():
    reference = (REPO_ROOT / "docs" / "train.md").read_text()
    assert resumable_keys_doc() in reference
    assert all(re.match(r"^[a-z_]+(\.[a-z_]+)*\.?$", k) for k in RESUMABLE_KEYS)


def test_the_training_recipe_may_change_when_asked_and_only_it(run):
    lower = load_config(run / "config.yaml", [f"trainer.steps={STEPS + 1}", "optimizer.learning_rate=0.001"])
    with pytest.raises(ResumeRefused, match="or keep them with --allow-change optimizer.learning_rate"):
        train(lower, run)
    summary = train(lower, run, allow_changes=["optimizer.learning_rate"])  # e.g. after a divergence
    assert summary.start_step == STEPS and summary.final_step == STEPS + 1
    from metatrain.errors import UserError

    with pytest.raises(UserError, match="--allow-change model.d_model: only keys of the training recipe"):
        train(load_config(run / "config.yaml", ["model.d_model=96"]), run, allow_changes=["model.d_model"])


def test_a_changed_model_is_refused_in_a_store_and_nothing_is_written(store):
    workdir = f"{store}/run"
    args = ("--config", str(TINY), "--set", "trainer.steps=2", "--set", "trainer.log_every=1",
            "--set", "trainer.eval_every=20", "--set", "trainer.eval_batches=1", "--set", "trainer.progress=false",
            "--set", "checkpoint.every=5", "--set", "checkpoint.async_save=true")
    done = run_cli("train", "--workdir", workdir, *args, env=store.variables)
    assert done.returncode == 0, done.stderr[-3000:]
    before = {n: store.read_bytes(n) for n in store.files()}
    refused = run_cli("train", "--workdir", workdir, *args, "--set", "model.d_ff=192", env=store.variables)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = error_lines(refused.stderr)
    assert any(f"cannot resume {workdir}" in line for line in lines), lines
    assert any("model.d_ff: 176 -> 192" in line for line in lines), lines
    assert "Traceback" not in refused.stderr
    after = {n: store.read_bytes(n) for n in store.files()}
    assert after == before
