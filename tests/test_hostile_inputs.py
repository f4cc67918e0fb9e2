"""Hostile values in settings: non-finite numbers in a run config, blank mantras, config
files that are alias bombs, nested too deep, not UTF-8, not regular files or symlink
loops. Each is refused in one line naming the key, flag or file, before anything is written."""

from __future__ import annotations

import itertools
import json
import os
import re
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


# -- hostile config files: each is one line naming the file, exit 2, before any work ----------


def _alias_bomb(levels: int) -> str:
    """A list of lists, each holding nine aliases of the one before: 9**levels strings once expanded."""
    names = "abcdefghij"[:levels]
    text = "[&a [" + ",".join(["lol"] * 9) + "]"
    for previous, name in itertools.pairwise(names):
        text += f",&{name} [" + ",".join([f"*{previous}"] * 9) + "]"
    return text + "]"


def _config_of_kind(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.yaml"
    if kind == "alias bomb":  # 302 bytes; the message of a wrong type was 34.7 MB
        path.write_text(f"base: {TINY}\ntrainer:\n  seed: {_alias_bomb(7)}\n")
    elif kind == "deep":
        path.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    elif kind == "latin-1":
        path.write_bytes(b"trainer:\n  steps: 5  # caf\xe9\n")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "character device":
        path = Path("/dev/zero")
    elif kind == "symlink loop":
        (tmp_path / "other.yaml").symlink_to(path)
        path.symlink_to(tmp_path / "other.yaml")
    return path


@pytest.mark.parametrize("kind, words", [
    ("alias bomb", r"line 3, column \d+: aliases expand to more than 100,000 nodes"),
    ("deep", r"line 1, column 107: nested deeper than 100 levels"),
    ("latin-1", r"not UTF-8 text: byte 0xe9 at offset 26 \(line 2\); save it as UTF-8"),
    ("fifo", r"is a named pipe \(FIFO\), not a file; give a YAML file"),
    ("character device", r"is a character device, not a file; give a YAML file"),
    ("symlink loop", r"is a loop of symbolic links"),
])
def test_a_hostile_config_file_is_one_line_naming_the_file(kind, words, tmp_path, capsys):
    import time

    path = _config_of_kind(kind, tmp_path)
    started = time.monotonic()
    code = main(["model-info", "--config", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines[:3]
    assert re.search(rf"^metatrain model-info: error: .*{re.escape(path.name)}\b.*{words}", lines[0]), lines[0][:500]
    assert len(lines[0]) < 500 and time.monotonic() - started < 15  # read no further than needed


def test_a_config_file_past_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from metatrain.io import yaml_files

    monkeypatch.setattr(yaml_files, "MAX_YAML_FILE_BYTES", 1000)
    config = tmp_path / "big.yaml"
    config.write_text(f"base: {TINY}\n" + "# padding\n" * 200)
    with pytest.raises(UserError, match=rf"^{config}: 2,\d\d\d bytes; a YAML file metatrain reads is at most 1,000"):
        load_config(config)


@pytest.mark.hostile
@pytest.mark.parametrize("argv", [
    ["tokenizer", "inspect", "--tokenizer", str(SAMPLE_TOKENIZER), "--tags", "{fifo}"],
    ["sweep", "plan", "--spec", "{fifo}", "--out", "{out}"],
])
def test_a_named_pipe_as_a_tag_registry_or_sweep_spec_is_named_and_never_opened(argv, tmp_path, capsys):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: none will
    code = main([a.format(fifo=fifo, out=tmp_path / "sweep") for a in argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{fifo} is a named pipe" in err
    assert not (tmp_path / "sweep").exists()
