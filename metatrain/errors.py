"""Errors meant for the person running metatrain.

`UserError` is raised for anything the user can fix (bad config, bad file, missing
tag); the CLI prints its message without a traceback and exits with status 2.
`RecordError` describes one bad input record: where it is and why it was refused.
"""

from __future__ import annotations

import dataclasses


class UserError(Exception):
    """A problem the user can act on; the message says what, where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class RecordError(UserError):
    """One invalid input record.

    Attributes:
        path: file the record came from.
        line: 1-based line number in that file.
        reason: why the record was refused.
        doc_id: the document's `id`, when it could be read.
    """

    path: str
    line: int
    reason: str
    doc_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        if self.doc_id is not None:
            where += f" (document {self.doc_id!r})"
        return f"{where}: {self.reason}"
