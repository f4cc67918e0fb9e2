"""`evaluate_workdir`: one checkpoint of a run evaluated, its report and plot written.

    metatrain eval --workdir W [--data DOCS.jsonl] [--step N] [--out DIR] [--json]

Reads one checkpoint of a run (its newest, or `step`) onto a mesh of the visible
devices and the run's held-out split (or `data`), computes the report
(`report.evaluate_checkpoint`, and with `--self-think` the self-thinking pass,
`self_think.run_self_think`, which reads the documents' segments too) and writes
`DIR/report.json` (default `W/eval/<step>/`), `DIR/probes.png` and, with
`--self-think`, `DIR/self_think.jsonl` (the documents with the self-written thoughts). In a multi-process run (`metatrain launch local -- eval ...`) the
mesh spans every process's devices; every process reads the same documents and computes
the same report, and process 0 alone writes it (`placement`). `EvalOptions`
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
from metatrain.engine.sampling import check_seed
from metatrain.errors import UserError
from metatrain.evaluation.report import EvalSettings
from metatrain.io.storage import is_remote

#: The files `metatrain eval` writes into its output directory (nothing else is touched).
REPORT_FILE, PROBES_PLOT = "report.json", "probes.png"
SELF_THINK_FILE = "self_think.jsonl"  # with `--self-think`: the documents with self-written thoughts


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `metatrain eval` was asked for; each field is the flag of the same name.

    Attributes:
        data: evaluate these document files instead of the run's held-out split.
        step: checkpoint step (None: the newest).
        out: where report.json and probes.png go (None: `W/eval/<step>`).
        max_documents: evaluate the first N documents (0: all of them).
        strict: stop at the first bad record instead of skipping it.
        settings: what is measured and how much (`--seq-len`, `--bootstrap`, `--prompts`, ...).
        mesh_settings: `--set mesh.KEY=VALUE` values: the mesh the checkpoint is restored
            onto (empty: every visible device, in a layout the model allows).
    """

    data: Sequence[str] | None = None
    step: int | None = None
    out: Path | None = None
    max_documents: int = 2000
    strict: bool = False
    settings: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    mesh_settings: Sequence[str] = ()

    def check(self) -> None:
        """Refuses values out of range, naming the flag.

        Raises:
            UserError: the first value out of range.
        """
        settings = self.settings
        for name in ("batch_rows", "prompts", "samples", "max_new_tokens", "probe_tokens", "min_documents",
                     "self_think_tokens"):
            value = getattr(settings, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        bounds = (("max_documents", self.max_documents, 0), ("seq_len", settings.seq_len, 1),
                  ("stride", settings.stride, 1), ("step", self.step, 0))
        for name, value, low in bounds:
            if value is not None and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if settings.resamples < 0:
            raise UserError(f"--bootstrap must be >= 0, got {settings.resamples}")
        if not 0.0 < settings.level < 1.0:
            raise UserError(f"--level must be in (0, 1), got {settings.level}")
        if settings.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {settings.temperature}")
        if settings.self_think and settings.samples is not None and settings.temperature == 0:
            raise UserError(f"--self-think --samples {settings.samples} with --temperature 0 writes the same greedy "
                            "thoughts every time; leave out --samples for greedy, or give --temperature above 0")
        check_seed(settings.seed)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate_workdir` did: the report, where it was written, the records skipped,
    and whether this process wrote it (process 0 of a multi-process run; the others
    computed the same report and wrote nothing)."""

    report: dict[str, Any]
    path: Path
    skips: SkipCounter
    wrote: bool = True


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
    ours = False
    if report.exists() or (links and report.is_symlink()):
        try:
            ours = report.is_file() and not (links and report.is_symlink()) and "ablation" in json.loads(report.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"--out {out} holds a {REPORT_FILE} that is not a `metatrain eval` report; "
                            "it is left as it is: choose another --out")
    thoughts = out / SELF_THINK_FILE
    if thoughts.exists() or (links and thoughts.is_symlink()):
        # Written after report.json: one without a report beside it is not ours.
        if not ours or (links and thoughts.is_symlink()) or not thoughts.is_file():
            raise UserError(f"--out {out} holds a {SELF_THINK_FILE} that `metatrain eval` did not write; "
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
        UserError: a bad option (a seed the PRNG cannot take, more free-generation samples
            than memory holds: both before any work), no such checkpoint, no document to
            evaluate, an output directory that may not receive the report, or
            `--self-think` on a source without segments (a token cache).
    """
    from metatrain.config import load_config_dict
    from metatrain.evaluation.documents import file_documents, split_documents
    from metatrain.evaluation.free_generation import check_generation_fits
    from metatrain.evaluation.placement import writes_files
    from metatrain.evaluation.report import PROMPT_TOKENS, evaluate_checkpoint
    from metatrain.generate.generator import Generator
    from metatrain.io.outputs import check_output_file, write_atomically
    from metatrain.run.reader import load_checkpoint

    options.check()
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory (give a `metatrain train` work directory)")
    if options.out is not None:
        check_eval_out(options.out)
    loaded = load_checkpoint(workdir, step=options.step, mesh_settings=list(options.mesh_settings))
    config = load_config_dict(loaded.config, where=f"checkpoint {loaded.path}")
    settings = dataclasses.replace(options.settings, seq_len=options.settings.seq_len or config.trainer.seq_len)
    seq_len = settings.seq_len
    if seq_len > loaded.model_config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's max_seq_len {loaded.model_config.max_seq_len}")
    if settings.stride is not None and settings.stride > seq_len:
        raise UserError(f"--stride {settings.stride} must be at most --seq-len {seq_len}")
    if settings.generation:
        check_generation_fits(Generator(loaded.params, loaded.model_config, loaded.encoder, loaded.mesh), prompts=settings.prompts,
                              samples=settings.generation_samples, prompt_tokens=PROMPT_TOKENS,
                              max_new_tokens=settings.max_new_tokens)
    skips = SkipCounter()
    limit = options.max_documents or None
    if options.data:
        docs = file_documents(options.data, loaded.encoder, strict=options.strict, skips=skips, limit=limit)
        data_label = ", ".join(map(str, options.data))
    else:
        data = dataclasses.replace(config.data, strict=options.strict or config.data.strict)
        docs = split_documents(data, loaded.encoder, "eval", skips=skips, limit=limit)
        data_label = f"held-out split of {', '.join(s.name for s in data.sources)} (eval_fraction {data.eval_fraction})"
    report = {"checkpoint": str(loaded.path), "step": loaded.step, "data": data_label,
              "skipped_records": skips.count, "max_documents": limit}
    out = options.out or workdir / "eval" / str(loaded.step)
    if options.out is None:
        check_eval_out(out)  # refused before the evaluation, by every process alike
    if settings.self_think:
        check_output_file(out / SELF_THINK_FILE, inputs=options.data or (), option="--out")
    sources = None
    if settings.self_think:  # the documents again, with their segments (refused before any work)
        from metatrain.evaluation.self_think import (
            file_source_documents,
            split_source_documents,
        )

        if options.data:
            sources = file_source_documents(options.data, loaded.encoder, strict=options.strict, limit=limit)
        else:
            sources = split_source_documents(data, loaded.encoder, limit=limit)
        if [s.document.id for s in sources] != [d.doc_id for d in docs]:
            raise AssertionError("--self-think read other documents than the evaluation")
    report.update(evaluate_checkpoint(loaded.params, loaded.model_config, config.loss, loaded.encoder, docs, settings,
                                      mesh=loaded.mesh))
    self_think = None
    if sources is not None:
        from metatrain.evaluation.self_think import run_self_think

        generator = Generator(loaded.params, loaded.model_config, loaded.encoder, loaded.mesh)
        self_think = run_self_think(generator, config.loss, sources, settings, docs)
        report["self_think"] = self_think.report
    if not writes_files():  # the same report; process 0 writes it
        if "probes" in report:
            report["probes"]["plot"] = str(out / PROBES_PLOT)
        return EvalResult(report, out / REPORT_FILE, skips, wrote=False)
    out = check_eval_out(out)  # again: a file may have appeared while evaluating
    out.mkdir(parents=True, exist_ok=True)
    if "probes" in report:
        from metatrain.evaluation.probes import plot_probes

        report["probes"]["plot"] = str(plot_probes(report["probes"], out / PROBES_PLOT))
    path = write_atomically(out / REPORT_FILE, json.dumps(report, indent=1) + "\n", option="--out")
    if self_think is not None:
        write_atomically(out / SELF_THINK_FILE, self_think.jsonl(), inputs=options.data or (), option="--out")
    return EvalResult(report, path, skips)
