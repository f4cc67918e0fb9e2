"""Several candidate thoughts per insertion point, and which one is kept.

`metatrain annotate --samples K --select gain|random|first` asks the generator for K
candidates at each point (each with its own seed: candidate 0 keeps the seed a run
without `--samples` uses, so `--samples 1 --select first` writes what today's run
writes). The candidates that pass the checks are scored by their **gain**
(`metatrain.annotate.gain`): log p of the next text given the thought minus log p of it
without (nats). Then

    gain    the candidate with the largest gain (ties: the first; no gain at all: the first)
    random  a uniform choice, from a stream seeded by (seed, document, point): the control
    first   the first candidate that passed (today's behaviour)

`--min-gain G` then keeps the chosen candidate only if its gain is at least G (a thought
that does not help the text after it, or whose gain cannot be known, puts no block):
"keep the thoughts that help", not only the best of those asked for.

`random` and `first` still record the gains when a scoring model is available. Each
document's provenance then carries `annotation.selection` (`selection_provenance`), and
`gain_statistics` reads the same numbers back from written documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

from metatrain.errors import UserError

#: The `--select` rules.
SELECTS: tuple[str, ...] = ("gain", "random", "first")
#: Text tokens after the point a gain scores when `--gain-tokens` is not given.
DEFAULT_GAIN_TOKENS: int = 32


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """`--samples`, `--select`, `--gain-tokens`, `--scorer` (all part of the resume identity).

    Attributes:
        samples: candidates per insertion point (K >= 1).
        select: one of `SELECTS`.
        gain_tokens: text tokens after the point that a gain scores (N >= 1).
        scorer: the `--scorer` work directory (absolute), or None: the generator's own
            checkpoint when it has one, else no gains.
        min_gain: the least gain (nats) a kept thought has (None: no floor).
    """

    samples: int = 1
    select: str = "first"
    gain_tokens: int = DEFAULT_GAIN_TOKENS
    scorer: str | None = None
    min_gain: float | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1 (candidate thoughts per point), got {self.samples}")
        if self.gain_tokens < 1:
            raise UserError(f"--gain-tokens must be >= 1 (text tokens a gain scores), got {self.gain_tokens}")
        if self.min_gain is not None and not math.isfinite(self.min_gain):
            raise UserError(f"--min-gain must be a finite number of nats, got {self.min_gain}")
        if self.select not in SELECTS:
            raise UserError(f"--select must be one of {', '.join(SELECTS)}, got {self.select!r}")

    def identity(self) -> dict[str, Any]:
        identity = {"samples": self.samples, "select": self.select, "gain_tokens": self.gain_tokens,
                    "scorer": self.scorer}
        if self.min_gain is not None:  # absent otherwise: runs from before the option resume
            identity["min_gain"] = self.min_gain
        return identity


def candidate_seed(seed: int, doc_id: str, point: int, attempt: int, candidate: int) -> int:
    """A 31-bit seed for one candidate; candidate 0 gets `runner.derive_seed`'s seed (the
    seed of a run without `--samples`), the others their own."""
    text = f"{seed}\0{doc_id}\0{point}\0{attempt}"
    if candidate:
        text += f"\0candidate\0{candidate}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _random_stream(seed: int, doc_id: str, point: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{point}\0select".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def choose(select: str, survivors: Sequence[int], gains: Sequence[float | None], *, seed: int, doc_id: str,
           point: int, min_gain: float | None = None) -> int | None:
    """The index (into the K candidates) of the one kept, or None when none survived or
    the chosen one's gain is below `min_gain` (or unknown, with a floor).

    Args:
        select: one of `SELECTS`.
        survivors: indices of the candidates that passed the checks, in order.
        gains: per candidate, its gain or None (dropped, or nothing to score).
        seed, doc_id, point: seed `random`'s choice (the same every run).
        min_gain: the floor of `--min-gain` (None: none).
    """
    chosen = _choose(select, survivors, gains, seed=seed, doc_id=doc_id, point=point)
    if chosen is not None and min_gain is not None and (gains[chosen] is None or gains[chosen] < min_gain):
        return None
    return chosen


def _choose(select: str, survivors: Sequence[int], gains: Sequence[float | None], *, seed: int, doc_id: str,
            point: int) -> int | None:
    if not survivors:
        return None
    if select == "random":
        return survivors[_random_stream(seed, doc_id, point).randrange(len(survivors))]
    if select == "gain":
        scored = [i for i in survivors if gains[i] is not None]
        if scored:
            return max(scored, key=lambda i: (gains[i], -i))  # ties: the first
    return survivors[0]


def point_entry(point: int, gains: Sequence[float | None], chosen: int | None) -> dict[str, Any]:
    """One point of `annotation.selection.points`."""
    return {"point": point, "gains": [None if g is None else float(g) for g in gains], "chosen": chosen}


def selection_provenance(config: SelectionConfig, scorer: str | None, points: list[dict[str, Any]]) -> dict[str, Any]:
    """`record["annotation"]["selection"]`: the settings, the scoring model (None: no
    gains) and, per insertion point, every candidate's gain and the chosen one."""
    out = {"samples": config.samples, "select": config.select, "gain_tokens": config.gain_tokens,
           "scorer": scorer, "points": points}
    if config.min_gain is not None:
        out["min_gain"] = config.min_gain
    return out


@dataclasses.dataclass
class GainTotals:
    """Running sums of gains (what the run summary and `gain_statistics` report)."""

    blocks: int = 0  # points that got a block
    chosen_sum: float = 0.0
    chosen: int = 0  # blocks whose gain is known
    candidate_sum: float = 0.0
    candidates: int = 0  # candidates whose gain is known
    positive: int = 0  # ... and > 0

    def add_point(self, entry: dict[str, Any]) -> None:
        gains, chosen = entry.get("gains") or [], entry.get("chosen")
        for g in gains:
            if g is not None:
                self.candidate_sum += g
                self.candidates += 1
                self.positive += g > 0
        if chosen is not None:
            self.blocks += 1
            if 0 <= chosen < len(gains) and gains[chosen] is not None:
                self.chosen_sum += gains[chosen]
                self.chosen += 1

    def add(self, other: "GainTotals") -> None:
        for field in dataclasses.fields(GainTotals):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def statistics(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "chosen_gain_mean": self.chosen_sum / self.chosen if self.chosen else None,
            "candidate_gain_mean": self.candidate_sum / self.candidates if self.candidates else None,
            "positive_gain_share": self.positive / self.candidates if self.candidates else None,
        }


def gain_statistics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Gains of annotated documents (their `annotation.selection`), as the run summary
    reports them.

    Returns:
        `blocks` (points that got a block), `chosen_gain_mean` (mean gain of the kept
        thoughts), `candidate_gain_mean` (mean gain of every scored candidate) and
        `positive_gain_share` (the share of scored candidates whose gain is > 0); each
        mean None when no gain was recorded. Records without a selection are skipped.
    """
    totals = GainTotals()
    for record in records:
        annotation = record.get("annotation") if isinstance(record, dict) else None
        selection = annotation.get("selection") if isinstance(annotation, dict) else None
        if not isinstance(selection, dict):
            continue
        for entry in selection.get("points") or ():
            if isinstance(entry, dict):
                totals.add_point(entry)
    return totals.statistics()
