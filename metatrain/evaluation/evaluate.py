"""`evaluate_workdir`: one checkpoint of a run evaluated, its report and plot written.

    metatrain eval --workdir W [--data DOCS.jsonl] [--step N] [--out DIR] [--json]

Reads one checkpoint of a run (its newest, or `step`) onto one device and the run's
held-out split (or `data`), computes the report (`report.evaluate_checkpoint`) and
writes `DIR/report.json` (default `W/eval/<step>/`) and `DIR/probes.png`. `EvalOptions`
holds the command's options (checked with the flag names in messages); `check_eval_out`
says whether a directory may receive a report. What each number means: docs/eval.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatrain.documents import SkipCounter
from metatrain.errors import UserError
from metatrain.io.storage import is_remote

#: The files `metatrain eval` writes into its output directory (nothing else is touched).
REPORT_FILE, PROBES_PLOT = "report.json", "probes.png"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `metatrain eval` was asked for; each field is the flag of the same name.

    Attributes:
        data: evaluate these document files instead of the run's held-out split.
        step: checkpoint step (None: the newest).
        out: where report.json and probes.png go (None: `W/eval/<step>`).
        max_documents: evaluate the first N documents (0: all of them).
        seq_len: row length (None: the run's `trainer.seq_len`).
        stride: window step inside long documents (None: seq_len / 2).
        batch_rows: rows per forward pass.
        bootstrap, level, min_documents: the bootstrap intervals.
        seed: seed of the shuffle, the bootstrap, sampling and probes.
        prompts, samples, max_new_tokens, temperature: free generation.
        probe_tokens: tokens the probes use at most.
        generation, probes: run those parts at all.
        strict: stop at the first bad record instead of skipping it.
    """

    data: Sequence[str] | None = None
    step: int | None = None
    out: Path | None = None
    max_documents: int = 2000
    seq_len: int | None = None
    stride: int | None = None
    batch_rows: int = 8
    bootstrap: int = 1000
    level: float = 0.95
    min_documents: int = 20
    seed: int = 0
    prompts: int = 8
    samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    probe_tokens: int = 50_000
    generation: bool = True
    probes: bool = True
    strict: bool = False

    def check(self) -> None:
        """Refuses values out of range, naming the flag.

        Raises:
            UserError: the first value out of range.
        """
        for name in ("batch_rows", "prompts", "samples", "max_new_tokens", "probe_tokens", "min_documents"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, low in (("max_documents", 0), ("seq_len", 1), ("stride", 1), ("step", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.bootstrap < 0:
            raise UserError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise UserError(f"--level must be in (0, 1), got {self.level}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate_workdir` did: the report, where it was written, the records skipped."""

    report: dict[str, Any]
    path: Path
    skips: SkipCounter


def check_eval_out(out: Path) -> Path:
    """`out` if it may receive a report: absent, or a real directory whose `report.json`
    (if any) was written by `metatrain eval` (a rerun replaces it; other files stay).

    Raises:
        UserError: `out` is a link or not a directory, or holds a `report.json` that is
            not an evaluation report.
    """
    links = not is_remote(str(out))  # object storage has no links
    if (links and out.is_symlink()) or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    report = out / REPORT_FILE
    if report.exists() or (links and report.is_symlink()):
        try:
            ours = report.is_file() and not (links and report.is_symlink()) and "ablation" in json.loads(report.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"--out {out} holds a {REPORT_FILE} that is not a `metatrain eval` report; "
                            "it is left as it is: choose another --out")
    return out


def evaluate_workdir(workdir: Path, options: EvalOptions) -> EvalResult:
    """Evaluate one checkpoint of `workdir` and write its report (see the module docstring).

    The options, the work directory and `options.out` are checked before the checkpoint
    loads.

    Returns:
        The report (a JSON-ready dict, the keys of docs/eval.md), the path of
        `report.json`, and the bad records skipped.

    Raises:
        UserError: a bad option, no such checkpoint, no document to evaluate, or an
            output directory that may not receive the report.
    """
    from metatrain.config import load_config_dict
    from metatrain.evaluation.documents import file_documents, split_documents
    from metatrain.evaluation.report import EvalSettings, evaluate_checkpoint
    from metatrain.io.outputs import write_atomically
    from metatrain.run.reader import load_checkpoint

    options.check()
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory (give a `metatrain train` work directory)")
    if options.out is not None:
        check_eval_out(options.out)
    loaded = load_checkpoint(workdir, step=options.step)
    config = load_config_dict(loaded.config, where=f"checkpoint {loaded.path}")
    seq_len = options.seq_len or config.trainer.seq_len
    if seq_len > loaded.model_config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's max_seq_len {loaded.model_config.max_seq_len}")
    if options.stride is not None and options.stride > seq_len:
        raise UserError(f"--stride {options.stride} must be at most --seq-len {seq_len}")
    skips = SkipCounter()
    limit = options.max_documents or None
    if options.data:
        docs = file_documents(options.data, loaded.encoder, strict=options.strict, skips=skips, limit=limit)
        data_label = ", ".join(map(str, options.data))
    else:
        data = dataclasses.replace(config.data, strict=options.strict or config.data.strict)
        docs = split_documents(data, loaded.encoder, "eval", skips=skips, limit=limit)
        data_label = f"held-out split of {', '.join(s.name for s in data.sources)} (eval_fraction {data.eval_fraction})"
    settings = EvalSettings(
        seq_len=seq_len, stride=options.stride, batch_rows=options.batch_rows, resamples=options.bootstrap,
        level=options.level, seed=options.seed, min_documents=options.min_documents, prompts=options.prompts,
        samples=options.samples, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
        probe_tokens=options.probe_tokens, generation=options.generation, probes=options.probes,
    )
    report = {"checkpoint": str(loaded.path), "step": loaded.step, "data": data_label,
              "skipped_records": skips.count, "max_documents": limit}
    report.update(evaluate_checkpoint(loaded.params, loaded.model_config, config.loss, loaded.encoder, docs, settings))
    out = check_eval_out(options.out or workdir / "eval" / str(loaded.step))
    out.mkdir(parents=True, exist_ok=True)
    if "probes" in report:
        from metatrain.evaluation.probes import plot_probes

        report["probes"]["plot"] = str(plot_probes(report["probes"], out / PROBES_PLOT))
    path = write_atomically(out / REPORT_FILE, json.dumps(report, indent=1) + "\n", option="--out")
    return EvalResult(report, path, skips)
