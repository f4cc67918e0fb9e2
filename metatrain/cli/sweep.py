"""`metatrain sweep sizes|plan|run|fit|coord-check`: scaling-law sweeps from the command line.

    metatrain sweep sizes [--family tiny] [--config BASE.yaml] [--json]
    metatrain sweep plan --spec SWEEP.yaml --out DIR [--set KEY=VALUE ...]
    metatrain sweep run DIR [--spec SWEEP.yaml] [--fit] [--only NAME ...]
    metatrain sweep run DIR --emit local|tpu|gke|slurm [--launch-arg ARG ...] [--dry-run]
    metatrain sweep run DIR --collect
    metatrain sweep fit DIR [--role text|thinking|joint|all | --loss-key KEY] [--json] [--no-plots]
    metatrain sweep coord-check --out DIR [--widths 64 128 ...] [--steps N] [--lr LR] [--layers L]

`sweep run DIR --spec SWEEP.yaml --fit` is the whole sweep in one command: plan (if DIR
has no manifest yet), train every point here, fit and plot. See docs/sweeps.md.

DIR (and `plan --out`) may be a bucket URL, `gs://bucket/sweep`; the spec is a local file.
Parsing only; the work is `metatrain.sweep.steps` (`metatrain.sweep.coord_check` for
coord-check), imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metatrain.cli.options import output_path, positive_int
from metatrain.io.storage import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="scaling-law sweeps: plan, run and fit L(N, D)",
        description="Scaling-law sweeps: plan a grid or IsoFLOP sweep, run it, fit L(N, D) and plot.",
    )
    sub = p.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")

    sizes = sub.add_parser("sizes", help="the presets of a size family, with parameter counts and FLOPs")
    sizes.add_argument("--family", default="tiny", help="size family (default: tiny)")
    sizes.add_argument("--config", type=Path, default=None,
                       help="run config giving vocabulary and seq_len (default: configs/default.yaml)")
    sizes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sizes.set_defaults(func=run_sizes)

    plan = sub.add_parser("plan", help="write one run config per point and the manifest")
    plan.add_argument("--spec", type=Path, required=True, help="sweep spec YAML (see configs/sweeps/)")
    plan.add_argument("--out", required=True, type=output_path("--out"), help="sweep directory to create (a local path or gs://bucket/path)")
    _add_set(plan)
    plan.set_defaults(func=run_plan)

    run = sub.add_parser("run", help="train the unfinished points here, or print their launch commands")
    run.add_argument("directory", metavar="DIR", help="sweep directory (from `sweep plan`; local or gs://)")
    run.add_argument("--spec", type=Path, default=None,
                     help="plan DIR from this spec first (a no-op when DIR already holds this plan)")
    _add_set(run)
    run.add_argument("--only", action="append", default=[], metavar="NAME", help="only this point (repeatable)")
    run.add_argument("--fit", action="store_true", help="fit and plot once every point is done")
    run.add_argument("--emit", choices=("local", "tpu", "gke", "slurm"), default=None,
                     help="print the commands that train the unfinished points instead of training them: "
                          "`metatrain train ...` (local) or `metatrain launch TARGET ... -- train ...`")
    run.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                     help="argument for `metatrain launch TARGET` in emitted commands (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="with --emit: emitted launch commands get --dry-run")
    run.add_argument("--collect", action="store_true",
                     help="train nothing; mark done the points whose work directories hold their final evaluation")
    _add_fit_options(run)
    run.set_defaults(func=run_run)

    fit = sub.add_parser("fit", help="fit L(N, D) (and IsoFLOP minima), write DIR/fit.json and plots")
    fit.add_argument("directory", metavar="DIR", help="directory holding manifest.jsonl (local or gs://)")
    fit.add_argument("--role", default="all", choices=("text", "thinking", "joint", "all"),
                     help="loss to fit: text, thinking, the joint loss, or all of them (default)")
    fit.add_argument("--loss-key", default=None, metavar="KEY",
                     help="fit this numeric manifest key instead of --role, e.g. bpb/text (bits per byte "
                          "of text, comparable across tokenizers)")
    fit.add_argument("--json", action="store_true", help="print the JSON report instead of text")
    fit.add_argument("--tokens-key", default="tokens",
                     help="manifest key used as D (default: tokens; text_tokens with count_tokens: text)")
    fit.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    _add_fit_options(fit)
    fit.set_defaults(func=run_fit)

    coord = sub.add_parser(
        "coord-check",
        help="μP's coordinate check: activation sizes against width after a few steps, both parametrizations",
        description="Train models of several widths (fixed depth and head size) for a few Adam steps on one "
                    "synthetic batch under standard parametrization and μP, and record the mean |coordinate| "
                    "of the embedding, each block's output and the logits, and how far training moved them. "
                    "Writes DIR/coord_check.json and DIR/coord_check.png. See docs/sweeps.md, \"μP\".",
    )
    coord.add_argument("--out", required=True, type=output_path("--out"), help="directory for the JSON and the plot")
    coord.add_argument("--widths", type=positive_int, nargs="+", default=[64, 128, 256, 512, 1024], metavar="D",
                       help="d_model of each model, increasing (default: 64 128 256 512 1024)")
    coord.add_argument("--base-width", type=positive_int, default=None,
                       help="μP's mup_base_width (default: the smallest width)")
    coord.add_argument("--layers", type=positive_int, default=2, help="depth of every model (default 2)")
    coord.add_argument("--head-dim", type=positive_int, default=16, help="width of every head (default 16)")
    coord.add_argument("--steps", type=positive_int, default=10, help="Adam updates per model (default 10)")
    coord.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    coord.add_argument("--vocab", type=positive_int, default=256, help="synthetic vocabulary size (default 256)")
    coord.add_argument("--seq-len", type=positive_int, default=64, help="tokens per row (default 64)")
    coord.add_argument("--batch-size", type=positive_int, default=8, help="rows in the batch (default 8)")
    coord.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    coord.set_defaults(func=run_coord_check)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every point, after the spec's (repeatable)")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=100, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 100; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_sizes(args: argparse.Namespace) -> int:
    from metatrain.config import load_config
    from metatrain.sweep.steps import sizes_report

    print(sizes_report(args.family, load_config(args.config), as_json=args.json))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from metatrain.sweep.steps import plan_and_print

    plan_and_print(args.spec, as_path(args.out), args.overrides)
    return 0


def run_run(args: argparse.Namespace) -> int:
    from metatrain.sweep.steps import run_and_print

    return run_and_print(
        as_path(args.directory), spec=args.spec, overrides=args.overrides, only=args.only, emit=args.emit,
        launch_args=args.launch_arg, dry_run=args.dry_run, collect=args.collect, fit=args.fit,
        resamples=args.bootstrap, seed=args.seed,
    )


def run_fit(args: argparse.Namespace) -> int:
    from metatrain.sweep.steps import fit_and_print

    fit_and_print(as_path(args.directory), role=args.role, loss_key=args.loss_key, as_json=args.json,
                  tokens_key=args.tokens_key, resamples=args.bootstrap, seed=args.seed, plots=not args.no_plots)
    return 0


def run_coord_check(args: argparse.Namespace) -> int:
    from metatrain.sweep.coord_check import CoordCheckSpec, coord_check_and_write

    spec = CoordCheckSpec(
        widths=tuple(args.widths), base_width=args.base_width, n_layers=args.layers, head_dim=args.head_dim,
        steps=args.steps, learning_rate=args.lr, vocab_size=args.vocab, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed,
    )
    coord_check_and_write(spec, as_path(args.out))
    return 0
