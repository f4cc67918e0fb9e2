"""make_batch_iterator end to end: contract, role counts, restore, hosts, mixtures, bad input;
sources on local disk and in a bucket (`stored_corpus`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metatrain.data import make_batch_iterator, merge_lane_states
from metatrain.data.packing import check_batch
from metatrain.data.split import id_hash, in_split
from metatrain.documents import parse_document
from metatrain.errors import UserError

from ..conftest import assert_batches_equal, data_config, make_docs, take, write_jsonl

B, L = 4, 67  # global batch rows, row length (prime)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(60, seed=1)
    return docs, write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs)


def encoded_split(docs, encoder, split, fraction):
    out = []
    for d in docs:
        if in_split(id_hash(d["id"]), split, fraction):
            out.append(encoder.encode(parse_document(d, path="", line=0)))
    return out


def test_batches_follow_the_batch_contract(corpus):
    it = make_batch_iterator(data_config(corpus[1]), batch_size=B, seq_len=L)
    for batch in take(it, 5):
        check_batch(batch, B, L)
        assert (batch["segment_ids"] > 0).all()  # the train split is packed without padding
    assert it.skips.count == 0


def test_eval_split_holds_every_token_of_every_held_out_document_once(corpus, encoder):
    docs, path = corpus
    fraction = 0.3
    it = make_batch_iterator(data_config(path, eval_fraction=fraction), batch_size=B, seq_len=L, split="eval")
    batches = list(it)
    held_out = encoded_split(docs, encoder, "eval", fraction)
    assert len(held_out) > 5
    # per-role token counts survive the whole pipeline
    want = np.bincount(np.concatenate([e.roles[1:] for e in held_out]), minlength=5)
    got = sum(np.bincount(b["target_roles"].ravel(), minlength=5) for b in batches)
    np.testing.assert_array_equal(got[1:], want[1:])
    # and so do the (input, target) pairs themselves
    want_pairs = sorted(p for e in held_out for p in zip(e.ids[:-1].tolist(), e.ids[1:].tolist()))
    got_pairs = sorted(
        p for b in batches for p in zip(b["inputs"][b["segment_ids"] > 0].tolist(), b["targets"][b["segment_ids"] > 0].tolist())
    )
    assert got_pairs == want_pairs
    with pytest.raises(StopIteration):  # the eval split is finite
        next(it)


def test_train_split_role_counts_over_one_epoch(corpus, encoder):
    docs, path = corpus
    # one lane reads the whole shuffled epoch in order; its first T tokens are exactly one epoch
    cfg = data_config(path, eval_fraction=0.0)
    train = encoded_split(docs, encoder, "train", 0.0)
    total = sum(len(e) - 1 for e in train)
    it = make_batch_iterator(cfg, batch_size=1, seq_len=L)
    stream = np.concatenate([b["target_roles"][0] for b in take(it, -(-total // L))])[:total]
    want = np.bincount(np.concatenate([e.roles[1:] for e in train]), minlength=5)
    np.testing.assert_array_equal(np.bincount(stream, minlength=5), want)


def test_train_split_is_deterministic_and_seeded(corpus):
    cfg = data_config(corpus[1])
    a = take(make_batch_iterator(cfg, batch_size=B, seq_len=L, seed=3), 4)
    assert_batches_equal(a, take(make_batch_iterator(cfg, batch_size=B, seq_len=L, seed=3), 4))
    b = take(make_batch_iterator(cfg, batch_size=B, seq_len=L, seed=4), 4)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


@pytest.mark.parametrize("split, n", [("train", 0), ("train", 1), ("train", 7), ("eval", 2)])
def test_restore_after_n_batches_gives_byte_identical_batches(corpus, split, n):
    cfg = data_config(corpus[1], eval_fraction=0.5)
    it = make_batch_iterator(cfg, batch_size=B, seq_len=L, split=split)
    take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = take(it, 3)
    fresh = make_batch_iterator(cfg, batch_size=B, seq_len=L, split=split)
    take(fresh, 2)  # wherever it was, set_state moves it
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_restore_refuses_a_state_of_another_run(corpus):
    cfg = data_config(corpus[1])
    state = make_batch_iterator(cfg, batch_size=B, seq_len=L).get_state()
    other = make_batch_iterator(cfg, batch_size=B, seq_len=L + 2)
    with pytest.raises(UserError, match="seq_len: saved 67, now 69"):
        other.set_state(state)
    with pytest.raises(UserError, match="not a metatrain data state"):
        other.set_state({"next_index": 3})


def test_two_hosts_make_the_rows_of_one_global_batch(corpus):
    cfg = data_config(corpus[1])
    one = make_batch_iterator(cfg, batch_size=B, seq_len=L, process_index=0, process_count=1)
    hosts = [make_batch_iterator(cfg, batch_size=B, seq_len=L, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(6):
        glob = next(one)
        parts = [next(h) for h in hosts]
        for k in glob:
            assert parts[0][k].shape == (B // 2, L)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])


def _documents_seen(batches) -> set[tuple[int, ...]]:
    """Documents identified by their first 12 input tokens (BOS-started segments at position 0)."""
    seen = set()
    for b in batches:
        for r, t in zip(*np.nonzero((b["positions"] == 0) & (b["segment_ids"] > 0))):
            if b["inputs"][r, t] == 1 and t + 12 <= b["inputs"].shape[1]:
                seen.add(tuple(b["inputs"][r, t:t + 12].tolist()))
    return seen


def test_two_hosts_read_disjoint_documents_that_cover_the_source(corpus):
    cfg = data_config(corpus[1], eval_fraction=0.9)
    per_host = [
        _documents_seen(make_batch_iterator(cfg, batch_size=B, seq_len=L, split="eval", process_index=p, process_count=2))
        for p in (0, 1)
    ]
    everything = _documents_seen(make_batch_iterator(cfg, batch_size=B, seq_len=L, split="eval"))
    assert len(everything) > 30
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == everything


def test_checkpoint_moves_between_process_counts(corpus):
    cfg = data_config(corpus[1])
    kw = dict(batch_size=B, seq_len=L)
    one = make_batch_iterator(cfg, **kw)
    take(one, 3)
    state_1 = one.get_state()
    expected = take(one, 2)
    # saved on 1 process, resumed on 2
    hosts = [make_batch_iterator(cfg, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for h in hosts:
        h.set_state(state_1)
    got = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*(take(h, 2) for h in hosts))]
    assert_batches_equal(got, expected)
    # saved on 2 processes (their states joined, as in a multi-host checkpoint), resumed on 1
    state_2 = merge_lane_states([h.get_state() for h in hosts])
    expected = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*(take(h, 2) for h in hosts))]
    single = make_batch_iterator(cfg, **kw)
    single.set_state(state_2)
    assert_batches_equal(take(single, 2), expected)
    # one process's partial state cannot restore another's rows
    with pytest.raises(UserError, match="has no lane 2"):
        hosts[1].set_state(hosts[0].get_state())


def test_mixture_proportions_hold(tmp_path):
    alpha = write_jsonl(tmp_path / "a.jsonl", make_docs(50, prefix="a", first_word="alpha", seed=2))
    beta = write_jsonl(tmp_path / "b.jsonl", make_docs(50, prefix="b", first_word="beta", seed=3))
    cfg = data_config(alpha, beta, weights=(0.7, 0.3), eval_fraction=0.0)
    it = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    enc = cfg  # the first text token tells the source apart
    from metatrain.data.sources import EncoderSpec

    encoder = EncoderSpec(str(enc.tokenizer), str(enc.tags), None, "every").build()
    first = {w: encoder.tokenizer.encode_texts([w])[0][0] for w in ("alpha", "beta")}
    counts = {"alpha": 0, "beta": 0}
    for b in take(it, 300):
        starts = (b["positions"] == 0) & (b["inputs"] == encoder.bos_id)
        for w, tok in first.items():
            counts[w] += int((starts & (b["targets"] == tok)).sum())
    n = sum(counts.values())
    assert n > 300
    share = counts["alpha"] / n
    assert abs(share - 0.7) < 3 * np.sqrt(0.7 * 0.3 / n), counts


def test_mixture_is_deterministic_for_a_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(20, prefix="a", seed=2))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(20, prefix="b", seed=3))
    cfg = data_config(a, b, weights=(2.0, 1.0))
    assert_batches_equal(
        take(make_batch_iterator(cfg, batch_size=B, seq_len=L), 5),
        take(make_batch_iterator(cfg, batch_size=B, seq_len=L), 5),
    )


# -- bad input ------------------------------------------------------------------------------


def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog):
    docs = make_docs(12)
    records = [docs[0], "{broken", *docs[1:6], '{"id": "q", "segments": 3}', *docs[6:]]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    it = make_batch_iterator(data_config(path, eval_fraction=0.0), batch_size=2, seq_len=L)
    with caplog.at_level("WARNING"):
        take(it, 40)  # several epochs
    assert it.skips.count >= 2 and it.skips.count % 2 == 0  # both bad lines, once per epoch
    assert any(m.startswith(f"{path}:2: invalid JSON") for m in it.skips.messages)
    assert any(m.startswith(f"{path}:8 (document 'q')") for m in it.skips.messages)
    assert f"{path}:2" in caplog.text


def test_strict_run_stops_at_a_bad_record_with_its_message(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [*make_docs(3), "{broken"])
    it = make_batch_iterator(data_config(path, strict=True, eval_fraction=0.0), batch_size=2, seq_len=L)
    with pytest.raises(UserError, match=f"{path}:4: invalid JSON"):
        take(it, 20)
    first_bad = write_jsonl(tmp_path / "b.jsonl", ["{broken", *make_docs(3)])
    with pytest.raises(UserError, match=f"{first_bad}:1: invalid JSON"):  # found by the check at start
        make_batch_iterator(data_config(first_bad, strict=True, eval_fraction=0.0), batch_size=2, seq_len=L)


def test_empty_source_is_a_clear_error_at_start(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        make_batch_iterator(data_config(empty), batch_size=2, seq_len=L)


def test_source_without_valid_document_is_a_clear_error_at_start(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{broken", '{"segments": []}'])
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(5))
    with pytest.raises(UserError, match=rf"{path} has no valid document \(2 bad records\).*{path}:1: invalid JSON"):
        make_batch_iterator(data_config(good, path), batch_size=2, seq_len=L)


def test_empty_splits_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    with pytest.raises(UserError, match="eval split is empty"):
        make_batch_iterator(data_config(path, eval_fraction=0.0), batch_size=2, seq_len=L, split="eval")
    with pytest.raises(UserError, match="no training document"):
        make_batch_iterator(data_config(path, eval_fraction=0.99999), batch_size=2, seq_len=L)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_batch_iterator(data_config(tmp_path / "nope.jsonl"), batch_size=2, seq_len=L)


def test_worker_processes_report_skips_restore_exactly_and_surface_errors(tmp_path):
    docs = make_docs(30, seed=4)
    path = write_jsonl(tmp_path / "a.jsonl", [*docs[:10], "{broken", *docs[10:]])
    kw = dict(batch_size=2, seq_len=L)
    cfg = data_config(path, num_workers=2, eval_fraction=0.0)
    with make_batch_iterator(cfg, **kw) as it:
        batches = take(it, 30)
        assert all(type(v) is np.ndarray for v in batches[0].values())
        assert it.skips.count >= 1  # skipped in a worker, counted here
        assert it.skips.messages[0].startswith(f"{path}:11: invalid JSON")
        assert sum(int(b["segment_ids"].astype(bool).sum()) for b in batches) == 30 * 2 * L
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 3)
    with make_batch_iterator(cfg, **kw) as again:
        again.set_state(state)
        assert_batches_equal(take(again, 3), expected)
    strict = data_config(path, num_workers=1, eval_fraction=0.0, strict=True)
    with make_batch_iterator(strict, **kw) as it, pytest.raises(UserError, match=f"{path}:11: invalid JSON"):
        take(it, 30)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_from_a_glob_in_a_store_equal_the_local_ones(stored_corpus, workers):
    _, root, store = stored_corpus
    kw = dict(batch_size=2, seq_len=47)
    want = take(make_batch_iterator(data_config(f"{root}/shards/*.jsonl", num_workers=workers), **kw), 5)
    got = take(make_batch_iterator(data_config(f"{store}/corpus/shards/*.jsonl", num_workers=workers), **kw), 5)
    assert_batches_equal(got, want)


@pytest.mark.hostile
def test_a_stream_that_cannot_make_a_batch_in_a_whole_pass_fails_in_one_line(tmp_path):
    import time

    # One good document among 20,000 bad records: no pass gives every row of a batch.
    path = tmp_path / "mostly_bad.jsonl"
    good = json.dumps({"id": "ok", "segments": [{"kind": "text", "text": "The river floods."}]})
    path.write_text("\n".join([good, *(["not json"] * 20_000)]) + "\n")
    it = make_batch_iterator(data_config(path, eval_fraction=0.0), batch_size=B, seq_len=L)
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        next(it)
    assert time.monotonic() - started < 120  # one pass or so, not forever
    message = str(refused.value)
    assert "\n" not in message and len(message) < 1000
    assert "more than a whole pass over the training data (20001 records)" in message
    assert "too few good records" in message and f"{path}:" in message and ": invalid JSON" in message
    it.close()
