"""Generation from a trained run: prompts in, samples (ids, text, segments) out.

    prompts.py      prompts (text or documents) to ids and grammar states
    generator.py    `Generator`: prompts in, samples out, decoded by the engine
    sample.py       samples as `metatrain generate` prints them; the end-of-training sample
    thoughts.py     `ThoughtWriter`: the thought a model writes at the end of a document prefix

The decoding itself (KV cache, grammar, sampling, batching) is the inference engine's
(`metatrain.engine`).
"""

from metatrain.generate.generator import Generator, Sample
from metatrain.generate.thoughts import Thought, ThoughtPrefix, ThoughtWriter

__all__ = ["Generator", "Sample", "Thought", "ThoughtPrefix", "ThoughtWriter"]
