"""`metatrain eval`: does the thinking help, what did the model learn, can it be monitored.

    metatrain eval --workdir W [--data DOCS.jsonl] [--step N] [--out DIR] [--json]

Reads one checkpoint of a run (its newest, or `--step N`) onto one device and the run's
held-out split (or `--data`), and writes `DIR/report.json` (default
`W/eval/<step>/`) and `DIR/probes.png`; prints the report as tables (`--json`: the JSON).
What each number means: docs/eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from metatrain.errors import UserError
from metatrain.io.storage import as_path, is_remote


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: per-role loss, text bits per byte, thinking ablations, "
             "free-generation grammar, probes",
        description=(
            "Evaluate a checkpoint on the run's held-out split (or --data): per-role loss and text bits "
            "per byte; the text's bits per byte with thinking removed, shuffled or reduced to the mantra, "
            "with bootstrap intervals over documents; tag-grammar and mantra rates of free generation; "
            "linear probes for mode and role at every layer. See docs/eval.md."
        ),
    )
    p.add_argument("--workdir", type=as_path, required=True, metavar="W",
                   help="a `metatrain train` work directory, or gs://BUCKET/PATH")
    p.add_argument("--data", type=str, action="append", default=None, metavar="DOCS.jsonl",
                   help="evaluate these documents (JSON Lines, compressed or a glob; repeatable) instead of "
                        "the run's held-out split")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the newest)")
    p.add_argument("--out", type=as_path, default=None, metavar="DIR",
                   help="where report.json and probes.png go (default: W/eval/<step>)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    p.add_argument("--max-documents", type=int, default=2000, metavar="N",
                   help="evaluate the first N documents (default 2000; 0: all of them)")
    p.add_argument("--seq-len", type=int, default=None, metavar="L", help="row length (default: the run's trainer.seq_len)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="window step inside documents longer than a row (default seq-len / 2; seq-len: no overlap)")
    p.add_argument("--batch-rows", type=int, default=8, metavar="B", help="rows per forward pass (default 8)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--min-documents", type=int, default=20, metavar="N",
                   help="fewer documents give no interval (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle, the bootstrap, sampling and probes")
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="free-generation prompts (default 8)")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="samples per prompt and mode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="free-generation budget (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="free-generation temperature (default 1.0)")
    p.add_argument("--probe-tokens", type=int, default=50_000, metavar="N",
                   help="tokens the probes use at most (default 50000)")
    p.add_argument("--no-generation", action="store_true", help="leave out free generation")
    p.add_argument("--no-probes", action="store_true", help="leave out the probes")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.set_defaults(func=run_eval)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_rows", "prompts", "samples", "max_new_tokens", "probe_tokens", "min_documents"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, low in (("max_documents", 0), ("seq_len", 1), ("stride", 1), ("step", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not 0.0 < args.level < 1.0:
        raise UserError(f"--level must be in (0, 1), got {args.level}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")


def _checkpoint(workdir: Path, step: int | None) -> Path | None:
    """The step directory `--step` names, refused with the steps there are."""
    if step is None:
        return None
    from metatrain.run.layout import CHECKPOINTS_DIR

    directory = workdir / CHECKPOINTS_DIR
    path = directory / str(step)
    if not path.is_dir():
        steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
        have = ", ".join(map(str, steps)) or "none"
        raise UserError(f"--step {step}: {workdir} has no checkpoint at step {step} (checkpoints: {have})")
    return path


def run_eval(args: argparse.Namespace) -> int:
    from metatrain.config import load_config_dict
    from metatrain.documents import SkipCounter
    from metatrain.evaluation.documents import file_documents, split_documents
    from metatrain.evaluation.report import EvalSettings, evaluate_checkpoint, format_report
    from metatrain.generate.checkpoint import load_checkpoint
    from metatrain.io.outputs import write_atomically

    _check_args(args)
    workdir = args.workdir
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory (give a `metatrain train` work directory)")
    if args.out is not None:
        check_eval_out(args.out)
    checkpoint = _checkpoint(workdir, args.step)
    loaded = load_checkpoint(None if checkpoint else workdir, checkpoint)
    config = load_config_dict(loaded.config, where=f"checkpoint {loaded.path}")
    seq_len = args.seq_len or config.trainer.seq_len
    if seq_len > loaded.model_config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's max_seq_len {loaded.model_config.max_seq_len}")
    if args.stride is not None and args.stride > seq_len:
        raise UserError(f"--stride {args.stride} must be at most --seq-len {seq_len}")
    skips = SkipCounter()
    limit = args.max_documents or None
    if args.data:
        docs = file_documents(args.data, loaded.encoder, strict=args.strict, skips=skips, limit=limit)
        data_label = ", ".join(map(str, args.data))
    else:
        data = dataclasses.replace(config.data, strict=args.strict or config.data.strict)
        docs = split_documents(data, loaded.encoder, "eval", skips=skips, limit=limit)
        data_label = f"held-out split of {', '.join(s.name for s in data.sources)} (eval_fraction {data.eval_fraction})"
    settings = EvalSettings(
        seq_len=seq_len, stride=args.stride, batch_rows=args.batch_rows, resamples=args.bootstrap,
        level=args.level, seed=args.seed, min_documents=args.min_documents, prompts=args.prompts,
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        probe_tokens=args.probe_tokens, generation=not args.no_generation, probes=not args.no_probes,
    )
    report = {"checkpoint": str(loaded.path), "step": loaded.step, "data": data_label,
              "skipped_records": skips.count, "max_documents": limit}
    report.update(evaluate_checkpoint(loaded.params, loaded.model_config, config.loss, loaded.encoder, docs, settings))
    out = check_eval_out(args.out or workdir / "eval" / str(loaded.step))
    out.mkdir(parents=True, exist_ok=True)
    if "probes" in report:
        from metatrain.evaluation.probes import plot_probes

        report["probes"]["plot"] = str(plot_probes(report["probes"], out / PROBES_PLOT))
    path = write_atomically(out / REPORT_FILE, json.dumps(report, indent=1) + "\n", option="--out")
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if skips.count:
            print(skips.summary())
        print(f"report: {path}")
        return 0
    print(f"metatrain eval: report in {path}", file=sys.stderr)
    return 0


#: The files `metatrain eval` writes into its output directory (nothing else is touched).
REPORT_FILE, PROBES_PLOT = "report.json", "probes.png"


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
