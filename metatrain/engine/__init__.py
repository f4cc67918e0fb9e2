"""The inference engine: every command that generates (`generate`, `eval`, `serve`,
`annotate --generator metatrain`) decodes through it.

    sampling.py     temperature, top-k, top-p and greedy on masked logits (pure)
    constraints.py  the grammar as device arrays: tag mask, state update, mantra, lock
    policy.py       `RowSampling`: the grammar, then each row's own sampling settings
    step.py         the device side: slots, admission (prefill, prefix reuse), decode steps
    engine.py       `Engine`: continuous batching of rows over the slots, as a batch job
                    (`run`) or a server (`submit`)
    capacity.py     how many rows fit the device's memory
    scoring.py      `Scorer`: log-likelihoods of chosen tokens of whole rows (annotate's gains)

The KV cache itself is the model's (`metatrain.models.Transformer.decode`, one cache
position per row); which tags are legal is the tokenizer's grammar
(`metatrain.tokenizer.grammar`). Nothing here trains, and nothing here reads a run.
"""

from metatrain.engine.constraints import GrammarChooser, RowState, TagConstraints
from metatrain.engine.engine import Engine, Handle, RowRequest
from metatrain.engine.policy import RowSampling
from metatrain.engine.sampling import SamplingConfig
from metatrain.engine.scoring import Scorer

__all__ = ["Engine", "GrammarChooser", "Handle", "RowRequest", "RowSampling", "RowState", "SamplingConfig",
           "Scorer", "TagConstraints"]
