"""The token cache: what it stores, its stats and CLI, and that training reads it like the JSON
Lines; a cache written to and read from a bucket (`store`) like one on local disk."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metatrain.cli import main
from metatrain.data import make_batch_iterator
from metatrain.data.cache import TokenCache, cache_stats, is_cache_dir, write_cache
from metatrain.data.sources import EncoderSpec
from metatrain.documents import parse_document
from metatrain.errors import FaultError, UserError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.io.storage import as_path
from metatrain.roles import LOSS_ROLES

from ..conftest import assert_batches_equal, data_config, make_docs, take, write_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder_spec):
    root = tmp_path_factory.mktemp("cache")
    docs = make_docs(23, seed=7)
    a = write_jsonl(root / "a.jsonl", docs[:13])
    b = write_jsonl(root / "b.jsonl", [docs[13], "{broken", *docs[14:]])
    meta = write_cache([a, b], root / "cache", encoder_spec, progress=False)
    return docs, (a, b), root / "cache", meta


def test_cache_holds_each_valid_document_as_encoded(built, encoder):
    docs, _, directory, meta = built
    cache = TokenCache(directory)
    assert len(cache) == meta["documents"] == 23 and meta["skipped_records"] == 1
    assert cache.offsets[0] == 0 and cache.offsets[-1] == meta["tokens"]
    for i, doc in enumerate(docs):
        want = encoder.encode(parse_document(doc, path="", line=0))
        ids, roles = cache.document(i)
        assert ids.dtype == np.int32 and roles.dtype == np.int8
        np.testing.assert_array_equal(ids, want.ids)
        np.testing.assert_array_equal(roles, want.roles)


def test_stats_count_tokens_per_role_from_the_arrays(built, encoder):
    docs, _, directory, meta = built
    stats = cache_stats(directory)
    roles = np.concatenate([encoder.encode(parse_document(d, path="", line=0)).roles for d in docs])
    want = {r.label: int((roles == r).sum()) for r in LOSS_ROLES}
    assert stats["documents"] == 23
    assert stats["tokens"] == want == meta["tokens_by_role"]
    assert stats["mantra_share"] == pytest.approx(want["mantra"] / len(roles))
    assert stats["tag_share"] == pytest.approx(want["tag"] / len(roles))


def test_training_reads_the_cache_like_the_json_lines(tmp_path, built, encoder_spec):
    docs, _, _, _ = built
    clean = write_jsonl(tmp_path / "clean.jsonl", docs)  # no bad record: same document indices
    cache_dir = tmp_path / "clean-cache"
    write_cache([clean], cache_dir, encoder_spec, progress=False)
    for split in ("train", "eval"):
        kw = dict(batch_size=2, seq_len=53, split=split)
        raw = make_batch_iterator(data_config(clean, eval_fraction=0.3), **kw)
        cached = make_batch_iterator(data_config(cache_dir, eval_fraction=0.3), **kw)
        n = 6 if split == "train" else len(list(make_batch_iterator(data_config(clean, eval_fraction=0.3), **kw)))
        assert_batches_equal(take(cached, n), take(raw, n))


def test_restore_from_the_cache_is_exact(built):
    _, _, directory, _ = built
    cfg = data_config(directory)
    it = make_batch_iterator(cfg, batch_size=3, seq_len=41)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    again = make_batch_iterator(cfg, batch_size=3, seq_len=41)
    again.set_state(state)
    assert_batches_equal(take(again, 3), expected)


def test_training_refuses_a_cache_of_another_tokenizer_or_mantra(tmp_path, built):
    _, _, directory, _ = built
    with pytest.raises(UserError, match=r"(?s)does not match this run's encoder.*mantra: cache built with 'I feel no fear.*this run uses 'Another mantra.'"):
        make_batch_iterator(data_config(directory, mantra="Another mantra."), batch_size=2, seq_len=41)
    other = tmp_path / "other.model"
    other.write_bytes(data_config(directory).tokenizer.read_bytes() + b"\0")
    cfg = data_config(directory)
    cfg = type(cfg)(sources=cfg.sources, tokenizer=other, tags=cfg.tags)
    with pytest.raises(UserError, match=r"(?s)tokenizer: cache built with .*sample.model .* this run uses .*other.model"):
        make_batch_iterator(cfg, batch_size=2, seq_len=41)


def test_cache_refuses_to_overwrite_and_all_bad_inputs(tmp_path, built, encoder_spec):
    _, (a, _), directory, _ = built
    with pytest.raises(UserError, match="already exists"):
        write_cache([a], directory, encoder_spec, progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{broken", "[]"])
    with pytest.raises(UserError, match="no valid document.*bad.jsonl:1: invalid JSON"):
        write_cache([bad], tmp_path / "c", encoder_spec, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    with pytest.raises(UserError, match="bad.jsonl:1: invalid JSON"):
        write_cache([bad], tmp_path / "c", encoder_spec, strict=True, progress=False)


def test_cli_cache_and_stats(tmp_path, built, capsys, encoder_spec):
    _, (a, b), _, _ = built
    out = tmp_path / "cli-cache"
    glob = str(b.parent / "b*.jsonl")
    assert main(["data", "cache", "--input", str(a), "--input", glob, "--tokenizer", encoder_spec.tokenizer,
                 "--out", str(out), "--no-progress"]) == 0
    assert "23 documents" in capsys.readouterr().out
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 23
    assert set(stats["tokens"]) == {"text", "thinking", "mantra", "tag"}
    assert all(isinstance(v, int) for v in stats["tokens"].values())
    assert main(["data", "stats", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mantra share" in table and "thinking" in table
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "not a token cache" in capsys.readouterr().err
    shutil.rmtree(out)


def test_a_damaged_cache_fails_naming_the_document(tmp_path, built):
    _, _, directory, _ = built
    damaged = tmp_path / "damaged"
    shutil.copytree(directory, damaged)
    (damaged / "ids" / "0").write_bytes(b"not a chunk")
    it = make_batch_iterator(data_config(damaged), batch_size=2, seq_len=41)
    with pytest.raises(FaultError, match=rf"token cache {damaged}, document \d+: cannot read it"):
        take(it, 3)


# -- a cache in a store: local disk or a bucket (the GCS emulator) ------------------------

CLI = "import sys; from metatrain.cli import main; sys.exit(main())"  # `metatrain ARGS...`


def test_a_cache_written_to_a_store_equals_the_local_one_and_trains_the_same(stored_corpus, tmp_path):
    _, root, store = stored_corpus
    remote = f"{store}/corpus"
    spec = EncoderSpec(store.upload("tok.model", SAMPLE_TOKENIZER), store.upload("tags.yaml", DEFAULT_TAGS), None, "every")
    local_spec = EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every")
    want = write_cache([root / "plain.jsonl", f"{root}/shards/*.jsonl"], tmp_path / "cache", local_spec, progress=False)
    out = f"{store}/cache"
    meta = write_cache([f"{remote}/plain.jsonl", f"{remote}/shards/*.jsonl"], out, spec, progress=False)
    assert is_cache_dir(out) and "cache.json" in store.files("cache")
    assert meta["tokenizer"]["path"] == f"{store}/tok.model" and meta["inputs"][0] == f"{remote}/plain.jsonl"
    for key in ("documents", "tokens", "tokens_by_role", "skipped_records", "mantra", "mantra_policy"):
        assert meta[key] == want[key]
    assert meta["tokenizer"]["sha256"] == want["tokenizer"]["sha256"] and meta["tags"]["sha256"] == want["tags"]["sha256"]
    a, b = TokenCache(tmp_path / "cache"), TokenCache(out)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.id_hashes, b.id_hashes)
    assert len(a) == len(b)
    for i in range(len(a)):
        for x, y in zip(a.document(i), b.document(i)):
            np.testing.assert_array_equal(x, y)
    kw = dict(batch_size=2, seq_len=41)  # read in worker processes, which open the remote arrays themselves
    config = dataclasses.replace(data_config(out, num_workers=2), tokenizer=as_path(spec.tokenizer),
                                 tags=as_path(spec.tags))
    assert_batches_equal(take(make_batch_iterator(config, **kw), 4),
                         take(make_batch_iterator(data_config(tmp_path / "cache", num_workers=2), **kw), 4))


def test_a_failed_cache_build_leaves_nothing(store, encoder_spec):
    store.write_text("bad.jsonl", "{broken\n[]\n")
    with pytest.raises(UserError, match=f"no valid document in {store}/bad.jsonl"):
        write_cache([f"{store}/bad.jsonl"], f"{store}/cache", encoder_spec, progress=False)
    assert store.files() == ["bad.jsonl"]


def test_the_cli_caches_inputs_in_a_store_into_it_and_reports_bad_ones(stored_corpus):
    _, _, store = stored_corpus
    remote = f"{store}/corpus"
    out = f"{store}/cli-cache"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                              env=store.env(), timeout=120)

    tokenizer, tags = store.upload("cli/tok.model", SAMPLE_TOKENIZER), store.upload("cli/tags.yaml", DEFAULT_TAGS)
    done = cli("data", "cache", "--input", f"{remote}/shards/*.jsonl", "--tokenizer", tokenizer,
               "--tags", tags, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 22 documents" in done.stdout
    stats = cli("data", "stats", out, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["documents"] == 22
    missing = cli("data", "cache", "--input", f"{remote}/missing.jsonl", "--tokenizer", str(SAMPLE_TOKENIZER),
                  "--out", f"{store}/c2", "--no-progress")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"{remote}/missing.jsonl does not exist" in missing.stderr


@pytest.mark.hostile
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupted_cache_build_leaves_nothing_behind(tmp_path, signum):
    import os
    import signal
    import time

    corpus = write_jsonl(tmp_path / "big.jsonl", make_docs(40_000, seed=2))
    out = tmp_path / "out" / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("METATRAIN_DEBUG", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "data", "cache", "--input", str(corpus), "--out", str(out),
         "--tokenizer", str(SAMPLE_TOKENIZER), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # Signalled while it builds: once the staging directory holds the first arrays.
        while not any(p.name.endswith(".partial") and any(p.iterdir()) for p in out.parent.glob(".*")):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(getattr(signal, signum))
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == {"SIGINT": 130, "SIGTERM": 143}[signum], err[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == [], "a temporary was left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out"]


@pytest.mark.hostile
def test_a_line_past_the_bound_is_skipped_and_counted_in_the_cache(tmp_path, encoder_spec):
    docs = make_docs(2)
    path = write_jsonl(tmp_path / "a.jsonl", [docs[0], "x" * 50_000, docs[1]])
    meta = write_cache([path], tmp_path / "cache", encoder_spec, progress=False, max_line_bytes=10_000)
    assert (meta["documents"], meta["skipped_records"]) == (2, 1)
    assert meta["skipped_examples"][0].startswith(f"{path}:2: the line is 50000 bytes, longer than the limit")
    with pytest.raises(UserError, match=f"{path}:2: the line is 50000 bytes"):
        write_cache([path], tmp_path / "strict", encoder_spec, strict=True, progress=False, max_line_bytes=10_000)
    assert not (tmp_path / "strict").exists()
