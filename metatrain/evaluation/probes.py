"""Linear probes: can a linear classifier on a layer's hidden states tell the mode and role of a token?

For every layer of a trained model (the embeddings, each decoder block, the final norm)
a multinomial logistic regression is fitted on the hidden states of real tokens, once
to predict the token's *mode* (human / ai / ai_quoting_human: the grammar state after
the token) and once its *role* (text / thinking / mantra / tag). Held-out accuracy
by layer, beside the majority-class baseline, says where the model represents which
mode it is in and which part of a document it is reading.

Train and test are split by document, so a probe cannot pass by memorising one
document's tokens. Hidden states come from `layer_hidden_states`, which applies the
model's own submodules to its parameters, so the model code is not changed for this.
What does not live here: the model (`metatrain.models`), the grammar
(`metatrain.tokenizer.grammar`) and the role enum (`metatrain.roles`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from metatrain.errors import UserError
from metatrain.evaluation.placement import replicated, to_mesh
from metatrain.evaluation.stats import paired_ratio_difference
from metatrain.generate.prompts import grammar_states
from metatrain.io.outputs import write_atomically
from metatrain.layers import Embedding, RMSNorm
from metatrain.models import DecoderBlock, ModelConfig
from metatrain.models.transformer import Params
from metatrain.roles import LOSS_ROLE_LABELS, LOSS_ROLES, Role
from metatrain.tokenizer.encoder import EncodedDocument, Encoder

#: Role classes of the role probe, in label order (`Role` value - 1).
ROLE_CLASSES: tuple[str, ...] = LOSS_ROLE_LABELS
TASKS: tuple[str, ...] = ("mode", "role")


@functools.partial(jax.jit, static_argnames=("model_config", "out_sharding"))
def layer_hidden_states(
    params: Params, model_config: ModelConfig, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array,
    out_sharding: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
    """The residual stream after every layer, from the model's parameters.

    Args:
        params: the `Transformer`'s parameters (boxed or unboxed).
        model_config: the model's shape.
        inputs: [B, T] int32 token ids.
        positions: [B, T] int32 position inside each packed document.
        segment_ids: [B, T] int32 document index (0 = padding).
        out_sharding: where the result goes (`placement.replicated`: whole on every
            device of the parameters' mesh, so every process can read it); None: where
            XLA puts it.

    Returns:
        [L + 2, B, T, D] float32: index 0 the embeddings, 1..L the output of each
        decoder block, L + 1 the final norm (what `Transformer.__call__` returns).
    """
    cfg = model_config
    params = nn.unbox(params)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = Embedding(cfg.vocab_size, cfg.d_model, dtype, param_dtype)
    x = embed.apply({"params": params["embedding"]}, inputs)  # [B, T, D]
    # Remat only changes the backward pass, so the plain block gives the same forward.
    block = DecoderBlock(cfg)

    def run_block(x, layer_params):
        y, _ = block.apply({"params": layer_params}, x, positions, segment_ids)
        return y, y.astype(jnp.float32)

    if cfg.scan_layers:  # params["layers"] leaves have a leading [L] axis
        x_last, blocks = jax.lax.scan(run_block, x, params["layers"])  # blocks [L, B, T, D]
    else:
        x_last, outs = x, []
        for i in range(cfg.n_layers):
            x_last, out = run_block(x_last, params[f"layers_{i}"])
            outs.append(out)
        blocks = jnp.stack(outs)
    final = RMSNorm(cfg.norm_eps, dtype, param_dtype).apply({"params": params["final_norm"]}, x_last)
    out = jnp.concatenate([x[None].astype(jnp.float32), blocks, final[None].astype(jnp.float32)])
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


def token_labels(encoder: Encoder, ids: np.ndarray, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mode and role class of every token of one encoded document (or a prefix of one).

    Args:
        encoder: the encoder the document was encoded with.
        ids: int [n] token ids starting with BOS (`EncodedDocument.ids`).
        roles: int [n] `Role` of each token (`EncodedDocument.roles`); never PAD.

    Returns:
        (mode [n] int32 index into `encoder.grammar.modes`: the mode of the grammar
        state after the token, so `<AI>` is in ai and `</AI>` in human; role [n] int32
        index into `ROLE_CLASSES`).

    Raises:
        ValueError: ids and roles differ in length, a token has role PAD, or a tag is
            illegal where it stands.
    """
    ids, roles = np.asarray(ids), np.asarray(roles)
    if ids.shape != roles.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and roles {roles.shape} must be one [n] shape")
    if np.any(roles == Role.PAD) or np.any(roles > max(LOSS_ROLES)):
        raise ValueError("every token needs a role among text, thinking, mantra, tag (found PAD or unknown)")
    grammar = encoder.grammar
    mode_of_state = np.array([grammar.modes.index(s.mode) for s in grammar.states], np.int32)
    modes = mode_of_state[grammar_states(encoder, ids)]
    return modes, (roles.astype(np.int32) - int(Role.TEXT))


def majority_baseline(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of always predicting the most frequent training class."""
    majority = np.bincount(np.asarray(train_y)).argmax()
    return float(np.mean(np.asarray(test_y) == majority))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    *,
    steps: int = 100,
    l2: float = 1e-3,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a multinomial logistic regression (full-batch L-BFGS).

    Features are standardised with the training mean and standard deviation. The loss
    is the mean cross entropy plus `l2 / 2 * |params|^2`; the penalty keeps the problem
    strongly convex, so separable data and classes absent from training stay finite.

    Args:
        train_x: [N, D] features; train_y: [N] int labels in [0, num_classes).
        test_x: [M, D] features; test_y: [M] int labels in [0, num_classes).
        num_classes: C; a class may appear only in test (it is never predicted right).
        steps: L-BFGS iterations (fixed, so the compiled loop is one program).
        l2: weight of the squared-norm penalty.
        seed: initial weights (the problem is convex: only rounding depends on it).

    Returns:
        Accuracy on the test set, in [0, 1].
    """
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, y, n in (("train", train_y, len(train_x)), ("test", test_y, len(test_x))):
        if len(y) != n or n == 0:
            raise ValueError(f"{name}: {n} feature rows and {len(y)} labels; need as many, and at least one")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    return float(probe_hits(train_x, train_y, test_x, num_classes, test_y, steps=steps, l2=l2, seed=seed).mean())


def probe_hits(train_x, train_y, test_x, num_classes: int, test_y, *, steps: int = 100, l2: float = 1e-3,
               seed: int = 0) -> np.ndarray:
    """bool [M]: which test rows the probe fitted on the training rows gets right (`fit_probe`)."""
    correct = _fit_and_score(
        jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32),
        jnp.asarray(test_x, jnp.float32), jnp.asarray(test_y, jnp.int32),
        jax.random.key(seed), num_classes=num_classes, steps=steps, l2=l2,
    )
    return np.asarray(correct)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "l2"))
def _fit_and_score(train_x, train_y, test_x, test_y, key, *, num_classes: int, steps: int, l2: float):
    """bool [M]: test rows predicted right; x [N, D] / [M, D] float32, y int32."""
    mean = train_x.mean(0)
    std = train_x.std(0)
    std = jnp.where(std > 0, std, 1.0)  # a constant feature carries nothing; avoid 0/0
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    d = train_x.shape[1]
    params = (0.01 * jax.random.normal(key, (d, num_classes)), jnp.zeros((num_classes,)))

    def loss(params):
        w, b = params
        logp = jax.nn.log_softmax(train_x @ w + b)  # [N, C]
        ce = -jnp.mean(jnp.take_along_axis(logp, train_y[:, None], axis=1))
        return ce + 0.5 * l2 * (jnp.sum(w * w) + jnp.sum(b * b))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    w, b = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))[0]
    return jnp.argmax(test_x @ w + b, axis=-1) == test_y


def run_probes(
    params: Params,
    model_config: ModelConfig,
    encoder: Encoder,
    documents: Sequence[EncodedDocument],
    *,
    seq_len: int,
    max_tokens: int = 50_000,
    memory_bytes: int = 4 << 30,
    test_fraction: float = 0.3,
    seed: int = 0,
    batch_rows: int = 8,
) -> dict:
    """Mode and role probes on every layer, trained and tested on different documents.

    Each document is one row of its first `seq_len` tokens (no packing, so every token
    sees only its own document). Hidden states are kept only for the sampled tokens:
    host memory is `tokens * (L + 2) * D * 4` bytes, so the tokens are also capped to
    `memory_bytes` (4 GiB by default: all 50k tokens of the default run, about 7,700 of a
    7B model with D = 4096, L = 32); the report's `tokens_capped_by_memory` says when.

    Args:
        params, model_config: the model.
        encoder: the encoder the documents were encoded with (its grammar gives modes).
        documents: encoded documents, at least 2.
        seq_len: tokens kept from the start of each document.
        max_tokens: most tokens probed in total (train + test), sampled uniformly
            within each side of the split.
        test_fraction: share of the documents held out (at least one on each side).
        seed: the document split, the token sample and the probes' initial weights.
        batch_rows: documents per forward pass (the last batch is padded).

    Returns:
        JSON-ready `{"layer_names": [...], "mode": {...}, "role": {...}}`; each task has
        `classes`, `layers` (test accuracy per layer, embeddings first), `baseline`
        (majority class of train, on test), `train_tokens`, `test_tokens` and
        `test_documents`, and `minus_baseline_ci`: per layer the bootstrap interval over
        held-out documents of accuracy minus baseline (None with fewer than
        `stats.MIN_DOCUMENTS` held-out documents; `interval_note` says so). A task with one class in the training tokens is not fitted
        (there is nothing to separate): its `layers` are all None and `note` says why.

    Raises:
        UserError: fewer than 2 documents, or a bad `seq_len`, `max_tokens`,
            `test_fraction` or `batch_rows`.
    """
    if len(documents) < 2:
        raise UserError(f"probes need at least 2 documents (one to train on, one to test on), got {len(documents)}")
    for name, value, low in (("seq_len", seq_len, 1), ("max_tokens", max_tokens, 2), ("batch_rows", batch_rows, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    n_docs = len(documents)
    n_test = int(np.clip(round(test_fraction * n_docs), 1, n_docs - 1))
    is_test = np.zeros(n_docs, bool)
    is_test[rng.permutation(n_docs)[:n_test]] = True
    rows = [doc.ids[:seq_len] for doc in documents]
    labels = [token_labels(encoder, doc.ids[:seq_len], doc.roles[:seq_len]) for doc in documents]
    per_token = (model_config.n_layers + 2) * model_config.d_model * 4  # float32 hidden states, every layer
    capped = min(max_tokens, max(2, memory_bytes // per_token))
    kept = _sample_tokens([len(r) for r in rows], is_test, capped, rng)
    features = _kept_hidden_states(params, model_config, encoder, rows, kept, seq_len, batch_rows)
    token_test = np.concatenate([np.full(len(k), t) for k, t in zip(kept, is_test)])
    token_doc = np.concatenate([np.full(len(k), d) for d, k in enumerate(kept)])
    report: dict = {"layer_names": ["embeddings", *(f"block_{i}" for i in range(1, model_config.n_layers + 1)),
                                    "final_norm"],
                    "tokens_capped_by_memory": capped < max_tokens and sum(map(len, rows)) > capped}
    for task, column, classes in (("mode", 0, encoder.grammar.modes), ("role", 1, ROLE_CLASSES)):
        y = np.concatenate([lab[column][k] for lab, k in zip(labels, kept)])
        report[task] = _probe_task(features, y, token_test, token_doc, classes, int(n_test), seed)
    return report


def _sample_tokens(lengths: list[int], is_test: np.ndarray, max_tokens: int, rng) -> list[np.ndarray]:
    """Positions kept in each row: every token, or a uniform sample of each side of the
    split, sized in proportion to the side (at least one token each)."""
    kept = [np.arange(n) for n in lengths]
    total = sum(lengths)
    if total <= max_tokens:
        return kept
    for side in (False, True):
        docs = np.flatnonzero(is_test == side)
        side_total = sum(lengths[i] for i in docs)
        cap = max(1, min(side_total, int(max_tokens * side_total / total)))
        chosen = np.sort(rng.choice(side_total, cap, replace=False))
        starts = np.cumsum([0] + [lengths[i] for i in docs])
        for j, i in enumerate(docs):
            in_doc = chosen[(chosen >= starts[j]) & (chosen < starts[j + 1])]
            kept[i] = in_doc - starts[j]
    return kept


def _kept_hidden_states(params, model_config, encoder, rows, kept, seq_len, batch_rows) -> np.ndarray:
    """[L + 2, tokens, D] float32 hidden states of the kept tokens, in document order
    (the same on every process of a multi-process run: each reads the whole result)."""
    everywhere = replicated(params)
    pad = max(encoder.pad_id, 0)  # segment 0 masks it anyway; any valid id will do
    n_kept = sum(len(k) for k in kept)
    out = np.empty((model_config.n_layers + 2, n_kept, model_config.d_model), np.float32)
    offset = 0
    for start in range(0, len(rows), batch_rows):
        inputs = np.full((batch_rows, seq_len), pad, np.int32)
        segments = np.zeros((batch_rows, seq_len), np.int32)
        for b, row in enumerate(rows[start:start + batch_rows]):
            inputs[b, :len(row)] = row
            segments[b, :len(row)] = 1
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape)
        hidden = layer_hidden_states(params, model_config, *to_mesh((inputs, positions, segments), everywhere),
                                     out_sharding=everywhere)  # [L+2, B, T, D]
        batch_kept = kept[start:start + batch_rows]
        b_idx = np.concatenate([np.full(len(k), b) for b, k in enumerate(batch_kept)]).astype(np.int32)
        t_idx = np.concatenate(batch_kept).astype(np.int32)
        # Gathered on the device, so only the sampled tokens travel to the host.
        out[:, offset:offset + len(t_idx)] = np.asarray(_take(hidden, *to_mesh((b_idx, t_idx), everywhere),
                                                              out_sharding=everywhere))
        offset += len(t_idx)
    return out


@functools.partial(jax.jit, static_argnames=("out_sharding",))
def _take(hidden: jax.Array, b_idx: jax.Array, t_idx: jax.Array,
          out_sharding: jax.sharding.NamedSharding | None = None) -> jax.Array:
    """hidden [L + 2, B, T, D] at (b_idx[i], t_idx[i]) -> [L + 2, n, D] (placed as `layer_hidden_states`)."""
    out = hidden[:, b_idx, t_idx]
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


def _probe_task(features: np.ndarray, y: np.ndarray, token_test: np.ndarray, token_doc: np.ndarray, classes,
                test_documents: int, seed: int) -> dict:
    """One task's report: a probe per layer of `features` [L + 2, tokens, D], each with
    the interval of its accuracy minus the baseline's over the held-out documents."""
    train, test = ~token_test, token_test
    result = {
        "classes": list(classes),
        "baseline": majority_baseline(y[train], y[test]),
        "train_tokens": int(train.sum()),
        "test_tokens": int(test.sum()),
        "test_documents": test_documents,
    }
    present = np.unique(y[train])
    if len(present) < 2:
        result["layers"] = [None] * len(features)
        result["note"] = (f"the training tokens hold one class only ({classes[present[0]]}): a probe has "
                          "nothing to separate, so none was fitted; add documents with other classes")
        return result
    majority = np.bincount(y[train]).argmax()
    docs, n_docs = token_doc[test], int(token_doc.max()) + 1

    def per_doc(hits: np.ndarray) -> np.ndarray:
        return np.bincount(docs, weights=hits.astype(np.float64), minlength=n_docs)

    baseline_hits, tokens = per_doc(y[test] == majority), per_doc(np.ones(int(test.sum()), bool))
    result["layers"], result["minus_baseline_ci"] = [], []
    for layer in features:
        hits = probe_hits(layer[train], y[train], layer[test], len(classes), y[test], seed=seed)
        result["layers"].append(float(hits.mean()))
        interval = paired_ratio_difference(per_doc(hits), baseline_hits, tokens, seed=seed)
        result["minus_baseline_ci"].append(interval.ci)
    if interval.reason:
        result["interval_note"] = interval.reason
    held_out = np.unique(y[test])
    if len(held_out) < 2:
        result["note"] = (f"the held-out tokens hold one class only ({classes[held_out[0]]}): the baseline is "
                          "1.0 and the accuracies say little; evaluate documents with other classes (--data)")
    return result


def plot_probes(report: dict, path: Path) -> Path:
    """A PNG of held-out accuracy by layer, one line per task, its baseline dashed.

    The image is rendered in memory first, so an interrupted render leaves nothing on
    disk; only the short write goes through a temporary (`write_atomically`).

    Returns:
        `path`, written atomically.
    """
    names = report["layer_names"]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.0, 0.35 * len(names) + 2.5), 4.0), layout="constrained")
    ax = fig.subplots()
    for task, colour in zip(TASKS, ("tab:blue", "tab:orange")):
        if task not in report:
            continue
        result = report[task]
        # A task that was not fitted (one class) has no line, only its baseline.
        accuracy = [np.nan if a is None else a for a in result["layers"]]
        ax.plot(x, accuracy, marker="o", color=colour, label=f"{task} probe")
        ax.axhline(result["baseline"], color=colour, linestyle="--", linewidth=1, label=f"{task} baseline")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    return write_atomically(path, image.getvalue(), option="plot")
