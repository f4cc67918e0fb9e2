"""Hugging Face interop: `metatrain export` (a run -> a `LlamaForCausalLM` directory) and
`metatrain import` (a Llama-family checkpoint -> a work directory `metatrain train` continues).

`convert` is the one home of the weight and config mapping (pure NumPy); `export` and
`importer` do the files; `logits_processor` carries the tag grammar into transformers'
`generate` (it reads the `metatrain.json`, `tags.yaml` and `mantra.txt` an export writes).
torch, transformers, safetensors and tokenizers come with the `hf` extra
(`pip install 'metatrain[hf]'`) and are imported only when a command runs.
"""

from typing import Any

__all__ = ["TagGrammarLogitsProcessor"]


def __getattr__(name: str) -> Any:
    """`metatrain.hf.TagGrammarLogitsProcessor`, imported on first use (it loads torch and
    transformers; `import metatrain.hf` alone loads neither, nor jax)."""
    if name == "TagGrammarLogitsProcessor":
        from metatrain.hf.logits_processor import TagGrammarLogitsProcessor

        return TagGrammarLogitsProcessor
    raise AttributeError(f"module 'metatrain.hf' has no attribute {name!r}")
