"""`metatrain eval --self-think`: the text scored after thoughts a real tiny checkpoint writes itself."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.cli import main
from metatrain.config import LossConfig
from metatrain.evaluation.report import EvalSettings
from metatrain.evaluation.self_think import file_source_documents, run_self_think
from metatrain.generate.generator import Generator
from metatrain.io.paths import REPO_ROOT
from metatrain.run.reader import load_checkpoint

SYNTHETIC = REPO_ROOT / "data" / "sample" / "synthetic.jsonl"  # every document has thinking
QUICK = ["--data", str(SYNTHETIC), "--max-documents", "6", "--no-probes", "--bootstrap", "100", "--batch-rows", "4",
         "--self-think-tokens", "12"]


def _eval(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy(workdir, tmp_path_factory):
    """One greedy self-think evaluation (free generation on, with its default samples)."""
    out = tmp_path_factory.mktemp("self") / "greedy"
    assert main(["eval", "--workdir", str(workdir), "--out", str(out), "--self-think", *QUICK,
                 "--prompts", "1", "--max-new-tokens", "8"]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_the_report_has_the_self_think_keys(greedy):
    out, r = greedy
    st = r["self_think"]
    assert set(st) >= {"self", "none", "self_minus_none", "points", "samples", "max_new_tokens"}
    for key in ("self", "none"):
        assert set(st[key]) >= {"bpb/text", "loss/text"}
    diff = st["self_minus_none"]
    assert set(diff) >= {"bpb/text", "ci", "documents"}
    assert diff["bpb/text"] == pytest.approx(st["self"]["bpb/text"] - st["none"]["bpb/text"], abs=1e-12)
    assert diff["documents"] == 6 and diff["ci"] is None and "too few documents" in diff["note"]
    assert st["samples"] is None and st["temperature"] == 0.0 and st["max_new_tokens"] == 12
    # synthetic.jsonl's first 6 documents: 6 blocks, one in AI mode right after quoted human text
    assert st["points"] == 6 and st["points_skipped"] == 0
    assert st["thoughts"]["written"] == 6 and st["thoughts"]["empty"] < 6  # this checkpoint does think
    assert st["tokens/text"] == r["tokens/text"]
    # `none` is the ablation's `removed` of the same documents: the same text, the blocks gone.
    assert st["none"]["bpb/text"] == pytest.approx(r["ablation"]["removed"]["bpb/text"], abs=1e-12)
    assert r["free_generation"]["samples_per_prompt"] == 4  # --samples not given: free generation's default
    records = _records(out / "self_think.jsonl")
    originals = _records(SYNTHETIC)[:6]
    assert [x["id"] for x in records] == [x["id"] for x in originals]
    for got, was in zip(records, originals):
        assert got["source"] == was["source"]  # metadata kept
        assert [s["text"] for s in got["segments"] if s["kind"] == "text"] == \
            [s["text"] for s in was["segments"] if s["kind"] == "text"]
        thoughts = [s["text"] for s in got["segments"] if s["kind"] == "thinking"]
        assert got["self_think"]["written"] == len(thoughts) and all(thoughts)
        assert not set(thoughts) & {s["text"] for s in was["segments"] if s["kind"] == "thinking"}


def test_self_equals_the_ordinary_evaluation_of_the_written_documents(workdir, greedy, capsys, tmp_path):
    out, r = greedy
    code, printed, err = _eval(capsys, "--workdir", str(workdir), "--data", str(out / "self_think.jsonl"),
                               "--out", str(tmp_path / "again"), "--no-probes", "--no-generation", "--json")
    assert code == 0, err
    again = json.loads(printed)["ablation"]
    st = r["self_think"]
    assert again["kept"]["bpb/text"] == pytest.approx(st["self"]["bpb/text"], rel=1e-12)
    assert again["kept"]["loss/text"] == pytest.approx(st["self"]["loss/text"], rel=1e-12)
    assert again["removed"]["bpb/text"] == pytest.approx(st["none"]["bpb/text"], rel=1e-12)
    assert again["kept"]["tokens/text"] == st["tokens/text"]


def test_greedy_is_deterministic_and_samples_are_seeded(workdir, greedy, capsys, tmp_path):
    out, r = greedy
    base = ["--workdir", str(workdir), "--self-think", *QUICK, "--no-generation", "--json"]
    code, printed, _ = _eval(capsys, *base, "--out", str(tmp_path / "g"))
    assert code == 0
    assert json.loads(printed)["self_think"] == r["self_think"]
    assert (tmp_path / "g" / "self_think.jsonl").read_text() == (out / "self_think.jsonl").read_text()
    sampled = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):  # 3 documents: 3 points
        code, printed, _ = _eval(capsys, *base, "--max-documents", "3", "--samples", "2", "--seed", seed,
                                 "--out", str(tmp_path / name))
        assert code == 0
        sampled.append((json.loads(printed)["self_think"], (tmp_path / name / "self_think.jsonl").read_text()))
    assert sampled[0] == sampled[1]
    assert sampled[0][1] != sampled[2][1]
    greedy_lines = (out / "self_think.jsonl").read_text().splitlines()[:3]
    assert sampled[0][1].splitlines() != greedy_lines
    st = sampled[0][0]
    assert st["samples"] == 2 and st["temperature"] == 1.0 and st["thoughts"]["written"] == 2 * 3
    assert st["none"] == sampled[2][0]["none"]  # the same text with no thought, whatever was sampled
    assert all(x["self_think"]["samples"] == 2 and x["self_think"]["sample"] == 0
               for x in _records(tmp_path / "a" / "self_think.jsonl"))


def test_a_model_that_never_thinks_scores_exactly_no_thought(workdir):
    """The `</thinking>` row of the tied embedding gets a huge component along a direction that
    every hidden state holds (a constant added to one embedding dimension of every token
    dominates the residual stream, so the final norm's output points along it): greedy
    closes every block at once, and self-thinking must score exactly `none`."""
    loaded = load_checkpoint(workdir)
    params = jax.tree_util.tree_map(lambda x: x, loaded.params)
    encoder = loaded.encoder
    scale = np.asarray(params["final_norm"]["scale"])
    d0 = int(np.argmax(scale))
    assert scale[d0] > 0
    table = np.asarray(params["embedding"]["table"]).copy()
    table[:, d0] += 100.0
    table[encoder.tag_ids["</thinking>"], d0] += 100.0
    params["embedding"] = {"table": jnp.asarray(table)}
    generator = Generator(params, loaded.model_config, encoder)
    sources = file_source_documents([str(SYNTHETIC)], encoder, limit=4)
    settings = EvalSettings(seq_len=32, batch_rows=4, resamples=0, self_think=True, self_think_tokens=8)
    result = run_self_think(generator, LossConfig(), sources, settings)
    st = result.report
    assert st["points"] == 4 and st["thoughts"]["written"] == 4
    assert st["thoughts"]["empty"] == st["thoughts"]["written"]  # it never thinks
    assert st["self"] == st["none"] and st["self_minus_none"]["bpb/text"] == 0.0
    assert not any(s["kind"] == "thinking" for r in result.records for s in r["segments"])
    # (The unedited checkpoint does write thoughts on these documents: `greedy`'s report.)


def test_the_held_out_split_is_read_with_its_segments(workdir, capsys):
    code, printed, err = _eval(capsys, "--workdir", str(workdir), "--self-think", "--self-think-tokens", "4",
                               "--max-documents", "2", "--no-probes", "--no-generation", "--json", "--seq-len", "32")
    assert code == 0, err
    r = json.loads(printed)
    assert "held-out split" in r["data"] and r["documents"] == 2
    assert r["self_think"]["points"] > 0 and r["self_think"]["none"]["bpb/text"] == \
        pytest.approx(r["ablation"]["removed"]["bpb/text"], abs=1e-12)


def test_the_tables_show_self_thinking(workdir, capsys, tmp_path):
    code, printed, _ = _eval(capsys, "--workdir", str(workdir), "--self-think", *QUICK, "--no-generation",
                             "--out", str(tmp_path / "t"))
    assert code == 0
    assert "self-thinking: 6 points in 6 documents, greedy, up to 12 tokens a thought" in printed
    assert "- none (bpb)" in printed and "points skipped" not in printed


@pytest.mark.parametrize("flags, message", [
    (["--self-think-tokens", "0"], "--self-think-tokens must be >= 1, got 0"),
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--samples", "2", "--temperature", "0"], "--temperature above 0"),
])
def test_bad_values_are_refused_in_one_line(capsys, tmp_path, flags, message):
    code, _, err = _eval(capsys, "--workdir", str(tmp_path), "--self-think", *flags)  # refused before loading
    assert code == 2
    (line,) = err.strip().splitlines()
    assert message in line


def test_a_foreign_self_think_file_is_never_overwritten(workdir, capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "self_think.jsonl").write_text("mine\n")
    code, _, err = _eval(capsys, "--workdir", str(workdir), "--self-think", *QUICK, "--out", str(out))
    assert code == 2 and "self_think.jsonl that `metatrain eval` did not write" in err
    assert (out / "self_think.jsonl").read_text() == "mine\n"
