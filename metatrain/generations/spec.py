"""The generations spec (`SPEC.yaml`): what `metatrain generations run` loops over.

    corpus: [data/raw.jsonl]        # raw training documents ({id, text}): what each generation annotates
    heldout: [data/heldout.jsonl]   # annotated documents every generation is evaluated on
    generations: 3                  # generations 0 .. 2
    annotate:                       # `metatrain annotate` options of every annotation (null: its default)
      where: passage
      split: paragraph
      max_blocks: 4
      samples: 4                    # candidate thoughts per point ...
      select: gain                  # ... and which one is kept: gain | random | first
      gain_tokens: 32
      temperature: 0.8
      max_tokens: 48
      seed: 0
      args: []                      # more `metatrain annotate` arguments, as written on the command line
    generation0:                    # exactly one of:
      corpus: data/annotated.jsonl  #   an annotated corpus, copied into gen-0
      # endpoint: {base_url: http://localhost:8000/v1, model: NAME, api_key_env: MY_KEY}
      # checkpoint: runs/teacher    #   a metatrain work directory annotates generation 0
      # scorer: runs/judge          # (endpoint only) the work directory that scores candidates
    train:
      config: ../default.yaml       # run config; data.sources is replaced by each generation's corpus
      set: [trainer.steps=200]      # overrides, like `metatrain train --set`
      continue: false               # every generation from scratch (true: from the previous one's parameters)
    eval:
      self_think: true              # `metatrain eval --self-think`
      samples: null                 # --samples K (null: greedy)
      self_think_tokens: 32         # --self-think-tokens N
      max_documents: 200            # --max-documents N
      args: [--no-probes]           # more `metatrain eval` arguments

Relative paths are relative to the spec file. The spec maps one to one onto the frozen
dataclasses below, read by the same typed loader as run configs and sweep specs: an
unknown key is refused naming the file, the key and the closest valid one. `continue`
(a Python keyword) is the field `continue_training`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from metatrain.errors import UserError
from metatrain.io.dataclass_yaml import build_typed, to_plain_data
from metatrain.io.storage import is_remote
from metatrain.io.yaml_files import parse_yaml, read_yaml_text

#: Override keys the loop sets itself, refused in `train.set`.
LOOP_KEYS: tuple[str, ...] = ("data.sources", "checkpoint.init_from")
#: Flags the loop passes itself, refused in `annotate.args` and `eval.args` (argparse
#: keeps a repeated flag's last value: one there would point a stage elsewhere).
LOOP_FLAGS: dict[str, tuple[str, ...]] = {
    "annotate": ("--input", "--out", "--generator", "--workdir", "--checkpoint", "--scorer", "--base-url",
                 "--model", "--api-key-env"),
    "eval": ("--workdir", "--data", "--out", "--step", "--json"),
}


def check_args(section: str, args: tuple[str, ...]) -> None:
    """Refuses, in one line, an argument of `section.args` that the loop sets itself."""
    for arg in args:
        flag = str(arg).split("=", 1)[0]
        if flag in LOOP_FLAGS[section]:
            raise UserError(f"{section}.args: {flag} is set by the loop for every generation; remove it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnotateSpec:
    """`metatrain annotate` options for every generation's annotation; None leaves the
    command's own default (the flag is not passed)."""

    where: Literal["passage", "document", "chunk"] | None = None
    split: str | None = None
    max_blocks: int | None = None
    samples: int | None = None
    select: Literal["gain", "random", "first"] | None = None
    gain_tokens: int | None = None
    min_gain: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    concurrency: int | None = None
    max_batch: int | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_args("annotate", self.args)
        for name in ("max_blocks", "samples", "gain_tokens", "max_tokens", "concurrency", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"annotate.{name}={value} must be >= 1 (or null for the command's default)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """An OpenAI-compatible server that annotates generation 0 (`--generator openai`).

    Attributes:
        base_url: the API root, e.g. http://localhost:8000/v1.
        model: the model name the server knows.
        api_key_env: the environment variable holding the key, passed to the child as
            OPENAI_API_KEY (null: OPENAI_API_KEY itself, if set).
    """

    base_url: str
    model: str
    api_key_env: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation0Spec:
    """Where generation 0's corpus comes from: exactly one of `corpus`, `endpoint`, `checkpoint`.

    Attributes:
        corpus: an annotated corpus (JSON Lines documents), copied into gen-0.
        endpoint: an OpenAI-compatible server annotates the raw corpus.
        checkpoint: a metatrain work directory annotates the raw corpus.
        scorer: a work directory scoring the candidates of an endpoint's annotation
            (`--scorer`; a checkpoint scores its own).
    """

    corpus: str | None = None
    endpoint: EndpointSpec | None = None
    checkpoint: str | None = None
    scorer: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("corpus", "endpoint", "checkpoint") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise UserError(f"generation0 takes exactly one of corpus, endpoint and checkpoint; got {got}")
        if self.scorer is not None and self.endpoint is None:
            raise UserError("generation0.scorer applies to an endpoint's annotation only (a checkpoint scores "
                            "its own candidates, a copied corpus is not annotated); remove it")

    @property
    def source(self) -> str:
        """"corpus", "endpoint" or "checkpoint"."""
        return next(k for k in ("corpus", "endpoint", "checkpoint") if getattr(self, k) is not None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """How each generation trains.

    Attributes:
        config: the run config every generation starts from.
        set: `KEY=VALUE` overrides after it (`data.sources` is the loop's).
        continue_training: the YAML key `continue`: false, every generation from
            scratch; true, generation n >= 1 starts from generation n-1's final
            parameters (`checkpoint.init_from`; a fresh optimizer and schedule).
    """

    config: str
    set: tuple[str, ...] = ()
    continue_training: bool = False

    def __post_init__(self) -> None:
        for override in self.set:
            key = override.split("=", 1)[0].strip()
            if "=" not in override or not key:
                raise UserError(f"train.set: {override!r} is not KEY=VALUE; write e.g. trainer.steps=50")
            if key in LOOP_KEYS or any(key.startswith(k + ".") or key.startswith(k + "[") for k in LOOP_KEYS):
                raise UserError(f"train.set: {key} is set by the loop (each generation trains on its own corpus); "
                                "remove it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """`metatrain eval` options for every generation; None leaves the command's default."""

    self_think: bool = False
    samples: int | None = None
    self_think_tokens: int | None = None
    max_new_tokens: int | None = None
    max_documents: int | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_args("eval", self.args)
        for name in ("samples", "self_think_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"eval.{name}={value} must be >= 1 (or null for the command's default)")
        if self.max_documents is not None and self.max_documents < 0:
            raise UserError(f"eval.max_documents={self.max_documents} must be >= 0 (0: all)")
        if not self.self_think and (self.samples is not None or self.self_think_tokens is not None):
            raise UserError("eval.samples and eval.self_think_tokens apply to self-thinking; set "
                            "eval.self_think: true or remove them")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationsSpec:
    """A generational loop (see the module docstring for the YAML); paths are absolute."""

    corpus: tuple[str, ...]
    heldout: tuple[str, ...]
    generations: int
    generation0: Generation0Spec
    train: TrainSpec
    annotate: AnnotateSpec = AnnotateSpec()
    eval: EvalSpec = EvalSpec()

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise UserError(f"generations={self.generations} must be >= 1 (generations 0 .. N-1)")
        if not self.corpus:
            raise UserError("corpus is empty; list the raw training documents (JSON Lines {id, text})")
        if not self.heldout:
            raise UserError("heldout is empty; list the annotated documents every generation is evaluated on")


def load_spec(path: str | Path) -> GenerationsSpec:
    """Read and validate a generations spec; relative paths become absolute against its directory.

    Raises:
        UserError: a missing file, bad YAML, an unknown key (file, key and the closest
            valid one), a value of the wrong type, a failed check, or a named local file
            that does not exist.
    """
    path = Path(path).resolve()
    text = read_yaml_text(path, "generations spec")
    raw = parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a generations spec is a mapping (corpus:, heldout:, generations:, ...), got {raw!r}")
    base = path.parent
    for key in ("corpus", "heldout"):
        if isinstance(raw.get(key), str):
            raw[key] = [raw[key]]
        if isinstance(raw.get(key), list):
            raw[key] = [_absolute(base, p) for p in raw[key]]
    if isinstance(raw.get("train"), dict):
        train = raw["train"]
        if "continue" in train:
            train["continue_training"] = train.pop("continue")
        if isinstance(train.get("config"), str):
            train["config"] = _absolute(base, train["config"])
        if isinstance(train.get("set"), str):
            train["set"] = [train["set"]]
    if isinstance(raw.get("generation0"), dict):
        g0 = raw["generation0"]
        for key in ("corpus", "checkpoint", "scorer"):
            if isinstance(g0.get(key), str):
                g0[key] = _absolute(base, g0[key])
    spec = build_typed(GenerationsSpec, raw, prefix="", where=str(path))
    _check_files(spec, path)
    return spec


def _absolute(base: Path, value: Any) -> Any:
    """`value` against `base` when it is a relative local path (URLs and others unchanged)."""
    if not isinstance(value, str) or not value or is_remote(value):
        return value
    return os.path.normpath((base / Path(value).expanduser()).absolute())


def _check_files(spec: GenerationsSpec, where: Path) -> None:
    """Local, non-glob files the spec names must exist (globs are expanded by the stages)."""
    named = [*(("corpus", p) for p in spec.corpus), *(("heldout", p) for p in spec.heldout),
             ("train.config", spec.train.config)]
    g0 = spec.generation0
    if g0.corpus is not None:
        named.append(("generation0.corpus", g0.corpus))
    for key, value in named:
        if is_remote(value) or glob.has_magic(value):
            continue
        if not Path(value).exists():
            raise UserError(f"{where}: {key}: {value} does not exist; give a path relative to the spec file")
    if g0.corpus is not None and not g0.corpus.endswith(".jsonl"):
        raise UserError(f"{where}: generation0.corpus: {g0.corpus} is not a .jsonl file; give one annotated "
                        "JSON Lines file (uncompressed: it is copied into gen-0 as corpus.jsonl)")
    if g0.corpus is not None and is_remote(g0.corpus):
        raise UserError(f"{where}: generation0.corpus: {g0.corpus} is in a bucket; copy it here first (the loop "
                        "copies it into gen-0 as corpus.jsonl, from a local file)")
    if g0.corpus is not None:
        if glob.has_magic(g0.corpus) or not Path(g0.corpus).is_file():
            raise UserError(f"{where}: generation0.corpus: {g0.corpus} is not a file; give one annotated "
                            "JSON Lines file")
    for key in ("checkpoint", "scorer"):
        value = getattr(g0, key)
        if value is not None and not is_remote(value) and not Path(value).is_dir():
            raise UserError(f"{where}: generation0.{key}: {value} is not a directory; give a `metatrain train` "
                            "work directory")


def spec_data(spec: GenerationsSpec) -> dict[str, Any]:
    """The spec as plain JSON-ready data (`continue_training` under its YAML name `continue`)."""
    data = to_plain_data(spec)
    data["train"]["continue"] = data["train"].pop("continue_training")
    return data


def spec_hash(data: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `spec_data(...)`."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def spec_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (lists compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in [*old, *(k for k in new if k not in old)]:
            changes += spec_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return changes
    if old != new:
        return [f"{prefix[:-1]}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []
