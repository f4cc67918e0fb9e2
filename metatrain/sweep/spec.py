"""The sweep spec (`SWEEP.yaml`): which runs a scaling-law sweep is made of.

    base: ../tiny.yaml              # run config every point starts from (relative to this file)
    family: tiny                    # size family (metatrain.sweep.family)
    overrides:                      # config overrides for every point (dotted keys, like --set)
      optimizer.warmup_steps: 2
    grid:                           # model size x training tokens ...
      sizes: [tiny-1, tiny-2, tiny-3]
      tokens: [4096, 8192]
    # isoflop:                      # ... or IsoFLOP budgets (one of the two)
    #   budgets: [3.0e10, 1.0e11]
    #   sizes_per_budget: 5
    # branches: [4096, 8192]        # ... or, with a grid of sizes alone, cooldown branches:
                                    # one "wsd" run per size, cooled down at each budget
    variants:                       # optional: cross the points with named config overrides
      joint: {}
      no_thinking_loss: {loss.weights.thinking: 0.0}
    count_tokens: all               # grid tokens count every token, or only text tokens

The spec maps one to one onto the frozen dataclasses below; an unknown key is an error
naming it and the closest valid one (the same typed loader as run configs). Override
keys and values are checked when the sweep is planned, against the real run config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Iterable, Literal

from metatrain.errors import UserError
from metatrain.io.dataclass_yaml import (  # the run config's loader too: one set of messages
    build_typed,
)
from metatrain.io.yaml_files import parse_yaml, read_yaml_text
from metatrain.sweep.family import SHAPE_FIELDS, get_family

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridSpec:
    """Every size trained on every token budget.

    Attributes:
        sizes: preset names of the spec's family (`tiny-2`).
        tokens: training tokens per run (rounded to whole optimizer steps when planned);
            empty when the spec gives them as `branches`.
    """

    sizes: tuple[str, ...]
    tokens: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes:
            raise UserError("grid.sizes is empty; list the model sizes to train, e.g. [tiny-1, tiny-2, tiny-3]")
        if len(set(self.sizes)) != len(self.sizes):
            raise UserError(f"grid.sizes lists a size twice: {list(self.sizes)}")
        _check_token_budgets("grid.tokens", self.tokens)


def _check_token_budgets(key: str, tokens: tuple[float, ...]) -> None:
    """Whole, positive, distinct token counts (`grid.tokens`, `branches`)."""
    for t in tokens:
        if not (math.isfinite(t) and t > 0):
            raise UserError(f"{key}: {t} is not a positive number of tokens")
        if t != int(t):
            raise UserError(f"{key}: {t:g} is not a whole number of tokens; give a count such as "
                            f"{math.floor(t)} or {math.ceil(t)}")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{key} lists a budget twice: {list(tokens)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IsoFlopSpec:
    """For each compute budget C, sizes around the compute-optimal one, D = C / FLOPs-per-token.

    Attributes:
        budgets: training compute per run, in FLOPs (`ModelConfig.flops_per_token` x tokens).
        sizes_per_budget: consecutive family sizes per budget (at least 3, for a parabola).
        tokens_per_param: where the compute-optimal guess is centred: the size whose
            tokens / non-embedding parameters is closest to this (Chinchilla: ~20).
    """

    budgets: tuple[float, ...]
    sizes_per_budget: int = 5
    tokens_per_param: float = 20.0

    def __post_init__(self) -> None:
        if not self.budgets:
            raise UserError("isoflop.budgets is empty; list compute budgets in FLOPs, e.g. [3.0e10, 1.0e11]")
        for c in self.budgets:
            if not (math.isfinite(c) and c > 0):
                raise UserError(f"isoflop.budgets: {c} is not a positive number of FLOPs")
        if len(set(self.budgets)) != len(self.budgets):
            raise UserError(f"isoflop.budgets lists a budget twice: {list(self.budgets)}")
        if self.sizes_per_budget < 3:
            raise UserError(
                f"isoflop.sizes_per_budget={self.sizes_per_budget}: a parabola through each IsoFLOP "
                "curve needs at least 3 sizes"
            )
        if not self.tokens_per_param > 0:
            raise UserError(f"isoflop.tokens_per_param={self.tokens_per_param} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A scaling-law sweep (see the module docstring for the YAML).

    Attributes:
        base: run config YAML every point starts from.
        family: size family the sizes come from.
        overrides: dotted config keys -> values, applied to every point.
        grid: size x tokens grid (exclusive with `isoflop`).
        isoflop: IsoFLOP budgets (exclusive with `grid`).
        branches: token budgets trained as cooldown branches, instead of `grid.tokens`:
            per size and variant one "wsd" run of the largest budget (the stable trunk),
            and for each smaller budget a run that continues the trunk's checkpoint where
            that budget's cooldown starts (`metatrain.sweep.plan`). Needs
            `optimizer.decay: wsd`, checked when planning.
        variants: name -> overrides; every point is planned once per variant.
        count_tokens: "all": grid tokens are training tokens; "text": they are *text*
            tokens, and each variant trains on as many total tokens as its corpus needs
            to show that many text tokens (measured on its training data when planned),
            so corpora with and without thinking blocks compare at equal text tokens.
        text_fraction_batches: training batches read to measure the text fraction.
    """

    base: Path
    family: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: GridSpec | None = None
    isoflop: IsoFlopSpec | None = None
    branches: tuple[float, ...] = ()
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    count_tokens: Literal["all", "text"] = "all"
    text_fraction_batches: int = 8

    def __post_init__(self) -> None:
        if (self.grid is None) == (self.isoflop is None):
            got = "both" if self.grid is not None else "neither"
            raise UserError(f"a sweep spec has exactly one of `grid:` and `isoflop:`; this one has {got}")
        self._check_budgets()
        family = get_family(self.family)
        if self.grid is not None:
            for name in self.grid.sizes:
                family.find(name)
        if self.isoflop is not None and self.isoflop.sizes_per_budget > len(family.depths):
            raise UserError(
                f"isoflop.sizes_per_budget={self.isoflop.sizes_per_budget} but family {self.family!r} "
                f"has only {len(family.depths)} sizes"
            )
        if self.count_tokens == "text" and self.grid is None:
            raise UserError(
                "count_tokens: text applies to `grid:` sweeps (an IsoFLOP budget counts the compute of "
                "every token); remove it or use a grid"
            )
        for name in self.variants:
            if not _VARIANT_NAME.match(name):
                raise UserError(
                    f"variant name {name!r}: use letters, digits, '_' and '-' only (it names run directories)"
                )
        check_override_keys("overrides", self.overrides)
        for name, overrides in self.variants.items():
            check_override_keys(f"variants.{name}", overrides)
        if self.text_fraction_batches < 1:
            raise UserError(f"text_fraction_batches={self.text_fraction_batches} must be >= 1")

    def _check_budgets(self) -> None:
        """A grid's budgets come from exactly one of `grid.tokens` and `branches`."""
        if self.isoflop is not None and self.branches:
            raise UserError(
                "branches: gives the token budgets of a `grid:` sweep (grid.sizes with branches: [...]); an "
                "IsoFLOP sweep sets each run's tokens from its compute budget: remove branches or use a grid"
            )
        if self.grid is None:
            return
        if self.grid.tokens and self.branches:
            raise UserError(
                "grid.tokens and branches: both give the token budgets; keep one (branches trains one stable "
                "run per size and a cooldown branch per smaller budget, grid.tokens a separate run per budget)"
            )
        if not self.grid.tokens and not self.branches:
            raise UserError(
                "grid.tokens is empty; list the training-token budgets, e.g. [4096, 8192] (or give them as "
                "branches: [4096, 8192] to train cooldown branches of one stable run per size)"
            )
        _check_token_budgets("branches", self.branches)

    @property
    def token_budgets(self) -> tuple[tuple[float, ...], str]:
        """A grid's token budgets and the key that gives them (`grid.tokens` or `branches`)."""
        if self.branches:
            return self.branches, "branches"
        return (self.grid.tokens if self.grid is not None else ()), "grid.tokens"

    @property
    def variant_names(self) -> tuple[str | None, ...]:
        """The variants, or `(None,)` for a sweep without variants."""
        return tuple(self.variants) or (None,)


def check_override_keys(where: str, keys: Iterable[Any]) -> None:
    """Refuse an override key a sweep would silently replace: `trainer.steps` (from each
    point's budget) and the model shape (`model.<SHAPE_FIELDS>`, from each point's size).

    Args:
        where: what holds the keys, for the message (`overrides`, `variants.NAME`, `--set`).
        keys: dotted config keys.
    """
    for key in keys:
        if not isinstance(key, str) or not key or "=" in key:
            raise UserError(
                f"{where}: {key!r} is not a dotted config key; write e.g. `loss.weights.thinking: 0.0`"
            )
        if key.split(".")[0] == "trainer" and key.split(".")[-1] == "steps":
            raise UserError(
                f"{where}: {key} is set by the sweep from each point's token budget; give tokens "
                "(grid.tokens or branches) or budgets (isoflop.budgets) instead"
            )
        if key.startswith("model.") and key[len("model."):] in SHAPE_FIELDS:
            raise UserError(
                f"{where}: {key} is set by each point's size from its family, so this value would be "
                "ignored; choose sizes with grid.sizes (`metatrain sweep sizes --family NAME` lists them)"
            )


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; `base` is made absolute against the spec's directory.

    Raises:
        UserError: a missing file, bad YAML, an unknown key (named, with the closest
            valid one), a value of the wrong type, or a failed check.
    """
    path = Path(path).resolve()
    text = read_yaml_text(path, "sweep spec")
    raw = parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep spec is a mapping (base:, grid: or isoflop:, ...), got {raw!r}")
    if isinstance(raw.get("base"), str):
        raw["base"] = str((path.parent / Path(raw["base"]).expanduser()).resolve())
    return build_typed(SweepSpec, raw, prefix="", where=str(path))
