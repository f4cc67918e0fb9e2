"""`generations report`: a loop's results as a table per generation and a plot.

The table has one row per generation: the stages' state, the corpus's documents and
blocks, the annotation's mean chosen gain and share of positive gains (nats over the next
`gain_tokens` tokens), the share of known-answer points whose thought carries the
answer (the corpus's, and the self-written thoughts' with self-thinking evaluation),
the held-out `bpb/text`, the self-thinking `bpb/text` and `removed - kept` (bits per
byte of text the thinking saves, with its interval). A value the loop has not computed,
or that does not apply, is "-".

`DIR/generations.png` plots the held-out text bits per byte (with self-written
thoughts too, when evaluated) and the mean chosen thought gain against the generation.
The figure is built with `matplotlib.figure.Figure` (Agg), never pyplot.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from metatrain.generations.manifest import (
    STAGES,
    Manifest,
    compared_part,
    read_manifest,
)
from metatrain.io.outputs import write_atomically

PLOT_FILE = "generations.png"

_COLUMNS = ("gen", "stages", "docs", "blocks", "chosen gain", "gain > 0", "answers", "bpb/text",
            "self-think bpb", "self answers", "removed-kept")


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)


def rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One flat dict per generation: the numbers the table and the plot show."""
    out = []
    for generation in manifest["generations"]:
        r = generation.get("results") or {}
        corpus, evaluation = r.get("corpus") or {}, r.get("eval") or {}
        out.append({
            "generation": generation["generation"],
            "stages": {s: generation["stages"][s]["status"] for s in STAGES},
            "documents": corpus.get("documents"),
            "blocks": corpus.get("blocks"),
            "chosen_gain_mean": _get(corpus, "gain", "chosen_gain_mean"),
            "positive_gain_share": _get(corpus, "gain", "positive_gain_share"),
            "answer_share": _get(corpus, "answers", "share"),
            "bpb/text": evaluation.get("bpb/text"),
            "self_think_bpb/text": _get(evaluation, "self_think", "self", "bpb/text"),
            "self_think_answer_share": _get(evaluation, "self_think", "answers", "share"),
            "removed_minus_kept": _get(evaluation, "removed_minus_kept", "bpb/text"),
            "removed_minus_kept_ci": _get(evaluation, "removed_minus_kept", "ci"),
        })
    return out


def _stages(statuses: dict[str, str]) -> str:
    if all(s == "done" for s in statuses.values()):
        return "done"
    return " ".join(f"{stage}:{status}" for stage, status in statuses.items() if status != "done")


def format_table(manifest: Manifest) -> str:
    """The per-generation table (see the module docstring), with the loop's status above it."""
    lines = [f"generations: {manifest['status']}" + (f" ({manifest['error']})" if manifest.get("error") else "")]
    table = [_COLUMNS]
    for r in rows(manifest):
        ci = r["removed_minus_kept_ci"]
        removed = _num(r["removed_minus_kept"], "+.4f")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
            removed += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"
        table.append((str(r["generation"]), _stages(r["stages"]), _num(r["documents"], "d"), _num(r["blocks"], "d"),
                      _num(r["chosen_gain_mean"], "+.4f"), _num(r["positive_gain_share"], ".3f"),
                      _num(r["answer_share"], ".3f"), _num(r["bpb/text"]), _num(r["self_think_bpb/text"]),
                      _num(r["self_think_answer_share"], ".3f"), removed))
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def write_plot(manifest: Manifest, directory: Path) -> Path:
    """`DIR/generations.png`: text bits per byte and mean chosen thought gain against the generation."""
    from matplotlib.figure import Figure

    data = rows(manifest)
    gens = [r["generation"] for r in data]

    def series(key: str) -> list[float]:
        return [r[key] if isinstance(r[key], (int, float)) else float("nan") for r in data]

    fig = Figure(figsize=(8.8, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(gens, series("bpb/text"), "o-", label="held-out text (given thoughts)")
    if any(isinstance(r["self_think_bpb/text"], (int, float)) for r in data):
        left.plot(gens, series("self_think_bpb/text"), "s--", label="self-written thoughts")
    left.set_xlabel("generation")
    left.set_ylabel("bits per byte of text (bpb/text)")
    left.legend(fontsize="small")
    right.plot(gens, series("chosen_gain_mean"), "o-", color="C2")
    right.axhline(0.0, color="0.6", linewidth=0.8)
    if not any(isinstance(r["chosen_gain_mean"], (int, float)) for r in data):
        right.text(0.5, 0.5, "no candidate gains recorded\n(annotate.samples / select: gain)", ha="center",
                   va="center", transform=right.transAxes, color="0.4")
    right.set_xlabel("generation")
    right.set_ylabel("mean chosen thought gain (nats)")
    for ax in (left, right):
        ax.set_xticks(gens)
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    return write_atomically(directory / PLOT_FILE, buffer.getvalue(), option="plot")


def report_generations(directory: str | Path, *, as_json: bool = False, plot: bool = True) -> str:
    """The report of the loop in `directory` as text (or JSON), writing the plot unless `plot` is False."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if as_json:
        return json.dumps(compared_part(manifest), indent=1)
    text = format_table(manifest)
    if plot:
        text += f"\nplot: {write_plot(manifest, directory)}"
    return text
