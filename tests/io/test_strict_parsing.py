"""Duplicate keys are errors in every YAML file metatrain reads and in JSON documents
(issue: PyYAML and `json` silently keep the last value); hostile YAML (alias bombs, deep
nesting, values PyYAML cannot build) and JSON past the limits are refused in one line."""

from __future__ import annotations

import itertools
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


def _alias_bomb(levels: int = 9) -> str:
    """Billion laughs: each list holds nine aliases of the previous one (~330 bytes, 9**9 leaves)."""
    names = "abcdefghi"[:levels]
    text = "a: &a [" + ",".join(["lol"] * 9) + "]\n"
    for previous, name in itertools.pairwise(names):
        text += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]\n"
    return text


@pytest.mark.hostile
def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded():
    import time

    import yaml

    from metatrain.io.strict_parsing import MAX_YAML_ALIAS_NODES

    text = _alias_bomb()
    assert len(text) < 400
    started = time.monotonic()
    with pytest.raises(yaml.YAMLError, match=rf"aliases expand to more than {MAX_YAML_ALIAS_NODES:,} nodes"):
        load_yaml(text)
    assert time.monotonic() - started < 10  # refused, not expanded (expanding takes minutes)
    # Aliases used as they are meant to be (a shared block, reused) still load.
    assert load_yaml("x: &x {lr: 1}\ny: *x\nz: [*x, *x]\n")["z"] == [{"lr": 1}, {"lr": 1}]
    # An alias inside the node it names would make a structure that contains itself.
    with pytest.raises(yaml.YAMLError, match=r"alias \*x is inside the node it names"):
        load_yaml("a: &x [1, *x]\n")


@pytest.mark.hostile
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "a:\n" + "".join(f"{' ' * i}- \n" for i in range(1, 2000))])
def test_yaml_nested_past_the_limit_is_a_yaml_error_not_a_recursion_error(text):
    import yaml

    from metatrain.io.strict_parsing import MAX_YAML_DEPTH

    with pytest.raises(yaml.YAMLError, match=rf"nested deeper than {MAX_YAML_DEPTH} levels"):
        load_yaml(text)
    deep_enough = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    assert load_yaml(deep_enough) is not None


@pytest.mark.hostile
@pytest.mark.parametrize("value, reason", [
    ("1" * 5000, "integer of 5000 digits"),
    ("2020-13-45", "month must be in 1..12"),
    ("!!int abc", "invalid literal for int"),
    ("!!float abc", "could not convert string to float"),
])
def test_a_yaml_value_its_constructor_cannot_build_is_a_yaml_error_naming_the_line(value, reason):
    import yaml

    from metatrain.io.strict_parsing import describe_yaml_error

    with pytest.raises(yaml.YAMLError) as info:
        load_yaml(f"trainer:\n  steps: {value}\n")
    described = describe_yaml_error(info.value)
    assert described.startswith("line 2, column 10: ") and reason in described and "\n" not in described
