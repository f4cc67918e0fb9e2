"""`sweep fit`: from a manifest to fitted scaling laws, a JSON report and plots.

For each variant (or the whole sweep, without variants) and each loss fitted, the
finished runs give points (N, D, L): N the non-embedding parameters (`params`), D the
training tokens (`tokens`, or another key such as `text_tokens`), and L a manifest key:
the final evaluation loss of a role (`--role`: `loss/text`, `loss/thinking`, or the
joint `loss`) or any other numeric key (`--loss-key`, e.g. `bpb/text`, bits per byte of
text, comparable across tokenizers). A series is named by a label (the role, or the key
itself) and fitted with L(N, D) (`metatrain.sweep.law`, approach 3) and, where runs
carry an IsoFLOP `budget`, with parabolas per budget (`metatrain.sweep.isoflop`,
approach 2).

Inputs that cannot identify the law are refused with a `UserError` saying what is
missing: no finished run, a key absent, a NaN or non-positive loss, fewer than 5 runs,
a single model size or a single token budget.

`DIR/fit.json` holds the report (`fit_sweep` returns the same dict):

    {"fits": [{"variant": null, "role": "text", "loss_key": "loss/text", "E": .., "A": ..,
               "B": .., "alpha": .., "beta": .., "ci": {"E": [lo, hi], ...}, ...}, ...],
     "isoflop": [{"variant": .., "role": .., "loss_key": .., "budgets": [..], "N_opt": {..},
                  "D_opt": {..}}],
     "notes": [...], "plots": [...]}

`role` is the series' label: the role, or with `--loss-key` the key itself.

DIR may be a bucket (`gs://...`): the manifest is read there, and `fit.json` and the
plots are written there as whole objects.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any, Sequence

import numpy as np

from metatrain.errors import UserError
from metatrain.io.outputs import write_atomically
from metatrain.io.storage import as_path
from metatrain.sweep.isoflop import fit_isoflop
from metatrain.sweep.law import PARAMS, bootstrap_law, fit_law
from metatrain.sweep.manifest import Record, manifest_path, read_manifest
from metatrain.sweep.plots import write_plots
from metatrain.sweep.series import RoleFit, Series, Target, loss_name, targets_for

MIN_POINTS = len(PARAMS)
REPORT = "fit.json"
PLOTS_DIR = "plots"


def fit_sweep(
    directory: str | os.PathLike,
    *,
    role: str = "all",
    loss_key: str | None = None,
    tokens_key: str = "tokens",
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Fit the sweep in `directory`, write `fit.json` (and plots), return the report.

    Args:
        directory: holds `manifest.jsonl`; local or in a bucket.
        role: "text", "thinking", "joint" or "all".
        loss_key: fit this numeric manifest key instead of the roles (e.g. "bpb/text");
            its label in the report is the key itself. Only with `role="all"`.
        tokens_key: the manifest key used as D.
        resamples: bootstrap resamples for the intervals (0: none).
        level: coverage of the intervals.
        seed: bootstrap seed.
        plots: also write PNGs under `DIR/plots/`.

    Raises:
        UserError: the manifest cannot identify the law (see the module docstring).
    """
    directory = as_path(directory)
    records = read_manifest(directory)
    targets = targets_for(role, loss_key)
    series, notes = select_series(records, targets, tokens_key, source=str(manifest_path(directory)))
    fits = [fit_series(s, resamples=resamples, level=level, seed=seed) for s in series]
    notes += [note for f in fits if (note := degenerate_note(f)) is not None]
    report = build_report(fits, notes, tokens_key=tokens_key, level=level, resamples=resamples)
    report["sweep"] = str(directory)
    if plots:
        report["plots"] = [str(p) for p in write_plots(fits, directory / PLOTS_DIR)]
    write_atomically(directory / REPORT, json.dumps(report, indent=1) + "\n", option="fit report")
    return report


def fit_series(series: Series, *, resamples: int = 100, level: float = 0.95, seed: int = 0) -> RoleFit:
    """L(N, D) with bootstrap intervals, and the IsoFLOP analysis where runs have budgets."""
    law = fit_law(series.N, series.D, series.L)
    if resamples > 0:
        law = bootstrap_law(series.N, series.D, series.L, law, resamples=resamples, level=level, seed=seed)
    iso = None
    has_budget = np.isfinite(series.budget)
    if has_budget.any():
        iso = fit_isoflop(
            series.budget[has_budget],
            series.N[has_budget],
            series.D[has_budget],
            series.L[has_budget],
            resamples=resamples,
            level=level,
            seed=seed,
        )
    return RoleFit(series=series, law=law, isoflop=iso)


# -- choosing and checking the points ---------------------------------------------------------


def select_series(
    records: Sequence[Record], targets: Sequence[Target], tokens_key: str = "tokens", source: str = "the manifest"
) -> tuple[list[Series], list[str]]:
    """The fittable series of each variant and target, and notes on what was left out.

    A (variant, target) whose runs all have a null loss (e.g. no thinking token was
    evaluated, a corpus without thinking blocks) is left out with a note when several
    targets are fitted, and refused when it is the only one asked for.

    Raises:
        UserError: what is missing for the law to be identified (module docstring).
    """
    done = [r for r in records if r.get("status") == "done"]
    notes = []
    left = [r["name"] for r in records if r.get("status") != "done"]
    if not done:
        statuses = ", ".join(f"{n} {s}" for s, n in Counter(r.get("status") for r in records).items())
        raise UserError(
            f"no finished run in {source} ({statuses}); train the points first (metatrain sweep run DIR), "
            'or give runs made elsewhere status "done" and their losses'
        )
    if left:
        notes.append(f"{len(left)} run(s) not done are left out: {_names(left)}")
    for target in targets:
        _check_key_exists(done, target, source)
    variants = list(dict.fromkeys(r.get("variant") for r in done))
    series, skipped = [], []
    for variant in variants:
        runs = [r for r in done if r.get("variant") == variant]
        for target in targets:
            s = _series(runs, variant, target, tokens_key, source)
            if s is None:
                skipped.append((variant, target))
            else:
                series.append(s)
                notes += _identification_notes(s, tokens_key)
    for variant, target in skipped:
        what = f"variant {variant!r}, " if variant is not None else ""
        if target.is_role:
            message = (f"{what}role {target.label}: every finished run has {target.key} null "
                       f"(no {target.label} token evaluated)")
        else:
            message = f"{what}{target.key}: every finished run has {target.key} null"
        if len(targets) == 1:
            raise UserError(f"{message}; nothing to fit for this {'role' if target.is_role else 'key'}")
        notes.append(message + "; not fitted")
    if not series:
        raise UserError(f"no role has losses to fit in {source}: " + "; ".join(notes))
    return series, notes


def _check_key_exists(done: list[Record], target: Target, source: str) -> None:
    """A `--loss-key` no finished run has is most likely a typo: say which keys could be fitted."""
    if target.is_role or any(target.key in r for r in done):
        return
    numeric = dict.fromkeys(
        k for r in done for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    raise UserError(
        f"{source}: no finished run has the key {target.key!r} (--loss-key {target.key}); numeric keys of the "
        f"finished runs: {_names(list(numeric), limit=12) or 'none'}"
    )


def _series(runs: list[Record], variant: str | None, target: Target, tokens_key: str, source: str) -> Series | None:
    loss_key = target.key
    for r in runs:
        missing = [k for k in ("params", tokens_key, "tokens", "flops", loss_key) if k not in r]
        if missing:
            raise UserError(
                f"{source}: run {r['name']!r} is done but has no {', '.join(repr(k) for k in missing)}; "
                f"sweep fit needs params (non-embedding N), tokens (D), flops and the fitted {loss_key} of each run"
            )
    nulls = [r["name"] for r in runs if r[loss_key] is None]
    if len(nulls) == len(runs):
        return None
    where = f"variant {variant!r}, " if variant is not None else ""
    if nulls:
        raise UserError(
            f"{source}: {where}{loss_key} is null for {_names(nulls)} but not for the other runs; "
            "rerun those points, or set their status to \"failed\" to leave them out"
        )
    N = _positive(runs, "params", source)
    D = _positive(runs, tokens_key, source)
    L = _positive(runs, loss_key, source, hint='rerun the point, or set its status to "failed" to leave it out')
    names = tuple(r["name"] for r in runs)
    if len(np.unique(N)) < 2:
        raise UserError(
            f"{source}: {where}every run has the same model size (params={int(N[0]):,}); L(N, D) needs at "
            "least 2 sizes (3 or more to separate A/N^alpha from E): add sizes to the sweep"
        )
    if len(np.unique(D)) < 2:
        raise UserError(
            f"{source}: {where}every run has the same {tokens_key} ({D[0]:.6g}); L(N, D) needs at least 2 "
            "token budgets: add token budgets to the sweep"
        )
    if len(runs) < MIN_POINTS:
        raise UserError(
            f"{source}: {where}too few points: {len(runs)} finished run(s) ({_names(names)}), and L(N, D) "
            f"has {MIN_POINTS} parameters; finish at least {MIN_POINTS} runs (e.g. 3 sizes x 2 token budgets)"
        )
    flops = _positive(runs, "flops", source)
    return Series(
        variant=variant,
        label=target.label,
        loss_key=loss_key,
        names=names,
        N=N,
        D=D,
        L=L,
        flops=flops,
        flops_per_token=flops / _positive(runs, "tokens", source),
        budget=np.array([float(r["budget"]) if r.get("budget") is not None else math.nan for r in runs]),
    )


def _identification_notes(s: Series, tokens_key: str) -> list[str]:
    """Two values of N (or D) fix only the difference of the A (or B) term at them, so
    A, alpha and E (or B, beta and E) trade off freely: the fit is one of many."""
    notes = []
    for axis, values, term in (("model sizes", s.N, "A, alpha"), (f"values of {tokens_key}", s.D, "B, beta")):
        if len(np.unique(values)) == 2:
            notes.append(
                f"{_label(s)}: only 2 {axis}, so {term} and E are not separately determined (any such "
                "curve fits two points); read the intervals, and use 3 or more for a real fit"
            )
    return notes


#: Relative spread below which losses (or a fitted law's predictions) count as constant.
_FLAT = 1e-6


def _spread(values: np.ndarray) -> float:
    return float(np.ptp(values) / max(float(np.max(np.abs(values))), 1e-300))


def degenerate_note(fit: RoleFit) -> str | None:
    """A note when the fit says nothing about scaling: the losses do not vary across the
    runs (runs that did not train, or a loss key copied from one run), or the fitted law
    predicts the same loss everywhere (only E was fitted). The fit is still reported, so a
    sweep can be inspected, but its A, B, alpha and beta carry no meaning."""
    s = fit.series
    if _spread(s.L) <= _FLAT:
        return (f"{_label(s)}: the losses do not vary ({s.loss_key} is {s.L[0]:.6g} in all {len(s.L)} runs), so "
                "the fit is degenerate: only E is determined, and A, B, alpha and beta mean nothing; check that "
                "the runs trained and that their losses were collected")
    if _spread(fit.law.law(s.N, s.D)) <= _FLAT:
        return (f"{_label(s)}: the fitted law predicts the same loss for every run, so the fit is degenerate: "
                "the losses do not fall with model size or tokens, and A, B, alpha and beta mean nothing")
    return None


def _positive(runs: list[Record], key: str, source: str, hint: str = "fix the manifest") -> np.ndarray:
    values = []
    for r in runs:
        v = r[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not ok:
            raise UserError(f"{source}: run {r['name']!r} has {key}={v!r}; it must be a finite number > 0 ({hint})")
        values.append(float(v))
    return np.array(values)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- the report --------------------------------------------------------------------------------


def build_report(
    fits: Sequence[RoleFit], notes: Sequence[str], *, tokens_key: str, level: float, resamples: int
) -> dict[str, Any]:
    """The JSON-ready report of `fits` (see the module docstring)."""
    report: dict[str, Any] = {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "N": "params (non-embedding parameters)",
        "D": tokens_key,
        "level": level,
        "fits": [_law_entry(f) for f in fits],
        "isoflop": [_isoflop_entry(f) for f in fits if f.isoflop is not None],
        "notes": list(notes),
    }
    for f in fits:
        if f.isoflop is not None:
            report["notes"] += [f"{_label(f.series)}: {n}" for n in f.isoflop.notes]
    return report


def _law_entry(fit: RoleFit) -> dict[str, Any]:
    law = fit.law.law
    alpha, beta = law.alpha, law.beta
    return {
        "variant": fit.series.variant,
        "role": fit.series.label,
        "loss_key": fit.series.loss_key,
        **law.as_dict(),
        "ci": {p: list(v) for p, v in fit.law.intervals.items()},
        "resamples": fit.law.resamples,
        "points": len(fit.series.names),
        "rms_log_residual": fit.law.rms_log_residual,
        # Minimising L at fixed C = k N D gives N_opt ~ C^(beta/(alpha+beta)).
        "degenerate": degenerate_note(fit) is not None,
        "N_opt_exponent": beta / (alpha + beta) if alpha + beta > 0 else None,
        "D_opt_exponent": alpha / (alpha + beta) if alpha + beta > 0 else None,
    }


def _isoflop_entry(fit: RoleFit) -> dict[str, Any]:
    iso = fit.isoflop
    assert iso is not None

    def law(p):
        return None if p is None else {"exponent": p.exponent, "coefficient": p.coefficient, "ci": p.interval}

    return {
        "variant": fit.series.variant,
        "role": fit.series.label,
        "loss_key": fit.series.loss_key,
        "budgets": [
            {"flops": m.budget, "N_opt": m.n_opt, "D_opt": m.d_opt, "loss": m.loss, "bracketed": m.bracketed, "points": m.points}
            for m in iso.minima
        ],
        "N_opt": law(iso.n_opt),
        "D_opt": law(iso.d_opt),
    }


def _label(series: Series) -> str:
    return f"{series.variant}/{series.label}" if series.variant is not None else series.label


def _ci(entry: dict, name: str) -> str:
    ci = entry["ci"].get(name)
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal."""
    level = round(100 * report["level"])
    lines = [f"{report['law']}   (N = non-embedding params, D = {report['D']}; {level}% bootstrap intervals)"]
    for e in report["fits"]:
        head = f"variant {e['variant']}, " if e["variant"] is not None else ""
        lines.append(
            f"\n{head}{loss_name(e['role'], e['loss_key'], with_key=True)}: {e['points']} runs, rms log residual "
            f"{e['rms_log_residual']:.3g}, {e['resamples']} bootstrap resamples"
        )
        for name in PARAMS:
            lines.append(f"  {name:<6} {e[name]:>12.4g}  {_ci(e, name)}")
        if e["N_opt_exponent"] is not None:
            lines.append(
                f"  compute-optimal (from alpha, beta): N_opt ~ C^{e['N_opt_exponent']:.3f}, "
                f"D_opt ~ C^{e['D_opt_exponent']:.3f}"
            )
    for e in report["isoflop"]:
        head = f"variant {e['variant']}, " if e["variant"] is not None else ""
        lines.append(f"\nIsoFLOP, {head}{loss_name(e['role'], e['loss_key'])}:")
        for b in e["budgets"]:
            flag = "" if b["bracketed"] else "  (extrapolated)"
            lines.append(
                f"  C={b['flops']:.3g}: N_opt {b['N_opt']:.4g}, D_opt {b['D_opt']:.4g}, loss {b['loss']:.4f}{flag}"
            )
        for key in ("N_opt", "D_opt"):
            p = e[key]
            if p is not None:
                ci = f"  [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" if p["ci"] else ""
                lines.append(f"  {key}(C) = {p['coefficient']:.4g} * C^{p['exponent']:.3f}{ci}")
    if report["notes"]:
        lines.append("\nnotes:")
        lines += [f"  - {n}" for n in report["notes"]]
    if report.get("plots"):
        lines.append("\nplots: " + ", ".join(report["plots"]))
    return "\n".join(lines)
