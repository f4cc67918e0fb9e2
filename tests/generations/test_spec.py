"""The generations spec: strict keys, one source for generation 0, paths against the spec file."""

from __future__ import annotations

import pytest

from metatrain.errors import UserError
from metatrain.generations.spec import load_spec, spec_changes, spec_data, spec_hash

from .conftest import spec_data as make_spec
from .conftest import write_spec


def test_a_spec_loads_with_paths_relative_to_its_file(tmp_path, corpus):
    data = make_spec(corpus)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "heldout.jsonl").write_text(corpus["heldout"].read_text())
    data["heldout"] = "d/heldout.jsonl"  # one path, relative: a list of one absolute path
    spec = load_spec(write_spec(tmp_path / "spec.yaml", data))
    assert spec.heldout == (str(tmp_path / "d" / "heldout.jsonl"),)
    assert spec.generation0.source == "corpus"
    assert spec.train.continue_training is False
    plain = spec_data(spec)
    assert plain["train"]["continue"] is False and "continue_training" not in plain["train"]
    assert spec_hash(plain) == spec_hash(spec_data(load_spec(tmp_path / "spec.yaml")))


@pytest.mark.parametrize(("change", "words"), [
    ({"generation": 2}, ["unknown config key 'generation'", "did you mean 'generations'"]),
    ({"annotate": {"sample": 4}}, ["unknown config key 'annotate.sample'", "'annotate.samples'"]),
    ({"annotate": {"select": "best"}}, ["annotate.select"]),
    ({"generations": 0}, ["generations=0 must be >= 1"]),
    ({"generation0": {}}, ["exactly one of corpus, endpoint and checkpoint; got none"]),
    ({"train": {"config": "missing.yaml"}}, ["train.config", "missing.yaml does not exist"]),
    ({"eval": {"samples": 2}}, ["eval.self_think: true"]),
    ({"eval": {"args": ["--out", "/tmp/elsewhere"]}}, ["eval.args: --out is set by the loop"]),
    ({"annotate": {"args": ["--input=x.jsonl"]}}, ["annotate.args: --input is set by the loop"]),
    ({"generation0": {"corpus": "gs://bucket/corpus.jsonl"}}, ["generation0.corpus", "is in a bucket"]),
])
def test_a_bad_spec_is_one_line_naming_the_file_and_the_key(tmp_path, corpus, change, words):
    path = write_spec(tmp_path / "spec.yaml", make_spec(corpus, **change))
    with pytest.raises(UserError) as e:
        load_spec(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_two_sources_for_generation0_and_loop_keys_are_refused(tmp_path, corpus):
    both = {"corpus": str(corpus["train"]), "checkpoint": str(tmp_path)}
    with pytest.raises(UserError, match="exactly one of corpus, endpoint and checkpoint; got corpus, checkpoint"):
        load_spec(write_spec(tmp_path / "a.yaml", make_spec(corpus, generation0=both)))
    train = {"config": make_spec(corpus)["train"]["config"], "set": ["data.sources=[{path: x}]"]}
    with pytest.raises(UserError, match="data.sources is set by the loop"):
        load_spec(write_spec(tmp_path / "b.yaml", make_spec(corpus, train=train)))


def test_a_continuing_generation_starts_from_the_previous_work_directory(tmp_path, corpus):
    from metatrain.generations.run import _train_overrides

    train = {**make_spec(corpus)["train"], "continue": True}
    spec = load_spec(write_spec(tmp_path / "spec.yaml", make_spec(corpus, train=train)))
    assert spec.train.continue_training is True
    overrides = _train_overrides(spec, tmp_path / "gen-1" / "corpus.jsonl", tmp_path / "gen-0" / "work")
    assert f'checkpoint.init_from="{tmp_path / "gen-0" / "work"}"' in overrides
    assert not any("init_from" in o for o in _train_overrides(spec, tmp_path / "c.jsonl", None))
    bad = {**make_spec(corpus)["train"], "set": ["checkpoint.init_from=/elsewhere"]}
    with pytest.raises(UserError, match="checkpoint.init_from is set by the loop"):
        load_spec(write_spec(tmp_path / "b.yaml", make_spec(corpus, train=bad)))


def test_spec_changes_name_each_changed_key():
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    new = {"a": {"b": 2, "c": [1, 2]}, "d": "x", "e": True}
    assert spec_changes(old, new) == ["a.b: 1 -> 2", "e: null -> true"]
    assert spec_changes(old, old) == []
