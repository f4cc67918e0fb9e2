"""Training with tags, loading with checks, extending an existing model, inspecting; outputs
on local disk and in a bucket (`store`)."""

from __future__ import annotations

import io
import random
import shlex

import pytest
import sentencepiece as spm

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS
from metatrain.io.storage import as_path
from metatrain.tokenizer import (
    SpmTokenizer,
    extend_tokenizer,
    inspect_tokenizer,
    load_registry,
    train_tokenizer,
)
from metatrain.tokenizer.build import _chunks
from metatrain.tokenizer.registry import registry_from_dict
from metatrain.tokenizer.spm import read_model_proto

from ..conftest import write_jsonl
from .conftest import TEST_VOCAB, make_corpus


def _plain_model(path, **extra) -> None:
    """A third-party-style model: SentencePiece defaults (NFKC, dummy prefix), no tags."""
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=61,
                                   minloglevel=2, **extra)
    path.write_bytes(model.getvalue())


def _registry_with(**controls):
    reg = load_registry()
    return registry_from_dict({
        "base_mode": reg.base_mode, "modes": list(reg.modes),
        "transitions": [{"tag": t.tag, "from": t.source, "to": t.target} for t in reg.transitions],
        "thinking": {"open": reg.thinking_open, "close": reg.thinking_close, "allowed_in": list(reg.thinking_modes)},
        "controls": reg.control_tags | controls,
    }, source="user_tags.yaml")


def test_trained_model_has_tags_as_control_pieces_and_exact_settings(tokenizer, registry):
    assert tokenizer.vocab_size == TEST_VOCAB
    assert tokenizer.exact
    for tag, token in tokenizer.tag_ids.items():
        assert tokenizer.processor.id_to_piece(token) == tag
        assert tokenizer.piece_type(token) == "control"
    assert tokenizer.proto.trainer_spec.byte_fallback
    assert tokenizer.proto.normalizer_spec.name == "identity"


def test_newline_is_an_ordinary_piece(tokenizer):
    """Newlines are text the model learns, not bytes or something the normaliser drops."""
    (ids,) = tokenizer.encode_texts(["\n"])
    assert ids == [tokenizer.processor.piece_to_id("\n")]
    assert tokenizer.piece_type(ids[0]) == "normal"


def test_train_refuses_impossible_settings(corpus_path, tmp_path):
    with pytest.raises(UserError, match="--vocab-size 200 is too small.*at least 268"):
        train_tokenizer([corpus_path], vocab_size=200, out_prefix=tmp_path / "x")
    with pytest.raises(UserError, match="SentencePiece refused to train: .*[Vv]ocabulary size"):
        train_tokenizer([corpus_path], vocab_size=100_003, out_prefix=tmp_path / "x")
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, ["{not json"])
    with pytest.raises(UserError, match=r"no valid documents .*skipped 1 bad record"):
        train_tokenizer([empty], vocab_size=300, out_prefix=tmp_path / "x")


def test_training_is_reproducible(corpus_path, tmp_path):
    """Same corpus and settings, different output folders: the same model bytes."""
    a = train_tokenizer([corpus_path], vocab_size=TEST_VOCAB, out_prefix=tmp_path / "a" / "tok")
    b = train_tokenizer([corpus_path], vocab_size=TEST_VOCAB, out_prefix=tmp_path / "b" / "tok")
    assert a.model_path.read_bytes() == b.model_path.read_bytes()


def test_chunks_cut_long_texts_at_newlines():
    text = ("a" * 30 + "\n") * 10
    chunks = list(_chunks(text, limit=100))
    assert "".join(chunks) == text
    assert all(len(c) <= 100 and c.endswith("\n") for c in chunks)
    assert list(_chunks("b" * 250, limit=100)) == ["b" * 100, "b" * 100, "b" * 50]


def test_loading_refuses_a_file_that_is_not_a_model(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_text("this is not a SentencePiece model\n")
    with pytest.raises(UserError, match="junk.model is not a SentencePiece model"):
        SpmTokenizer.load(junk)
    with pytest.raises(UserError, match="cannot read tokenizer"):
        SpmTokenizer.load(tmp_path / "missing.model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        inspect_tokenizer(junk)


def test_loading_refuses_a_model_without_the_tags(tmp_path):
    base = tmp_path / "plain.model"
    _plain_model(base)
    with pytest.raises(UserError) as info:
        SpmTokenizer.load(base)
    message = str(info.value)
    assert "lacks tag(s) <thinking>, </thinking>, <AI>" in message
    assert f"metatrain tokenizer extend --base {base} --tags" in message


def test_loading_refuses_tags_that_match_raw_text(tmp_path):
    base = tmp_path / "user_defined.model"
    _plain_model(base, user_defined_symbols=list(load_registry().tags))
    with pytest.raises(UserError, match="has tag <thinking> as a user_defined piece.*must be control pieces"):
        SpmTokenizer.load(base)
    with pytest.raises(UserError, match="already has <thinking> as a user_defined piece"):
        extend_tokenizer(base, load_registry(), tmp_path / "out.model")


def test_extend_keeps_every_id_and_adds_one_id_per_tag(tmp_path):
    base, out = tmp_path / "plain.model", tmp_path / "extended.model"
    _plain_model(base)
    old = spm.SentencePieceProcessor(model_file=str(base))
    registry = load_registry()
    report = extend_tokenizer(base, registry, out)
    new = spm.SentencePieceProcessor(model_file=str(out))
    assert new.get_piece_size() == old.get_piece_size() + len(registry.tags) == report.vocab_size
    for i in range(old.get_piece_size()):
        assert new.id_to_piece(i) == old.id_to_piece(i)
        assert new.get_score(i) == old.get_score(i)
    assert report.added == {t: old.get_piece_size() + i for i, t in enumerate(registry.tags)}
    assert report.present == {}
    # Text still tokenizes as before: the tags are control pieces, never matched in text.
    for line in ["plain words here", "<thinking> zeta </AI>"]:
        assert new.encode(line) == old.encode(line)
    tokenizer = SpmTokenizer.load(out, registry)
    assert tokenizer.tag_ids == report.added
    assert not tokenizer.exact  # the base model's NFKC normaliser stays; inspect says so


def test_extend_again_changes_nothing_and_adds_only_new_tags(tmp_path):
    base, once, twice = tmp_path / "plain.model", tmp_path / "once.model", tmp_path / "twice.model"
    _plain_model(base)
    first = extend_tokenizer(base, load_registry(), once)
    again = extend_tokenizer(once, load_registry(), twice)
    assert twice.read_bytes() == once.read_bytes()
    assert again.added == {} and again.present == first.added
    more = extend_tokenizer(once, _registry_with(toxic="<|toxic|>"), tmp_path / "more.model")
    assert more.added == {"<|toxic|>": first.vocab_size}
    assert more.present == first.added


def test_extend_is_idempotent_and_never_writes_over_its_base(tmp_path):
    model = tmp_path / "m.model"
    _plain_model(model)
    once, twice = tmp_path / "once.model", tmp_path / "twice.model"
    extend_tokenizer(model, load_registry(), once)
    extend_tokenizer(once, load_registry(), twice)
    assert twice.read_bytes() == once.read_bytes()
    before = model.read_bytes()
    with pytest.raises(UserError, match="is one of the inputs"):
        extend_tokenizer(model, load_registry(), model)
    assert model.read_bytes() == before


def test_inspect(model_path, tmp_path, registry):
    info = inspect_tokenizer(model_path)
    assert info.vocab_size == TEST_VOCAB
    assert info.special == {"bos": 1, "eos": 2, "unk": 0, "pad": -1}
    assert list(info.tags) == list(registry.tags)
    assert info.missing_tags == ()
    assert info.exact_round_trip and info.byte_fallback and info.model_type == "bpe"
    text = info.render()
    assert "vocab size:       331" in text and "<AI_quoting_human>" in text
    base = tmp_path / "plain.model"
    _plain_model(base)
    plain = inspect_tokenizer(base)
    assert plain.tags == {} and plain.missing_tags == registry.tags
    assert not plain.exact_round_trip and plain.normalizer == "nmt_nfkc"
    assert f"add them with `metatrain tokenizer extend --base {base} --tags {DEFAULT_TAGS} --out NEW.model`" \
        in plain.render()


def test_unigram_models_round_trip_too(tmp_path):
    docs = tmp_path / "d.jsonl"
    write_jsonl(docs, make_corpus(60, seed=3))
    report = train_tokenizer([docs], vocab_size=353, out_prefix=tmp_path / "u", model_type="unigram")
    tokenizer = SpmTokenizer.load(report.model_path)
    for text in ["  two spaces\n\nand ▁ a meta space ", "é and e\u0301"]:
        assert tokenizer.decode_text(tokenizer.encode_texts([text])[0]) == text


# -- outputs in a store: local disk or a bucket (the GCS emulator) ------------------------

#: A small vocabulary for the sample corpus (its characters alone take 340 pieces with the specials).
SAMPLE_VOCAB = 512
NEW_TAG = '  toxic: "<|toxic|>"\n'
ANCHOR = '  bad: "<|bad|>"\n'


def test_tokenizer_train_refuses_an_output_that_is_a_directory(store):
    store.write_text("tok/v1.model/keep.txt", "mine")
    with pytest.raises(UserError, match=f"--out {store}/tok/v1.model is a directory"):
        train_tokenizer([SAMPLE_CORPUS], vocab_size=SAMPLE_VOCAB, out_prefix=f"{store}/tok/v1")
    assert store.files() == ["tok/v1.model/keep.txt"]


def test_tokenizer_extend_in_a_store_writes_the_local_bytes(store, model_path, tmp_path):
    tags = tmp_path / "tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + NEW_TAG))
    local = extend_tokenizer(model_path, load_registry(tags), tmp_path / "ext.model")
    assert local.added == {"<|toxic|>": TEST_VOCAB}

    store.upload("base.model", model_path)  # a base in the store, too
    store.upload("tags.yaml", tags)
    assert main(["tokenizer", "extend", "--base", f"{store}/base.model", "--tags", f"{store}/tags.yaml",
                 "--out", f"{store}/ext.model"]) == 0
    assert as_path(f"{store}/ext.model").read_bytes() == (tmp_path / "ext.model").read_bytes()
    again = extend_tokenizer(f"{store}/ext.model", load_registry(tags), f"{store}/again.model")
    assert again.added == {} and str(again.out_path) == f"{store}/again.model"
    assert as_path(f"{store}/again.model").read_bytes() == (tmp_path / "ext.model").read_bytes()


@pytest.mark.hostile
def test_inspect_suggests_only_an_extend_that_extend_accepts(model_path, tmp_path):
    """A registry tag that the model has as an ordinary (text) piece cannot be added by
    `extend`: inspect must say to rename it, and the command it suggests for the tags that
    are really missing must then run."""
    from ..conftest import run_cli

    proto = read_model_proto(model_path)
    normal = next(p.piece for p in proto.pieces
                  if p.type == p.NORMAL and p.piece.isalpha() and len(p.piece) > 1)
    tags = tmp_path / "tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace(
        ANCHOR, ANCHOR + NEW_TAG + f'  word: "{normal}"\n'))
    shown = run_cli("tokenizer", "inspect", "--tokenizer", str(model_path), "--tags", str(tags))
    assert shown.returncode == 0, shown.stderr
    normal_id = next(i for i, p in enumerate(proto.pieces) if p.piece == normal)
    assert f"{normal} (id {normal_id}, a normal piece)" in shown.stdout
    assert f"rename it in {tags}" in shown.stdout
    assert "metatrain tokenizer extend --base" not in shown.stdout  # extend would refuse this registry
    refused = run_cli("tokenizer", "extend", "--base", str(model_path), "--tags", str(tags),
                      "--out", str(tmp_path / "refused.model"))
    assert refused.returncode == 2 and f"Rename the tag in {tags}" in refused.stderr

    tags.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + NEW_TAG))
    shown = run_cli("tokenizer", "inspect", "--tokenizer", str(model_path), "--tags", str(tags))
    suggested = shown.stdout.split("`")[1]
    assert suggested.startswith("metatrain tokenizer extend --base"), shown.stdout
    argv = shlex.split(suggested)[1:]
    argv[argv.index("NEW.model")] = str(tmp_path / "new.model")
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr
    assert "added: <|toxic|>=" in done.stderr
