"""The tag registry YAML: the shipped file, user-added tags, and every schema error."""

from __future__ import annotations

import copy

import pytest
import yaml

from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.tokenizer.registry import ModeTransition, load_registry, registry_from_dict

DEFAULT_TAG_STRINGS = ("<thinking>", "</thinking>", "<AI>", "</AI>", "<AI_quoting_human>",
                       "</AI_quoting_human>", "<|good|>", "<|bad|>")


def default_data() -> dict:
    return yaml.safe_load(DEFAULT_TAGS.read_text())


def test_shipped_registry_declares_the_default_tags_in_order():
    reg = load_registry()
    assert reg.tags == DEFAULT_TAG_STRINGS
    assert reg.base_mode == "human"
    assert reg.modes == ("human", "ai", "ai_quoting_human")
    assert reg.thinking_modes == ("human", "ai")
    assert reg.control_tags == {"good": "<|good|>", "bad": "<|bad|>"}
    assert ModeTransition("<AI>", "human", "ai") in reg.transitions
    assert reg.source == str(DEFAULT_TAGS)


def test_user_added_tags_are_appended_after_the_defaults():
    data = default_data()
    data["modes"].append("code")
    data["transitions"] += [{"tag": "<code>", "from": "ai", "to": "code"},
                            {"tag": "</code>", "from": "code", "to": "ai"}]
    data["controls"]["toxic"] = "<|toxic|>"
    data["reserved"] = ["<|reserved_0|>"]
    reg = registry_from_dict(data, source="user.yaml")
    assert reg.tags == DEFAULT_TAG_STRINGS[:6] + ("<code>", "</code>", "<|good|>", "<|bad|>", "<|toxic|>",
                                                  "<|reserved_0|>")
    assert reg.control_tag("toxic") == "<|toxic|>"


def test_unknown_control_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown control 'great'.*good, bad"):
        load_registry().control_tag("great")


def _broken(mutate):
    data = default_data()
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("modes"), "missing key `modes`"),
        (lambda d: d.pop("thinking"), "missing key `thinking`"),
        (lambda d: d["thinking"].pop("close"), "missing key `thinking.close`"),
        (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda d: d.update(base_mode="robot"), "`base_mode` 'robot' is not one of `modes`"),
        (lambda d: d["modes"].append("ai"), "lists a mode twice"),
        (lambda d: d["transitions"].append({"tag": "<X>", "from": "human", "to": "robot"}),
         "names unknown mode 'robot'"),
        (lambda d: d["transitions"].append({"tag": "<X>", "from": "ai", "to": "ai"}), "to itself"),
        (lambda d: d["transitions"].append({"tag": "<AI>", "from": "human", "to": "ai_quoting_human"}),
         "two transitions out of mode 'human'"),
        (lambda d: d["transitions"].append({"tag": "<X>", "from": "human"}), "exactly the keys tag, from, to"),
        (lambda d: d["thinking"].update(allowed_in=["robot"]), "`thinking.allowed_in` names unknown mode"),
        (lambda d: d["thinking"].update(depth=2), "unknown key\\(s\\) under `thinking`"),
        (lambda d: d["controls"].update(also_good="<|good|>"), "declared twice"),
        (lambda d: d["controls"].update(ai="<AI>"), "declared twice"),
        (lambda d: d["controls"].update(spaced="<|a b|>"), "contains whitespace"),
        (lambda d: d["controls"].update(eos="</s>"), "SentencePiece reserves"),
        (lambda d: d["controls"].update(byte="<0x41>"), "SentencePiece reserves"),
        (lambda d: d["controls"].update(empty=""), "non-empty string"),
        (lambda d: d.update(reserved="<|r|>"), "`reserved` must be a list"),
        (lambda d: d.update(modes="human"), "`modes` must be a list"),
    ],
)
def test_schema_errors_name_the_key_and_the_file(mutate, message):
    with pytest.raises(UserError, match=message) as info:
        registry_from_dict(_broken(mutate), source="my_tags.yaml")
    assert str(info.value).startswith("my_tags.yaml: ")


def test_load_registry_refuses_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="tag registry .* does not exist"):
        load_registry(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("modes: [human\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_registry(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_registry(bad)


def test_registry_is_immutable_data():
    reg = load_registry()
    assert reg == registry_from_dict(copy.deepcopy(default_data()), source=str(DEFAULT_TAGS))
    with pytest.raises(AttributeError):
        reg.base_mode = "ai"  # type: ignore[misc]
