"""The role of every token, the one definition used by encoder, data, loss and metrics.

A role says what part of a document a token came from. The joint loss weights the
next-token cross entropy by the role of the *target* token (docs/design.md section 3);
`PAD` marks targets that take no loss at all (padding, and targets that would cross
a packed-document boundary).
"""

from __future__ import annotations

import enum

import numpy as np


class Role(enum.IntEnum):
    """Token roles, stored as int8 in `target_roles` (batch contract, docs/design.md section 4)."""

    PAD = 0
    TEXT = 1
    THINKING = 2
    MANTRA = 3
    TAG = 4

    @property
    def label(self) -> str:
        """Lower-case name used in JSON output and metric keys (`loss/text`)."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> "Role":
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(
                f"unknown role {label!r}; expected one of {', '.join(LOSS_ROLE_LABELS)}"
            ) from None


#: Roles that can carry loss, in the order used for weight vectors and metrics.
LOSS_ROLES: tuple[Role, ...] = (Role.TEXT, Role.THINKING, Role.MANTRA, Role.TAG)
LOSS_ROLE_LABELS: tuple[str, ...] = tuple(r.label for r in LOSS_ROLES)
NUM_ROLES: int = len(Role)
ROLE_DTYPE = np.int8
