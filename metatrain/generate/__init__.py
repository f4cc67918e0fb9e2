"""Generation under the tag grammar: KV-cache decoding, sampling, mantra forcing, the AI lock.

    sampling.py     temperature, top-k, top-p and greedy on masked logits (pure)
    constraints.py  the grammar as device arrays: tag mask, state update, mantra, lock
    decoder.py      prefill and the decode step (shared with the serving engine); the jitted loop
    prompts.py      prompts (text or documents) to ids and grammar states
    generator.py    `Generator`: prompts in, samples (ids, text, segments) out
    sample.py       samples as `metatrain generate` prints them; the end-of-training sample

The KV cache itself is the model's (`metatrain.models.Transformer.decode`); which tags
are legal is the tokenizer's grammar (`metatrain.tokenizer.grammar`). Nothing here
trains.
"""

from metatrain.generate.constraints import GrammarChooser, RowState, TagConstraints
from metatrain.generate.decoder import DecodeOutput, PromptBatch, generate_tokens
from metatrain.generate.generator import Generator, Sample
from metatrain.generate.sampling import SamplingConfig

__all__ = [
    "DecodeOutput",
    "Generator",
    "GrammarChooser",
    "PromptBatch",
    "RowState",
    "Sample",
    "SamplingConfig",
    "TagConstraints",
    "generate_tokens",
]
