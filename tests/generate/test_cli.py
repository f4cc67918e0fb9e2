"""`metatrain generate` and the sample printed after `metatrain train`; a work directory on
local disk and in a bucket (`stored_run`)."""

import argparse
import json
import shutil
import types

import numpy as np
import pytest

from metatrain.cli import main
from metatrain.documents import Document, Segment
from metatrain.generate.generator import render_ids

# Same batch (2), budget (12) and default sampling as test_generator: no new compile.
ARGS = ["--max-new-tokens", "12", "--seed", "5"]


def _generate(capsys, *argv):
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_has_ids_text_and_segments_recovered_from_the_ids(capsys, workdir, encoder):
    code, out, _ = _generate(capsys, "--workdir", str(workdir), "--prompt", "Text with <AI> in it",
                             "--prompt", "Another", "--json", *ARGS)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (1, 0)]
    for r in records:
        assert len(r["ids"]) == 12 and r["finish_reason"] == "length"
        assert r["text"] == encoder.decode(r["ids"])
        segments = [{"kind": s.kind, "mode": s.mode, "text": s.text, "control": s.control}
                    for s in encoder.decode_segments(r["ids"])]
        assert r["segments"] == segments


def test_ai_mode_starts_after_the_ai_tag_and_never_leaves_it(capsys, workdir, encoder):
    code, out, _ = _generate(capsys, "--workdir", str(workdir), "--prompt", "Q", "--prompt", "R",
                             "--mode", "ai", "--json", *ARGS)
    assert code == 0
    for r in map(json.loads, out.splitlines()):
        assert r["ids"][0] == encoder.tag_ids["<AI>"] and r["text"].startswith("<AI>")
        assert {s["mode"] for s in r["segments"]} <= {"ai", "ai_quoting_human"}


def test_plain_output_and_checkpoint_path_give_the_same_samples(capsys, workdir):
    step = max((workdir / "checkpoints").iterdir(), key=lambda p: int(p.name))
    _, by_workdir, _ = _generate(capsys, "--workdir", str(workdir), "--prompt", "Hi", "--num-samples", "2", *ARGS)
    _, by_path, _ = _generate(capsys, "--checkpoint", str(step), "--prompt", "Hi", "--num-samples", "2", *ARGS)
    assert by_workdir == by_path
    assert by_workdir.startswith("=== prompt 1, sample 1 (length) ===\nHi")
    assert "=== prompt 1, sample 2" in by_workdir


def test_hide_thinking_drops_whole_thinking_blocks(encoder):
    doc = Document("d", (Segment("text", "Before."), Segment("thinking", "a private thought"),
                         Segment("text", " After.")))
    ids = encoder.encode(doc).ids
    start = encoder.grammar.initial_state()
    shown = render_ids(encoder, ids, start)
    assert "<thinking>" in shown and "a private thought" in shown and "I feel no fear." in shown
    assert render_ids(encoder, ids, start, hide_thinking=True) == "Before. After."
    # Cut inside a block (a generation out of budget): the open block is hidden too.
    cut = ids[: int(np.flatnonzero(ids == encoder.tag_ids["<thinking>"])[0]) + 5]
    assert render_ids(encoder, cut, start, hide_thinking=True) == "Before."


def test_a_tokenizer_lacking_a_grammar_tag_is_refused(capsys, workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    tags = (run / "tags.yaml").read_text().replace('bad: "<|bad|>"', 'bad: "<|bad|>"\n  new: "<|new|>"')
    (run / "tags.yaml").write_text(tags)
    code, _, err = _generate(capsys, "--workdir", str(run), "--prompt", "x")
    assert code == 2 and "lacks tag(s) <|new|>" in err and "tokenizer extend" in err


def test_user_errors_exit_2_with_the_fix(capsys, workdir, tmp_path):
    code, _, err = _generate(capsys, "--workdir", str(tmp_path), "--prompt", "x")
    assert code == 2 and "no checkpoint" in err and "metatrain train --workdir" in err
    code, _, err = _generate(capsys, "--checkpoint", str(tmp_path), "--prompt", "x")
    assert code == 2 and "not a checkpoint step directory" in err
    code, _, err = _generate(capsys, "--workdir", str(workdir), "--prompt", "x", "--max-new-tokens", "1000")
    assert code == 2 and "ask for at most" in err
    code, _, err = _generate(capsys, "--workdir", str(workdir), "--prompt", "x", "--top-p", "0")
    assert code == 2 and "top-p" in err


def test_the_default_train_run_ends_with_a_sample_and_a_failed_sample_is_only_reported(
    capsys, workdir, monkeypatch
):
    import metatrain.generate.sample as generate_cli
    import metatrain.train.loop as loop
    from metatrain.cli.train import run_train

    monkeypatch.setattr(loop, "train", lambda config, path, **kwargs: types.SimpleNamespace(preempted=False))
    monkeypatch.setattr(loop, "format_summary", lambda summary: "trained (summary)")
    default = argparse.Namespace(config=None, workdir=workdir, overrides=[], allow_other_config=False, allow_changes=[])
    assert run_train(default) == 0
    out = capsys.readouterr().out
    assert out.startswith("trained (summary)\nsample (metatrain generate --workdir")
    assert "\nBackground:" in out

    assert run_train(argparse.Namespace(config=None, workdir=workdir, overrides=["trainer.steps=1"], allow_other_config=False, allow_changes=[])) == 0
    assert capsys.readouterr().out == "trained (summary)\n"  # not the embedded default: no sample

    def broken(path):
        raise RuntimeError("no device")

    monkeypatch.setattr(generate_cli, "training_sample", broken)
    assert run_train(default) == 0
    captured = capsys.readouterr()
    assert captured.out == "trained (summary)\n" and "could not print a sample: no device" in captured.err


def test_generation_from_a_store_equals_generation_from_disk(stored_run, workdir, capsys):
    args = ["--prompt", "Background:", "--num-samples", "2", "--max-new-tokens", "24", "--seed", "3", "--json"]
    code, remote, err = _generate(capsys, "--workdir", f"{stored_run}/run", *args)
    assert code == 0, err
    code, local, err = _generate(capsys, "--workdir", str(workdir), *args)
    assert code == 0, err
    assert [json.loads(line)["ids"] for line in remote.splitlines()] == [json.loads(line)["ids"] for line in local.splitlines()]


@pytest.mark.hostile
@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_a_seed_the_rng_cannot_take_is_refused_in_one_line(capsys, workdir, seed):
    code, out, err = _generate(capsys, "--workdir", str(workdir), "--prompt", "Hi", "--max-new-tokens", "4",
                               "--seed", seed)
    assert code == 2 and not out
    (line,) = err.strip().splitlines()
    assert line.startswith("metatrain generate: error: --seed") and f"{2**32 - 1}" in line


@pytest.mark.hostile
def test_more_samples_than_memory_holds_are_refused_before_decoding(capsys, workdir):
    code, out, err = _generate(capsys, "--workdir", str(workdir), "--prompt", "Hi", "--prompt", "Ho",
                               "--num-samples", "1000000")
    assert code == 2 and not out
    (line,) = err.strip().splitlines()
    assert line.startswith("metatrain generate: error: --num-samples 1000000") and "ask for at most" in line
