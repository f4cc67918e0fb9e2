"""Creating a train state (`metatrain.run.create`): `grow_train_state` grows the vocabulary
axes of a state and its optimizer moments (what `tokenizer resize-checkpoint` writes, end to
end in tests/train/test_resize.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metatrain.config import load_config
from metatrain.run.create import grow_train_state
from metatrain.run.program import build_train_program
from metatrain.run.state import init_state
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE

from ..conftest import TINY, leaves_by_name

TABLE = "params/embedding/table"


def test_grow_train_state_grows_an_untied_output_projection_along_its_vocab_axis():
    """No training: a fresh untied model, grown from 13 to 17 ids (prime sizes)."""
    def program(vocab):
        config = load_config(TINY, ["model.tie_embeddings=false", f"model.vocab_size={vocab}", "mesh.data=1"])
        return build_train_program(config, jax.devices()[:1])

    small, large = program(13), program(17)
    state = init_state(small.model, small.optimizer, small.shardings, seed=0)
    grown, names = grow_train_state(state, large.abstract_state(), old_vocab_size=13, new_vocab_size=17, seed=3)
    assert set(names) == {TABLE, "params/output_projection",
                          *(f"opt_state/1/0/{m}/{p}" for m in ("mu", "nu")
                            for p in ("embedding/table", "output_projection"))}
    before, after = leaves_by_name(state), leaves_by_name(grown)
    out_before, out_after = before["params/output_projection"], after["params/output_projection"]  # [D, V]
    assert out_after.shape == (out_before.shape[0], 17)
    assert np.array_equal(out_after[:, :13], out_before)
    assert np.allclose(out_after[:, 13:], out_before.mean(1, keepdims=True),
                       atol=6 * DEFAULT_NOISE_SCALE * out_before.std(1).max())
    # Each table draws its own noise (same seed, different tables).
    noise_in = after[TABLE][13:] - before[TABLE].mean(0)  # [4, D]
    noise_out = out_after[:, 13:].T - out_before.mean(1)  # [4, D]
    assert not np.allclose(noise_in / before[TABLE].std(0), noise_out / out_before.std(1))

    wrong = program(13).abstract_state()  # same vocabulary but another width: not a resize
    wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(d + 1 for d in s.shape), s.dtype), wrong)
    with pytest.raises(ValueError, match="is not a vocabulary resize"):
        grow_train_state(state, wrong, old_vocab_size=13, new_vocab_size=17)
