"""Every generated block is checked before it is kept.

`BlockChecks` rejects a thought that is too short or too long, that repeats itself (few
distinct word 4-grams), that copies the document (a run of `copy_words` words found
verbatim in its text), that is not valid Unicode, or that a user hook refuses. A
rejected block is asked for again (up to `--retries` times); then the point goes
without a block. An empty reply is "no thinking here" and is not checked.

The user hook, `--filter module:function`, is called as `function(thought, context)`
with `context` a dict (`id`, `point`, `passage`, `document_so_far`, `metadata`) and
returns True to keep the block, or False or a reason (a string) to reject it. An
exception in the hook stops the run: a broken filter must not silently reject, or
keep, everything.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from metatrain.errors import UserError

_WORD = re.compile(r"\w+", re.UNICODE)

Filter = Callable[[str, Mapping[str, Any]], "bool | str"]


@dataclasses.dataclass(frozen=True)
class BlockChecks:
    """Bounds a thought must meet (characters of its stripped text; `None`: no bound).

    Attributes:
        min_chars, max_chars: length bounds.
        min_distinct_ngrams: the least share of distinct word 4-grams (repetition), for
            thoughts of at least 12 words.
        copy_words: a thought holding this many consecutive words of the document's text
            is a copy (0: not checked).
        user_filter: the `--filter` hook, or None.
        filter_name: `module:function` of the hook, for provenance.
    """

    min_chars: int = 8
    max_chars: int | None = 4000
    min_distinct_ngrams: float = 0.5
    copy_words: int = 12
    user_filter: Filter | None = None
    filter_name: str | None = None

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise UserError(f"--min-chars must be >= 0, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            raise UserError(f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}")
        if not 0 <= self.min_distinct_ngrams <= 1:
            raise UserError(f"min_distinct_ngrams must be in [0, 1], got {self.min_distinct_ngrams}")
        if self.copy_words < 0:
            raise UserError(f"copy_words must be >= 0, got {self.copy_words}")

    def rejection(self, thought: str, context: Mapping[str, Any], document_text: str) -> str | None:
        """Why `thought` (stripped, non-empty) is rejected, or None to keep it."""
        try:
            thought.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode (a lone surrogate)"
        if len(thought) < self.min_chars:
            return f"shorter than {self.min_chars} characters"
        if self.max_chars is not None and len(thought) > self.max_chars:
            return f"longer than {self.max_chars} characters"
        words = [w.lower() for w in _WORD.findall(thought)]
        if len(words) >= 12:
            grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
            if len(set(grams)) / len(grams) < self.min_distinct_ngrams:
                return "repeats itself"
        if self.copy_words and len(words) >= self.copy_words and _copies(words, document_text, self.copy_words):
            return f"copies {self.copy_words}+ words of the text"
        if self.user_filter is not None:
            verdict = self.user_filter(thought, context)
            if verdict is not True:
                return f"refused by {self.filter_name}" + (f": {verdict}" if isinstance(verdict, str) and verdict else "")
        return None


def _copies(words: list[str], text: str, n: int) -> bool:
    source = [w.lower() for w in _WORD.findall(text)]
    if len(source) < n:
        return False
    windows = {tuple(source[i:i + n]) for i in range(len(source) - n + 1)}
    return any(tuple(words[i:i + n]) in windows for i in range(len(words) - n + 1))


def load_filter(spec: str) -> Filter:
    """The function named by `module:function` (importable from the current directory too).

    Raises:
        UserError: a malformed spec, a module that does not import, a missing or
            non-callable attribute.
    """
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise UserError(f"--filter {spec!r}: give MODULE:FUNCTION, e.g. my_filters:keep")
    import sys

    if "" not in sys.path:
        sys.path.insert(0, "")  # a filter module in the directory annotate runs in
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(f"--filter {spec}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--filter {spec}: {module_name} has no function {function_name}")
    return function
