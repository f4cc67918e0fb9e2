"""`sweep plan` and `sweep run --emit` refuse a point whose model vocabulary is not its tokenizer's."""

import json
from pathlib import Path

import pytest
import yaml

import metatrain.sweep.plan as plan_module
import metatrain.tokenizer.spm as spm
from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.sweep.manifest import manifest_path, read_manifest
from metatrain.sweep.plan import plan_sweep
from metatrain.sweep.run import launch_commands

from .conftest import write_spec

GRID = "grid: {sizes: [tiny-1, tiny-2, tiny-3], tokens: [2048, 4096]}\n"


def refusal(spec: Path, out: Path) -> str:
    with pytest.raises(UserError) as e:
        plan_sweep(spec, out)
    return str(e.value)


def test_a_grid_point_with_another_vocabulary_is_refused_with_both_sizes(tmp_path, capsys):
    spec = write_spec(tmp_path, GRID + "overrides: {model.vocab_size: 4000}\n")
    message = refusal(spec, tmp_path / "sweep")
    assert "\n" not in message
    assert message.startswith("sweep point tiny-1.D2048: model.vocab_size=4000 but the tokenizer ")
    assert "has 4096 pieces" in message and "--set model.vocab_size=4096" in message
    assert not manifest_path(tmp_path / "sweep").exists()  # nothing written
    # From the command line: one line on stderr, exit status 2, no traceback.
    assert main(["sweep", "plan", "--spec", str(spec), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "sweep point tiny-1.D2048" in err and "4000" in err and "4096" in err
    # --set on the command line is checked too.
    good = write_spec(tmp_path, GRID, name="good.yaml")
    assert main(["sweep", "plan", "--spec", str(good), "--out", str(tmp_path / "set"), "--set", "model.vocab_size=5000"]) == 2
    assert "model.vocab_size=5000" in capsys.readouterr().err


def test_the_refused_point_is_the_one_of_the_bad_variant(tmp_path):
    spec = write_spec(tmp_path, GRID + "variants:\n  ok: {}\n  wide: {model.vocab_size: 8192}\n")
    message = refusal(spec, tmp_path / "sweep")
    assert message.startswith("sweep point wide.tiny-1.D2048: model.vocab_size=8192")


def test_an_isoflop_point_with_another_vocabulary_is_refused(tmp_path):
    spec = write_spec(tmp_path, "isoflop: {budgets: [3.0e10], sizes_per_budget: 3, tokens_per_param: 0.5}\n"
                                "overrides: {model.vocab_size: 4000}\n")
    message = refusal(spec, tmp_path / "sweep")
    assert message.startswith("sweep point C3e10.tiny-1: model.vocab_size=4000")


def test_the_check_comes_before_counting_text_tokens(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the vocabulary was checked")

    monkeypatch.setattr(plan_module, "text_token_fraction", no_data)
    spec = write_spec(tmp_path, GRID + "count_tokens: text\noverrides: {model.vocab_size: 4000}\n")
    assert "model.vocab_size=4000" in refusal(spec, tmp_path / "sweep")


def test_each_vocabulary_and_tokenizer_pair_is_read_once(tmp_path, monkeypatch):
    calls = []
    real = spm.check_vocab_size
    monkeypatch.setattr(spm, "check_vocab_size", lambda size, path: (calls.append((size, str(path))), real(size, path)))
    spec = write_spec(tmp_path, GRID + "variants:\n  joint: {}\n  text_only: {loss.weights.thinking: 0.0}\n")
    assert len(plan_sweep(spec, tmp_path / "sweep")) == 12
    assert len(calls) == 1 and calls[0][0] == 4096
    calls.clear()
    assert len(launch_commands(tmp_path / "sweep", "local")) == 12
    assert len(calls) == 1


def test_a_tokenizer_that_is_not_here_is_left_to_the_trainer(tmp_path):
    spec = write_spec(tmp_path, GRID + "overrides: {model.vocab_size: 32768, data.tokenizer: cluster/32k.model}\n")
    runs = plan_sweep(spec, tmp_path / "sweep")
    assert len(runs) == 6 and {r.config.model.vocab_size for r in runs} == {32768}
    assert len(launch_commands(tmp_path / "sweep", "slurm")) == 6


def test_emit_refuses_a_point_whose_config_was_changed_after_planning(tmp_path, capsys):
    out = tmp_path / "sweep"
    plan_sweep(write_spec(tmp_path, GRID), out)
    record = read_manifest(out)[3]
    config_file = out / record["config"]
    config = yaml.safe_load(config_file.read_text())
    config["model"]["vocab_size"] = 4000
    config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=rf"^sweep point {record['name']}: model.vocab_size=4000 .* 4096 pieces"):
        launch_commands(out, "local")
    assert main(["sweep", "run", str(out), "--emit", "slurm", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no command is emitted
    assert record["name"] in captured.err and "Traceback" not in captured.err
    # A done point is not emitted, so it is not checked either.
    records = read_manifest(out)
    records[3]["status"] = "done"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(launch_commands(out, "local")) == 5
