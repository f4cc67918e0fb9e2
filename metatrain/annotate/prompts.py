"""Prompt templates: files, one per placement, rendered into one chat message per point.

A template is a UTF-8 text file; the whole file, with its `$names` filled in, is the
user message of one chat-completions request (no system message). The shipped defaults
are `templates/passage.txt`, `templates/document.txt` and `templates/chunk.txt`;
`--prompt FILE` replaces the one for the run's placement. The names a template may use
(`string.Template` syntax: `$name` or `${name}`; `$$` is a literal `$`):

| name | value |
| --- | --- |
| `$passage` | the text the thought is about: the unit just before the point (`after`), the one just after it (`before`), the whole text (`document`) |
| `$document_so_far` | the document's text up to the point (thinking left out), its last `context_chars` characters |
| `$document` | the whole document's text, its first `context_chars` characters |
| `$title` | the record's `title` (metadata), else its id |
| `$id` | the document's id |
| `$metadata` | the record's other keys, as JSON |
| `$position` | `after` or `before` |
| `$position_hint` | what a thought at that position is for (one sentence) |
| `$point`, `$points` | the point's number (1-based) and how many the document has |

A template naming anything else is refused when the run starts, naming the name and the
file. The mantra is never asked for: the encoder adds it to every block it should open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from pathlib import Path
from typing import Any

from metatrain.errors import UserError

TEMPLATES_DIR: Path = Path(__file__).parent / "templates"

#: Placement -> its default template file.
DEFAULT_TEMPLATES: dict[str, Path] = {
    where: TEMPLATES_DIR / f"{where}.txt" for where in ("passage", "document", "chunk")
}

#: Characters of document text a template sees (`$document_so_far`, `$document`).
DEFAULT_CONTEXT_CHARS = 6000

POSITION_HINTS: dict[str, str] = {
    "after": "what it means, how it connects to what came before, what is doubtful or worth remembering.",
    "before": "what to expect from it, what to look for, what you already know that bears on it.",
}

FIELDS: tuple[str, ...] = ("passage", "document_so_far", "document", "title", "id", "metadata",
                           "position", "position_hint", "point", "points")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A loaded template: its text, where it came from, and its SHA-256 (provenance)."""

    text: str
    source: str
    sha256: str
    context_chars: int = DEFAULT_CONTEXT_CHARS

    def render(
        self,
        *,
        passage: str,
        document_so_far: str,
        document: str,
        doc_id: str,
        metadata: dict[str, Any],
        position: str,
        point: int,
        points: int,
    ) -> str:
        """The user message for one insertion point (`point` is 0-based here)."""
        keep = self.context_chars
        so_far = document_so_far if len(document_so_far) <= keep else "..." + document_so_far[-keep:]
        whole = document if len(document) <= keep else document[:keep] + "..."
        title = metadata.get("title")
        values = {
            "passage": passage,
            "document_so_far": so_far,
            "document": whole,
            "title": title if isinstance(title, str) and title.strip() else doc_id,
            "id": doc_id,
            "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True),
            "position": position,
            "position_hint": POSITION_HINTS.get(position, ""),
            "point": str(point + 1),
            "points": str(points),
        }
        return string.Template(self.text).substitute(values)


def load_template(path: str | Path | None, where: str, *, context_chars: int = DEFAULT_CONTEXT_CHARS) -> PromptTemplate:
    """The template at `path`, or the default for placement `where` when `path` is None.

    Raises:
        UserError: unreadable, not UTF-8, empty, or naming a field that does not exist.
    """
    file = Path(path) if path is not None else DEFAULT_TEMPLATES[where]
    try:
        data = file.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise UserError(f"--prompt {file}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt {file}: not UTF-8 (byte {e.start}); save the template as UTF-8") from None
    if not text.strip():
        raise UserError(f"--prompt {file} is empty; a template is the message sent for each point")
    if context_chars < 1:
        raise UserError(f"--context-chars must be >= 1, got {context_chars}")
    template = string.Template(text)
    if not template.is_valid():
        raise UserError(f"--prompt {file}: a `$` that starts no name (write `$$` for a literal `$`)")
    unknown = sorted(set(template.get_identifiers()) - set(FIELDS))
    if unknown:
        raise UserError(f"--prompt {file} uses ${unknown[0]}, which is not a template field; "
                        f"the fields are {', '.join('$' + f for f in FIELDS)}")
    return PromptTemplate(text, str(file), hashlib.sha256(data).hexdigest(), context_chars)
