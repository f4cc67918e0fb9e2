"""The engine on a mesh of the 8 CPU devices gives what it gives on one device: the same
greedy ids and the same log-probabilities, for every layout (data, fsdp, tensor, mixed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metatrain.engine import (
    Engine,
    GrammarChooser,
    RowRequest,
    SamplingConfig,
    TagConstraints,
)
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import encode_prompt

PROMPTS = ["Question: what is a river?", "The economy of the island rests on fishing", "Rain:"]
LAYOUTS = [[], ["mesh.data=8"], ["mesh.fsdp=8"], ["mesh.tensor=2"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]]


@pytest.fixture(scope="module")
def single(workdir) -> Generator:
    return Generator.load(workdir)


def _decode(generator: Generator) -> tuple[list[list[int]], np.ndarray]:
    """Greedy ids of every prompt (in one batch with per-row budgets) and each row's
    log-probabilities after its last token [rows, V]."""
    enc = generator.encoder
    engine = Engine(generator.params, generator.model_config, TagConstraints.from_encoder(enc), max_batch=4,
                    eos_id=enc.eos_id, chooser=GrammarChooser(SamplingConfig(0.0)), mesh=generator.mesh)
    handles = engine.run([RowRequest(encode_prompt(enc, p), 10 + 3 * i) for i, p in enumerate(PROMPTS)])
    logits = np.asarray(jax.device_get(engine._slots_state.logits))[: len(PROMPTS)]
    return [h.tokens for h in handles], np.asarray(jax.nn.log_softmax(logits, axis=-1))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: ",".join(s) or "default")
def test_every_layout_gives_the_single_device_ids_and_log_probabilities(workdir, single, layout):
    sharded = Generator.load(workdir, mesh_settings=layout)
    assert sharded.mesh is not None
    expected_ids, expected_logp = _decode(single)
    ids, logp = _decode(sharded)
    assert ids == expected_ids
    np.testing.assert_allclose(logp, expected_logp, atol=2e-4)
    if layout:
        sizes = dict(s.removeprefix("mesh.").split("=") for s in layout)
        assert {k: int(v) for k, v in sizes.items()}.items() <= dict(sharded.mesh.shape).items()
    cache = sharded.params  # the parameters really are spread over the mesh's devices
    assert len(jax.tree.leaves(cache)[0].sharding.device_set) == sharded.mesh.size


def test_generate_on_a_mesh_equals_one_device(workdir, single):
    sharded = Generator.load(workdir, mesh_settings=["mesh.data=2", "mesh.tensor=2", "mesh.fsdp=2"])
    greedy = SamplingConfig(0.0)
    for lock in (None, "ai"):
        a = single.generate(PROMPTS, lock_mode=lock, max_new_tokens=12, sampling=greedy)
        b = sharded.generate(PROMPTS, lock_mode=lock, max_new_tokens=12, sampling=greedy)
        assert [s.ids for s in a] == [s.ids for s in b]
