"""Size families: model presets for scaling-law sweeps, each defined by one number L.

A family fixes the shape ratios (width per layer, head size, query heads per key/value
head, MLP expansion) so that one number, L, names a model (its depth, unless the family
fixes that):

    d_model    = width_per_layer * L          (constant aspect ratio)
    n_heads    = d_model / head_dim
    n_kv_heads = n_heads / q_per_kv
    d_ff       = ffn_ratio * d_model, rounded up to a multiple of ffn_multiple

`tiny-2` is `configs/tiny.yaml`'s model. A fixed-depth family (`n_layers` set) keeps the
same ratios but not the depth: L gives only the width, every size has `n_layers`
layers, and sizes are named by their d_model (`tiny-width-128`); it is the family of
width-only studies such as μP's learning-rate transfer. Vocabulary and sequence length are not part of
a size: they come from the sweep's base run config. A family also names the base width
of μP (`mup_base_width`): the width whose learning rate a `parametrization: mup` sweep
reuses at every size. Parameter counts and FLOPs are not computed here but by
`ModelConfig` (their one home): `ModelSize.model_config(base)` gives the `ModelConfig`
to ask.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from metatrain.errors import UserError
from metatrain.models.config import ModelConfig

#: The `ModelConfig` fields a size preset sets; everything else comes from the base config.
SHAPE_FIELDS: tuple[str, ...] = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One preset of a family: the shape fields of a `ModelConfig`, and the family's μP
    base width."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    mup_base_width: int

    def overrides(self) -> list[str]:
        """`--set` strings that give a run config this model shape (the family's μP base
        width is the planner's: only where a point is μP and sets none of its own)."""
        return [f"model.{f}={getattr(self, f)}" for f in SHAPE_FIELDS]

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """`base` (vocabulary, sequence length, dtypes, ...) with this shape; a μP `base`
        without a `mup_base_width` of its own gets the family's."""
        fields = {f: getattr(self, f) for f in SHAPE_FIELDS}
        if base.parametrization == "mup" and base.mup_base_width is None:
            fields["mup_base_width"] = self.mup_base_width
        return dataclasses.replace(base, **fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeFamily:
    """Model shapes that grow with depth at fixed ratios (see the module docstring).

    Attributes:
        name: prefix of the preset names (`tiny` gives `tiny-1`, `tiny-2`, ...).
        depths: the depths offered as presets, smallest first.
        width_per_layer: d_model / n_layers (a multiple of head_dim).
        head_dim: width of every attention head.
        q_per_kv: query heads sharing one key/value head (1: plain multi-head attention).
        ffn_ratio: d_ff / d_model before rounding (8/3 keeps SwiGLU at a 4x MLP's cost).
        ffn_multiple: d_ff is rounded up to a multiple of this.
        mup_base_width: the d_model μP's learning rate is tuned at (`ModelConfig.mup_base_width`
            of every size; None: the smallest size's width).
        n_layers: a fixed depth: every size has this many layers and `depths` give only
            the widths (sizes named `<name>-<d_model>`); None: the depth is L.
    """

    name: str
    depths: tuple[int, ...]
    width_per_layer: int
    head_dim: int
    q_per_kv: int = 1
    ffn_ratio: float = 8 / 3
    ffn_multiple: int = 16
    mup_base_width: int | None = None
    n_layers: int | None = None

    def __post_init__(self) -> None:
        if not self.depths or any(d < 1 for d in self.depths) or list(self.depths) != sorted(set(self.depths)):
            raise UserError(f"family {self.name}: depths must be increasing positive integers, got {self.depths}")
        if self.width_per_layer % self.head_dim:
            raise UserError(
                f"family {self.name}: width_per_layer={self.width_per_layer} must be a multiple of "
                f"head_dim={self.head_dim} so that every depth has whole heads"
            )
        for depth in self.depths:
            heads = self.width_per_layer * depth // self.head_dim
            if heads % self.q_per_kv:
                raise UserError(
                    f"family {self.name}: depth {depth} has {heads} query heads, not divisible by "
                    f"q_per_kv={self.q_per_kv}"
                )
        if self.n_layers is not None and (isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int)
                                          or self.n_layers < 1):
            raise UserError(f"family {self.name}: n_layers must be a positive integer, got {self.n_layers!r}")
        if self.mup_base_width is None:
            object.__setattr__(self, "mup_base_width", self.width_per_layer * self.depths[0])
        if isinstance(self.mup_base_width, bool) or not isinstance(self.mup_base_width, int) or self.mup_base_width < 1:
            raise UserError(f"family {self.name}: mup_base_width must be a positive integer, got {self.mup_base_width!r}")

    def size(self, depth: int) -> ModelSize:
        """The preset of depth `depth` (which need not be among `depths`); in a fixed-depth
        family, the preset of width `width_per_layer * depth` at `n_layers` layers."""
        d_model = self.width_per_layer * depth
        n_heads = d_model // self.head_dim
        d_ff = self.ffn_multiple * math.ceil(self.ffn_ratio * d_model / self.ffn_multiple - 1e-9)
        return ModelSize(
            name=f"{self.name}-{depth if self.n_layers is None else d_model}",
            n_layers=depth if self.n_layers is None else self.n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_heads // self.q_per_kv,
            head_dim=self.head_dim,
            d_ff=d_ff,
            mup_base_width=self.mup_base_width,
        )

    def sizes(self) -> tuple[ModelSize, ...]:
        """Every preset, smallest first."""
        return tuple(self.size(d) for d in self.depths)

    def find(self, name: str) -> ModelSize:
        """The preset called `name`, or a UserError listing the family's presets."""
        by_name = {s.name: s for s in self.sizes()}
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"size {name!r} is not in family {self.name!r}{hint} (its sizes: {', '.join(by_name)}; "
                f"see `metatrain sweep sizes --family {self.name}`)"
            )
        return by_name[name]


#: The shipped families. `tiny` trains on a 2-core CPU in seconds per run; `tiny-width`
#: is its widths at tiny-2's depth; `base` is the accelerator family (GPT-2 small is
#: `base-12`: 12 layers of width 768). Their μP
#: base widths are the widths of the presets whose learning rates are the tuned ones:
#: `tiny-2` (`configs/tiny.yaml`, 64) and `base-12` (`configs/125m.yaml`, 768).
FAMILIES: dict[str, SizeFamily] = {
    "tiny": SizeFamily(
        name="tiny", depths=(1, 2, 3, 4, 5, 6, 8), width_per_layer=32, head_dim=16, q_per_kv=2, mup_base_width=64
    ),
    # tiny's shapes at tiny-2's depth: widths 32 to 1024 at 2 layers, for width-only studies.
    "tiny-width": SizeFamily(
        name="tiny-width", depths=(1, 2, 4, 8, 16, 32), width_per_layer=32, head_dim=16, q_per_kv=2,
        mup_base_width=64, n_layers=2,
    ),
    "base": SizeFamily(
        name="base",
        depths=(4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48),
        width_per_layer=64,
        head_dim=64,
        mup_base_width=768,
    ),
}


def get_family(name: str) -> SizeFamily:
    """The shipped family `name`, or a UserError naming the known ones."""
    if name not in FAMILIES:
        raise UserError(f"unknown size family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]
