"""`Scorer`: log-likelihoods of chosen tokens, against the training forward on the same ids."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metatrain.engine import Scorer
from metatrain.evaluation.scoring import token_losses
from metatrain.roles import Role
from metatrain.run.reader import load_checkpoint


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_checkpoint(workdir)


def direct(loaded, row: np.ndarray, mask: np.ndarray) -> float:
    """Σ log p of `row[mask]` by the training step's forward and cross entropy (one row, unpadded)."""
    n = len(row)
    batch = {
        "inputs": row[None, :-1].astype(np.int32),
        "targets": row[None, 1:].astype(np.int32),
        "positions": np.arange(n - 1, dtype=np.int32)[None],
        "segment_ids": np.ones((1, n - 1), np.int32),
        "target_roles": np.where(mask[1:], Role.TEXT, Role.PAD).astype(np.int8)[None],
    }
    nll, _ = token_losses(loaded.params, batch, model_config=loaded.model_config, impl="naive", precision="float32")
    return -float(np.asarray(jax.device_get(nll))[0][mask[1:]].sum())


def test_log_likelihoods_equal_the_training_forward_whatever_the_batch(loaded):
    rng = np.random.default_rng(0)
    vocab, limit = loaded.model_config.vocab_size, loaded.model_config.max_seq_len
    rows, masks = [], []
    for n in (2, 7, 40, limit):
        row = rng.integers(5, vocab, size=n).astype(np.int32)
        row[0] = loaded.encoder.bos_id
        mask = rng.random(n) < 0.4
        mask[0], mask[-1] = False, True
        rows.append(row)
        masks.append(mask)
    scorer = Scorer(loaded.params, loaded.model_config, loaded.mesh, max_rows=2)  # 4 rows: two calls
    got = scorer.log_likelihoods(rows, masks)
    want = [direct(loaded, r, m) for r, m in zip(rows, masks)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert all(g < 0 for g in got)
    # A range is the mask of its positions; a row alone scores what it scores among others.
    alone = scorer.log_likelihoods([rows[2]], [(10, 25)])
    ranged = np.zeros(40, bool)
    ranged[10:25] = True
    np.testing.assert_allclose(alone, [direct(loaded, rows[2], ranged)], atol=1e-4, rtol=1e-5)


def test_rows_that_cannot_be_scored_are_refused(loaded):
    scorer = Scorer(loaded.params, loaded.model_config, loaded.mesh)
    limit = loaded.model_config.max_seq_len
    with pytest.raises(ValueError, match="2 to"):
        scorer.log_likelihoods([np.zeros(limit + 1, np.int32)], [(1, 2)])
    with pytest.raises(ValueError, match="position 0"):
        scorer.log_likelihoods([np.zeros(4, np.int32)], [np.array([True, False, False, False])])
    with pytest.raises(ValueError, match="outside"):
        scorer.log_likelihoods([np.zeros(4, np.int32)], [(0, 3)])
