"""Duplicate keys are errors in every YAML file metatrain reads and in JSON documents
(issue: PyYAML and `json` silently keep the last value)."""

from __future__ import annotations

import json

import pytest

from metatrain.config import load_config
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.paths import CONFIGS_DIR, DEFAULT_TAGS
from metatrain.io.strict_parsing import DuplicateKeyError, load_yaml, loads_json
from metatrain.sweep.spec import load_spec
from metatrain.tokenizer.registry import load_registry


def test_yaml_and_json_refuse_a_repeated_key_and_name_its_lines():
    with pytest.raises(DuplicateKeyError, match=r"line 3: duplicate key 'steps' \(first at line 2\)"):
        load_yaml("trainer:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(DuplicateKeyError, match="duplicate key 'kind'"):
        loads_json('{"kind": "text", "kind": "thinking"}')
    # Legal YAML keeps working: merges, equal keys in different mappings.
    assert load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  j: 2\nc: {k: 3}\n")["b"] == {"k": 1, "j": 2}


def test_a_run_config_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {CONFIGS_DIR / 'tiny.yaml'}\ntrainer:\n  steps: 5\n  steps: 50\n")
    with pytest.raises(UserError, match=rf"{path}: line 4: duplicate key 'steps' \(first at line 3\)"):
        load_config(path)


def test_a_tag_registry_with_a_control_twice_is_refused(tmp_path):
    text = DEFAULT_TAGS.read_text()
    assert "controls:" in text and "  bad:" in text
    path = tmp_path / "tags.yaml"
    path.write_text(text.replace("  bad:", '  bad: "<|bad|>"\n  bad:', 1))
    with pytest.raises(UserError, match=rf"tag registry {path}: line \d+: duplicate key 'bad'"):
        load_registry(path)


def test_a_sweep_spec_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"base: {CONFIGS_DIR / 'tiny.yaml'}\nfamily: tiny\nfamily: tiny\n")
    with pytest.raises(UserError, match=r"spec.yaml: line 3: duplicate key 'family'"):
        load_spec(path)


def test_a_document_with_a_key_twice_is_a_record_error_skipped_and_counted(tmp_path):
    good = {"id": "a", "segments": [{"kind": "text", "text": "Fine."}]}
    bad = '{"id": "b", "segments": [{"kind": "text", "kind": "thinking", "text": "Which?"}]}'
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips)] == ["a"]
    assert skips.count == 1
    with pytest.raises(RecordError, match=rf"{path}:2: invalid JSON: duplicate key 'kind'"):
        list(read_documents(path, strict=True))


def test_json_limits_are_checked_without_recursing_and_only_outside_strings():
    from metatrain.io.strict_parsing import MAX_JSON_DEPTH, JsonLimitError, check_json_depth

    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(JsonLimitError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        loads_json(deep)
    # brackets in strings, escaped quotes included, do not nest
    text = json.dumps({"a": '\\"' + "[" * 500, "b": ["x\\", "{" * 500]})
    check_json_depth(text)
    assert loads_json(text)["b"][1] == "{" * 500
    assert loads_json('{"n": -12, "x": 1.5e3, "y": [0.25]}') == {"n": -12, "x": 1500.0, "y": [0.25]}
    for bad, reason in [("1e999", "number too large"), ("Infinity", "Infinity is not a JSON number"),
                        ("-Infinity", "-Infinity is not a JSON number"), ("1" * 101, "number too large")]:
        with pytest.raises(JsonLimitError, match=reason):
            loads_json(f'{{"v": {bad}}}')


def test_json_error_messages_say_at_once():
    from metatrain.io.strict_parsing import describe_json_error

    for text, expected in [('{"a": "x', "Unterminated string starting at column 7"),
                           ('{"a": "\x01"}', "Invalid control character at column 8"),
                           ('{"a" 1}', "Expecting ':' delimiter at column 6")]:
        with pytest.raises(json.JSONDecodeError) as info:
            loads_json(text)
        assert describe_json_error(info.value) == expected
