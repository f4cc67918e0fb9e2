"""`metatrain sweep sizes|plan|run|fit`: scaling-law sweeps from the command line.

    metatrain sweep sizes [--family tiny] [--config BASE.yaml] [--json]
    metatrain sweep plan --spec SWEEP.yaml --out DIR [--set KEY=VALUE ...]
    metatrain sweep run DIR [--spec SWEEP.yaml] [--fit] [--only NAME ...]
    metatrain sweep run DIR --emit local|tpu|gke|slurm [--launch-arg ARG ...] [--dry-run]
    metatrain sweep run DIR --collect
    metatrain sweep fit DIR [--role text|thinking|joint|all | --loss-key KEY] [--json] [--no-plots]

`sweep run DIR --spec SWEEP.yaml --fit` is the whole sweep in one command: plan (if DIR
has no manifest yet), train every point here, fit and plot. See docs/sweeps.md.

DIR (and `plan --out`) may be a bucket URL, `gs://bucket/sweep`; the spec is a local file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metatrain.errors import UserError
from metatrain.io.storage import StoragePath, as_path


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
    plan.add_argument("--out", required=True, help="sweep directory to create (a local path or gs://bucket/path)")
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


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every point, after the spec's (repeatable)")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=100, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 100; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_sizes(args: argparse.Namespace) -> int:
    from metatrain.config import load_config
    from metatrain.sweep.family import get_family

    config = load_config(args.config)
    seq_len = config.trainer.seq_len
    rows = []
    for size in get_family(args.family).sizes():
        model = size.model_config(config.model)
        rows.append({
            "name": size.name, "n_layers": size.n_layers, "d_model": size.d_model, "n_heads": size.n_heads,
            "n_kv_heads": size.n_kv_heads, "head_dim": size.head_dim, "d_ff": size.d_ff,
            "params": model.num_non_embedding_params, "embedding_params": model.num_embedding_params,
            "flops_per_token": model.flops_per_token(seq_len), "seq_len": seq_len,
        })
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"family {args.family} (vocab {config.model.vocab_size}, FLOPs per training token at seq_len {seq_len})")
    print(f"{'name':<10}{'L':>4}{'d_model':>8}{'heads':>6}{'kv':>4}{'d_ff':>6}{'N (non-emb)':>14}{'embedding':>12}{'FLOPs/token':>14}")
    for r in rows:
        print(f"{r['name']:<10}{r['n_layers']:>4}{r['d_model']:>8}{r['n_heads']:>6}{r['n_kv_heads']:>4}{r['d_ff']:>6}"
              f"{r['params']:>14,}{r['embedding_params']:>12,}{r['flops_per_token']:>14.4g}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from metatrain.sweep.manifest import manifest_path
    from metatrain.sweep.plan import plan_sweep

    out = as_path(args.out)
    planned_before = manifest_path(out).is_file()
    runs = plan_sweep(args.spec, out, args.overrides)
    if planned_before:
        print(f"{out} already holds this plan ({len(runs)} runs); nothing changed, results kept")
    else:
        _print_plan([r.record for r in runs], out)
    return 0


def _print_plan(records: list[dict], out: StoragePath) -> None:
    print(f"planned {len(records)} runs in {out}/manifest.jsonl")
    print(f"{'name':<34}{'N':>12}{'D':>12}{'steps':>7}{'C (FLOPs)':>12}")
    for r in records:
        print(f"{r['name']:<34}{r['params']:>12,}{r['tokens']:>12,}{r['steps']:>7}{r['flops']:>12.3g}")
    warm = [r["name"] for r in records if r["steps"] <= 1]
    if warm:
        print(f"note: {len(warm)} run(s) train a single step: {', '.join(warm[:3])}", file=sys.stderr)


def run_run(args: argparse.Namespace) -> int:
    from metatrain.sweep.manifest import manifest_path
    from metatrain.sweep.run import collect_sweep, launch_commands, run_sweep

    directory = as_path(args.directory)
    if args.dry_run and args.emit is None:
        raise UserError("--dry-run only applies to --emit (launch commands); to see the points, use --emit local")
    if args.spec is not None:
        from metatrain.sweep.plan import plan_sweep

        planned_before = manifest_path(directory).is_file()
        runs = plan_sweep(args.spec, directory, args.overrides)  # checks DIR holds this plan
        if not planned_before:
            _print_plan([r.record for r in runs], directory)
    elif args.overrides:
        raise UserError("--set applies when planning: give --spec too (DIR must be new or hold the same plan)")
    if args.emit is not None:
        for command in launch_commands(directory, args.emit, launch_args=args.launch_arg,
                                       dry_run=args.dry_run, only=args.only):
            print(command)
        return 0
    if args.collect:
        records = collect_sweep(directory)
    else:
        records = run_sweep(directory, only=args.only)
    selected = [r for r in records if not args.only or r["name"] in args.only]
    done = sum(r.get("status") == "done" for r in selected)
    failed = [r["name"] for r in selected if r.get("status") == "failed"]
    print(f"{done}/{len(selected)} runs done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.fit and done == len(records):
        _fit_and_print(directory, role="all", loss_key=None, as_json=False, tokens_key="tokens",
                       resamples=args.bootstrap, seed=args.seed, plots=True)
    elif args.fit:
        print("not fitting yet: some runs are not done (metatrain sweep fit DIR fits the finished ones)")
    return 1 if failed else 0


def run_fit(args: argparse.Namespace) -> int:
    _fit_and_print(as_path(args.directory), role=args.role, loss_key=args.loss_key, as_json=args.json,
                   tokens_key=args.tokens_key, resamples=args.bootstrap, seed=args.seed, plots=not args.no_plots)
    return 0


def _fit_and_print(directory: StoragePath, *, role: str, loss_key: str | None, as_json: bool, tokens_key: str,
                   resamples: int, seed: int, plots: bool) -> None:
    from metatrain.sweep.fit import REPORT, fit_sweep, format_report

    if resamples < 0:
        raise UserError(f"--bootstrap {resamples}: give a number of resamples >= 0")
    report = fit_sweep(directory, role=role, loss_key=loss_key, tokens_key=tokens_key, resamples=resamples,
                       seed=seed, plots=plots)
    if as_json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        print(f"report: {directory / REPORT}")
