"""The sweep's steps as `metatrain sweep` runs them, each printing what it did.

    sizes_report    a size family's presets as a table (or JSON)
    plan_and_print  plan a sweep directory and print its points
    run_and_print   train (or collect, or emit commands for) the points, then fit
    fit_and_print   fit L(N, D), write DIR/fit.json and plots, print the report

The work itself is in `plan.py`, `run.py` and `fit.py`, imported when a step runs so
that `sweep sizes` stays light.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatrain.config import RunConfig
from metatrain.errors import UserError
from metatrain.io.storage import StoragePath


def sizes_report(family: str, config: RunConfig, *, as_json: bool = False) -> str:
    """The presets of size family `family` with parameter counts and FLOPs per token.

    Args:
        family: the size family's name (`metatrain.sweep.family.get_family`).
        config: the run config giving vocabulary and `trainer.seq_len`.
        as_json: one JSON list of rows instead of a table.

    Raises:
        UserError: no such family.
    """
    from metatrain.sweep.family import get_family

    seq_len = config.trainer.seq_len
    rows: list[dict[str, Any]] = []
    for size in get_family(family).sizes():
        model = size.model_config(config.model)
        rows.append({
            "name": size.name, "n_layers": size.n_layers, "d_model": size.d_model, "n_heads": size.n_heads,
            "n_kv_heads": size.n_kv_heads, "head_dim": size.head_dim, "d_ff": size.d_ff,
            "params": model.num_non_embedding_params, "embedding_params": model.num_embedding_params,
            "flops_per_token": model.flops_per_token(seq_len), "seq_len": seq_len,
        })
    if as_json:
        return json.dumps(rows)
    width = max(10, *(len(r["name"]) + 1 for r in rows))
    lines = [
        f"family {family} (vocab {config.model.vocab_size}, FLOPs per training token at seq_len {seq_len})",
        f"{'name':<{width}}{'L':>4}{'d_model':>8}{'heads':>6}{'kv':>4}{'d_ff':>6}{'N (non-emb)':>14}{'embedding':>12}{'FLOPs/token':>14}",
    ]
    for r in rows:
        lines.append(f"{r['name']:<{width}}{r['n_layers']:>4}{r['d_model']:>8}{r['n_heads']:>6}{r['n_kv_heads']:>4}{r['d_ff']:>6}"
                     f"{r['params']:>14,}{r['embedding_params']:>12,}{r['flops_per_token']:>14.4g}")
    return "\n".join(lines)


def print_plan(records: list[dict], out: StoragePath) -> None:
    """The planned points as a table; a note on stderr for points that train a single step.

    A sweep of cooldown branches gets two more columns (the step a branch starts from,
    `from`, and the compute it spends, `spent`) and its total compute against separate runs."""
    from metatrain.sweep.plan import compute_summary

    compute = compute_summary(records)
    print(f"planned {len(records)} runs in {out}/manifest.jsonl")
    extra = f"{'from':>7}{'spent':>12}" if compute else ""
    print(f"{'name':<34}{'N':>12}{'D':>12}{'steps':>7}{'C (FLOPs)':>12}{extra}")
    for r in records:
        if compute:
            extra = f"{r.get('branch_step', '-'):>7}{r.get('spent_flops', r['flops']):>12.3g}"
        print(f"{r['name']:<34}{r['params']:>12,}{r['tokens']:>12,}{r['steps']:>7}{r['flops']:>12.3g}{extra}")
    if compute:
        print(f"compute: {compute['branched']:.4g} FLOPs with cooldown branches, {compute['separate']:.4g} as "
              f"separate runs: {compute['saving']:.1%} saved")
    warm = [r["name"] for r in records if r["steps"] <= 1]
    if warm:
        print(f"note: {len(warm)} run(s) train a single step: {', '.join(warm[:3])}", file=sys.stderr)


def plan_and_print(spec: Path, out: StoragePath, overrides: Sequence[str] = (), *,
                   quiet_if_planned: bool = False) -> list[Any]:
    """Plan the sweep of `spec` into `out` (`plan.plan_sweep`) and print the plan.

    A directory that already holds this plan is left as it is; that is said, unless
    `quiet_if_planned`.

    Returns:
        The planned runs (`plan.PlannedRun`).

    Raises:
        UserError: a bad spec, or `out` holds another plan.
    """
    from metatrain.sweep.manifest import manifest_path
    from metatrain.sweep.plan import plan_sweep

    planned_before = manifest_path(out).is_file()
    runs = plan_sweep(spec, out, overrides)  # checks `out` holds this plan
    if not planned_before:
        print_plan([r.record for r in runs], out)
    elif not quiet_if_planned:
        print(f"{out} already holds this plan ({len(runs)} runs); nothing changed, results kept")
    return runs


def run_and_print(
    directory: StoragePath,
    *,
    spec: Path | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    emit: str | None = None,
    launch_args: Sequence[str] = (),
    dry_run: bool = False,
    collect: bool = False,
    fit: bool = False,
    resamples: int = 100,
    seed: int = 0,
) -> int:
    """`metatrain sweep run`: plan from `spec` first (if given), then one of: print the
    launch commands of the unfinished points (`emit`), mark done the points trained
    elsewhere (`collect`), or train the unfinished points here; then fit when `fit` and
    every point is done.

    Returns:
        The exit status: 1 when a selected point failed or (a cooldown branch) waits for
        a trunk that is not done, else 0.

    Raises:
        UserError: options that do not go together, or as planning, running and fitting.
    """
    from metatrain.sweep.run import collect_sweep, launch_commands, run_sweep

    if dry_run and emit is None:
        raise UserError("--dry-run only applies to --emit (launch commands); to see the points, use --emit local")
    if spec is not None:
        plan_and_print(spec, directory, overrides, quiet_if_planned=True)
    elif overrides:
        raise UserError("--set applies when planning: give --spec too (DIR must be new or hold the same plan)")
    if emit is not None:
        for command in launch_commands(directory, emit, launch_args=launch_args, dry_run=dry_run, only=only):
            print(command)
        return 0
    if collect:
        records = collect_sweep(directory)
    else:
        records = run_sweep(directory, only=only)
    selected = [r for r in records if not only or r["name"] in only]
    done = sum(r.get("status") == "done" for r in selected)
    failed = [r["name"] for r in selected if r.get("status") == "failed"]
    waiting = [] if collect else [r["name"] for r in selected
                                  if r.get("branch_of") and r.get("status") not in ("done", "failed")]
    print(f"{done}/{len(selected)} runs done" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; waiting for their trunk: {', '.join(waiting)}" if waiting else ""))
    if fit and done == len(records):
        fit_and_print(directory, role="all", loss_key=None, as_json=False, tokens_key="tokens",
                      resamples=resamples, seed=seed, plots=True)
    elif fit:
        print("not fitting yet: some runs are not done (metatrain sweep fit DIR fits the finished ones)")
    return 1 if failed or waiting else 0


def fit_and_print(directory: StoragePath, *, role: str = "all", loss_key: str | None = None, as_json: bool = False,
                  tokens_key: str = "tokens", resamples: int = 100, seed: int = 0, plots: bool = True) -> None:
    """Fit the sweep in `directory` (`fit.fit_sweep`, which writes DIR/fit.json and the
    plots) and print the report: as text with its path, or as JSON.

    Raises:
        UserError: `resamples` < 0, or the manifest cannot identify the law.
    """
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
