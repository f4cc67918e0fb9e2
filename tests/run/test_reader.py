"""The one checkpoint reader (`metatrain.run.reader`) on the tiny trained run: which
checkpoint an argument means, a missing step named with the steps there are, and the
run's tokenizer and tags found beside `checkpoints/` or where its config says."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.run.reader import load_checkpoint, resolve_checkpoint, run_files


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
