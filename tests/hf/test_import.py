"""`metatrain import`: a Llama checkpoint made by transformers becomes a work directory that
computes the same logits, exports back bit for bit, and trains on."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from metatrain.cli import main
from metatrain.errors import UserError  # noqa: E402
from metatrain.run.reader import load_checkpoint  # noqa: E402
from metatrain.hf.convert import from_hf_tensors, hf_tensor_shapes, to_hf_tensors  # noqa: E402
from metatrain.hf.export import export_workdir  # noqa: E402
from metatrain.hf.importer import import_checkpoint  # noqa: E402
from metatrain.io.paths import CONFIGS_DIR  # noqa: E402
from metatrain.models.config import ModelConfig  # noqa: E402

from ..conftest import TINY, error_lines, run_cli
from .conftest import (
    INTERRUPTS,
    held_out_documents,
    hf_logits,
    interrupt_while_building,
    load_hf_model,
    metatrain_logits,
    save_hf_llama,
    start_cli,
)

LOGIT_TOLERANCE = 1e-4
#: The tiny preset for everything but the model; rows short enough for max_position_embeddings=64.
RUN_SETTINGS = ["trainer.seq_len=32", "trainer.batch_size=8", "trainer.eval_every=0", "trainer.progress=false",
                "checkpoint.async_save=false"]


def _import(source, out, **kwargs):
    return import_checkpoint(source, out, config_file=CONFIGS_DIR / "tiny.yaml", overrides=RUN_SETTINGS, **kwargs)


@pytest.fixture(scope="module", params=["untied_gqa", "tied_mha"])
def hf_model(request):
    return request.getfixturevalue(f"hf_llama_{request.param}")


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "run"
    report = _import(hf_model, out)
    return report, out


def _ids(vocab_size, encoder):
    rows = [np.resize(encoder.encode(doc).ids, 40) for doc in held_out_documents()]
    rows.append(np.random.default_rng(3).integers(0, vocab_size, 40))
    return np.stack(rows).astype(np.int32)


def test_import_gives_transformers_logits(hf_model, imported):
    report, out = imported
    assert report.added_tags == {} and report.grown == ()  # the sample tokenizer has every shipped tag
    loaded = load_checkpoint(workdir=out)
    hf_config = json.loads((hf_model / "config.json").read_text())
    assert loaded.model_config.tie_embeddings == hf_config["tie_word_embeddings"]
    assert loaded.model_config.n_kv_heads == hf_config["num_key_value_heads"]
    assert loaded.model_config.rope_theta == 2500.0 and loaded.model_config.head_dim == 8
    ids = _ids(loaded.model_config.vocab_size, loaded.encoder)
    np.testing.assert_allclose(metatrain_logits(loaded.params, loaded.model_config, ids),
                               hf_logits(load_hf_model(hf_model), ids), rtol=0, atol=LOGIT_TOLERANCE)


def test_import_then_export_is_bit_identical(hf_model, imported, tmp_path):
    from safetensors.numpy import load_file

    _, out = imported
    export_workdir(out, tmp_path / "again")
    original, again = load_file(hf_model / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(original) == sorted(again)
    for name, array in original.items():
        assert again[name].dtype == array.dtype and again[name].shape == array.shape, name
        assert again[name].tobytes() == array.tobytes(), name
    before = transformers.AutoConfig.from_pretrained(hf_model).to_dict()
    after = transformers.AutoConfig.from_pretrained(tmp_path / "again").to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id"):
        assert after[key] == before[key], key


def test_missing_tags_get_new_rows_and_the_run_trains_on(hf_llama_untied_gqa, tags_with_extra, tmp_path):
    from metatrain.config import load_config
    from metatrain.train.loop import train

    out = tmp_path / "run"
    report = _import(hf_llama_untied_gqa, out, tags=tags_with_extra)
    assert report.added_tags == {"<|extra|>": 4096} and report.model.vocab_size == 4097
    assert set(report.grown) >= {"params/embedding/table", "params/output_projection"}
    loaded = load_checkpoint(workdir=out)
    assert loaded.encoder.tag_ids["<|extra|>"] == 4096
    table = np.asarray(loaded.params["embedding"]["table"])
    original = load_hf_model(hf_llama_untied_gqa)
    old = original.model.embed_tokens.weight.detach().numpy()
    assert table[:4096].tobytes() == old.tobytes()  # old rows bit for bit
    np.testing.assert_allclose(table[4096], old.mean(axis=0), atol=0.05 * old.std())  # mean plus small noise
    ids = _ids(4096, loaded.encoder)
    ours = metatrain_logits(loaded.params, loaded.model_config, ids)
    np.testing.assert_allclose(ours[..., :4096], hf_logits(original, ids), rtol=0, atol=LOGIT_TOLERANCE)

    summary = train(load_config(out / "config.yaml", ["trainer.steps=1"]), out)  # `metatrain train --workdir`
    assert (summary.start_step, summary.final_step) == (0, 1)
    assert np.isfinite(summary.last_metrics["loss"])


def test_convert_round_trip_is_exact_for_every_layout():
    """Prime sizes, stacked and unrolled layers, tied and untied: HF -> metatrain -> HF."""
    rng = np.random.default_rng(0)
    for scan in (True, False):
        for tie in (True, False):
            config = ModelConfig(vocab_size=13, d_model=10, n_layers=3, n_heads=5, n_kv_heads=1, head_dim=2,
                                 d_ff=7, max_seq_len=8, tie_embeddings=tie, scan_layers=scan)
            tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in hf_tensor_shapes(config).items()}
            back = to_hf_tensors(from_hf_tensors(tensors, config), config)
            assert sorted(back) == sorted(tensors)
            assert all(back[n].tobytes() == tensors[n].tobytes() for n in tensors)


def _edited_copy(source, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("changes, named", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({"vocab_size": 4000}, "vocab_size=4000"),
])
def test_refuses_what_metatrain_cannot_represent(hf_llama_untied_gqa, tmp_path, changes, named):
    source = _edited_copy(hf_llama_untied_gqa, tmp_path, **changes)
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace("[", r"\[")):
        _import(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_tensors_the_model_has_no_place_for(hf_llama_untied_gqa, tmp_path):
    from safetensors.torch import load_file, save_file

    source = _edited_copy(hf_llama_untied_gqa, tmp_path)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(48)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj.bias has no place"):
        _import(source, tmp_path / "out")


def test_refuses_setting_the_architecture(hf_llama_untied_gqa, tmp_path):
    with pytest.raises(UserError, match="model.d_model comes from the checkpoint"):
        import_checkpoint(hf_llama_untied_gqa, tmp_path / "out", overrides=["model.d_model=64"])


def test_sharded_and_bfloat16_checkpoints_import(tmp_path):
    source = save_hf_llama(tmp_path / "llama", tie=False, n_kv_heads=3, seed=2)
    model = load_hf_model(source).to(torch.bfloat16)
    (source / "model.safetensors").unlink()
    model.save_pretrained(source, max_shard_size="300KB")
    assert (source / "model.safetensors.index.json").is_file()
    _import(source, tmp_path / "run")
    export_workdir(tmp_path / "run", tmp_path / "again", dtype="bfloat16")
    from safetensors.torch import load_file

    original = {}
    for shard in sorted(source.glob("model-*.safetensors")):
        original.update(load_file(shard))
    again = {}
    for shard in sorted((tmp_path / "again").glob("model*.safetensors")):
        again.update(load_file(shard))
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[n], again[n]) and again[n].dtype == torch.bfloat16 for n in original)


# -- hostile inputs and interrupts (issue 25) -------------------------------------------------

CLI_SETTINGS = [arg for setting in RUN_SETTINGS for arg in ("--set", setting)]


@pytest.mark.hostile
@pytest.mark.parametrize("sig", INTERRUPTS)
def test_an_interrupted_import_leaves_nothing_under_its_name(hf_llama_untied_gqa, tmp_path, sig):
    """The work directory is built aside and renamed into place whole: interrupted half-way,
    there is nothing under --out for `train` to mistake for an empty run, and no temporary."""
    parent = tmp_path / "runs"
    parent.mkdir()
    process = start_cli("import", "--from", str(hf_llama_untied_gqa), "--out", str(parent / "run"),
                        "--config", str(TINY), *CLI_SETTINGS)
    seen, stderr = interrupt_while_building(process, parent, "run", sig)
    assert seen == [], f"--out held {seen} while the import was still building it"
    assert process.returncode == 128 + sig, stderr
    assert sorted(p.name for p in parent.iterdir()) == []


def _with_index(source, tmp_path, entry):
    """A copy of `source` whose safetensors index maps one tensor to `entry`."""
    from safetensors import safe_open

    copy = tmp_path / "indexed"
    shutil.copytree(source, copy)
    with safe_open(copy / "model.safetensors", framework="np") as f:
        names = sorted(f.keys())
    weight_map = {name: "model.safetensors" for name in names}
    weight_map[names[0]] = entry
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return copy


@pytest.mark.hostile
@pytest.mark.parametrize("entry", ["/etc/passwd", "../elsewhere/model.safetensors", "sub/../../elsewhere/x"])
def test_weight_map_entries_outside_from_are_not_read(hf_llama_untied_gqa, tmp_path, entry):
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(hf_llama_untied_gqa / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    shutil.copyfile(hf_llama_untied_gqa / "model.safetensors", tmp_path / "elsewhere" / "x")
    source = _with_index(hf_llama_untied_gqa, tmp_path, entry)
    with pytest.raises(UserError, match=f"weight_map entry '{entry}' is not a file in --from") as e:
        _import(source, tmp_path / "out")
    assert "model.safetensors.index.json" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile
@pytest.mark.parametrize("name", ["model-fifo.safetensors", "config.json"])
def test_a_fifo_in_from_is_refused_not_waited_on(hf_llama_untied_gqa, tmp_path, name):
    """A named pipe blocks whoever opens it until a writer comes: import refuses it
    in one line instead of hanging."""
    source = _with_index(hf_llama_untied_gqa, tmp_path, "model-fifo.safetensors")
    (source / name).unlink(missing_ok=True)
    os.mkfifo(source / name)
    result = run_cli("import", "--from", str(source), "--out", str(tmp_path / "out"), "--config", str(TINY),
                     *CLI_SETTINGS, timeout=120)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert name in lines[0] and "named pipe" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile
@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000 is above 1,024"),
    ({"intermediate_size": 10**9}, "intermediate_size=1000000000 is above"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings=1000000000000 is above"),
    ({"vocab_size": 10**10}, "vocab_size=10000000000 is above"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers='many' is not a whole number"),
    ({"num_hidden_layers": 1000}, r"implies [\d,]+ parameters .*num_hidden_layers=1000,.* but its weight files hold"),
])
def test_config_sizes_are_checked_before_anything_is_built(hf_llama_untied_gqa, tmp_path, changes, message):
    """A config.json that implies more parameters than its weights hold, or a context no
    model has, is refused at once (num_hidden_layers=10**6 took 40 s to refuse)."""
    source = _edited_copy(hf_llama_untied_gqa, tmp_path, **changes)
    with pytest.raises(UserError, match=message):
        _import(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile
def test_a_symlink_loop_as_from_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["import", "--from", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--from" in lines[0] and "symbolic links" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile
def test_an_out_inside_another_runs_checkpoints_is_refused(hf_llama_untied_gqa, tmp_path, capsys):
    run = tmp_path / "other-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    out = run / "checkpoints" / "99"
    assert main(["import", "--from", str(hf_llama_untied_gqa), "--out", str(out), "--config", str(TINY),
                 *CLI_SETTINGS]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "inside" in lines[0] and "checkpoints" in lines[0], lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []
