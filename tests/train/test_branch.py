"""Cooldown branches: `checkpoint.keep_steps` keeps a stable run's branch points and
`checkpoint.branch_from` continues one of them whole, so a branch of a "wsd" run is the
run of its length."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.optimizer import cooldown_start
from metatrain.run.resume import ResumeRefused
from metatrain.train.loop import Trainer, train

from ..conftest import read_records, tiny_config

LONG, SHORT = 12, 8
WSD = ("optimizer.decay=wsd", "optimizer.decay_fraction=0.25", "optimizer.warmup_steps=2")


def _params(workdir) -> list[np.ndarray]:
    state, _ = Trainer(tiny_config(*WSD, f"trainer.steps={LONG}"), workdir).initial_state()
    return [np.asarray(jax.device_get(a)) for a in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory):
    """A "wsd" run of LONG steps that keeps the checkpoint where SHORT's cooldown starts."""
    config = tiny_config(*WSD, f"trainer.steps={LONG}", "checkpoint.every=5", "checkpoint.keep=1")
    branch_at = cooldown_start(config.optimizer, SHORT)
    workdir = tmp_path_factory.mktemp("stable")
    train(tiny_config(*WSD, f"trainer.steps={LONG}", "checkpoint.every=5", "checkpoint.keep=1",
                      f"checkpoint.keep_steps=[{branch_at}]"), workdir)
    return workdir, branch_at


def test_kept_steps_are_saved_off_the_cadence_and_outlive_retention(stable_run):
    workdir, branch_at = stable_run
    assert branch_at == 6
    assert Checkpointer(workdir, read_only=True).all_steps() == [branch_at, LONG]


def test_a_branch_is_the_separate_run_of_its_length(stable_run, tmp_path):
    workdir, branch_at = stable_run
    branch, separate = tmp_path / "branch", tmp_path / "separate"
    summary = train(tiny_config(*WSD, f"trainer.steps={SHORT}",
                                f"checkpoint.branch_from={workdir / 'checkpoints' / str(branch_at)}"), branch)
    assert summary.start_step == branch_at and summary.final_step == SHORT
    train(tiny_config(*WSD, f"trainer.steps={SHORT}"), separate)
    for ours, theirs in zip(_params(branch), _params(separate), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    ours = {r["step"]: r for r in read_records(branch) if "eval/loss" in r}
    theirs = {r["step"]: r for r in read_records(separate) if "eval/loss" in r}
    assert ours[SHORT]["eval/loss"] == pytest.approx(theirs[SHORT]["eval/loss"], abs=1e-4)
    lr = {r["step"]: r["learning_rate"] for r in read_records(branch) if "learning_rate" in r}
    assert min(lr) == branch_at + 1, "the branch logs only its own steps"


def test_a_branch_resumes_its_own_checkpoint(stable_run, tmp_path):
    workdir, branch_at = stable_run
    branch = tmp_path / "branch"
    config = tiny_config(*WSD, f"trainer.steps={SHORT}",
                         f"checkpoint.branch_from={workdir / 'checkpoints' / str(branch_at)}")
    train(config, branch)
    _, step = Trainer(config, branch).initial_state()
    assert step == SHORT


def test_bad_branch_points_are_refused_in_one_line(stable_run, tmp_path):
    workdir, branch_at = stable_run
    with pytest.raises(UserError, match="is not a checkpoint step directory"):
        Trainer(tiny_config(*WSD, f"checkpoint.branch_from={workdir}"), tmp_path / "a").initial_state()
    at = workdir / "checkpoints"
    with pytest.raises(UserError, match=r"has no checkpoint at step 7 \(checkpoints: 6, 12\)"):
        Trainer(tiny_config(*WSD, f"trainer.steps={LONG}", f"checkpoint.branch_from={at / '7'}"),
                tmp_path / "b").initial_state()
    with pytest.raises(UserError, match="step 6 is not before this run's trainer.steps=6"):
        Trainer(tiny_config(*WSD, "trainer.steps=6", f"checkpoint.branch_from={at / '6'}"), tmp_path / "b")\
            .initial_state()
    with pytest.raises(UserError, match=r"step 6 is past this run's cooldown start \(5 of trainer.steps=7\)"):
        Trainer(tiny_config(*WSD, "trainer.steps=7", f"checkpoint.branch_from={at / '6'}"), tmp_path / "b")\
            .initial_state()
    with pytest.raises(UserError, match=r"its run was already cooling down at step 12 \(from step 9\)"):
        Trainer(tiny_config(*WSD, "trainer.steps=20", f"checkpoint.branch_from={at / '12'}"), tmp_path / "b")\
            .initial_state()
    assert not (tmp_path / "b").exists()
    with pytest.raises(ResumeRefused, match="optimizer.learning_rate"):
        Trainer(tiny_config(*WSD, f"trainer.steps={SHORT}", "optimizer.learning_rate=0.5",
                            f"checkpoint.branch_from={workdir / 'checkpoints' / str(branch_at)}"),
                tmp_path / "c").initial_state()
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_init_from_and_branch_from_are_exclusive(stable_run):
    workdir, branch_at = stable_run
    with pytest.raises(UserError, match="both set"):
        tiny_config(f"checkpoint.init_from={workdir}",
                    f"checkpoint.branch_from={workdir / 'checkpoints' / str(branch_at)}")


def test_a_branch_counts_the_stable_runs_tokens_before_it(stable_run, tmp_path):
    """The model card of an exported branch: its tokens are a separate run's of its length."""
    from metatrain.hf.export import run_metrics
    from metatrain.run.reader import load_checkpoint

    workdir, branch_at = stable_run
    branch, separate = tmp_path / "branch", tmp_path / "separate"
    train(tiny_config(*WSD, f"trainer.steps={SHORT}",
                      f"checkpoint.branch_from={workdir / 'checkpoints' / str(branch_at)}"), branch)
    train(tiny_config(*WSD, f"trainer.steps={SHORT}"), separate)
    ours = run_metrics(branch, SHORT, load_checkpoint(branch).config).tokens
    theirs = run_metrics(separate, SHORT, load_checkpoint(separate).config).tokens
    assert ours == theirs and sum(ours.values()) > 0


def test_lengthening_a_cooled_run_says_it_rewarms(stable_run, tmp_path, capsys):
    workdir, _ = stable_run
    copy = tmp_path / "longer"
    shutil.copytree(workdir, copy)
    capsys.readouterr()
    train(tiny_config(*WSD, f"trainer.steps={LONG + 4}", "checkpoint.every=5", "checkpoint.keep=1"), copy)
    err = capsys.readouterr().err
    start = cooldown_start(tiny_config(*WSD).optimizer, LONG)
    assert f"inside the cooldown this run began at step {start} (trainer.steps={LONG})" in err
    lr = {r["step"]: r["learning_rate"] for r in read_records(copy) if "learning_rate" in r}
    assert lr[LONG + 1] > lr[LONG], "the warning describes what the schedule does"
