"""Generation from a trained run: prompts in, samples (ids, text, segments) out.

    prompts.py      prompts (text or documents) to ids and grammar states
    generator.py    `Generator`: prompts in, samples out, decoded by the engine
    sample.py       samples as `metatrain generate` prints them; the end-of-training sample

The decoding itself (KV cache, grammar, sampling, batching) is the inference engine's
(`metatrain.engine`).
"""

from metatrain.generate.generator import Generator, Sample

__all__ = ["Generator", "Sample"]
