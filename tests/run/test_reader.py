"""The one checkpoint reader (`metatrain.run.reader`) on the tiny trained run: which
checkpoint an argument means, a missing step named with the steps there are, and the
run's tokenizer and tags found beside `checkpoints/` or where its config says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.run.reader import load_checkpoint, resolve_checkpoint, run_files

from ..conftest import TINY


def test_an_argument_names_one_work_directory_or_one_step_directory(workdir, tmp_path):
    with pytest.raises(UserError, match="give exactly one of --workdir"):
        resolve_checkpoint()
    with pytest.raises(UserError, match="give exactly one of --workdir"):
        resolve_checkpoint(workdir, workdir / "checkpoints" / "1")
    with pytest.raises(UserError, match="not a checkpoint step directory"):
        resolve_checkpoint(checkpoint=tmp_path)
    assert resolve_checkpoint(workdir) == (workdir, None)
    assert resolve_checkpoint(checkpoint=workdir / "checkpoints" / "1") == (workdir, 1)


def test_a_step_a_step_directory_and_the_newest_read_the_same_checkpoint(workdir):
    newest = load_checkpoint(workdir)
    by_step = load_checkpoint(workdir, step=1)
    by_dir = load_checkpoint(checkpoint=workdir / "checkpoints" / "1")
    for loaded in (newest, by_step, by_dir):
        assert loaded.step == 1 and loaded.path == workdir / "checkpoints" / "1"
        assert loaded.config["model"]["vocab_size"] == loaded.model_config.vocab_size == loaded.encoder.vocab_size
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), newest.params, by_step.params)
    assert all(jax.tree.leaves(same))


def test_a_missing_step_names_the_steps_there_are(workdir, tmp_path):
    with pytest.raises(UserError, match=r"has no checkpoint at step 999 \(checkpoints: 1\)"):
        load_checkpoint(workdir, step=999)
    with pytest.raises(UserError, match=r"has no checkpoint at step 3 \(checkpoints: none\)"):
        load_checkpoint(tmp_path, step=3)
    with pytest.raises(UserError, match="--step with --workdir"):
        load_checkpoint(checkpoint=workdir / "checkpoints" / "1", step=1)


def test_the_runs_copies_come_first_then_the_configured_files(workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = load_checkpoint(run).config
    assert run_files(run, config) == (run / "tokenizer.model", run / "tags.yaml")
    (run / "tags.yaml").unlink()
    tokenizer, tags = run_files(run, config)
    assert tokenizer == run / "tokenizer.model" and str(tags) == str(config["data"]["tags"])
    with pytest.raises(UserError, match="cannot find the run's tags.yaml"):
        run_files(run, {"data": {}})


@pytest.mark.hostile
def test_a_reader_racing_a_trainer_that_keeps_one_checkpoint_reads_the_newest(tmp_path):
    """A trainer with `checkpoint.keep=1` deletes each checkpoint as soon as the next is
    saved: a reader that listed it a moment before must read the newer one, not report
    the run as damaged (issue 25)."""
    run = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "train", "--config", str(TINY), "--workdir", str(run),
         "--set", "trainer.steps=400", "--set", "trainer.eval_every=0", "--set", "trainer.progress=false",
         "--set", "checkpoint.every=1", "--set", "checkpoint.keep=1", "--set", "checkpoint.async_save=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.isdigit() for p in (run / "checkpoints").glob("*")):
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the trainer wrote no checkpoint"
            time.sleep(0.1)
        steps = []
        while trainer.poll() is None and len(steps) < 12:
            steps.append(load_checkpoint(run).step)  # never "none of the 1 checkpoints can be restored"
        assert len(steps) >= 3 and steps == sorted(steps), steps
    finally:
        trainer.kill()
        trainer.wait()
