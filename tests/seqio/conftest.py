"""Fixtures of the seqio interop tests: corpora on disk and one registry module that
registers every Task and Mixture the tests read.

seqio and TensorFlow come from the `seqio` extra; each test module skips without them,
and nothing here imports them (the registry is a file the tests import through metatrain).
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

#: Texts that trip tokenizers: literal tags, SentencePiece's own `▁`, emoji, whitespace runs.
TRICKY_TEXTS = (
    "literal tags: <thinking>x</thinking> <AI>hi</AI> <|good|><|bad|> <AI_quoting_human>",
    "special-looking: <s> </s> <unk> <pad> <0x41>",
    "meta space ▁ alone, ▁▁ doubled, and▁glued",
    "emoji 🙂👍🏽 naïve café 日本語 e\u0301",
    "  leading\ttab\t\truns   of   spaces\n\n\nnewlines\r\nCRLF   ",
    " ",
    "",
)

_WORDS = "the of and to in a is that for it as was with study found river climate percent".split()


def short_docs(n: int, first_word: str, prefix: str, seed: int) -> list[dict]:
    """`n` short documents, each opening with `first_word` (so a test can tell the task apart)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        words = [first_word] + [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
        segments = [{"kind": "text", "text": " ".join(words) + "."}]
        if rng.random() < 0.5:
            segments.append({"kind": "thinking", "text": " ".join(rng.choice(_WORDS) for _ in range(3))})
        docs.append({"id": f"{prefix}-{d}", "segments": segments})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, list[dict]]:
    """The documents behind the registry's Tasks, by Task."""
    tricky = [{"id": "tricky-0", "segments": [
        {"kind": "text", "text": TRICKY_TEXTS[0]},
        {"kind": "thinking", "text": TRICKY_TEXTS[2]},
        {"kind": "text", "text": TRICKY_TEXTS[3], "mode": "ai"},
        {"kind": "thinking", "text": "a good thought", "control": "good"},
    ]}]
    return {"alpha": short_docs(60, "alpha", "a", 1), "bravo": short_docs(60, "bravo", "b", 2), "tricky": tricky}


@pytest.fixture(scope="session")
def registry(tmp_path_factory, corpora) -> str:
    """A `.py` registry module: document Tasks `mt_alpha`, `mt_bravo`, `mt_tricky`, a Mixture
    `mt_mix` at rates 3:1, a text Task `mt_text` and a Task with a byte vocabulary."""
    root = tmp_path_factory.mktemp("registry")
    alpha = write_jsonl(root / "alpha.jsonl", corpora["alpha"])
    bravo = write_jsonl(root / "bravo.jsonl", corpora["bravo"])
    tricky = write_jsonl(root / "tricky.jsonl", corpora["tricky"])
    texts = [t for t in TRICKY_TEXTS if t.strip()] + [f"plain line {i}" for i in range(20)]
    module = root / "my_registry.py"
    module.write_text(textwrap.dedent(f"""
        import functools

        import seqio
        import tensorflow as tf

        from metatrain.data.seqio import MetatrainVocabulary, register_document_task

        TOKENIZER, TAGS = {str(SAMPLE_TOKENIZER)!r}, {str(DEFAULT_TAGS)!r}
        TEXTS = {texts!r}

        register_document_task("mt_alpha", {{"train": {str(alpha)!r}}}, TOKENIZER, TAGS)
        register_document_task("mt_bravo", {str(bravo)!r}, TOKENIZER, TAGS)
        register_document_task("mt_tricky", {str(tricky)!r}, TOKENIZER, TAGS, mantra_policy="first")
        seqio.MixtureRegistry.add("mt_mix", [("mt_alpha", 3.0), ("mt_bravo", 1.0)])

        def texts_fn(split, shuffle_files, seed=None):
            return tf.data.Dataset.from_tensor_slices({{"text": TEXTS}})

        def text_task(name, vocabulary):
            seqio.TaskRegistry.add(
                name,
                source=seqio.FunctionDataSource(texts_fn, splits=["train"]),
                preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={{"targets": "text"}}),
                               seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                output_features={{"targets": seqio.Feature(vocabulary, add_eos=True)}},
            )

        text_task("mt_text", MetatrainVocabulary(TOKENIZER, TAGS))
        text_task("mt_bytes", seqio.ByteVocabulary())
    """), encoding="utf-8")
    return str(module)
