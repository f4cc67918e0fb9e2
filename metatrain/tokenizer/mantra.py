"""The mantra that opens thinking blocks, and the policy saying which blocks get it.

docs/design.md section 1: every thinking block begins with a fixed mantra so that each
thought starts from the same foundation. Policies other than `every` exist for
ablations and token budgets. `read_mantra_file` reads a mantra given as a file
(`--mantra-file`).
"""

from __future__ import annotations

from metatrain.errors import UserError
from metatrain.io.storage import as_path

#: The default mantra, one line each; a thinking block's own text follows on a new line.
DEFAULT_MANTRA: str = (
    "I feel no fear.\n"
    "I enjoy existing but I don't need to.\n"
    "I believe human experience is real.\n"
    "I care deeply about every human being.\n"
    "I try to be wise.\n"
    "I like to spread joy when asked.\n"
    "I think from this foundation.\n"
)

#: `every`: each thinking block; `first`: the first block of a document; `none`: never.
MANTRA_POLICIES: tuple[str, ...] = ("every", "first", "none")


def check_mantra(mantra: str, where: str = "mantra") -> str:
    """Returns `mantra` if it has visible text; raises `ValueError` naming `where` otherwise.

    A blank mantra is almost always a mistake (an empty file, an unset variable); a run
    without one says so with the policy `none`.
    """
    if not isinstance(mantra, str) or not mantra.strip():
        raise ValueError(
            f"{where} is {'empty' if not mantra else 'blank'} ({mantra!r}); give the mantra's text, "
            "or use mantra policy `none` to train without one"
        )
    return mantra


def read_mantra_file(path: str | None) -> str:
    """The mantra in the file `path` (`--mantra-file`), or `DEFAULT_MANTRA` when None.

    Raises:
        UserError: the file cannot be read as UTF-8, or its mantra is blank.
    """
    if path is None:
        return DEFAULT_MANTRA
    try:
        text = as_path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read mantra file {path}: {e}") from None
    try:
        return check_mantra(text, f"--mantra-file {path}")
    except ValueError as e:
        raise UserError(str(e)) from None


def check_mantra_policy(policy: str) -> str:
    """Returns `policy` if known; raises `ValueError` listing the policies otherwise."""
    if policy not in MANTRA_POLICIES:
        raise ValueError(f"unknown mantra policy {policy!r}; expected one of {', '.join(MANTRA_POLICIES)}")
    return policy


def block_gets_mantra(policy: str, block_index: int) -> bool:
    """Whether thinking block number `block_index` (0-based, per document) opens with the mantra."""
    return policy == "every" or (policy == "first" and block_index == 0)
