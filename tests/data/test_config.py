"""DataConfig: defaults point at the shipped files, strings become paths, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from metatrain.data.config import DataConfig, SourceConfig
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS, SAMPLE_TOKENIZER


def test_defaults_are_the_shipped_sample():
    cfg = DataConfig()
    assert cfg.sources == (SourceConfig(SAMPLE_CORPUS),)
    assert cfg.tokenizer == SAMPLE_TOKENIZER and cfg.tags == DEFAULT_TAGS
    assert cfg.mantra is None and cfg.mantra_policy == "every" and not cfg.strict


def test_strings_become_paths():
    cfg = DataConfig(sources=(SourceConfig("a.jsonl", 2),), tokenizer="t.model", tags="tags.yaml")
    assert cfg.sources[0].path == Path("a.jsonl") and cfg.sources[0].weight == 2
    assert cfg.tokenizer == Path("t.model")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sources": ()}, "sources` is empty"),
        ({"mantra_policy": "sometimes"}, "mantra_policy"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": -0.1}, "eval_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"mantra": "  "}, "mantra"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_source_weight_must_be_positive(weight):
    with pytest.raises(ValueError, match="weight"):
        SourceConfig("a.jsonl", weight)


def test_run_config_resolves_data_paths_against_the_yaml_file(tmp_path):
    from metatrain.config import load_config

    (tmp_path / "runs").mkdir()
    config = tmp_path / "runs" / "run.yaml"
    config.write_text(
        "base: " + str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml") + "\n"
        "data:\n"
        "  sources:\n"
        "    - {path: ../corpus/a.jsonl, weight: 0.7}\n"
        "    - {path: '../corpus/shards/*.jsonl', weight: 0.3}\n"
        "  tokenizer: tok/t.model\n"
        "  strict: true\n"
    )
    data = load_config(config).data
    assert data.sources == (
        SourceConfig(tmp_path / "corpus" / "a.jsonl", 0.7),
        SourceConfig(tmp_path / "corpus" / "shards" / "*.jsonl", 0.3),
    )
    assert data.tokenizer == tmp_path / "runs" / "tok" / "t.model"
    assert data.tags == DEFAULT_TAGS and data.strict
