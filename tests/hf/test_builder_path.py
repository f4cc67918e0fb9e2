"""The tokenizer builder's path, end to end: a Llama made by transformers with a plain
SentencePiece tokenizer (no tags) -> `metatrain import` with the default tags -> a few
steps of the joint loss -> `metatrain export` -> transformers loads it and generates
under the tag grammar."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from metatrain.cli import main  # noqa: E402
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS  # noqa: E402

pytestmark = pytest.mark.slow


def _plain_sentencepiece(path, texts, vocab_size=400):
    """A SentencePiece BPE model without metatrain's tags, as a Llama tokenizer would be."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(path), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    return path.with_name(path.name + ".model")


def test_llama_in_tags_added_trained_exported_and_generating_under_the_grammar(tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    from metatrain.hf import TagGrammarLogitsProcessor
    from metatrain.tokenizer import Encoder

    texts = [s["text"] for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]
             for s in json.loads(line)["segments"]]
    model_file = _plain_sentencepiece(tmp_path / "plain", texts)
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    hf = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=pieces, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(hf)
    shutil.copyfile(model_file, hf / "tokenizer.model")

    run = tmp_path / "run"
    assert main(["import", "--from", str(hf), "--out", str(run), "--set", "trainer.seq_len=64",
                 "--set", "trainer.batch_size=8"]) == 0
    assert main(["train", "--workdir", str(run), "--set", "trainer.steps=3", "--set", "trainer.eval_every=0",
                 "--set", "trainer.progress=false"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]  # the last record may hold only goodput/* keys
    assert trained and trained[-1]["step"] == 3 and "loss/thinking" in trained[-1]

    out = tmp_path / "exported"
    assert main(["export", "--workdir", str(run), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoder = Encoder.from_files(run / "tokenizer.model", DEFAULT_TAGS)
    assert len(tokenizer) == encoder.vocab_size > pieces  # the tags were added
    prompt = tokenizer("The capital is on the coast.", return_tensors="pt").input_ids
    for mode in ("human", "ai"):
        processor = TagGrammarLogitsProcessor.from_pretrained(out, mode=mode)
        generated = model.generate(prompt, logits_processor=LogitsProcessorList([processor]), do_sample=True,
                                   top_k=0, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id or 0)
        ids = generated[0].tolist()
        encoder.decode_segments(ids)  # raises on any token sequence the grammar forbids
