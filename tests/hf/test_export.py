"""`metatrain export`: transformers loads the directory with no custom code and computes
what metatrain computes (logits, greedy continuations, token ids); an `--out` on local disk
and in a bucket (`store`)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from metatrain.cli import main  # noqa: E402
from metatrain.errors import UserError  # noqa: E402
from metatrain.run.reader import load_checkpoint  # noqa: E402
from metatrain.hf.convert import check_exportable  # noqa: E402
from metatrain.hf.export import export_workdir  # noqa: E402
from metatrain.io.storage import as_path, gcs_blob  # noqa: E402
from metatrain.models.config import ModelConfig  # noqa: E402

from ..conftest import error_lines
from .conftest import (
    HELD_OUT_TEXTS,
    INTERRUPTS,
    held_out_documents,
    hf_logits,
    interrupt_while_building,
    load_hf_model,
    metatrain_logits,
    start_cli,
)

LOGIT_TOLERANCE = 1e-4  # float32 both sides; measured ~6e-6
GREEDY_TOKENS = 32


@pytest.fixture(scope="module", params=["tied", "untied"])
def exported(request, workdir, untied_mha_workdir):
    """(metatrain checkpoint, exported directory) for the tied GQA and the untied MHA run."""
    run = workdir if request.param == "tied" else untied_mha_workdir
    out = request.getfixturevalue(f"exported_{request.param}")
    return load_checkpoint(workdir=run), out


def _held_out_ids(encoder, vocab_size, seed=0):
    """Encoded held-out documents (tags included) and random ids, padded to one [B, T]."""
    rows = [encoder.encode(doc).ids for doc in held_out_documents()]
    rng = np.random.default_rng(seed)
    rows += [np.concatenate([[encoder.bos_id], rng.integers(0, vocab_size, 46)]) for _ in range(2)]
    length = min(max(len(r) for r in rows), 64)
    return np.stack([np.resize(r, length) for r in rows]).astype(np.int32)  # np.resize repeats short rows


def test_logits_equal_metatrain(exported):
    loaded, out = exported
    ids = _held_out_ids(loaded.encoder, loaded.model_config.vocab_size)
    ours = metatrain_logits(loaded.params, loaded.model_config, ids)
    theirs = hf_logits(load_hf_model(out), ids)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=LOGIT_TOLERANCE)


def _metatrain_greedy(params, config, prompt, steps, eos_id):
    """Greedy continuation by argmax over metatrain's own forward pass (no grammar)."""
    import jax
    import jax.numpy as jnp

    from metatrain.models.transformer import Transformer, logits

    total = len(prompt) + steps
    positions = jnp.arange(total, dtype=jnp.int32)[None]
    forward = jax.jit(lambda p, ids: logits(Transformer(config).apply({"params": p}, ids, positions,
                                                                       jnp.ones_like(ids)), p, config)[0])
    buffer = np.zeros((1, total), np.int32)
    buffer[0, :len(prompt)] = prompt
    for t in range(len(prompt), total):  # later slots are causally invisible to position t - 1
        buffer[0, t] = int(np.argmax(forward(params, buffer)[t - 1]))
        if buffer[0, t] == eos_id:
            return buffer[0, len(prompt):t + 1].tolist()
    return buffer[0, len(prompt):].tolist()


def test_greedy_continuations_equal_metatrain(exported):
    loaded, out = exported
    model = load_hf_model(out)
    for doc in held_out_documents()[:1]:
        prompt = loaded.encoder.encode(doc).ids[:20]
        ours = _metatrain_greedy(loaded.params, loaded.model_config, prompt, GREEDY_TOKENS, loaded.encoder.eos_id)
        with torch.no_grad():
            generated = model.generate(torch.as_tensor(prompt[None], dtype=torch.long),
                                       attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                       max_new_tokens=GREEDY_TOKENS, do_sample=False)
        theirs = generated[0, len(prompt):].tolist()
        assert theirs == ours
        assert len(ours) == GREEDY_TOKENS or ours[-1] == loaded.encoder.eos_id


def test_tokenizer_gives_metatrain_ids(exported_tied, workdir):
    encoder = load_checkpoint(workdir=workdir).encoder
    tok = transformers.AutoTokenizer.from_pretrained(exported_tied)
    for text in HELD_OUT_TEXTS:
        plain = list(encoder.tokenizer.encode_texts([text])[0])
        assert tok.encode(text, add_special_tokens=False) == plain, text
        assert tok(text)["input_ids"] == [encoder.bos_id] + plain, text  # BOS as in training documents
        assert tok.decode(plain) == text
    for tag, tag_id in encoder.tag_ids.items():
        assert tok.convert_tokens_to_ids(tag) == tag_id
        assert tag_id in tok.all_special_ids
        assert tag_id not in tok.encode(f"a {tag} b")  # a literal tag is text, never the tag
    for doc in held_out_documents():  # tags render as metatrain renders them
        ids = encoder.encode(doc).ids
        assert tok.decode(ids[1:-1]) == encoder.decode(ids)


def test_literal_meta_space_is_a_known_difference(exported_tied, workdir):
    """Documented in the model card: a literal U+2581 is the word-boundary piece for
    transformers (as for SentencePiece), byte pieces for metatrain."""
    encoder = load_checkpoint(workdir=workdir).encoder
    tok = transformers.AutoTokenizer.from_pretrained(exported_tied)
    assert tok.encode("a\u2581b", add_special_tokens=False) == encoder.tokenizer.processor.encode("a\u2581b")
    assert "U+2581" in (exported_tied / "README.md").read_text()


def test_directory_describes_the_run(exported_tied, workdir):
    loaded = load_checkpoint(workdir=workdir)
    cfg = loaded.model_config
    config = json.loads((exported_tied / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["tie_word_embeddings"], config["num_key_value_heads"], config["rms_norm_eps"]) == (
        cfg.tie_embeddings, cfg.n_kv_heads, cfg.norm_eps)
    assert transformers.AutoConfig.from_pretrained(exported_tied).rope_parameters["rope_theta"] == cfg.rope_theta
    generation = json.loads((exported_tied / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (loaded.encoder.bos_id, loaded.encoder.eos_id)
    assert generation["pad_token_id"] == 0 and config["pad_token_id"] is None  # <unk>: the sample model has no PAD
    assert json.loads((exported_tied / "tokenizer_config.json").read_text())["split_special_tokens"] is True
    meta = json.loads((exported_tied / "metatrain.json").read_text())
    assert meta == {"mantra_policy": "every", "mantra_file": "mantra.txt", "tags": "tags.yaml",
                    "tokenizer": "tokenizer.model", "bos_id": 1, "eos_id": 2, "pad_id": 0}
    assert (exported_tied / "tags.yaml").read_bytes() == (workdir / "tags.yaml").read_bytes()
    assert (exported_tied / "mantra.txt").read_text() == loaded.encoder.mantra
    assert (exported_tied / "model.safetensors").is_file()
    assert not (exported_tied / "model.safetensors.index.json").exists()
    card = (exported_tied / "README.md").read_text()
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert f"| text | {record['tokens/text']:,} | {record['loss/text']:.4f} |" in card
    assert "`<\\|good\\|>` | 9 | control `good`" in card
    assert "trainer:" in card and "model:" in card  # the training config


def test_sharded_export_follows_transformers_layout(exported_untied):
    index = json.loads((exported_untied / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((exported_untied / f).is_file() for f in files)
    assert files[0].startswith("model-00001-of-") and "lm_head.weight" in index["weight_map"]
    assert not (exported_untied / "model.safetensors").exists()


def test_bfloat16_export_rounds_the_float32_weights(workdir, exported_tied, tmp_path):
    from safetensors.torch import load_file

    export_workdir(workdir, tmp_path / "bf16", dtype="bfloat16")
    full, half = load_file(exported_tied / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert sorted(full) == sorted(half)
    for name, tensor in full.items():
        assert half[name].dtype == torch.bfloat16
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_refuses_what_llama_cannot_compute():
    base = dict(vocab_size=11, d_model=24, n_layers=1, n_heads=4, d_ff=8, max_seq_len=16)
    check_exportable(ModelConfig(**base))
    with pytest.raises(UserError, match="model.n_heads=5 does not divide model.d_model=24"):
        check_exportable(ModelConfig(**{**base, "n_heads": 5, "head_dim": 6}))

    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithQkNorm(ModelConfig):  # a feature metatrain might grow that Llama lacks
        qk_norm: bool = False

    check_exportable(WithQkNorm(**base))
    with pytest.raises(UserError, match="model.qk_norm=True has no equivalent"):
        check_exportable(WithQkNorm(**base, qk_norm=True))


def test_refuses_a_non_empty_out_and_a_missing_step(workdir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_workdir(workdir, tmp_path / "taken")
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        export_workdir(workdir, tmp_path / "new", step=7)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging directory left behind


@pytest.mark.hostile
def test_an_out_inside_another_runs_checkpoints_is_refused(workdir, tmp_path, capsys):
    """That run's checkpointer would list the export as a checkpoint and rename it as corrupt."""
    run = tmp_path / "other-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    assert main(["export", "--workdir", str(workdir), "--out", str(run / "checkpoints" / "99")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "inside" in lines[0] and "checkpoints" in lines[0], lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []


@pytest.mark.hostile
@pytest.mark.parametrize("sig", INTERRUPTS)
def test_an_interrupted_export_leaves_nothing_behind(workdir, tmp_path, sig):
    parent = tmp_path / "exports"
    parent.mkdir()
    process = start_cli("export", "--workdir", str(workdir), "--out", str(parent / "model"))
    seen, stderr = interrupt_while_building(process, parent, "model", sig)
    assert seen == [], f"--out held {seen} while the export was still building it"
    assert process.returncode == 128 + sig, stderr
    assert sorted(p.name for p in parent.iterdir()) == []


# -- an --out in a store: local disk or a bucket (the GCS emulator) -----------------------


def download(url, names, directory):
    """The files under `url` as local files, read through the storage layer (transformers
    cannot read gs:// itself)."""
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(as_path(f"{url}/{name}").read_bytes())
    return directory


def test_an_export_into_a_store_loads_with_the_local_exports_logits(workdir, exported_tied, store, tmp_path, capsys):
    out = f"{store}/export"
    assert main(["export", "--workdir", str(workdir), "--out", out]) == 0
    assert f"wrote {out}: step 1" in capsys.readouterr().out
    names = store.files("export")
    assert names == sorted(p.name for p in exported_tied.iterdir())
    if store.is_bucket:  # built in place there (a local export is staged and renamed whole)
        written = {}
        for name in names:
            blob = gcs_blob(f"{out}/{name}")
            blob.reload()
            written[name] = blob.generation  # the emulator's generations are microsecond timestamps
        assert max(written, key=written.get) == "config.json"  # the file that marks it complete is last

    local = download(out, names, tmp_path / "export")
    for name in names:  # the same bytes as the local export, README and weights included
        assert (local / name).read_bytes() == (exported_tied / name).read_bytes(), name
    ids = np.array([[1, 5, 17, 300, 42, 2000, 7, 9]], np.int32)
    np.testing.assert_array_equal(hf_logits(load_hf_model(local), ids), hf_logits(load_hf_model(exported_tied), ids))
    tokenizer = transformers.AutoTokenizer.from_pretrained(local)
    assert tokenizer.convert_tokens_to_ids("<AI>") == transformers.AutoTokenizer.from_pretrained(
        exported_tied).convert_tokens_to_ids("<AI>")


def test_a_non_empty_out_in_a_store_is_refused_in_one_line(workdir, store, capsys):
    out = f"{store}/export"
    store.write_text("export/notes.txt", "someone else's\n")
    assert main(["export", "--workdir", str(workdir), "--out", out]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and out in err and "not empty" in err
    assert store.files() == ["export/notes.txt"]


def test_a_failed_export_leaves_nothing_in_the_store(workdir, store, capsys):
    out = f"{store}/export"
    assert main(["export", "--workdir", str(workdir), "--out", out, "--max-shard-size", "lots"]) != 0
    assert "--max-shard-size" in capsys.readouterr().err
    assert store.files() == []
