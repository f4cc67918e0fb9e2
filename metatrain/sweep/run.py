"""`sweep run`: train a planned sweep's points here, one after another, or print launch commands.

Running is resumable: a point whose manifest status is "done" is skipped; a point whose
work directory already shows its final evaluation (trained, but the manifest was not
updated) is collected without training; any other point is trained with the real
trainer, which itself resumes from the latest checkpoint in the point's work directory.

Results come from each point's `metrics.jsonl` (the trainer's record of every
evaluation): the final evaluation losses per role (`loss`, `loss/<role>`) and bits per
UTF-8 byte of text (`bpb/text`, comparable across tokenizers), and the best of each
(`best_loss`, `best_loss/<role>`, `best_bpb/text`: the minimum over the run's
evaluations). A value absent from the metrics (`eval/bpb/text` in runs older than that
metric) or null in them (no text in the evaluation split) is null in the manifest.
`--collect` does only that, for points trained elsewhere from the emitted commands.

Cooldown branches (points with `branch_of`, see `metatrain.sweep.plan`) start from a
checkpoint of their trunk, so each is trained after its trunk is done, whatever the
manifest's order; a branch whose trunk is not done (it failed, or `--only` left it out)
waits: it is left as it is, with a line saying which trunk to train. `--emit` prints
the trunks first, and before the branches of a trunk that is not done a comment line
saying that they start once it has finished.

In a sweep directory in a bucket (`gs://...`), each point trains with its work
directory there (`gs://.../runs/<name>`), its `metrics.jsonl` is read from the bucket,
and each manifest update replaces the manifest object whole.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from typing import Any, Callable, Iterable

from metatrain.errors import UserError
from metatrain.io.storage import StoragePath, as_path
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.run.layout import METRICS_FILE
from metatrain.sweep.manifest import Record, read_manifest, write_manifest

#: `runner(config, workdir)` trains one point; the default is `metatrain.train.loop.train`.
#: `workdir` is a local `Path`, or an `epath.Path` in a bucket sweep.
Runner = Callable[[Any, StoragePath], Any]

#: Where `--emit` commands go: here (`metatrain train`) or a launcher target.
EMIT_TARGETS: tuple[str, ...] = ("local", "tpu", "gke", "slurm")

#: Evaluation values recorded per point: `KEY` (final evaluation) and `best_KEY` (minimum)
#: from the trainer's `eval/KEY`.
RESULT_KEYS: tuple[str, ...] = ("loss", *(f"loss/{role}" for role in LOSS_ROLE_LABELS), "bpb/text")


def collect_results(workdir: str | os.PathLike, steps: int) -> Record | None:
    """Final and best evaluation values of the run in `workdir`, or None if it has not finished.

    A run has finished when `metrics.jsonl` holds an evaluation at step >= `steps` (the
    trainer always evaluates the last step). Every value of `RESULT_KEYS` (and its
    `best_`) may be None: where the evaluation split had no token of that role, or the
    trainer did not log it (`bpb/text` before it existed). `best_step` is the step of
    `best_loss`. A work directory in a bucket is read there.
    """
    evals = _eval_records(as_path(workdir) / METRICS_FILE)
    if not evals or evals[-1][0] < steps:
        return None
    final_step, final = evals[-1]
    result: Record = {"final_step": final_step}
    for key in RESULT_KEYS:
        result[key] = final.get(f"eval/{key}")
        seen = [(r[f"eval/{key}"], step) for step, r in evals if r.get(f"eval/{key}") is not None]
        best = min(seen, default=(None, None))
        result[f"best_{key}"] = best[0]
        if key == "loss":
            result["best_step"] = best[1]
    return result


def _eval_records(path: StoragePath) -> list[tuple[int, dict]]:
    """(step, record) of every evaluation in `metrics.jsonl`, ordered by step (last write wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and "eval/loss" in record and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return sorted(by_step.items())


def run_sweep(
    directory: str | os.PathLike,
    *,
    runner: Runner | None = None,
    only: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> list[Record]:
    """Train every unfinished point of the sweep in `directory`, in manifest order.

    The manifest is rewritten after each point, so an interrupted sweep resumes where it
    stopped. A point that fails with a `UserError` (e.g. a non-finite loss) is marked
    "failed" with its `error` and the sweep goes on; any other exception is a bug and
    stops the sweep (the point stays "running" and is retried on the next run).

    Args:
        directory: the sweep directory (`sweep plan --out`), local or in a bucket.
        runner: trains one point; defaults to the real trainer.
        only: run just these point names (default: all).
        log: receives one line per point.

    Returns:
        The manifest records after the run.
    """
    from metatrain.config import load_config

    directory = as_path(directory)
    runner = runner or _train
    records = read_manifest(directory)
    selected = _select(records, only)
    by_name = {r["name"]: r for r in records}
    for index in training_order(records):
        record = records[index]
        name = record["name"]
        if name not in selected:
            continue
        if record.get("status") == "done":
            log(f"[{index + 1}/{len(records)}] {name}: done, skipped")
            continue
        workdir, steps = _point_paths(directory, record)
        result = collect_results(workdir, steps)
        trunk = by_name.get(record.get("branch_of"))
        if result is None and trunk is not None and not _trunk_done(directory, records, trunk):
            log(f"[{index + 1}/{len(records)}] {name}: waits for its stable trunk {trunk['name']} "
                f"({trunk.get('status', 'planned')}); train it first (sweep run DIR --only {trunk['name']})")
            continue
        if result is None:
            log(f"[{index + 1}/{len(records)}] {name}: training {steps} steps in {workdir}")
            record.update(status="running", error=None)
            write_manifest(directory, records)
            start = time.perf_counter()
            try:
                runner(load_config(directory / record["config"]), workdir)
            except UserError as e:
                record.update(status="failed", error=str(e))
                write_manifest(directory, records)
                log(f"    failed: {e}")
                continue
            record["train_seconds"] = round(time.perf_counter() - start, 3)
            result = collect_results(workdir, steps)
            if result is None:
                record.update(status="failed", error=f"no evaluation at step {steps} in {workdir / 'metrics.jsonl'}")
                write_manifest(directory, records)
                log(f"    failed: {record['error']}")
                continue
        record.update(result, status="done", error=None)
        write_manifest(directory, records)
        log(f"[{index + 1}/{len(records)}] {name}: done, {_losses(record)}")
    return records


def training_order(records: list[Record]) -> list[int]:
    """Indices of `records` in manifest order, except that each cooldown branch comes right
    after its trunk when the manifest lists it before.

    Raises:
        UserError: a `branch_of` that names no run of the manifest, or names a branch.
    """
    names = {r["name"]: r for r in records}
    for r in records:
        trunk = r.get("branch_of")
        if trunk is None:
            continue
        if trunk not in names:
            raise UserError(f"run {r['name']!r}: branch_of {trunk!r} names no run in the manifest; plan the sweep "
                            "again with `sweep plan`")
        if names[trunk].get("branch_of") is not None:
            raise UserError(f"run {r['name']!r}: branch_of {trunk!r} names a branch; a branch starts from a "
                            "stable run (a point without branch_of)")
    order: list[int] = []
    placed: set[str] = set()
    waiting: dict[str, list[int]] = {}
    for index, r in enumerate(records):
        trunk = r.get("branch_of")
        if trunk is not None and trunk not in placed:
            waiting.setdefault(trunk, []).append(index)
            continue
        order.append(index)
        placed.add(r["name"])
        order += waiting.pop(r["name"], [])
    return order


def _trunk_done(directory: StoragePath, records: list[Record], trunk: Record) -> bool:
    """Whether `trunk` is done; one whose work directory shows its final evaluation is
    collected (marked done in the manifest) on the way."""
    if trunk.get("status") == "done":
        return True
    result = collect_results(*_point_paths(directory, trunk))
    if result is None:
        return False
    trunk.update(result, status="done", error=None)
    write_manifest(directory, records)
    return True


def collect_sweep(directory: str | os.PathLike, log: Callable[[str], None] = print) -> list[Record]:
    """Mark done every point whose work directory shows its final evaluation (trains nothing)."""
    directory = as_path(directory)
    records = read_manifest(directory)
    for record in records:
        if record.get("status") == "done" or "workdir" not in record:
            continue
        workdir, steps = _point_paths(directory, record)
        result = collect_results(workdir, steps)
        if result is not None:
            record.update(result, status="done", error=None)
            log(f"{record['name']}: done, {_losses(record)}")
    write_manifest(directory, records)
    return records


def launch_commands(
    directory: str | os.PathLike,
    target: str,
    *,
    launch_args: Iterable[str] = (),
    dry_run: bool = False,
    only: Iterable[str] = (),
) -> list[str]:
    """Shell commands that train the unfinished points, one per line: stable trunks
    first, then cooldown branches, each group of branches of a trunk that is not done
    after a comment line (`# after TRUNK has finished: ...`).

    `local` gives `metatrain train --config C --workdir W`; a launcher target gives
    `metatrain launch TARGET [ARGS] [--dry-run] -- train --config C --workdir W` (the
    multi-host launchers). Paths are `directory` joined with the manifest's relative
    paths, so the sweep directory must be visible at the same path where they run (a
    bucket sweep gives `gs://` paths, which every host reaches).

    Raises:
        UserError: an unknown target, a point not planned here, or a point whose
            `model.vocab_size` is not its tokenizer's (checked before anything is emitted).
    """
    from metatrain.config import load_config
    from metatrain.sweep.plan import check_point_vocab

    if target not in EMIT_TARGETS:
        raise UserError(f"--emit {target!r}: choose one of {', '.join(EMIT_TARGETS)}")
    directory = as_path(directory)
    records = read_manifest(directory)
    selected = _select(records, only)
    by_name = {r["name"]: r for r in records}
    order = training_order(records)
    pending = [records[i] for i in order if records[i]["name"] in selected and records[i].get("status") != "done"]
    position = {r["name"]: i for i, r in enumerate(records)}
    # Every trunk first, then the branches grouped by trunk (a stable sort: otherwise manifest order).
    pending.sort(key=lambda r: (r.get("branch_of") is not None, position.get(r.get("branch_of"), 0)))
    checked: set[tuple[int, str]] = set()
    for record in pending:
        if "config" not in record or "workdir" not in record:
            raise UserError(f"run {record['name']!r} has no `config`/`workdir` in the manifest; it was not planned here")
        check_point_vocab(load_config(directory / record["config"]), record["name"], checked)
    commands = []
    stated: set[str] = set()
    for record in pending:
        trunk = by_name.get(record.get("branch_of"))
        if trunk is not None and trunk.get("status") != "done" and trunk["name"] not in stated:
            stated.add(trunk["name"])
            commands.append(f"# after {trunk['name']} has finished: its cooldown branches start from its checkpoints")
        train = ["train", "--config", str(directory / record["config"]), "--workdir", str(directory / record["workdir"])]
        if target == "local":
            argv = ["metatrain", *train]
        else:
            argv = ["metatrain", "launch", target, *launch_args, *(["--dry-run"] if dry_run else []), "--", *train]
        commands.append(shlex.join(argv))
    return commands


def _train(config: Any, workdir: StoragePath) -> Any:
    from metatrain.train.loop import train

    return train(config, workdir)


def _select(records: list[Record], only: Iterable[str]) -> set[str]:
    names = [r["name"] for r in records]
    only = list(only)
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UserError(f"--only {', '.join(unknown)}: no such run in the manifest (runs: {', '.join(names[:8])}, ...)")
    return set(only or names)


def _point_paths(directory: StoragePath, record: Record) -> tuple[StoragePath, int]:
    missing = [k for k in ("workdir", "config", "steps") if k not in record]
    if missing:
        raise UserError(
            f"run {record['name']!r} has no {', '.join(missing)} in the manifest, so it cannot be trained "
            "or collected here; give it status \"done\" and its losses, or plan the sweep with `sweep plan`"
        )
    return directory / record["workdir"], int(record["steps"])


def _losses(record: Record) -> str:
    parts = [f"{key} {record[key]:.4f}" for key in ("loss", "loss/text", "loss/thinking", "bpb/text") if record.get(key) is not None]
    return ", ".join(parts) or "no evaluation loss"
