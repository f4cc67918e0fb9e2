"""The tag registry: every tag token and the mode transitions, loaded from one YAML file.

The registry is plain data read from `tokenizer/tags.yaml` (or a user's copy of it);
`metatrain.tokenizer.grammar.Grammar` turns it into the state machine the encoder and
the decoder share. Nothing here knows about SentencePiece.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import yaml

from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import StoragePath, as_path, os_reason
from metatrain.io.strict_parsing import (
    DuplicateKeyError,
    describe_yaml_error,
    load_yaml,
)
from metatrain.io.yaml_files import read_yaml_text

#: Piece names SentencePiece reserves for itself; a tag may not take one of them.
RESERVED_PIECES: frozenset[str] = frozenset({"<s>", "</s>", "<unk>", "<pad>"})
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_TOP_LEVEL_KEYS = {"base_mode", "modes", "transitions", "thinking", "controls", "reserved"}


@dataclasses.dataclass(frozen=True)
class ModeTransition:
    """One legal mode change: emitting `tag` in mode `source` moves to mode `target`."""

    tag: str
    source: str
    target: str


@dataclasses.dataclass(frozen=True)
class TagRegistry:
    """Every tag token and the legal transitions between modes.

    Attributes:
        base_mode: the mode every document starts and ends in.
        modes: every mode, base mode included.
        transitions: the legal mode changes, each by one tag.
        thinking_open: tag that opens a thinking block.
        thinking_close: tag that closes it, back to the mode it opened in.
        thinking_modes: modes a thinking block may open in.
        controls: (name, tag) pairs of control tokens, legal outside thinking.
        reserved: tags that get ids but are illegal everywhere for now.
        source: where the registry came from, for error messages.
    """

    base_mode: str
    modes: tuple[str, ...]
    transitions: tuple[ModeTransition, ...]
    thinking_open: str
    thinking_close: str
    thinking_modes: tuple[str, ...]
    controls: tuple[tuple[str, str], ...] = ()
    reserved: tuple[str, ...] = ()
    source: str = "<registry>"

    def __post_init__(self) -> None:
        def bad(reason: str) -> UserError:
            return UserError(f"{self.source}: {reason}")

        if len(set(self.modes)) != len(self.modes):
            raise bad(f"`modes` lists a mode twice: {list(self.modes)}")
        if self.base_mode not in self.modes:
            raise bad(f"`base_mode` {self.base_mode!r} is not one of `modes` {list(self.modes)}")
        seen_moves: set[tuple[str, str]] = set()
        for t in self.transitions:
            for end in (t.source, t.target):
                if end not in self.modes:
                    raise bad(f"transition {t.tag!r} names unknown mode {end!r}; modes are {list(self.modes)}")
            if t.source == t.target:
                raise bad(f"transition {t.tag!r} goes from {t.source!r} to itself; a mode tag must change mode")
            if (t.source, t.tag) in seen_moves:
                raise bad(f"tag {t.tag!r} has two transitions out of mode {t.source!r}")
            seen_moves.add((t.source, t.tag))
        for mode in self.thinking_modes:
            if mode not in self.modes:
                raise bad(f"`thinking.allowed_in` names unknown mode {mode!r}; modes are {list(self.modes)}")
        names = [name for name, _ in self.controls]
        if len(set(names)) != len(names):
            raise bad(f"`controls` names a control twice: {names}")
        kinds: dict[str, str] = {}
        for tag, kind in self._tags_with_kinds():
            _check_tag_string(tag, self.source)
            if tag in kinds and not (kind == kinds[tag] == "mode"):
                raise bad(f"tag {tag!r} is declared twice (as {kinds[tag]} and as {kind}); each tag has one job")
            kinds[tag] = kind

    def _tags_with_kinds(self) -> list[tuple[str, str]]:
        return (
            [(self.thinking_open, "thinking"), (self.thinking_close, "thinking")]
            + [(t.tag, "mode") for t in self.transitions]
            + [(tag, "control") for _, tag in self.controls]
            + [(tag, "reserved") for tag in self.reserved]
        )

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag string, each once, in registry order (thinking, modes, controls, reserved).

        This order is the tag index used by `Grammar.transition_table`.
        """
        return tuple(dict.fromkeys(tag for tag, _ in self._tags_with_kinds()))

    @property
    def control_tags(self) -> dict[str, str]:
        """Control name -> tag string, e.g. `{"good": "<|good|>"}`."""
        return dict(self.controls)

    def control_tag(self, name: str) -> str:
        """The tag of control `name`; raises `KeyError` naming the known controls."""
        try:
            return self.control_tags[name]
        except KeyError:
            known = ", ".join(self.control_tags) or "none"
            raise KeyError(f"unknown control {name!r}; the registry {self.source} declares: {known}") from None


def _check_tag_string(tag: Any, source: str) -> None:
    if not isinstance(tag, str) or not tag:
        raise UserError(f"{source}: every tag must be a non-empty string, got {tag!r}")
    if any(ch.isspace() for ch in tag) or "\u2581" in tag:
        raise UserError(f"{source}: tag {tag!r} contains whitespace; a tag is one piece without spaces")
    for ch in tag:
        # A lone surrogate (YAML's "\ud800") is no character: no UTF-8 file or model can
        # hold it. A control character (NUL, ESC, ...) is refused by SentencePiece's
        # loader (NUL) or would print as terminal codes; a tag is printable text.
        kind = unicodedata.category(ch)
        if kind in ("Cs", "Cc"):
            what = "a lone surrogate, which is not a character" if kind == "Cs" else "a control character"
            raise UserError(f"{source}: tag {tag!r} contains U+{ord(ch):04X}, {what}; write the tag "
                            "with printable characters")
    if tag in RESERVED_PIECES or _BYTE_PIECE.fullmatch(tag):
        raise UserError(f"{source}: tag {tag!r} is a piece SentencePiece reserves for itself; pick another name")


def registry_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> TagRegistry:
    """Builds a registry from the parsed YAML mapping (see `tokenizer/tags.yaml`).

    Raises:
        UserError: a key is missing, unknown or of the wrong type; the message names it.
    """

    def bad(reason: str) -> UserError:
        return UserError(f"{source}: {reason}")

    if not isinstance(data, Mapping):
        raise bad("the tag registry must be a YAML mapping with keys " + ", ".join(sorted(_TOP_LEVEL_KEYS)))
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)}; known keys are {sorted(_TOP_LEVEL_KEYS)}")

    def require(mapping: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
        if key not in mapping:
            raise bad(f"missing key `{where}{key}`")
        value = mapping[key]
        if not isinstance(value, kind):
            raise bad(f"`{where}{key}` must be a {kind.__name__}, got {type(value).__name__}")
        return value

    modes = require(data, "modes", list, "")
    if not all(isinstance(m, str) and m for m in modes):
        raise bad(f"`modes` must be a list of names, got {modes!r}")
    transitions = []
    for i, entry in enumerate(require(data, "transitions", list, "")):
        where = f"transitions[{i}]."
        if not isinstance(entry, Mapping) or set(entry) != {"tag", "from", "to"}:
            raise bad(f"`transitions[{i}]` must be a mapping with exactly the keys tag, from, to; got {entry!r}")
        transitions.append(
            ModeTransition(
                tag=require(entry, "tag", str, where),
                source=require(entry, "from", str, where),
                target=require(entry, "to", str, where),
            )
        )
    thinking = require(data, "thinking", Mapping, "")
    unknown = set(thinking) - {"open", "close", "allowed_in"}
    if unknown:
        raise bad(f"unknown key(s) under `thinking`: {sorted(unknown)}; known: open, close, allowed_in")
    controls = data.get("controls") or {}
    if not isinstance(controls, Mapping) or not all(isinstance(k, str) for k in controls):
        raise bad(f"`controls` must map control names to tags, got {controls!r}")
    reserved = data.get("reserved") or []
    if not isinstance(reserved, list):
        raise bad(f"`reserved` must be a list of tags, got {reserved!r}")
    return TagRegistry(
        base_mode=require(data, "base_mode", str, ""),
        modes=tuple(modes),
        transitions=tuple(transitions),
        thinking_open=require(thinking, "open", str, "thinking."),
        thinking_close=require(thinking, "close", str, "thinking."),
        thinking_modes=tuple(require(thinking, "allowed_in", list, "thinking.")),
        controls=tuple(controls.items()),
        reserved=tuple(reserved),
        source=source,
    )


def load_registry(path: str | StoragePath = DEFAULT_TAGS) -> TagRegistry:
    """Loads a tag registry YAML file (default: the shipped `tokenizer/tags.yaml`); a
    remote one (`gs://...`) is read from its bucket.

    Raises:
        UserError: the file is missing, is not YAML, or does not describe a valid registry.
    """
    path = as_path(path)
    try:
        text = read_yaml_text(path, "tag registry")
    except OSError as e:
        raise UserError(f"cannot read tag registry {path}: {os_reason(e)}") from None
    try:
        data = load_yaml(text)
    except DuplicateKeyError as e:
        raise UserError(f"tag registry {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"tag registry {path} is not valid YAML: {describe_yaml_error(e)}") from None
    return registry_from_dict(data, source=str(path))
