"""`checkpoint.init_from`: a new run starts from another run's parameters, nothing else."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.run.reader import load_checkpoint
from metatrain.train.loop import Trainer, train

from ..conftest import STEPS, tiny_config


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    train(tiny_config(), workdir)
    return workdir


def _params(state) -> list[np.ndarray]:
    return [np.asarray(jax.device_get(a)) for a in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("which", ["workdir", "step directory"])
def test_a_new_run_starts_from_the_parameters_and_a_fresh_optimizer(source_run, tmp_path, which):
    source = source_run if which == "workdir" else source_run / "checkpoints" / str(STEPS)
    trainer = Trainer(tiny_config(f"checkpoint.init_from={source}"), tmp_path / "w")
    state, step = trainer.initial_state()
    assert step == 0 and int(state.step) == 0
    stored = load_checkpoint(source_run)
    for ours, theirs in zip(_params(state), [np.asarray(a) for a in jax.tree.leaves(stored.params)], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    moments = [np.asarray(jax.device_get(a)) for a in jax.tree.leaves(state.opt_state)
               if hasattr(a, "shape") and a.ndim > 0]
    assert moments and not any(m.any() for m in moments), "the optimizer starts afresh"
    fresh, _ = Trainer(tiny_config(), tmp_path / "fresh").initial_state()
    assert not all(np.array_equal(a, b) for a, b in zip(_params(fresh), _params(state)))


def test_a_resume_restores_its_own_checkpoint_not_the_source(source_run, tmp_path):
    workdir = tmp_path / "w"
    train(tiny_config(f"checkpoint.init_from={source_run}"), workdir)
    own = load_checkpoint(workdir)
    state, step = Trainer(tiny_config(f"checkpoint.init_from={source_run}", f"trainer.steps={STEPS + 3}"),
                          workdir).initial_state()
    assert step == STEPS
    for ours, theirs in zip(_params(state), [np.asarray(a) for a in jax.tree.leaves(own.params)], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_model_of_another_shape_is_refused_in_one_line(source_run, tmp_path):
    trainer = Trainer(tiny_config(f"checkpoint.init_from={source_run}", "model.d_ff=48"), tmp_path / "w")
    with pytest.raises(UserError, match="checkpoint.init_from .* has other parameters than this run's"):
        trainer.initial_state()
