"""`evaluate_checkpoint`: one report that answers the method's questions about a run.

    losses      loss/<role>, accuracy/<role>, tokens/<role> (as in training) and
                bpb/text, on the documents as they are
    ablation    text loss and bpb/text of the same text tokens with the thinking
                kept, removed, shuffled or reduced to the mantra (`ablation.py`), each
                difference to `kept` with a bootstrap interval over documents (`stats.py`)
    free_generation  illegal tag transitions, mantra reproduction and leaving AI mode
                when sampling with the grammar mask and mantra forcing off, next to the
                same counts with them on (`free_generation.py`)
    probes      held-out accuracy of linear probes for each token's mode and role at
                every layer, next to the majority-class baseline (`probes.py`)
    self_think  (with `--self-think`) text bits per byte after thoughts the model writes
                itself at each insertion point, against none, with an interval
                (`self_think.py`; run by `evaluate.py`, which has the documents' segments)

The report is a JSON-ready dict (its keys are a contract: docs/eval.md); `format_report`
prints it as tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from metatrain.config import LossConfig
from metatrain.errors import UserError
from metatrain.evaluation.ablation import VARIANTS, make_variants
from metatrain.evaluation.layout import layout_documents
from metatrain.evaluation.scoring import DocumentSums, score_rows
from metatrain.evaluation.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    MIN_DOCUMENTS,
    paired_ratio_difference,
)
from metatrain.evaluation.text_bytes import LN2, token_byte_lengths
from metatrain.roles import LOSS_ROLE_LABELS, Role
from metatrain.tokenizer.encoder import EncodedDocument, Encoder

#: Text tokens of a free-generation prompt, at most (the opening of a document).
PROMPT_TOKENS: int = 24
#: Free generation's samples per prompt and mode when `--samples` is not given.
FREE_SAMPLES: int = 4


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `metatrain eval` measures and how much of it.

    Attributes:
        seq_len: positions per row (None: the run's `trainer.seq_len`, filled in by
            `metatrain.evaluation.evaluate` before scoring).
        stride: window step for documents longer than a row (default `seq_len // 2`).
        batch_rows: rows per forward pass.
        resamples, level, seed, min_documents: the bootstrap (`stats.py`).
        prompts: free-generation prompts (the opening text of the first documents).
        samples: with `self_think`, sampled trajectories per document (None: one, greedy),
            and free generation keeps `FREE_SAMPLES`; without it, free generation's
            samples per prompt and mode (None: `FREE_SAMPLES`).
        max_new_tokens: free-generation budget per sample.
        temperature: sampling temperature (free generation; self-thinking with `samples`).
        probe_tokens: tokens the probes are fitted and tested on, at most.
        generation, probes: run those parts at all.
        self_think: run the self-thinking pass (a decode per insertion point).
        self_think_tokens: budget of a self-written thought.
    """

    seq_len: int | None = None
    stride: int | None = None
    batch_rows: int = 8
    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0
    min_documents: int = MIN_DOCUMENTS
    prompts: int = 8
    samples: int | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    probe_tokens: int = 50_000
    generation: bool = True
    probes: bool = True
    self_think: bool = False
    self_think_tokens: int = 64

    @property
    def generation_samples(self) -> int:
        """Free generation's samples per prompt and mode."""
        return FREE_SAMPLES if self.samples is None or self.self_think else self.samples

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.seq_len // 2)


def score_documents(params: Any, model_config, loss_config: LossConfig, docs: Sequence[EncodedDocument],
                    token_bytes: np.ndarray, settings: EvalSettings) -> DocumentSums:
    """Every target of `docs` scored once (`layout.py`), summed per document."""
    rows = layout_documents(docs, settings.seq_len, settings.window_stride)
    return score_rows(params, model_config, loss_config, rows, len(docs), token_bytes,
                      batch_rows=settings.batch_rows)


def ablation_report(sums: dict[str, DocumentSums], settings: EvalSettings) -> dict[str, Any]:
    """`ablation.<variant>` with `loss/text`, `bpb/text`, `tokens/text`, and for every
    variant but `kept` a `minus_kept` difference with its interval."""
    kept = sums["kept"]
    kept_tokens = kept.metrics()["tokens/text"]
    out: dict[str, Any] = {}
    for name, s in sums.items():
        m = s.metrics()
        if m["tokens/text"] != kept_tokens:
            raise AssertionError(f"ablation {name} scored {m['tokens/text']} text tokens, kept {kept_tokens}")
        entry: dict[str, Any] = {"loss/text": m["loss/text"], "bpb/text": m["bpb/text"], "tokens/text": m["tokens/text"]}
        if name != "kept":
            interval = paired_ratio_difference(
                s.nll[:, 0], kept.nll[:, 0], kept.text_bytes, scale=1 / LN2, resamples=settings.resamples,
                level=settings.level, seed=settings.seed, min_documents=settings.min_documents,
            )
            loss_diff = None
            if m["loss/text"] is not None and entry["tokens/text"]:
                loss_diff = float((s.nll[:, 0].sum() - kept.nll[:, 0].sum()) / entry["tokens/text"])
            entry["minus_kept"] = {
                "bpb/text": interval.estimate,
                "loss/text": loss_diff,
                "ci": interval.ci,
                "documents": interval.documents,
                **({"note": interval.reason} if interval.reason else {}),
            }
        out[name] = entry
    missing = [v for v in VARIANTS if v not in sums]
    out["headline"] = "removed - kept"
    out["documents"] = int((kept.text_bytes > 0).sum())
    out["level"] = settings.level
    out["resamples"] = settings.resamples
    if missing:
        out["note"] = (f"{', '.join(missing)} left out: fewer than two documents have thinking blocks, "
                       "so there is nothing to shuffle between")
    return out


def _prompts(encoder: Encoder, docs: Sequence[EncodedDocument], count: int,
             max_tokens: int = PROMPT_TOKENS) -> list[str]:
    """The opening text run of the first documents that open with text (at most `max_tokens`)."""
    out = []
    for doc in docs:
        roles = np.asarray(doc.roles)
        first = np.flatnonzero(roles == Role.TEXT)
        if not len(first):
            continue
        start = int(first[0])
        stop = start
        while stop < len(roles) and roles[stop] == Role.TEXT and stop - start < max_tokens:
            stop += 1
        text = encoder.tokenizer.decode_text(doc.ids[start:stop])
        if text.strip():
            out.append(text)
        if len(out) >= count:
            break
    return out


def evaluate_checkpoint(
    params: Any,
    model_config,
    loss_config: LossConfig,
    encoder: Encoder,
    docs: Sequence[EncodedDocument],
    settings: EvalSettings,
    mesh: Any = None,
) -> dict[str, Any]:
    """The whole report for one checkpoint on `docs` (see the module docstring); `mesh`:
    the mesh `params` are on (None: one device), where free generation decodes too.

    Raises:
        UserError: no document to evaluate.
    """
    if not docs:
        raise UserError("no document to evaluate: the data holds no valid document")
    token_bytes = token_byte_lengths(encoder.tokenizer)
    variants = make_variants(encoder, docs, settings.seed)
    sums = {name: score_documents(params, model_config, loss_config, v, token_bytes, settings)
            for name, v in variants.items()}
    report: dict[str, Any] = {"documents": len(docs), **sums["kept"].metrics()}
    report["ablation"] = ablation_report(sums, settings)
    report["layout"] = {"seq_len": settings.seq_len, "stride": settings.window_stride}
    if settings.generation:
        from metatrain.engine.sampling import SamplingConfig
        from metatrain.evaluation.free_generation import run_free_generation

        prompts = _prompts(encoder, docs, settings.prompts)
        if prompts:
            report["free_generation"] = run_free_generation(
                params, model_config, encoder, prompts, num_samples=settings.generation_samples,
                max_new_tokens=settings.max_new_tokens, sampling=SamplingConfig(settings.temperature),
                seed=settings.seed, mesh=mesh,
            )
    if settings.probes:
        from metatrain.evaluation.probes import run_probes

        if len(docs) >= 2:
            report["probes"] = run_probes(params, model_config, encoder, docs, seq_len=settings.seq_len,
                                          max_tokens=settings.probe_tokens, seed=settings.seed,
                                          batch_rows=settings.batch_rows)
    return report


# -- text ---------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The report as tables for the terminal."""
    lines = []
    head = report.get("checkpoint", "")
    lines.append(f"evaluation of {head}" if head else "evaluation")
    lines.append(f"data: {report.get('data', '')}, {report['documents']} documents")
    lines.append("")
    lines.append(f"{'role':<10}{'loss':>9}{'accuracy':>10}{'tokens':>10}")
    for role in LOSS_ROLE_LABELS:
        lines.append(f"{role:<10}{_num(report[f'loss/{role}']):>9}{_num(report[f'accuracy/{role}']):>10}"
                     f"{report[f'tokens/{role}']:>10,}")
    lines.append(f"bpb/text {_num(report['bpb/text'])}  ({report['bytes/text']:,} bytes of text)")
    ab = report["ablation"]
    level = round(100 * ab["level"])
    lines.append("")
    lines.append(f"thinking ablation: the same {ab['kept']['tokens/text']:,} text tokens, {ab['documents']} documents")
    lines.append(f"{'variant':<13}{'loss/text':>10}{'bpb/text':>10}{'- kept (bpb)':>14}  {level}% interval")
    notes = []
    for name in VARIANTS:
        if name not in ab:
            continue
        e = ab[name]
        diff = e.get("minus_kept")
        delta, ci = ("", "")
        if diff is not None:
            delta = _num(diff["bpb/text"], "+.4f")
            ci = f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]" if diff["ci"] else "none (see note)"
            if diff.get("note") and diff["note"] not in notes:
                notes.append(diff["note"])
        lines.append(f"{name:<13}{_num(e['loss/text']):>10}{_num(e['bpb/text']):>10}{delta:>14}  {ci}")
    if ab.get("note"):
        notes.append(ab["note"])
    lines += [f"note: {n}" for n in notes]
    fg = report.get("free_generation")
    if fg:
        lines.append("")
        lines.append(f"free generation: {fg['prompts']} prompts x {fg['samples_per_prompt']} samples, "
                     f"{fg['max_new_tokens']} tokens, temperature {fg['temperature']}")
        lines.append(f"{'':<8}{'illegal/1k tok':>15}{'mantra exact':>14}{'AI left':>9}{'tokens':>9}")
        for key in ("free", "masked"):
            s = fg[key]
            lines.append(f"{key:<8}{_num(s['illegal_per_1000_tokens'], '.2f'):>15}{_num(s['mantra_exact'], '.3f'):>14}"
                         f"{_num(s['ai_left_fraction'], '.3f'):>9}{s['tokens']:>9,}")
    st = report.get("self_think")
    if st:
        lines += [""] + format_self_think(st, level)
    probes = report.get("probes")
    if probes:
        lines.append("")
        names = probes["layer_names"]
        lines.append(f"linear probes (held-out accuracy): {'':<4}" + "".join(f"{n[:11]:>11} " for n in names)
                     + f"{'baseline':>10}")
        for task in ("mode", "role"):
            p = probes[task]
            cis = p.get("minus_baseline_ci") or [None] * len(p["layers"])
            accs = "".join(f"{_num(a, '.3f') + ('*' if ci and (ci[0] > 0 or ci[1] < 0) else ' '):>12}"
                           for a, ci in zip(p["layers"], cis))
            lines.append(f"  {task:<36}{accs}{_num(p['baseline'], '.3f'):>10}")
        lines.append(f"  (*: the {level}% interval of accuracy - baseline over "
                     f"{probes['role']['test_documents']} held-out documents excludes 0)")
        for task in ("mode", "role"):
            for key in ("note", "interval_note"):
                if probes[task].get(key):
                    lines.append(f"note: {task} probe: {probes[task][key]}")
    return "\n".join(lines)


def format_self_think(st: dict[str, Any], level: int) -> list[str]:
    """The `self_think` entry as a table."""
    how = "greedy" if st["samples"] is None else f"{st['samples']} samples a document, temperature {st['temperature']}"
    th = st["thoughts"]
    lines = [f"self-thinking: {st['points']} points in {st['documents_with_points']} documents, {how}, "
             f"up to {st['max_new_tokens']} tokens a thought ({th['empty']} of {th['written']} thoughts empty)",
             f"{'thoughts':<13}{'loss/text':>10}{'bpb/text':>10}{'- none (bpb)':>14}  {level}% interval"]
    diff = st["self_minus_none"]
    ci = f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]" if diff["ci"] else "none (see note)"
    lines.append(f"{'self':<13}{_num(st['self']['loss/text']):>10}{_num(st['self']['bpb/text']):>10}"
                 f"{_num(diff['bpb/text'], '+.4f'):>14}  {ci}")
    lines.append(f"{'none':<13}{_num(st['none']['loss/text']):>10}{_num(st['none']['bpb/text']):>10}")
    if st.get("points_skipped"):
        lines.append(f"note: {st['points_skipped']} points skipped: the text before them is in a mode where "
                     "no thinking may open")
    if diff.get("note"):
        lines.append(f"note: {diff['note']}")
    return lines
