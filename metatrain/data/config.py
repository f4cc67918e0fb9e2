"""`DataConfig`: where training documents come from and how they are encoded.

Path fields are typed `Path` so the run-config loader (`metatrain.config`) resolves a
relative path against the YAML file that wrote it; a plain string is accepted too
(converted in `__post_init__`). The defaults point at the shipped sample corpus,
tokenizer and tag registry.

A mixture schedule (`DataConfig.schedule`, a list of `ScheduleStage`) changes the
sources' weights over training; how the stream follows it is in `mixture.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from metatrain.io.compression import MAX_LINE_BYTES
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS, SAMPLE_TOKENIZER
from metatrain.io.storage import as_path
from metatrain.tokenizer.mantra import MANTRA_POLICIES


def _as_path(config: object, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, str):
        object.__setattr__(config, name, as_path(value))
    elif not isinstance(value, os.PathLike):
        raise ValueError(f"`{name}` must be a path, got {value!r} ({type(value).__name__})")
    if not str(getattr(config, name)):
        raise ValueError(f"`{name}` is empty; give a file or directory path")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One document source of the training mixture: a file path, or a seqio Task or Mixture.

    Attributes:
        path: a JSON Lines file (plain, or compressed: `.jsonl.gz`, `.jsonl.zst`,
            `.jsonl.bz2`, `.jsonl.xz`), a Parquet file (`.parquet`), an ArrayRecord file
            (`.array_record`), a glob of them (`data/*.jsonl`, which also finds the
            compressed ones), or a token-cache directory written by `metatrain data
            cache`. A directory of files is given as a glob (`data/*.jsonl`).
        weight: relative share of this source in the mixture (weights need not sum to 1);
            not used when `DataConfig.schedule` gives the weights.
        seqio: instead of `path`, the name of a seqio Task or Mixture (the `seqio` extra;
            see `metatrain.data.seqio`).
        module: with `seqio`, the module that registers it: a dotted module name
            importable from `sys.path`, or a `.py` file.
        split: with `seqio`, the seqio split to read.
        feature: with `seqio`, the feature holding the text of a Task that has no
            `ids` and `roles` features.
    """

    path: Path | None = None
    weight: float = 1.0
    seqio: str | None = None
    module: str | None = None
    split: str = "train"
    feature: str = "targets"

    def __post_init__(self) -> None:
        if self.seqio is None:
            if self.path is None:
                raise ValueError("a source needs `path` (a file, glob or token cache) or `seqio` (a seqio Task "
                                 "or Mixture, with `module`)")
            _as_path(self, "path")
        else:
            self._check_seqio()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"source {self.name}: `weight` must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(
                f"source {self.name}: `weight` must be a positive number, got {self.weight!r} "
                "(drop the source instead of giving it weight 0)"
            )

    def _check_seqio(self) -> None:
        if self.path is not None:
            raise ValueError(f"source seqio:{self.seqio} also has `path` {self.path}; give one of them")
        for key in ("seqio", "module", "split", "feature"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                fix = " (the module that registers the Task or Mixture)" if key == "module" else ""
                raise ValueError(f"source seqio:{self.seqio}: `{key}` must be a non-empty string{fix}, got {value!r}")

    @property
    def name(self) -> str:
        """How messages name the source: its path, or `seqio:NAME`."""
        return str(self.path) if self.seqio is None else f"seqio:{self.seqio}"


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclasses.dataclass(frozen=True)
class ScheduleStage:
    """One stage of a mixture schedule: from training step `step` on, the sources mix by `weights`.

    Attributes:
        step: the first training step of the stage (the stage lasts until the next one starts).
        weights: one weight per source, in the order of `DataConfig.sources`, >= 0 with a
            positive sum (they need not sum to 1); 0 leaves a source out of this stage.
    """

    step: int
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"schedule stage: `step` must be an integer >= 0 (a training step), got {self.step!r}")
        where = f"schedule stage at step {self.step}"
        if not isinstance(self.weights, (list, tuple)):
            raise ValueError(f"{where}: `weights` must be a list of numbers, one per source, got {self.weights!r}")
        for w in self.weights:
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{where}: weights must be finite numbers >= 0, got {w!r} in {list(self.weights)}")
        if not sum(self.weights) > 0:
            raise ValueError(f"{where}: every weight is 0, so no source would be read; make one positive")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))


def _as_stage(stage: object) -> ScheduleStage:
    """A `ScheduleStage` from itself, a mapping `{step, weights}` or a pair `(step, weights)`."""
    if isinstance(stage, ScheduleStage):
        return stage
    if isinstance(stage, dict) and set(stage) == {"step", "weights"}:
        return ScheduleStage(**stage)
    if isinstance(stage, (list, tuple)) and len(stage) == 2:
        return ScheduleStage(*stage)
    raise ValueError(f"`schedule` holds {stage!r}; each stage is {{step: STEP, weights: [W, ...]}}")


def _check_schedule(schedule: tuple[ScheduleStage, ...], sources: tuple[SourceConfig, ...]) -> None:
    """The stages start at step 0, in increasing steps, and each weighs every source."""
    if schedule[0].step != 0:
        raise ValueError(
            f"`schedule` must start at step 0, but its first stage starts at step {schedule[0].step}; "
            "add a stage {step: 0, weights: [...]} for the steps before it"
        )
    for before, stage in zip(schedule, schedule[1:]):
        if stage.step <= before.step:
            raise ValueError(
                f"`schedule` steps must increase: a stage at step {stage.step} follows the stage at step {before.step}"
            )
    for stage in schedule:
        if len(stage.weights) != len(sources):
            raise ValueError(
                f"schedule stage at step {stage.step} has {len(stage.weights)} weights for {len(sources)} sources; "
                "give one weight per source, in the order of `sources`"
            )
    for k, source in enumerate(sources):
        if all(stage.weights[k] == 0 for stage in schedule):
            raise ValueError(
                f"source {source.name} has weight 0 in every stage of `schedule`, so it is never read; "
                "drop it from `sources` (and its weight from every stage)"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: sources and their mixture, tokenizer, mantra, split and order.

    Attributes:
        sources: the sources, mixed by weight (one source means no mixing).
        schedule: optional stages `{step, weights}` that replace the sources' weights as
            training goes on (the first starts at step 0; step s uses the stage with the
            largest start <= s); empty: the sources' own weights hold for the whole run.
            See `mixture.py` for the exact semantics.
        tokenizer: SentencePiece `.model` file with the registry's tags.
        tags: the tag registry (YAML).
        mantra: text opening thinking blocks; None means the default mantra.
        mantra_policy: `every` thinking block, the `first` of a document, or `none`.
        eval_fraction: share of documents held out for the eval split, chosen by a
            hash of the document id (stable across runs and process counts).
        seed: seed of the shuffle and the mixture; None in `make_batch_iterator`
            (its `seed` argument) falls back to this.
        strict: stop at the first bad record instead of skipping and counting it.
        max_line_bytes: the longest JSON Lines line read, in bytes (its newline not
            counted); a longer line is a bad record, refused from its length without
            being read, so one huge line cannot exhaust memory.
        num_workers: background worker processes for reading, encoding and packing (0:
            in the main process). Each worker makes every other batch from its own slice of
            every lane's records, so the batch order depends on `num_workers` (not on the
            number of hosts); a checkpoint resumes only with the same `num_workers`.
    """

    sources: tuple[SourceConfig, ...] = (SourceConfig(SAMPLE_CORPUS),)
    schedule: tuple[ScheduleStage, ...] = ()
    tokenizer: Path = SAMPLE_TOKENIZER
    tags: Path = DEFAULT_TAGS
    mantra: str | None = None
    mantra_policy: str = "every"
    eval_fraction: float = 0.05
    seed: int = 0
    strict: bool = False
    max_line_bytes: int = MAX_LINE_BYTES
    num_workers: int = 0

    def __post_init__(self) -> None:
        sources = self.sources
        if isinstance(sources, SourceConfig):
            sources = (sources,)
        sources = tuple(SourceConfig(s) if isinstance(s, (str, Path)) else s for s in sources)
        if not sources:
            raise ValueError("`sources` is empty; give at least one JSON Lines, Parquet or ArrayRecord file, glob or token cache")
        for s in sources:
            if not isinstance(s, SourceConfig):
                raise ValueError(f"`sources` holds {s!r}; each source is {{path: ..., weight: ...}} "
                                 "or {seqio: NAME, module: MODULE, weight: ...}")
        object.__setattr__(self, "sources", sources)
        if not isinstance(self.schedule, (list, tuple)):
            raise ValueError(f"`schedule` must be a list of stages {{step, weights}}, got {self.schedule!r}")
        schedule = tuple(_as_stage(stage) for stage in self.schedule)
        if schedule:
            _check_schedule(schedule, sources)
        object.__setattr__(self, "schedule", schedule)
        _as_path(self, "tokenizer")
        _as_path(self, "tags")
        if self.mantra is not None and (not isinstance(self.mantra, str) or not self.mantra.strip()):
            raise ValueError(f"`mantra` must be non-empty text or null (the default mantra), got {self.mantra!r}")
        if self.mantra_policy not in MANTRA_POLICIES:
            raise ValueError(
                f"`mantra_policy` must be one of {', '.join(MANTRA_POLICIES)}, got {self.mantra_policy!r}"
            )
        if not (0.0 <= self.eval_fraction < 1.0):
            raise ValueError(
                f"`eval_fraction` must be in [0, 1) (share of documents held out), got {self.eval_fraction!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        if isinstance(self.max_line_bytes, bool) or not isinstance(self.max_line_bytes, int) or self.max_line_bytes < 1:
            raise ValueError(f"`max_line_bytes` must be an integer >= 1 (the longest JSON Lines line read, in bytes; "
                             f"default {MAX_LINE_BYTES}), got {self.max_line_bytes!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0, got {self.num_workers!r}")
