"""`sweep plan`: a spec becomes one resolved run config per point, plus the manifest.

    DIR/manifest.jsonl              one JSON object per run (metatrain.sweep.manifest)
    DIR/runs/<name>/config.yaml     the run's resolved config, loadable with load_config

A point's work directory is `DIR/runs/<name>`, so `metatrain train --workdir
DIR/runs/<name>` alone trains (or resumes) it. Token budgets become whole optimizer
steps: `steps = round(tokens / (batch_size x seq_len))`, at least 1, and the manifest
records the tokens actually trained on.

Every point's `model.vocab_size` is checked against its tokenizer's piece count (once
per distinct pair) before anything is written, so a mismatch is refused at plan time,
naming the point, instead of failing each run at its first step.

**Cooldown branches** (`branches:` in the spec, for "wsd" runs): per size and variant,
the largest budget's run is the stable trunk, which keeps its checkpoint where each
smaller budget's cooldown starts (`checkpoint.keep_steps`); each smaller budget is a run
of its own length that continues that checkpoint whole (`checkpoint.branch_from`, an
absolute path into the trunk's work directory). Under "wsd" the learning rate before a
run's cooldown does not depend on the run's length, so a branch is the separate run of
its length, bar rounding. Its manifest record is a point like any other (tokens and
flops of that whole run) plus `branch_of` (the trunk), `branch_step` (where it starts)
and `spent_flops` (the compute it adds: its cooldown only; the trunk's is its flops).

DIR may be a bucket (`gs://bucket/sweep`): the configs and the manifest are objects
there (a run directory is a prefix, which exists once something is written under it),
and each run trains with `--workdir gs://bucket/sweep/runs/<name>`. The spec is a local
file: its `base` and relative override paths are read against its directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from metatrain.config import RunConfig, config_to_dict, load_config, save_config
from metatrain.errors import UserError
from metatrain.io.storage import StoragePath, absolute, as_path, is_remote
from metatrain.models.config import ModelConfig
from metatrain.run.layout import CHECKPOINTS_DIR
from metatrain.sweep.family import ModelSize, SizeFamily, get_family
from metatrain.sweep.manifest import (
    Record,
    manifest_path,
    read_manifest,
    write_manifest,
)
from metatrain.sweep.spec import SweepSpec, check_override_keys, load_spec

RUNS_DIR = "runs"
#: The most steps a run can take: the train state counts them in a 32-bit integer.
MAX_STEPS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One point: its manifest record and its resolved run config."""

    record: Record
    config: RunConfig


def plan_sweep(spec_path: str | Path, out: str | os.PathLike, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Plan the sweep of `spec_path` into `out` (see the module docstring).

    Planning again into a directory that holds the same plan changes nothing (results
    are kept); a different plan there is refused.

    Args:
        spec_path: the sweep spec YAML.
        out: the sweep directory (created), local or in a bucket (`gs://...`).
        overrides: extra `KEY=VALUE` config overrides for every point (after the spec's).

    Returns:
        The planned runs, in manifest order.

    Raises:
        UserError: a bad spec, an override the run config refuses, a budget too small
            for one step, or `out` holding a different sweep.
    """
    spec_path = Path(spec_path).resolve()
    runs = plan_runs(load_spec(spec_path), spec_path.parent, absolute(out), overrides)
    write_plan(runs, as_path(out))
    return runs


def plan_runs(spec: SweepSpec, spec_dir: Path, out: StoragePath, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """The runs of `spec`; relative paths in its overrides are relative to `spec_dir`.

    `out` is the (absolute) sweep directory: cooldown branches name their trunk's
    checkpoints in it."""
    check_override_keys("--set", [setting.split("=", 1)[0].strip() for setting in overrides])  # as the loader reads it
    family = get_family(spec.family)
    family_width = _family_width(spec.base, spec_dir, family)
    runs: list[PlannedRun] = []
    checked: set[tuple[int, str]] = set()
    named: dict[str, float] = {}  # run name -> the grid.tokens or isoflop.budgets value it came from
    for variant in spec.variant_names:
        settings = [*_as_sets(spec.overrides), *_as_sets(spec.variants.get(variant, {})), *overrides]
        where = f"variant {variant!r}" if variant else "the spec's overrides"
        needed = [family.find(n) for n in spec.grid.sizes] if spec.grid is not None else family.sizes()
        configs = {s.name: _load_sized_config(spec.base, spec_dir, settings, s, family_width, where)
                   for s in needed}
        if spec.grid is not None:
            budgets, key = spec.token_budgets
            for size_name in spec.grid.sizes:  # before reading any data for count_tokens: text
                name = _run_name(variant, family.find(size_name), budgets[0], None)
                check_point_vocab(configs[size_name], name, checked)
                if spec.branches:
                    _check_branchable(configs[size_name], where)
            fraction = None
            if spec.count_tokens == "text":
                fraction = text_token_fraction(configs[spec.grid.sizes[0]], spec.text_fraction_batches)
            for size_name in spec.grid.sizes:
                size = family.find(size_name)
                points = []
                for tokens in budgets:
                    train_tokens = tokens / fraction if fraction else tokens
                    run = _planned(configs[size_name], size, variant, train_tokens, tokens=tokens,
                                   text_fraction=fraction, key=key)
                    points.append(_claim_name(named, run, key, tokens, "6 significant digits of the tokens"))
                runs += branched(points, budgets, out) if spec.branches else points
        else:
            iso = spec.isoflop
            for budget in iso.budgets:
                sizes = isoflop_sizes(family, configs, budget, iso.sizes_per_budget, iso.tokens_per_param)
                for size in sizes:
                    config = configs[size.name]
                    check_point_vocab(config, _run_name(variant, size, None, budget), checked)
                    tokens = budget / config.model.flops_per_token(config.trainer.seq_len)
                    run = _planned(config, size, variant, tokens, budget=budget)
                    runs.append(_claim_name(named, run, "isoflop.budgets", budget, "3 significant digits of the budget"))
    return runs


def _check_branchable(config: RunConfig, where: str) -> None:
    """Refuse cooldown branches of runs whose schedule is not "wsd"."""
    if config.optimizer.decay != "wsd":
        raise UserError(
            f"{where}: branches need optimizer.decay: wsd (this config has {config.optimizer.decay!r}, whose "
            "learning rate depends on the run's length from the start); add `optimizer.decay: wsd` to the "
            "spec's overrides"
        )


def branched(points: list[PlannedRun], budgets: Sequence[float], out: StoragePath) -> list[PlannedRun]:
    """One size and variant's points as cooldown branches of the longest (see the module docstring).

    Args:
        points: the separate runs of each budget, in the order of `budgets`.
        budgets: the spec's `branches` values (named in messages).
        out: the absolute sweep directory, where the trunk's checkpoints will be.

    Returns:
        The trunk (keeping each branch's start), then the branches from the shortest.

    Raises:
        UserError: two budgets of the same number of steps, or a budget that cannot be
            a branch: within the warmup, a cooldown of no step, or one that starts at step 0.
    """
    from metatrain.run.optimizer import cooldown_start

    steps = [p.config.trainer.steps for p in points]
    for i, j in itertools.combinations(range(len(points)), 2):
        if steps[i] == steps[j]:
            tps = points[i].config.tokens_per_step
            raise UserError(f"branches: {budgets[i]:g} and {budgets[j]:g} tokens are both {steps[i]} steps of {tps} "
                            f"tokens ({points[i].record['name']}, {points[j].record['name']}); drop one")
    order = sorted(range(len(points)), key=steps.__getitem__)
    trunk, rest = points[order[-1]], [(points[i], budgets[i]) for i in order[:-1]]
    trunk_dir = out / trunk.record["workdir"] / CHECKPOINTS_DIR
    branches, starts = [], []
    for point, budget in rest:
        start = _branch_start(point, budget, cooldown_start)
        starts.append(start)
        tc, ck = point.config.trainer, point.config.checkpoint
        config = dataclasses.replace(point.config, checkpoint=dataclasses.replace(ck, branch_from=trunk_dir / str(start)))
        spent = point.record["flops_per_token"] * point.config.tokens_per_step * (tc.steps - start)
        record = _with_keys(point.record, branch_of=trunk.record["name"], branch_step=start, spent_flops=spent)
        branches.append(PlannedRun(record=record, config=config))
    ck = trunk.config.checkpoint
    keep = tuple(sorted({*ck.keep_steps, *starts}))
    config = dataclasses.replace(trunk.config, checkpoint=dataclasses.replace(ck, keep_steps=keep))
    record = _with_keys(trunk.record, branches=[b.record["name"] for b in branches], spent_flops=trunk.record["flops"])
    return [PlannedRun(record=record, config=config), *branches]


def _branch_start(point: PlannedRun, budget: float, cooldown_start) -> int:
    """The step `point`'s cooldown starts at: where it branches from the trunk.

    Raises:
        UserError: the budget is within the warmup (its own warmup would be shorter than the
            trunk's), it has no cooldown, or its cooldown starts at step 0.
    """
    opt, steps = point.config.optimizer, point.config.trainer.steps
    tps = point.config.tokens_per_step
    what = f"branches: {budget:g} tokens ({point.record['name']}) is {steps} steps of {tps} tokens"
    if steps <= opt.warmup_steps:
        raise UserError(f"{what}, not past optimizer.warmup_steps={opt.warmup_steps}: its warmup would be shorter "
                        f"than the stable run's; give more than {opt.warmup_steps * tps} tokens or fewer warmup steps")
    start = cooldown_start(opt, steps)
    if start >= steps:
        raise UserError(f"{what}, with no cooldown (optimizer.decay_fraction {opt.decay_fraction:g}), so a branch "
                        "would train nothing; raise decay_fraction")
    if start < 1:
        raise UserError(f"{what}, whose cooldown (optimizer.decay_fraction {opt.decay_fraction:g}) is the whole "
                        "run: it shares nothing with the stable run; lower decay_fraction or use grid.tokens")
    return start


def _with_keys(record: Record, **keys) -> Record:
    """`record` with `keys` added before its `config` (the plan's keys stay together)."""
    out: Record = {}
    for key, value in record.items():
        if key == "config":
            out.update(keys)
        out[key] = value
    return out


def compute_summary(records: Sequence[Record]) -> dict[str, float] | None:
    """The compute of a branched sweep against separate runs, or None for a sweep without branches.

    Returns:
        `branched`: FLOPs the sweep trains (each record's `spent_flops`, else its
        `flops`); `separate`: as separate runs (the sum of `flops`); `saving`: the share
        of `separate` that branching saves.
    """
    if not any("branch_of" in r for r in records):
        return None
    separate = float(sum(r["flops"] for r in records))
    spent = float(sum(r.get("spent_flops", r["flops"]) for r in records))
    return {"branched": spent, "separate": separate, "saving": 1.0 - spent / separate}


def _claim_name(named: dict[str, float], run: PlannedRun, key: str, value: float, precision: str) -> PlannedRun:
    """`run`, once no other point has its name: a run directory and a manifest line are
    keyed by it, and `sweep run` refuses a manifest that names a run twice.

    Raises:
        UserError: two values of `key` round to the same name; one line naming both.
    """
    name = run.record["name"]
    if name in named:
        first, second = _distinctly(named[name], value)
        raise UserError(
            f"{key} {first} and {second} both name the run {name} (names keep {precision}): "
            f"drop one, or make them differ within that precision"
        )
    named[name] = value
    return run


def _distinctly(a: float, b: float) -> tuple[str, str]:
    """`a` and `b` with the fewest significant digits that tell them apart."""
    for digits in range(3, 18):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return repr(a), repr(b)


def check_point_vocab(config: RunConfig, point: str, checked: set[tuple[int, str]] | None = None) -> None:
    """Refuse `point` when its `model.vocab_size` is not its tokenizer's piece count.

    A tokenizer file that does not exist here (a sweep planned for a cluster's data) is
    left to the trainer, which checks it at start; one in a bucket is read there. Pairs already in `checked` are not
    read again; checked pairs are added to it.

    Raises:
        UserError: one line naming the point, with both sizes and the fix.
    """
    from metatrain.tokenizer.spm import check_vocab_size

    key = (config.model.vocab_size, str(config.data.tokenizer))
    if checked is not None and key in checked:
        return
    if as_path(config.data.tokenizer).is_file():
        try:
            check_vocab_size(config.model.vocab_size, config.data.tokenizer)
        except UserError as e:
            raise UserError(f"sweep point {point}: {e}") from None
    if checked is not None:
        checked.add(key)


def _as_sets(overrides: dict) -> list[str]:
    # JSON is YAML flow syntax, so every value reads back exactly as written in the spec.
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def _family_width(base: Path, spec_dir: Path, family: SizeFamily) -> int | None:
    """The family's μP base width, where the base config names none of its own."""
    with contextlib.chdir(spec_dir):
        try:
            own = load_config(base).model.mup_base_width
        except UserError as e:
            raise UserError(f"the spec's base: {e}") from None
    return None if own is not None else family.mup_base_width


def _load_sized_config(base: Path, spec_dir: Path, settings: list[str], size: ModelSize, family_width: int | None,
                       where: str) -> RunConfig:
    """The point's config at `size`. A μP point without a `model.mup_base_width` of its own
    (in the base config or the settings, which win) gets `family_width` (`_family_width`); a
    standard point is left without one (the config of the same run planned by hand)."""
    given = [] if family_width is None else [f"model.mup_base_width={family_width}"]
    config = _load_point_config(base, spec_dir, [*given, *settings, *size.overrides()], where)
    if given and config.model.parametrization == "standard":
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, mup_base_width=None))
    return config


def _load_point_config(base: Path, spec_dir: Path, settings: list[str], where: str) -> RunConfig:
    # load_config reads relative paths in --set values against the working directory;
    # in a spec they are relative to the spec's directory.
    with contextlib.chdir(spec_dir):
        try:
            config = load_config(base, settings)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if config.trainer.eval_every == 0:
        raise UserError(
            f"{where}: trainer.eval_every is 0, so runs would report no evaluation loss to fit; "
            "set trainer.eval_every (the final step is always evaluated when it is > 0)"
        )
    return config


def text_token_fraction(config: RunConfig, batches: int) -> float:
    """Share of training positions (padding included) whose target is a text token.

    Read from the first `batches` training batches of `config`'s data, so a corpus with
    thinking blocks (a smaller share) is given more total tokens than one without.
    """
    from metatrain.data import make_batch_iterator
    from metatrain.roles import Role

    tc = config.trainer
    text = total = 0
    with make_batch_iterator(config.data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="train", seed=tc.seed) as it:
        for _, batch in zip(range(batches), it):
            roles = np.asarray(batch["target_roles"])
            text += int(np.sum(roles == Role.TEXT))
            total += roles.size
    if text == 0:
        raise UserError(
            f"count_tokens: text, but the first {batches} training batches of {config.data.sources[0].name} "
            "hold no text token; count all tokens instead (count_tokens: all)"
        )
    return text / total


def isoflop_sizes(
    family: SizeFamily,
    configs: dict[str, RunConfig],
    budget: float,
    count: int,
    tokens_per_param: float,
) -> list[ModelSize]:
    """`count` consecutive sizes of `family` centred on the compute-optimal guess at `budget`.

    The guess is the size whose tokens per non-embedding parameter, with tokens =
    budget / FLOPs-per-token, is closest (in log) to `tokens_per_param`. Near the ends of
    the family the window is shifted to stay inside it.
    """
    sizes = family.sizes()
    ratios = []
    for s in sizes:
        model = configs[s.name].model
        tokens = budget / model.flops_per_token(configs[s.name].trainer.seq_len)
        ratios.append(math.log(tokens / model.num_non_embedding_params))
    centre = int(np.argmin([abs(r - math.log(tokens_per_param)) for r in ratios]))
    start = min(max(centre - count // 2, 0), len(sizes) - count)
    return list(sizes[start : start + count])


def _planned(
    config: RunConfig,
    size: ModelSize,
    variant: str | None,
    train_tokens: float,
    *,
    tokens: float | None = None,
    budget: float | None = None,
    text_fraction: float | None = None,
    key: str = "grid.tokens",
) -> PlannedRun:
    tc = config.trainer
    exact_steps = train_tokens / config.tokens_per_step
    if exact_steps > MAX_STEPS:
        what = f"isoflop.budgets: {budget:g} FLOPs is" if budget is not None else f"{key}: {tokens:g} tokens is"
        raise UserError(
            f"{size.name}: {what} {exact_steps:.3g} steps of {config.tokens_per_step} tokens, beyond the "
            f"{MAX_STEPS:,} steps a run can count; give at most {MAX_STEPS * config.tokens_per_step:.3g} tokens "
            "per run"
        )
    steps = round(exact_steps)
    if steps < 1:
        what = f"budget {budget:.3g} FLOPs" if budget is not None else f"{tokens:g} tokens"
        raise UserError(
            f"{size.name}: {what} is {train_tokens:.3g} training tokens, less than one step of "
            f"{config.tokens_per_step} (batch_size {tc.batch_size} x seq_len {tc.seq_len}); raise it, "
            "or lower trainer.batch_size in the spec's overrides"
        )
    config = dataclasses.replace(config, trainer=dataclasses.replace(tc, steps=steps))
    name = _run_name(variant, size, tokens, budget)
    model: ModelConfig = config.model
    record: Record = {"name": name}
    if variant is not None:
        record["variant"] = variant
    record.update(
        size=size.name,
        n_layers=model.n_layers,
        d_model=model.d_model,
        n_heads=model.n_heads,
        n_kv_heads=model.n_kv_heads,
        d_ff=model.d_ff,
        params=model.num_non_embedding_params,
        embedding_params=model.num_embedding_params,
        flops_per_token=model.flops_per_token(tc.seq_len),
        batch_size=tc.batch_size,
        seq_len=tc.seq_len,
        steps=steps,
        tokens=config.total_tokens,
        flops=model.flops_per_token(tc.seq_len) * config.total_tokens,
    )
    if budget is not None:
        record["budget"] = budget
    if text_fraction is not None:
        record["text_fraction"] = text_fraction
        record["text_tokens"] = round(text_fraction * config.total_tokens)
    record.update(
        config=f"{RUNS_DIR}/{name}/config.yaml",
        workdir=f"{RUNS_DIR}/{name}",
        status="planned",
        loss=None,
        **{"loss/text": None, "loss/thinking": None},
    )
    return PlannedRun(record=record, config=config)


def _run_name(variant: str | None, size: ModelSize, tokens: float | None, budget: float | None) -> str:
    parts = [variant] if variant else []
    if budget is not None:
        parts += [f"C{budget:.3g}".replace("+", ""), size.name]
    else:
        parts += [size.name, f"D{tokens:.6g}".replace("+", "")]
    return ".".join(parts)


def write_plan(runs: list[PlannedRun], out: StoragePath) -> None:
    """Write each run's config and the manifest (see `plan_sweep` for an existing `out`).

    In a bucket no directory is made (a prefix has nothing to create): each run's
    directory is the prefix its config is written under. The manifest is written last,
    so a sweep directory with a manifest holds every config."""
    remote = is_remote(str(out))
    if (not remote and out.is_symlink()) or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a directory; plan the sweep into a new directory")
    if manifest_path(out).is_file():
        _check_same_plan(runs, out)
        return
    for run in runs:
        if not remote:
            (out / run.record["workdir"]).mkdir(parents=True, exist_ok=True)
        save_config(run.config, out / run.record["config"])
    write_manifest(out, [run.record for run in runs])


def _check_same_plan(runs: list[PlannedRun], out: StoragePath) -> None:
    existing = {r["name"]: r for r in read_manifest(out)}
    planned = {run.record["name"]: run for run in runs}
    differ = sorted(set(existing) ^ set(planned))
    for name in set(existing) & set(planned):
        config_file = out / existing[name].get("config", "")
        if not config_file.is_file() or config_to_dict(load_config(config_file)) != config_to_dict(planned[name].config):
            differ.append(name)
    if differ:
        raise UserError(
            f"{out} already holds a different sweep (runs that differ: {', '.join(differ[:5])}"
            f"{', ...' if len(differ) > 5 else ''}); plan into a new --out directory"
        )
