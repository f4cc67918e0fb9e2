"""The cheap part of the evaluation at every trainer evaluation: `removed - kept`.

`eval/ablation/removed_minus_kept` is the bits per byte of text the thinking saves on
held-out documents: the text of the same documents scored with their thinking blocks
and without them (`ablation.remove_thinking`), through the trainer's own jitted eval
step. The documents are chosen once, at the first evaluation: this process's share of
the held-out split (every `process_count`-th document), in order, up to the first that
does not fit in what is left of `trainer.eval_batches` batches in both variants (a
document too long for them on its own is passed over), laid out whole (`layout.py`, windows
of `seq_len` without overlap for longer documents). Every process runs the same number
of batches (the largest any process needs, agreed once), so the sums are global.

`metatrain eval` reports the same difference with its interval, the other variants,
free generation and probes; this is the number to watch while a run trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from metatrain.config import RunConfig
from metatrain.data import global_batch
from metatrain.documents import SkipCounter
from metatrain.evaluation.ablation import remove_thinking
from metatrain.evaluation.documents import iter_split_documents
from metatrain.evaluation.layout import RowCounter, Rows, layout_documents
from metatrain.evaluation.text_bytes import bits_per_byte
from metatrain.run.metrics import add_sums

logger = logging.getLogger(__name__)
#: Held-out documents too long for the budget that are skipped before giving up.
_MAX_TOO_LONG = 1000
#: Metric keys this writes (under `eval/`), a contract with scripts and dashboards.
KEYS: tuple[str, ...] = ("ablation/removed_minus_kept", "ablation/kept/bpb/text", "ablation/removed/bpb/text",
                         "ablation/tokens/text", "ablation/documents")


class InLoopAblation:
    """Held-out documents in both variants, ready for the trainer's eval step.

    Args:
        config: the run config (data, batch size, sequence length, eval batches).
        encoder: the run's encoder.
        skips: the trainer's skip counter (bad records are counted once).
    """

    def __init__(self, config: RunConfig, encoder, skips: SkipCounter | None = None):
        tc = config.trainer
        index, count = jax.process_index(), jax.process_count()
        self.local_rows = tc.batch_size // count
        budget = self.local_rows * tc.eval_batches
        kept_count, removed_count = RowCounter(tc.seq_len), RowCounter(tc.seq_len)
        docs, removed, too_long = [], [], 0
        # Read lazily, and stop at the first document that does not fit what is left: a
        # pod's held-out split can be far larger than what one evaluation scores.
        for i, doc in enumerate(iter_split_documents(config.data, encoder, "eval", skips=skips)):
            if i % count != index:
                continue
            without = remove_thinking(encoder, doc)
            if RowCounter(tc.seq_len).add(len(doc)) > budget:  # would never fit: the next may
                too_long += 1
                if too_long >= _MAX_TOO_LONG:
                    break
                continue
            if kept_count.add(len(doc)) > budget or removed_count.add(len(without)) > budget:
                break
            docs.append(doc)
            removed.append(without)
        if not docs:
            logger.warning(
                "in-loop ablation: no held-out document fits %d rows (trainer.eval_batches x the batch rows of a "
                "process; %d longer ones skipped), so eval/ablation/* are null: raise trainer.eval_batches",
                budget, too_long)
        self.documents = len(docs)
        self.kept = layout_documents(docs, tc.seq_len)
        self.removed = layout_documents(removed, tc.seq_len)
        need = -(-max(len(self.kept), len(self.removed), 1) // self.local_rows)
        if count > 1:
            from jax.experimental import multihost_utils

            need = int(np.max(multihost_utils.process_allgather(np.int32(need))))
            self.documents = int(np.sum(multihost_utils.process_allgather(np.int32(len(docs)))))
        self.batches = need

    def _sums(self, rows: Rows, eval_step: Callable, params: Any, sharding) -> dict[str, float]:
        sums = None
        for b in range(self.batches):
            batch = rows.batch(b * self.local_rows, self.local_rows)
            sums = add_sums(sums, eval_step(params, global_batch(batch, sharding)))
        return sums

    def evaluate(self, eval_step: Callable, params: Any, sharding) -> dict[str, Any]:
        """`eval/ablation/...` metrics (see `KEYS`); None values where there is no text."""
        kept = self._sums(self.kept, eval_step, params, sharding)
        removed = self._sums(self.removed, eval_step, params, sharding)
        if kept["count/text"] != removed["count/text"]:  # the ablation's contract; a bug if broken
            raise AssertionError(f"in-loop ablation scored {removed['count/text']} text tokens without thinking, "
                                 f"{kept['count/text']} with it")
        text_bytes = kept.get("bytes/text", 0.0)
        return {
            "eval/ablation/removed_minus_kept": bits_per_byte(removed["nll_sum/text"] - kept["nll_sum/text"], text_bytes),
            "eval/ablation/kept/bpb/text": bits_per_byte(kept["nll_sum/text"], text_bytes),
            "eval/ablation/removed/bpb/text": bits_per_byte(removed["nll_sum/text"], text_bytes),
            "eval/ablation/tokens/text": int(kept["count/text"]),
            "eval/ablation/documents": self.documents,
        }
