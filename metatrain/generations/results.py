"""What each stage of a generation gives the manifest, read back from the files it wrote.

- corpus (`gen-<n>/corpus.jsonl`): documents and thinking blocks; the candidate gains of
  the annotation (`metatrain.annotate.selection.gain_statistics`: blocks, mean chosen and
  candidate gain, share of positive gains; None without candidates); and, for documents with `known` metadata (synthetic known-answer corpora),
  how many known points have a thought carrying the answer
  (`metatrain.data.synthetic.thought_answers`).
- train (`gen-<n>/work/metrics.jsonl`): the step and values of the last evaluation.
- eval (`gen-<n>/eval/report.json`): `bpb/text` and `loss/text`, the ablation's
  `removed - kept` with its interval, and with self-thinking the `self`, `none` and
  `self_minus_none` numbers, plus the answer share of the self-written thoughts
  (`eval/self_think.jsonl`).

Everything here is a pure function of those files, so a stage redone after a kill gives
the same results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from metatrain.errors import UserError

#: Evaluation values recorded from the trainer's last evaluation (`eval/KEY`).
TRAIN_KEYS: tuple[str, ...] = ("loss", "loss/text", "loss/thinking", "bpb/text")


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (a line cut short by a crash is skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def answer_share(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`{carried, total, share}` over the records with `known` metadata (None: none has any)."""
    from metatrain.data.synthetic import thought_answers as count

    known = [r for r in records if r.get("known")]
    if not known:
        return None
    carried = total = 0
    for record in known:
        c, t = count(record)
        carried += int(c)
        total += int(t)
    return {"carried": carried, "total": total, "share": carried / total if total else None}


def corpus_results(path: Path) -> dict[str, Any]:
    """Documents, blocks, candidate gains and answer share of an annotated corpus."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: the corpus stage wrote no corpus")
    records = list(read_records(path))
    blocks = sum(1 for r in records for s in r.get("segments") or () if isinstance(s, dict)
                 and s.get("kind") == "thinking")
    from metatrain.annotate.selection import gain_statistics

    gains = gain_statistics(records)
    return {"documents": len(records), "blocks": blocks, "gain": gains, "answers": answer_share(records)}


def train_results(workdir: Path) -> dict[str, Any]:
    """`step` and `KEY` of `TRAIN_KEYS` at the last evaluation of `workdir` (empty: none)."""
    path = workdir / "metrics.jsonl"
    evals: dict[int, dict] = {}
    if path.is_file():
        for record in read_records(path):
            if "eval/loss" in record and isinstance(record.get("step"), int):
                evals[record["step"]] = record
    if not evals:
        return {"step": None, **{k: None for k in TRAIN_KEYS}}
    step = max(evals)
    return {"step": step, **{k: evals[step].get(f"eval/{k}") for k in TRAIN_KEYS}}


def eval_results(out: Path) -> dict[str, Any]:
    """The headline numbers of `out/report.json` (see the module docstring)."""
    path = out / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} could not be read ({e}): the eval stage wrote no report") from None
    removed = (report.get("ablation") or {}).get("removed") or {}
    minus = removed.get("minus_kept") or {}
    results: dict[str, Any] = {
        "step": report.get("step"),
        "documents": report.get("documents"),
        "bpb/text": report.get("bpb/text"),
        "loss/text": report.get("loss/text"),
        "removed_minus_kept": {"bpb/text": minus.get("bpb/text"), "ci": minus.get("ci")} if minus else None,
        "self_think": None,
    }
    self_think = report.get("self_think")
    if isinstance(self_think, dict):
        difference = self_think.get("self_minus_none") or {}
        results["self_think"] = {
            "self": {k: (self_think.get("self") or {}).get(k) for k in ("bpb/text", "loss/text")},
            "none": {k: (self_think.get("none") or {}).get(k) for k in ("bpb/text", "loss/text")},
            "self_minus_none": {"bpb/text": difference.get("bpb/text"), "ci": difference.get("ci")},
            "answers": None,
        }
        thoughts = out / "self_think.jsonl"
        if thoughts.is_file():
            results["self_think"]["answers"] = answer_share(list(read_records(thoughts)))
    return results
