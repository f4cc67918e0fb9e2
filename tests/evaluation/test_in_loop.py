"""The trainer's cheap evaluation: bpb/text and removed - kept at every evaluation."""

import json
import math

import pytest

from metatrain.config import load_config
from metatrain.documents import SkipCounter
from metatrain.evaluation.ablation import remove_thinking
from metatrain.evaluation.documents import split_documents
from metatrain.evaluation.in_loop import InLoopAblation
from metatrain.evaluation.layout import layout_documents
from metatrain.io.paths import CONFIGS_DIR
from metatrain.roles import Role
from metatrain.train.loop import train

OVERRIDES = ["trainer.steps=4", "trainer.batch_size=8", "trainer.seq_len=128", "trainer.eval_every=2",
             "trainer.eval_batches=3", "trainer.progress=false", "checkpoint.every=100",
             "checkpoint.async_save=false", "data.eval_fraction=0.2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("inloop")
    config = load_config(CONFIGS_DIR / "tiny.yaml", OVERRIDES)
    summary = train(config, path)
    return config, path, summary


def eval_records(path):
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]


def test_every_evaluation_logs_bpb_and_the_ablation(run):
    config, path, summary = run
    records = eval_records(path)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["eval/bpb/text"] > 0
        assert math.isfinite(r["eval/ablation/removed_minus_kept"])
        assert r["eval/ablation/documents"] >= 1 and r["eval/ablation/tokens/text"] > 0
        diff = r["eval/ablation/removed/bpb/text"] - r["eval/ablation/kept/bpb/text"]
        assert r["eval/ablation/removed_minus_kept"] == pytest.approx(diff, rel=1e-9, abs=1e-12)
    assert summary.eval_metrics["eval/bpb/text"] == records[-1]["eval/bpb/text"]


def test_bpb_in_the_loop_is_nll_over_bytes(run):
    """eval/bpb/text = eval/loss/text * tokens / ln 2 / bytes, the bytes counted from the batches' text."""
    from metatrain.data import make_batch_iterator
    from metatrain.evaluation.text_bytes import token_byte_lengths
    from metatrain.tokenizer.spm import SpmTokenizer

    config, path, _ = run
    record = eval_records(path)[-1]
    table = token_byte_lengths(SpmTokenizer.load(config.data.tokenizer))
    text_bytes = 0
    with make_batch_iterator(config.data, batch_size=8, seq_len=128, split="eval") as it:
        for _, batch in zip(range(config.trainer.eval_batches), it):
            text = batch["target_roles"] == Role.TEXT
            text_bytes += int(table[batch["targets"][text]].sum())
    expected = record["eval/loss/text"] * record["eval/tokens/text"] / math.log(2) / text_bytes
    assert record["eval/bpb/text"] == pytest.approx(expected, rel=1e-6)


def test_tensorboard_reads_the_new_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, path, _ = run
    acc = EventAccumulator(str(path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/bpb/text", "eval/ablation/removed_minus_kept"} <= tags
    assert [e.step for e in acc.Scalars("eval/ablation/removed_minus_kept")] == [2, 4]


def test_the_ablation_set_fits_its_budget_in_both_variants():
    config = load_config(CONFIGS_DIR / "tiny.yaml", OVERRIDES)
    from metatrain.data.sources import EncoderSpec

    d = config.data
    encoder = EncoderSpec(str(d.tokenizer), str(d.tags), d.mantra, d.mantra_policy).build()
    ablation = InLoopAblation(config, encoder, SkipCounter())
    budget = 8 * 3
    assert 1 <= ablation.documents
    assert len(ablation.kept) <= budget and len(ablation.removed) <= budget
    assert ablation.batches == -(-len(ablation.kept) // 8)
    # the same text targets in both variants
    for rows in (ablation.kept, ablation.removed):
        assert (rows.target_roles == Role.TEXT).sum() == (ablation.kept.target_roles == Role.TEXT).sum()
    # the next document would not have fitted
    docs = split_documents(config.data, encoder, "eval")
    if ablation.documents < len(docs):
        more = docs[:ablation.documents + 1]
        assert max(len(layout_documents(more, 128)), len(layout_documents(
            [remove_thinking(encoder, x) for x in more], 128))) > budget


def test_no_document_fitting_the_budget_says_so(caplog):
    """Rows too short for any held-out document: nothing is scored, and the log says why."""
    config = load_config(CONFIGS_DIR / "tiny.yaml", OVERRIDES + ["trainer.seq_len=8", "trainer.eval_batches=1"])
    from metatrain.data.sources import EncoderSpec

    d = config.data
    encoder = EncoderSpec(str(d.tokenizer), str(d.tags), d.mantra, d.mantra_policy).build()
    with caplog.at_level("WARNING"):
        ablation = InLoopAblation(config, encoder, SkipCounter())
    assert ablation.documents == 0 and len(ablation.kept) == 0
    assert "no held-out document fits 8 rows" in caplog.text and "raise trainer.eval_batches" in caplog.text
