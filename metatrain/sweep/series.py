"""What `sweep fit` fits and plots: the losses asked for, their series of runs, their fits.

`metatrain.sweep.fit` builds these from a manifest and `metatrain.sweep.plots` draws
them; both import this module, neither imports the other's reader.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from metatrain.errors import UserError
from metatrain.sweep.isoflop import IsoFlopFit
from metatrain.sweep.law import LawFit

#: Role names accepted by `--role` (besides "all") and the manifest key of each.
ROLE_KEYS: dict[str, str] = {"text": "loss/text", "thinking": "loss/thinking", "joint": "loss"}
ROLE_CHOICES: tuple[str, ...] = ("text", "thinking", "joint", "all")


@dataclasses.dataclass(frozen=True)
class Target:
    """One loss to fit: `key` is its manifest key, `label` names it in reports and plots."""

    label: str
    key: str

    @property
    def is_role(self) -> bool:
        return ROLE_KEYS.get(self.label) == self.key


@dataclasses.dataclass(frozen=True)
class Series:
    """The finished runs of one variant, as arrays for one loss.

    Attributes:
        variant: the variant (None for a sweep without variants).
        label: "text", "thinking" or "joint" (`--role`), or the manifest key (`--loss-key`).
        loss_key: the manifest key of L ("loss/text", ..., or the `--loss-key`).
        names: run names, in manifest order.
        N: non-embedding parameters; D: tokens (of `tokens_key`); L: values of `loss_key`.
        flops: training compute; flops_per_token: flops / training tokens.
        budget: IsoFLOP budget of each run (NaN where a run has none).
    """

    variant: str | None
    label: str
    loss_key: str
    names: tuple[str, ...]
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    flops: np.ndarray
    flops_per_token: np.ndarray
    budget: np.ndarray


@dataclasses.dataclass(frozen=True)
class RoleFit:
    """Both analyses of one series."""

    series: Series
    law: LawFit
    isoflop: IsoFlopFit | None


def targets_for(role: str = "all", loss_key: str | None = None) -> tuple[Target, ...]:
    """The losses to fit: the `--role` roles ("all": text, thinking and the joint loss), or
    the one manifest key `loss_key` (`--loss-key`, which replaces `--role`)."""
    if loss_key is not None:
        if role != "all":
            raise UserError(f"--role {role} and --loss-key {loss_key}: give one of them (--loss-key replaces --role)")
        if not loss_key.strip():
            raise UserError("--loss-key '': give a numeric manifest key, e.g. --loss-key bpb/text")
        return (Target(label=loss_key, key=loss_key),)
    if role not in ROLE_CHOICES:
        raise UserError(f"--role {role!r}: choose one of {', '.join(ROLE_CHOICES)}")
    roles = ("text", "thinking", "joint") if role == "all" else (role,)
    return tuple(Target(label=r, key=ROLE_KEYS[r]) for r in roles)


def loss_name(label: str, key: str, *, with_key: bool = False) -> str:
    """How reports and plots name a loss: "text loss" ("text loss (loss/text)"), or the key."""
    if ROLE_KEYS.get(label) != key:
        return key
    return f"{label} loss ({key})" if with_key else f"{label} loss"
