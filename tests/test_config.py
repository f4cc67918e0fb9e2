import dataclasses

import numpy as np
import pytest
import yaml

from metatrain.config import (
    CheckpointConfig,
    LossConfig,
    OptimizerConfig,
    RoleWeights,
    RunConfig,
    TrainerConfig,
    config_to_dict,
    load_config,
    save_config,
)
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR, REPO_ROOT, SAMPLE_CORPUS, SAMPLE_TOKENIZER
from metatrain.roles import NUM_ROLES, Role

CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_the_shipped_presets_exist():
    assert {p.stem for p in CONFIG_FILES} >= {"default", "tiny", "125m", "1b", "7b"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    saved = tmp_path / "config.yaml"
    save_config(config, saved)
    assert load_config(saved) == config
    assert "base" not in yaml.safe_load(saved.read_text())


def test_default_is_the_embedded_sample_run():
    config = load_config()
    assert config == load_config(CONFIGS_DIR / "default.yaml")
    assert config.data.sources[0].path == SAMPLE_CORPUS
    assert config.data.tokenizer == SAMPLE_TOKENIZER
    assert config.tokens_per_step == config.trainer.batch_size * config.trainer.seq_len
    assert config.flops_per_step == config.model.flops_per_token(config.trainer.seq_len) * config.tokens_per_step
    # the contract names
    for key in ("trainer.steps", "trainer.batch_size", "trainer.seq_len", "checkpoint.every"):
        section, name = key.split(".")
        assert isinstance(getattr(getattr(config, section), name), int)


def test_presets_are_overlays_that_change_only_what_they_say():
    default, tiny = load_config(), load_config(CONFIGS_DIR / "tiny.yaml")
    assert tiny.model.d_model == 64 and tiny.trainer.steps == 20
    assert tiny.optimizer == default.optimizer and tiny.data == default.data
    assert tiny.model.dtype == default.model.dtype  # untouched keys come from the base
    big = load_config(CONFIGS_DIR / "7b.yaml")
    assert big.model.vocab_size == 32768 and not big.model.tie_embeddings


def test_overrides_are_typed_and_applied():
    config = load_config(None, ["trainer.steps=50", "loss.z_loss=1e-3", "model.tie_embeddings=false",
                                "loss.weights.text=0", "mesh.rules=[[batch, data], [embed, null]]"])
    assert config.trainer.steps == 50
    assert config.loss.z_loss == 1e-3  # YAML 1.1 reads "1e-3" as a string; a float field takes it
    assert config.model.tie_embeddings is False
    assert config.loss.weights.text == 0.0 and isinstance(config.loss.weights.text, float)
    assert config.mesh.rules == (("batch", "data"), ("embed", None))
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(None, ["trainer.steps"])


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.step=5", ["'trainer.step'", "did you mean 'trainer.steps'"]),
        ("modle.d_model=3", ["'modle'", "did you mean 'model'"]),
        ("model.n_head=3", ["'model.n_head'", "'model.n_heads'"]),
        ("checkpoint.evry=3", ["'checkpoint.evry'", "'checkpoint.every'"]),
        ("data.sources=[{path: a.jsonl, wieght: 2}]", ["'data.sources[0].wieght'", "'data.sources[0].weight'"]),
        ("trainer.steps=abc", ["'trainer.steps' must be an integer", "'abc'"]),
        ("trainer.steps=1.5", ["'trainer.steps' must be an integer"]),
        ("optimizer.learning_rate=fast", ["'optimizer.learning_rate' must be a number"]),
        ("trainer.progress=maybe", ["'trainer.progress' must be true or false"]),
        ("optimizer.decay=cos", ["'optimizer.decay'", "'cosine'", "did you mean 'cosine'"]),
        ("loss.impl=fused", ["'loss.impl'", "'pallas'"]),
        ("trainer=3", ["'trainer' must be a mapping"]),
        ("model.n_kv_heads=3", ["model:", "n_kv_heads=3", "1, 2, 4"]),
        ("trainer.seq_len=100000", ["trainer.seq_len=100000", "model.max_seq_len"]),
        ("trainer.grad_accum=3", ["batch_size=16", "grad_accum=3"]),
        ("data.eval_fraction=2", ["eval_fraction"]),
        ("mesh.data=0", ["data=0"]),
    ],
)
def test_bad_values_and_unknown_keys_are_refused_naming_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    for word in words:
        assert word in str(e.value)


def test_unknown_key_in_a_file_names_the_file_and_closest_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {CONFIGS_DIR / 'default.yaml'}\noptimizer:\n  learning_rat: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "'optimizer.learning_rat'" in str(e.value) and "'optimizer.learning_rate'" in str(e.value)


def test_relative_paths_resolve_against_the_file_that_wrote_them(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    overlay = tmp_path / "sub" / "run.yaml"
    overlay.write_text(
        f"base: {CONFIGS_DIR / 'default.yaml'}\n"
        "data:\n  sources: [{path: corpus/*.jsonl, weight: 2}]\n"
    )
    config = load_config(overlay)
    assert config.data.sources[0].path == tmp_path / "sub" / "corpus" / "*.jsonl"
    assert config.data.tokenizer == REPO_ROOT / "tokenizer" / "sample.model"  # from default.yaml
    monkeypatch.chdir(tmp_path)
    assert load_config(overlay, ["data.tokenizer=my.model"]).data.tokenizer == tmp_path / "my.model"


def test_base_chains_merge_key_by_key_and_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {CONFIGS_DIR / 'tiny.yaml'}\ntrainer: {{steps: 7}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrainer: {batch_size: 4}\n")
    config = load_config(tmp_path / "b.yaml")
    assert (config.trainer.steps, config.trainer.batch_size, config.model.d_model) == (7, 4, 64)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(UserError, match="loops"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    raw = config_to_dict(load_config())
    del raw["trainer"]["steps"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="'trainer.steps' is required"):
        load_config(path)


def test_role_weights_as_array_is_indexed_by_role():
    weights = RoleWeights(text=0.0, thinking=2.0, mantra=0.5, tag=1.0).as_array()
    assert weights.dtype == np.float32 and weights.shape == (NUM_ROLES,)
    assert weights[Role.PAD] == 0 and weights[Role.TEXT] == 0 and weights[Role.THINKING] == 2
    assert weights[Role.MANTRA] == 0.5 and weights[Role.TAG] == 1
    with pytest.raises(UserError, match="every role weight is 0"):
        RoleWeights(text=0, thinking=0, mantra=0, tag=0)
    with pytest.raises(UserError, match=">= 0"):
        RoleWeights(text=-1.0)


def test_section_defaults_match_the_documented_ones():
    assert OptimizerConfig() == OptimizerConfig(
        learning_rate=3e-3, warmup_steps=50, decay="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.1, clip_norm=1.0,
    )
    assert CheckpointConfig() == CheckpointConfig(every=100, keep=3, async_save=True)
    assert LossConfig().z_loss == 1e-4 and LossConfig().impl == "auto"
    t = TrainerConfig(steps=1, batch_size=2, seq_len=3)
    assert (t.grad_accum, t.log_every, t.eval_every, t.eval_batches, t.seed, t.progress) == (1, 10, 100, 4, 0, True)
    assert all(f.kw_only for f in dataclasses.fields(RunConfig))


TINY = CONFIGS_DIR / "tiny.yaml"


@pytest.mark.hostile
@pytest.mark.parametrize("override, words", [
    (f"trainer.seed={2**70}", r"'trainer.seed' must be an integer in \[-2\*\*63, 2\*\*63\) \(numpy and jax hold no more\), got 118059162071741130"),
    (f"trainer.seed={2**32}", r"trainer: seed=4294967296 must be in \[0, 2\*\*32\)"),
    ("trainer.seed=-1", r"trainer: seed=-1 must be in \[0, 2\*\*32\)"),
    (f"data.seed={2**70}", r"'data.seed' must be an integer in \[-2\*\*63, 2\*\*63\)"),
    (f"model.d_model={2**64}", r"'model.d_model' must be an integer in \[-2\*\*63, 2\*\*63\)"),
    (f"trainer.steps={2**40}", r"trainer: steps=1099511627776 is more than a run can count"),
    ("trainer.steps=" + "1" * 5000, r"value is not valid YAML: line 1, column 1: an integer of 5000 digits is too long"),
])
def test_an_integer_numpy_or_jax_cannot_hold_is_refused_naming_its_key(override, words):
    with pytest.raises(UserError, match=words) as info:
        load_config(TINY, [override])
    assert len(str(info.value)) < 600  # the value is shown cut, not in its 5,000 digits
    assert load_config(TINY, ["trainer.seed=4294967295"]).trainer.seed == 2**32 - 1


@pytest.mark.hostile
def test_a_huge_value_of_the_wrong_type_is_shown_cut(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {TINY}\ntrainer:\n  steps: [" + ", ".join(["lol"] * 100_000) + "]\n")
    with pytest.raises(UserError, match=r"'trainer.steps' must be an integer, got \['lol', 'lol', .*\.\.\.\] \(list of 100000\)") as info:
        load_config(config)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("override", ["trainer.wandb={project: p, api_key: s3cr3t-value}",
                                      "trainer.wandb.api_key=s3cr3t-value"])
def test_a_credential_in_a_config_is_refused_without_being_echoed(override):
    with pytest.raises(UserError, match="credentials are never read from a config") as error:
        load_config(CONFIGS_DIR / "tiny.yaml", [override])
    assert "s3cr3t-value" not in str(error.value) and "WANDB_API_KEY" in str(error.value)


def test_kept_steps_past_the_run_are_refused():
    with pytest.raises(UserError, match=r"checkpoint.keep_steps \[900\] are past trainer.steps=10"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["trainer.steps=10", "checkpoint.keep_steps=[5, 900]"])
