"""Sweep specs and `sweep plan`: validation messages, resolved configs, the manifest; a sweep
directory on local disk and in a bucket (`store`)."""

import json
import re

import pytest
import yaml

from metatrain.cli import main
from metatrain.config import load_config
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR, SAMPLE_CORPUS
from metatrain.sweep.manifest import REQUIRED_KEYS, read_manifest
from metatrain.sweep.plan import plan_sweep
from metatrain.sweep.run import launch_commands
from metatrain.sweep.spec import load_spec

from .conftest import GRID_SPEC, TINY, write_spec

SWEEP_SPECS = sorted((CONFIGS_DIR / "sweeps").glob("*.yaml"))

GRID = """\
grid:
  sizes: [tiny-1, tiny-2, tiny-3]
  tokens: [2048, 4096]
"""


@pytest.mark.parametrize("path", SWEEP_SPECS, ids=lambda p: p.name)
def test_shipped_specs_plan(path, tmp_path):
    runs = plan_sweep(path, tmp_path / "sweep")
    assert runs and all(r.config.trainer.steps >= 1 for r in runs)


def test_plan_writes_loadable_configs_and_a_manifest(tmp_path):
    spec = write_spec(tmp_path, GRID + "overrides: {trainer.eval_batches: 1}\n")
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", "--spec", str(spec), "--out", str(out)]) == 0
    records = read_manifest(out)
    assert [r["name"] for r in records] == [
        f"tiny-{n}.D{d}" for n in (1, 2, 3) for d in (2048, 4096)
    ]
    tiny = load_config(TINY)
    for r in records:
        assert set(REQUIRED_KEYS) <= set(r) and "variant" not in r
        assert r["status"] == "planned" and r["loss"] is None
        config = load_config(out / r["config"])
        assert config.trainer.eval_batches == 1
        assert config.trainer.steps == r["steps"] == r["tokens"] // tiny.tokens_per_step
        assert r["tokens"] == config.total_tokens
        assert r["params"] == config.model.num_non_embedding_params
        assert r["embedding_params"] == config.model.num_embedding_params
        assert r["flops"] == config.model.flops_per_token(config.trainer.seq_len) * r["tokens"]
        assert config.model.n_layers == int(r["size"].split("-")[1])
        assert config.data == tiny.data  # paths stay absolute and equal
    assert (out / records[0]["workdir"]).is_dir()


def test_variants_cross_the_grid(tmp_path):
    spec = write_spec(tmp_path, GRID + "variants:\n  joint: {}\n  text_only: {loss.weights.thinking: 0.0}\n")
    runs = plan_sweep(spec, tmp_path / "sweep")
    assert len(runs) == 12
    by_variant = {}
    for run in runs:
        by_variant.setdefault(run.record["variant"], []).append(run)
        assert run.record["name"].startswith(run.record["variant"] + ".")
    assert {r.config.loss.weights.thinking for r in by_variant["joint"]} == {1.0}
    assert {r.config.loss.weights.thinking for r in by_variant["text_only"]} == {0.0}
    assert [r.record["tokens"] for r in by_variant["joint"]] == [r.record["tokens"] for r in by_variant["text_only"]]


def test_count_text_tokens_gives_a_corpus_with_thinking_more_steps(tmp_path):
    """Equal *text* tokens: the corpus with thinking blocks trains on more tokens in all."""
    no_thinking = tmp_path / "no_thinking.jsonl"
    with open(SAMPLE_CORPUS) as f, open(no_thinking, "w") as out:
        for line in f:
            doc = json.loads(line)
            doc["segments"] = [s for s in doc["segments"] if s["kind"] != "thinking"]
            out.write(json.dumps(doc) + "\n")
    spec = write_spec(
        tmp_path,
        """\
        grid: {sizes: [tiny-1, tiny-2], tokens: [8192, 16384]}
        count_tokens: text
        variants:
          with_thinking: {}
          without_thinking: {data.sources: [{path: no_thinking.jsonl}]}
        """,
    )
    records = {r.record["name"]: r.record for r in plan_sweep(spec, tmp_path / "sweep")}
    with_t, without_t = records["with_thinking.tiny-1.D8192"], records["without_thinking.tiny-1.D8192"]
    assert without_t["text_fraction"] > 0.95 > 0.8 > with_t["text_fraction"] > 0.3
    assert with_t["steps"] > without_t["steps"]
    for r in records.values():  # each sees about the requested text tokens (to one step)
        requested = float(r["name"].rsplit(".D", 1)[1])
        assert abs(r["text_tokens"] - requested) <= r["text_fraction"] * r["batch_size"] * r["seq_len"]
    config = load_config(tmp_path / "sweep" / records["without_thinking.tiny-2.D8192"]["config"])
    assert [s.path for s in config.data.sources] == [no_thinking]  # relative to the spec


def test_isoflop_plan_centres_sizes_and_spends_the_budget(tmp_path):
    spec = write_spec(
        tmp_path,
        """\
        isoflop: {budgets: [3.0e10, 3.0e11], sizes_per_budget: 3, tokens_per_param: 0.5}
        """,
    )
    records = [r.record for r in plan_sweep(spec, tmp_path / "sweep")]
    assert len(records) == 6
    for budget in (3e10, 3e11):
        on = [r for r in records if r["budget"] == budget]
        assert len({r["size"] for r in on}) == 3
        for r in on:  # tokens rounded to whole steps: within half a step's compute
            step_flops = r["flops_per_token"] * r["batch_size"] * r["seq_len"]
            assert abs(r["flops"] - budget) <= step_flops / 2
    # tokens per parameter nearest 0.5: tiny-2 at 3e10 FLOPs, tiny-3 at 3e11 (centred)
    assert [r["size"] for r in records] == ["tiny-1", "tiny-2", "tiny-3", "tiny-2", "tiny-3", "tiny-4"]


def test_replanning_is_idempotent_but_a_different_plan_is_refused(tmp_path):
    out = tmp_path / "sweep"
    spec = write_spec(tmp_path, GRID)
    plan_sweep(spec, out)
    records = read_manifest(out)
    records[0]["status"] = "done"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plan_sweep(spec, out)
    assert read_manifest(out)[0]["status"] == "done"  # kept
    other = write_spec(tmp_path, GRID.replace("4096", "8192"), name="other.yaml")
    with pytest.raises(UserError, match="already holds a different sweep"):
        plan_sweep(other, out)


@pytest.mark.parametrize(
    "body, words",
    [
        (GRID.replace("sizes:", "size:"), ["unknown config key 'grid.size'", "did you mean 'grid.sizes'"]),
        ("grid: {sizes: [tiny-1], tokens: [1]}\nisoflop: {budgets: [1.0e10]}\n", ["exactly one of", "both"]),
        ("family: tiny\n", ["exactly one of", "neither"]),
        ("grid: {sizes: [tiny-9], tokens: [1024]}\n", ["'tiny-9' is not in family 'tiny'"]),
        ("grid: {sizes: [tiny-1], tokens: [-5]}\n", ["grid.tokens", "-5"]),
        ("isoflop: {budgets: [1.0e10], sizes_per_budget: 2}\n", ["sizes_per_budget=2", "at least 3"]),
        (GRID + "overrides: {trainer.steps: 3}\n", ["trainer.steps is set by the sweep"]),
        (GRID + "overrides: {model.n_layers: 2}\n", ["overrides: model.n_layers is set by each point's size"]),
        (GRID + "variants: {wide: {model.d_model: 512}}\n", ["variants.wide: model.d_model is set by each"]),
        ("isoflop: {budgets: [1.0e10]}\ncount_tokens: text\n", ["count_tokens: text applies to `grid:`"]),
        (GRID + "variants: {'a b': {}}\n", ["variant name 'a b'"]),
        (GRID + "count_tokens: some\n", ["count_tokens", "'all', 'text'"]),
    ],
    ids=["unknown-key", "both", "neither", "unknown-size", "negative-tokens", "two-sizes-per-budget",
         "steps-override", "depth-override", "width-variant", "text-tokens-isoflop", "variant-name", "count-tokens-choice"],
)
def test_bad_specs_are_refused_with_the_reason(tmp_path, body, words):
    with pytest.raises(UserError) as e:
        load_spec(write_spec(tmp_path, body))
    for word in words:
        assert word in str(e.value)


def test_bad_overrides_name_the_variant_and_key(tmp_path):
    spec = write_spec(tmp_path, GRID + "variants:\n  typo: {loss.weights.thinkin: 0.0}\n")
    with pytest.raises(UserError) as e:
        plan_sweep(spec, tmp_path / "sweep")
    assert "variant 'typo'" in str(e.value) and "loss.weights.thinkin" in str(e.value)
    assert "did you mean 'loss.weights.thinking'" in str(e.value)
    no_eval = write_spec(tmp_path, GRID + "overrides: {trainer.eval_every: 0}\n")
    with pytest.raises(UserError, match="eval_every is 0"):
        plan_sweep(no_eval, tmp_path / "sweep2")
    too_small = write_spec(tmp_path, "grid: {sizes: [tiny-1, tiny-2], tokens: [100, 2048]}\n")
    with pytest.raises(UserError, match="less than one step of 1024"):
        plan_sweep(too_small, tmp_path / "sweep3")


@pytest.mark.parametrize("setting", ["trainer.steps=3", "model.head_dim=8", " model.n_layers =4"])
def test_a_set_the_sweep_would_replace_is_refused(tmp_path, setting):
    with pytest.raises(UserError, match=f"--set: {setting.split('=')[0].strip()} is set by"):
        plan_sweep(write_spec(tmp_path, GRID), tmp_path / "sweep", [setting])
    assert not (tmp_path / "sweep").exists(), "nothing is written"
    plan_sweep(write_spec(tmp_path, GRID), tmp_path / "sweep", ["model.mup_base_width=32"])  # not a shape key


def test_launch_commands_for_here_and_for_a_cluster(tmp_path, capsys):
    out = tmp_path / "sweep"
    plan_sweep(write_spec(tmp_path, GRID), out)
    records = read_manifest(out)
    records[0]["status"] = "done"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    local = launch_commands(out, "local")
    assert len(local) == 5  # the done point is not relaunched
    assert local[0] == f"metatrain train --config {out}/runs/tiny-1.D4096/config.yaml --workdir {out}/runs/tiny-1.D4096"
    assert main(["sweep", "run", str(out), "--emit", "slurm", "--launch-arg=--nodes=2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("metatrain launch slurm --nodes=2 --dry-run -- train --config ")
    assert yaml.safe_load((out / "runs/tiny-2.D2048/config.yaml").read_text())["trainer"]["steps"] == 2


def test_plan_writes_configs_and_manifest_into_a_store(grid_spec, store, capsys):
    out = f"{store}/sweep"
    assert main(["sweep", "plan", "--spec", str(grid_spec), "--out", out]) == 0
    assert f"planned 6 runs in {out}/manifest.jsonl" in capsys.readouterr().out
    records = read_manifest(out)
    assert store.files("sweep") == sorted(["manifest.jsonl", *(r["config"] for r in records)])
    assert all(r["status"] == "planned" for r in records)

    assert main(["sweep", "plan", "--spec", str(grid_spec), "--out", out]) == 0  # the same plan: a no-op
    assert "already holds this plan" in capsys.readouterr().out
    grid_spec.write_text(GRID_SPEC.replace("4096", "8192"))
    with pytest.raises(UserError, match="already holds a different sweep"):
        plan_sweep(grid_spec, out)

    commands = launch_commands(out, "local")  # reads every point's config from the store
    assert commands[0] == (f"metatrain train --config {out}/runs/tiny-1.D2048/config.yaml "
                           f"--workdir {out}/runs/tiny-1.D2048")


# -- hostile specs (issue 25): never a plan `sweep run` refuses, never an impossible run -----


@pytest.mark.hostile
@pytest.mark.parametrize("body, says", [
    ("grid:\n  sizes: [tiny-1, tiny-2]\n  tokens: [1000000, 1000001]\n",
     "grid.tokens 1000000 and 1000001 both name the run tiny-1.D1e06"),
    ("isoflop:\n  budgets: [1.0e11, 1.001e11]\n  sizes_per_budget: 3\n",
     "isoflop.budgets 1e+11 and 1.001e+11 both name the run C1e11.tiny-"),
], ids=["grid", "isoflop"])
def test_plan_refuses_points_whose_names_collide(tmp_path, body, says):
    spec = write_spec(tmp_path, "overrides: {trainer.eval_every: 2}\n" + body)
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match="^" + re.escape(says)) as info:
        plan_sweep(spec, out)
    assert "\n" not in str(info.value)
    assert not out.exists()  # nothing `sweep run` would refuse is written


@pytest.mark.hostile
@pytest.mark.parametrize("body, says", [
    ("grid:\n  sizes: [tiny-1]\n  tokens: [1.0e30]\n", "grid.tokens: 1e+30 tokens"),
    ("isoflop:\n  budgets: [1.0e40]\n  sizes_per_budget: 3\n", "isoflop.budgets: 1e+40 FLOPs"),
    ("grid:\n  sizes: [tiny-1]\n  tokens: [2048.5]\n", "grid.tokens: 2048.5 is not a whole number of tokens"),
], ids=["tokens", "budget", "fraction"])
def test_plan_refuses_impossible_token_counts_in_one_line(tmp_path, body, says):
    spec = write_spec(tmp_path, "overrides: {trainer.eval_every: 2}\n" + body)
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match=re.escape(says)) as info:
        plan_sweep(spec, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
