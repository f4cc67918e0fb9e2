"""Per-document, per-role sums of next-token loss over laid-out rows (`layout.py`).

The forward pass and the cross entropy are the training step's (`Transformer`, the
output projection in `loss.precision`, the fused kernel `loss.impl`), so a loss here is
the loss `metatrain train` reports; what changes is the bookkeeping: each scored target
adds its negative log-likelihood, its correctness and (for text) its bytes to its
document's row of `DocumentSums`, so that statistics can resample documents.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.config import LossConfig
from metatrain.evaluation.layout import Rows
from metatrain.evaluation.placement import replicated, to_mesh
from metatrain.evaluation.text_bytes import bits_per_byte
from metatrain.kernels import fused_cross_entropy
from metatrain.models import ModelConfig, Transformer, output_projection
from metatrain.roles import LOSS_ROLE_LABELS, LOSS_ROLES, Role


@dataclasses.dataclass(frozen=True)
class DocumentSums:
    """Sums per document (rows) and role (columns, `LOSS_ROLE_LABELS` order), float64.

    Attributes:
        nll: [docs, 4] Σ negative log-likelihood (nats).
        count: [docs, 4] scored targets.
        correct: [docs, 4] targets that were the argmax.
        text_bytes: [docs] Σ UTF-8 bytes of the text targets (`text_bytes.py`).
    """

    nll: np.ndarray
    count: np.ndarray
    correct: np.ndarray
    text_bytes: np.ndarray

    @property
    def documents(self) -> int:
        return self.nll.shape[0]

    def metrics(self) -> dict[str, Any]:
        """`loss/<role>`, `accuracy/<role>`, `tokens/<role>`, `bpb/text` and `bytes/text`
        over all documents (None where a role has no token)."""
        nll, count, correct = self.nll.sum(0), self.count.sum(0), self.correct.sum(0)
        out: dict[str, Any] = {}
        for j, role in enumerate(LOSS_ROLE_LABELS):
            out[f"loss/{role}"] = float(nll[j] / count[j]) if count[j] else None
            out[f"accuracy/{role}"] = float(correct[j] / count[j]) if count[j] else None
            out[f"tokens/{role}"] = int(count[j])
        out["bpb/text"] = bits_per_byte(nll[0], self.text_bytes.sum())
        out["bytes/text"] = int(self.text_bytes.sum())
        return out


@functools.partial(jax.jit, static_argnames=("model_config", "impl", "precision", "out_sharding"))
def token_losses(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    model_config: ModelConfig,
    impl: str = "auto",
    precision: str = "compute",
    out_sharding: jax.sharding.NamedSharding | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(nll, correct)`, each f32 [B, T], of every target; 0 where `target_roles` is PAD.

    `out_sharding`: where both go (`placement.replicated`: whole on every device of the
    parameters' mesh, so every process can read them); None: where XLA puts them.
    """
    hidden = Transformer(model_config).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )  # [B, T, D]
    projection = output_projection(params, model_config)  # [D, V]
    if precision == "float32":
        hidden, projection = hidden.astype(jnp.float32), projection.astype(jnp.float32)
    else:
        projection = projection.astype(hidden.dtype)
    b, t, d = hidden.shape
    mask = batch["target_roles"].reshape(-1) != Role.PAD
    nll, _, correct = fused_cross_entropy(
        hidden.reshape(b * t, d), projection, batch["targets"].reshape(-1), mask, impl=impl, return_correct=True
    )
    nll, correct = nll.reshape(b, t), correct.reshape(b, t)
    if out_sharding is not None:
        nll, correct = (jax.lax.with_sharding_constraint(a, out_sharding) for a in (nll, correct))
    return nll, correct


def score_rows(
    params: Any,
    model_config: ModelConfig,
    loss_config: LossConfig,
    rows: Rows,
    num_documents: int,
    token_bytes: np.ndarray,
    *,
    batch_rows: int = 8,
) -> DocumentSums:
    """Runs the model over `rows` and adds each scored target to its document's sums.

    Args:
        params: the model's unboxed parameters, on one device or sharded over a mesh (in
            a multi-process run every process calls this with the same rows, and gets
            the same sums).
        model_config: its shape.
        loss_config: `impl` and `precision` of the cross entropy (weights are not used:
            every role is reported on its own).
        rows: laid-out documents (`layout_documents`).
        num_documents: how many documents `rows.doc_index` refers to.
        token_bytes: int [V], UTF-8 bytes of each token (`token_byte_lengths`).
        batch_rows: rows per forward pass (fixed, so it compiles once).
    """
    nll_sum = np.zeros((num_documents, len(LOSS_ROLES)))
    count, correct = np.zeros_like(nll_sum), np.zeros_like(nll_sum)
    text_bytes = np.zeros((num_documents,))
    everywhere = replicated(params)
    for start, batch in rows.batches(batch_rows):
        nll, ok = jax.device_get(token_losses(
            params, to_mesh(batch, everywhere), model_config=model_config, impl=loss_config.impl,
            precision=loss_config.precision, out_sharding=everywhere,
        ))
        n = min(batch_rows, len(rows) - start)
        doc = rows.doc_index[start:start + n].reshape(-1)
        role = rows.target_roles[start:start + n].reshape(-1).astype(np.int64)
        scored = doc >= 0
        doc, column = doc[scored], role[scored] - 1  # Role.TEXT .. Role.TAG -> 0 .. 3
        np.add.at(nll_sum, (doc, column), nll[:n].reshape(-1)[scored].astype(np.float64))
        np.add.at(count, (doc, column), 1.0)
        np.add.at(correct, (doc, column), ok[:n].reshape(-1)[scored].astype(np.float64))
        text = column == 0
        targets = rows.targets[start:start + n].reshape(-1)[scored]
        np.add.at(text_bytes, doc[text], token_bytes[targets[text]].astype(np.float64))
    return DocumentSums(nll_sum, count, correct, text_bytes)
