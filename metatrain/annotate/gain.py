"""The gain of a candidate thought: how much it makes the next text more likely.

For a point k of a document and a candidate thought c, the scoring model reads

    with     context + <thinking> c </thinking> + following
    without  the same ids with the block's tokens removed

where `context` is the document up to the point (with the thoughts kept before it) and
`following` the document after it, up to the next point or the end (the segments as the
annotator sees them). Both rows come from ONE encoding by the scorer's encoder (the
mantra where its policy puts one), the block removed at token level as
`metatrain.evaluation.ablation.remove_thinking` removes it, so the scored text ids are the
same in both. The scored tokens are the first `gain_tokens` text tokens after the block;

    gain(c) = Σ log p(scored | with) − Σ log p(scored | without)      (nats)

Rows end at the last scored token (the model is causal: nothing after it matters). A row
longer than the scorer's `max_seq_len` loses tokens from the front of the context (after
BOS), by the same count in every row of the point (the longest candidate decides the
cut), so the `without` row is one row for all K candidates: a point costs K + 1 rows,
scored in one batched call (`metatrain.engine.Scorer`). A candidate whose block alone
leaves no room, and a point with no text after it, get no gain (None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from metatrain.annotate.selection import SelectionConfig
from metatrain.documents import Document, Segment
from metatrain.errors import UserError
from metatrain.roles import Role
from metatrain.tokenizer.encoder import EncodeError, Encoder


@dataclasses.dataclass(frozen=True)
class PointRows:
    """The rows that score one point's candidates.

    Attributes:
        rows: int32 id rows: the candidates' `with` rows, then the `without` row last.
        targets: per row, the bool mask of its scored tokens.
        index: per candidate, its row in `rows` (None: not scored).
    """

    rows: list[np.ndarray]
    targets: list[np.ndarray]
    index: list[int | None]


def _block(encoder: Encoder, ids: np.ndarray, nth: int) -> tuple[int, int] | None:
    """`(start, end)` of the `nth` thinking block of `ids` (both tags included)."""
    registry = encoder.grammar.registry
    opening, closing = encoder.tag_ids[registry.thinking_open], encoder.tag_ids[registry.thinking_close]
    opens = np.flatnonzero(ids == opening)
    if nth >= len(opens):
        return None
    start = int(opens[nth])
    closes = np.flatnonzero(ids[start:] == closing)
    return (start, start + int(closes[0]) + 1) if len(closes) else None


def point_rows(encoder: Encoder, doc_id: str, mode: str, context: Sequence[Segment],
               candidates: Sequence[str | None], following: Sequence[Segment], *, gain_tokens: int,
               max_len: int) -> PointRows:
    """The `with` rows of `candidates` (None: not scored) and the shared `without` row.

    Args:
        encoder: the scorer's encoder.
        context: the document up to the point (starts with text).
        following: the document after the point, up to the next point or the end.
        gain_tokens: text tokens after the block to score.
        max_len: the longest row the scorer takes.
    """
    nth = sum(seg.kind == "thinking" for seg in context)
    found: list[tuple[int, np.ndarray, int, int, np.ndarray] | None] = []
    for c in candidates:
        if c is None:
            found.append(None)
            continue
        try:
            encoded = encoder.encode(Document(doc_id, (*context, Segment("thinking", c), *following), mode=mode))
        except EncodeError:
            found.append(None)
            continue
        ids, roles = np.asarray(encoded.ids, np.int32), np.asarray(encoded.roles)
        block = _block(encoder, ids, nth)
        if block is None:
            found.append(None)
            continue
        start, end = block
        after = end + np.flatnonzero(roles[end:] == Role.TEXT)[:gain_tokens]
        if len(after) == 0:
            found.append(None)
            continue
        last = int(after[-1]) + 1
        found.append((len(found), ids[:last], start, end, after))
    # One cut for the point: the most any candidate needs that leaves it a context token.
    cut = 0
    for f in found:
        if f is not None and len(f[1]) - max_len <= f[2] - 1:
            cut = max(cut, len(f[1]) - max_len)
    rows: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    index: list[int | None] = []
    without: tuple[np.ndarray, np.ndarray] | None = None
    for f in found:
        if f is None or len(f[1]) - cut > max_len or f[2] - 1 < cut:
            index.append(None)
            continue
        _, ids, start, end, after = f
        row = np.concatenate([ids[:1], ids[1 + cut:]])
        mask = np.zeros(len(row), bool)
        mask[after - cut] = True
        bare = np.concatenate([ids[:1], ids[1 + cut:start], ids[end:]])
        bare_mask = np.zeros(len(bare), bool)
        bare_mask[after - cut - (end - start)] = True
        if without is None:
            without = (bare, bare_mask)
        elif not (np.array_equal(without[0], bare) and np.array_equal(without[1], bare_mask)):
            raise AssertionError(f"document {doc_id!r}: the rows without a thought differ between candidates; "
                                 "this is a bug in metatrain")
        index.append(len(rows))
        rows.append(row)
        targets.append(mask)
    if without is not None:
        rows.append(without[0])
        targets.append(without[1])
    return PointRows(rows, targets, index)


class GainScorer:
    """Gains of candidate thoughts under one scoring model (`metatrain.engine.Scorer`).

    Args:
        scorer: the model (its parameters and mesh).
        encoder: its encoder (tokenizer, tags, mantra and policy).
        gain_tokens: text tokens after the point each gain scores.
        source: what to record as the scorer (a checkpoint path).
    """

    def __init__(self, scorer: Any, encoder: Encoder, gain_tokens: int, source: str):
        self.scorer, self.encoder, self.gain_tokens, self.source = scorer, encoder, gain_tokens, source

    def gains(self, doc_id: str, mode: str, context: Sequence[Segment], candidates: Sequence[str | None],
              following: Sequence[Segment]) -> list[float | None]:
        """Each candidate's gain (nats), None where it is None or cannot be scored.
        Blocking: the runner calls it in a thread."""
        planned = point_rows(self.encoder, doc_id, mode, context, candidates, following,
                             gain_tokens=self.gain_tokens, max_len=self.scorer.max_len)
        if not planned.rows:
            return [None] * len(candidates)
        scores = self.scorer.log_likelihoods(planned.rows, planned.targets)
        bare = scores[-1]
        return [None if i is None else scores[i] - bare for i in planned.index]


def build_gain_scorer(config: SelectionConfig, generator: Any, *, mesh_settings: Sequence[str] | None = None,
                      max_rows: int = 16) -> GainScorer | None:
    """The scoring model a run uses: `--scorer WORKDIR`, else the generator's own
    checkpoint (`--generator metatrain`: its parameters and mesh, shared), else None.

    Raises:
        UserError: `--select gain` with no scoring model; a scorer under several
            processes (not supported yet); a `--scorer` that is not a trained run.
    """
    from metatrain.engine import Scorer

    own = getattr(generator, "scoring_model", None)
    if config.scorer is None and own is None:
        if config.select == "gain":
            raise UserError(no_scorer_message(getattr(generator, "kind", "?")))
        return None
    refuse_multiprocess()
    max_rows = max(max_rows, config.samples + 1)  # a point's candidates and its bare row in one call
    if config.scorer is not None:
        from metatrain.run.reader import load_checkpoint

        loaded = (load_checkpoint(config.scorer) if mesh_settings is None
                  else load_checkpoint(config.scorer, mesh_settings=mesh_settings))
        # Provenance names the checkpoint step that scored, not only its run.
        return GainScorer(Scorer(loaded.params, loaded.model_config, getattr(loaded, "mesh", None), max_rows=max_rows),
                          loaded.encoder, config.gain_tokens, str(loaded.path))
    params, model_config, mesh, encoder = own()
    return GainScorer(Scorer(params, model_config, mesh, max_rows=max_rows), encoder, config.gain_tokens,
                      str(generator.model))


def no_scorer_message(generator: str) -> str:
    return (f"--select gain needs a scoring model, and --generator {generator} has none: give --scorer WORKDIR "
            "(a trained metatrain run), or --select random|first")


def refuse_multiprocess() -> None:
    """Scoring thoughts on several processes (`launch local`) is not supported yet."""
    import jax

    if jax.process_count() > 1:
        raise UserError(f"scoring candidate thoughts (--samples/--select/--scorer) runs on one process only, not "
                        f"{jax.process_count()} yet; run `metatrain annotate` without `launch`, or drop those flags")
