"""Hostile values in settings: non-finite numbers in a run config, blank mantras. Each is
refused in one line naming the key or flag, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metatrain.cli import main
from metatrain.config import load_config
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR, SAMPLE_TOKENIZER

pytestmark = pytest.mark.hostile

TINY = CONFIGS_DIR / "tiny.yaml"


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e400", "-1e999",
                                   "1" + "0" * 400])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(value):
    with pytest.raises(UserError, match=r"'optimizer.learning_rate' must be a finite number"):
        load_config(TINY, [f"optimizer.learning_rate={value}"])


@pytest.mark.parametrize("key", ["loss.z_loss", "optimizer.clip_norm", "loss.weights.thinking",
                                 "optimizer.eps"])
def test_every_float_setting_refuses_infinity(key):
    with pytest.raises(UserError, match=rf"'{key}' must be a finite number"):
        load_config(TINY, [f"{key}=.inf"])


def test_a_non_finite_number_in_a_yaml_file_names_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {TINY}\noptimizer:\n  learning_rate: .inf\n")
    with pytest.raises(UserError, match=rf"^{config}.*'optimizer.learning_rate' must be a finite number, got inf"):
        load_config(config)


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "a", "segments": [{"kind": "text", "text": "Hi.\n"},
                                                        {"kind": "thinking", "text": "Why?"}]}) + "\n")
    return path


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_encode_refuses_an_empty_or_blank_mantra_file(docs, tmp_path, capsys, content):
    mantra = tmp_path / "mantra.txt"
    mantra.write_text(content)
    out = tmp_path / "out.jsonl"
    code = main(["encode", "--tokenizer", str(SAMPLE_TOKENIZER), "--input", str(docs), "--output", str(out),
                 "--mantra-file", str(mantra)])
    err = capsys.readouterr().err
    assert code == 2 and f"--mantra-file {mantra} is" in err and "mantra policy `none`" in err
    assert not out.exists()


@pytest.mark.parametrize("mantra", ["", "   ", "\n"])
def test_data_cache_refuses_a_blank_mantra(docs, tmp_path, capsys, mantra):
    out = tmp_path / "cache"
    code = main(["data", "cache", "--input", str(docs), "--tokenizer", str(SAMPLE_TOKENIZER),
                 "--out", str(out), "--mantra", mantra, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--mantra is" in err and "mantra policy `none`" in err
    assert not out.exists()


def test_tokenizer_train_refuses_an_empty_mantra_file(docs, tmp_path, capsys):
    mantra = tmp_path / "mantra.txt"
    mantra.write_text("")
    code = main(["tokenizer", "train", "--input", str(docs), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok"), "--mantra-file", str(mantra)])
    assert code == 2 and "--mantra-file" in capsys.readouterr().err
    assert not (tmp_path / "tok.model").exists()


def test_a_directory_as_config_or_base_is_named_as_a_directory(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(UserError, match=r"^config file .*/configs is a directory; give a YAML file$"):
        load_config(tmp_path / "configs")
    child = tmp_path / "run.yaml"
    child.write_text("base: configs\n")
    with pytest.raises(UserError, match=rf"^{child}: `base:` .*/configs is a directory; give a YAML file$"):
        load_config(child)
