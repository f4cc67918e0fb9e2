"""μP's coordinate check: activation sizes across widths over a few training steps.

    metatrain sweep coord-check --out DIR [--widths 64 128 256 512 1024] [--steps 10]

The standard test that a parametrisation is wired right (Yang et al. 2022, arXiv
2203.03466, appendix D.1; the `mup` package's `get_coord_data`): for each
parametrisation and each width, a model of fixed depth and head size (d_model, n_heads
and d_ff grow together; head_dim is fixed, as in the size families) trains `steps`
AdamW updates on one batch, and for the embedding output, every block's output and the
logits two numbers are recorded on that batch at initialisation (step 0) and after
each update:

    scale   mean |x_t|          the mean absolute coordinate (what `mup` records)
    change  mean |x_t - x_0|    how far training has moved it

Under standard parametrisation an Adam update moves a width-D activation by an amount
that grows with D (each of D coordinates of a weight row moves by about lr, in step
with the input), so block outputs and the change of the logits grow with width within
a few steps. Under μP both stay flat: hidden matrices learn at lr / m and the logits
are multiplied by 1 / m. (The logits' *scale* at initialisation does shrink with width
under μP, as 1 / sqrt(m): the base-width readout divided by m. That is μP's design, and
why the check also records the change.)

The runs use the real model, output projection (`metatrain.models.output_projection`,
which applies μP's logit multiplier), optimizer (`metatrain.run.optimizer`) and train
step (`metatrain.run.step`); activations are read with flax's `capture_intermediates`.
Tokens are synthetic and hermetic (`synthetic_batch`), one batch trained on at every
step as in the `mup` package's check. No gradient clipping and no weight decay, so that
only the parametrisation differs between widths.

`run_coord_check(spec)` returns a `CoordCheck`; `write_coord_check` writes its JSON
and PNG; `growth_ratio` is the number the tests check.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from metatrain.config import LossConfig, OptimizerConfig
from metatrain.errors import UserError
from metatrain.io.outputs import write_atomically
from metatrain.io.storage import StoragePath, as_path, is_remote
from metatrain.layers import Embedding
from metatrain.models import DecoderBlock, ModelConfig, Transformer, logits
from metatrain.roles import ROLE_DTYPE, Role
from metatrain.run.optimizer import build_optimizer, learning_rate_schedule
from metatrain.run.state import TrainState
from metatrain.run.step import make_train_step

PARAMETRIZATIONS: tuple[str, ...] = ("standard", "mup")
#: What is recorded of each activation x_t (after t updates): mean |x_t|, mean |x_t - x_0|.
STATISTICS: tuple[str, ...] = ("scale", "change")
#: What `write_coord_check` writes into its directory.
JSON_FILE = "coord_check.json"
PLOT_FILE = "coord_check.png"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoordCheckSpec:
    """The models and training of a coordinate check.

    Attributes:
        widths: d_model of each model, increasing, multiples of `head_dim`.
        parametrizations: "standard" and/or "mup".
        n_layers: depth of every model (fixed: μP's transfer is across width).
        head_dim: width of every attention head (n_heads = d_model / head_dim).
        steps: AdamW updates per model.
        learning_rate: Adam's (constant) learning rate; under μP the base width's.
        vocab_size: V of the synthetic tokens.
        seq_len: T of every row.
        batch_size: B, rows per update.
        base_width: μP's `mup_base_width` (None: the smallest width, where μP is the
            standard model).
        seed: initialisation and data.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    parametrizations: tuple[str, ...] = PARAMETRIZATIONS
    n_layers: int = 2
    head_dim: int = 16
    steps: int = 10
    learning_rate: float = 1e-2
    vocab_size: int = 256
    seq_len: int = 64
    batch_size: int = 8
    base_width: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        object.__setattr__(self, "widths", widths)
        if len(widths) < 2 or list(widths) != sorted(set(widths)):
            raise UserError(f"--widths {' '.join(map(str, widths))}: give at least two increasing widths, e.g. 64 128 256")
        if self.head_dim < 2 or self.head_dim % 2:
            raise UserError(f"--head-dim {self.head_dim}: must be an even number >= 2 (rotary embeddings rotate pairs)")
        if any(w % self.head_dim for w in widths):
            raise UserError(f"--widths {' '.join(map(str, widths))}: every width must be a multiple of head_dim={self.head_dim}")
        unknown = [p for p in self.parametrizations if p not in PARAMETRIZATIONS]
        if unknown or not self.parametrizations:
            raise UserError(f"parametrizations {list(self.parametrizations)}: choose among {', '.join(PARAMETRIZATIONS)}")
        for name in ("n_layers", "steps", "vocab_size", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--lr {self.learning_rate}: must be a positive number")
        if self.base_width is None:
            object.__setattr__(self, "base_width", widths[0])
        if self.base_width < 1:
            raise UserError(f"--base-width {self.base_width}: must be >= 1")

    def model_config(self, width: int, parametrization: str) -> ModelConfig:
        """The model of `width` (plain multi-head attention, d_ff = 8/3 width rounded up
        to 16), unrolled so that every block's output can be captured, in float32."""
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=width, n_layers=self.n_layers, n_heads=width // self.head_dim,
            head_dim=self.head_dim, d_ff=16 * math.ceil(8 * width / 3 / 16), max_seq_len=self.seq_len,
            dtype="float32", scan_layers=False, attention="xla", parametrization=parametrization,
            mup_base_width=self.base_width if parametrization == "mup" else None,
        )

    def optimizer_config(self) -> OptimizerConfig:
        """Constant learning rate, no warmup, no clipping, no weight decay."""
        return OptimizerConfig(learning_rate=self.learning_rate, warmup_steps=0, decay="constant",
                               weight_decay=0.0, clip_norm=math.inf)


@dataclasses.dataclass(frozen=True)
class CoordCheck:
    """What a coordinate check measured.

    Attributes:
        spec: the check's settings.
        activations: `activation_names(n_layers)`.
        scale: parametrization -> activation -> [len(widths), steps + 1] mean |x_t|
            (column t: after t updates).
        change: the same shape, mean |x_t - x_0| (column 0 is 0).
    """

    spec: CoordCheckSpec
    activations: tuple[str, ...]
    scale: dict[str, dict[str, np.ndarray]]
    change: dict[str, dict[str, np.ndarray]]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: the spec, both statistics as nested lists, and the growth ratios
        after the last update."""
        return {
            "spec": dataclasses.asdict(self.spec),
            "activations": list(self.activations),
            **{stat: {p: {a: v.tolist() for a, v in by_act.items()} for p, by_act in getattr(self, stat).items()}
               for stat in STATISTICS},
            "growth_ratio": {
                stat: {p: {a: growth_ratio(self, p, a, stat) for a in self.activations} for p in self.scale}
                for stat in STATISTICS
            },
        }


def activation_names(n_layers: int) -> tuple[str, ...]:
    """The measured activations in model order: "embedding", "block_0" .. "block_{n_layers-1}",
    "logits", and "readout" (what the output projection's own update adds to the logits)."""
    return ("embedding", *(f"block_{i}" for i in range(n_layers)), "logits", "readout")


def activations(model: Transformer, params: Any, config: ModelConfig, batch: dict[str, jax.Array],
                initial: Any = None) -> dict[str, jax.Array]:
    """The activations of `model` on `batch` that the check measures.

    Args:
        model: an unrolled (`scan_layers=False`) `Transformer` of `config`.
        params: its unboxed parameters.
        config: its config.
        batch: `inputs`, `positions`, `segment_ids`, each [B, T] int32.
        initial: the parameters at initialisation (None: `params`).

    Returns:
        `activation_names(config.n_layers)` -> float32 array: the embedding output and
        each block's output [B, T, D] (captured with flax's `capture_intermediates`), and
        the logits [B, T, V] (through `output_projection`, so with μP's multiplier), and
        the readout term [B, T, V]: the logits of today's hidden state through today's
        output projection less through the initial one. The logits' change mixes it with
        the initial projection's view of the moved hidden state (which μP lets vanish as
        1/sqrt(m)); this term alone is Θ(1) under μP at every width, and would shrink as
        1/m if the table's learning rate were scaled like a hidden matrix's.
    """
    def captured(module: nn.Module, method: str) -> bool:
        return method == "__call__" and isinstance(module, (Embedding, DecoderBlock))

    hidden, state = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        capture_intermediates=captured, mutable=["intermediates"],
    )
    found = state["intermediates"]
    outputs = {"embedding": found["embedding"]["__call__"][0]}
    for i in range(config.n_layers):
        outputs[f"block_{i}"] = found[f"layers_{i}"]["__call__"][0][0]  # a block returns (x, None)
    outputs["logits"] = logits(hidden, params, config)
    outputs["readout"] = outputs["logits"] - logits(hidden, params if initial is None else initial, config)
    return {name: x.astype(jnp.float32) for name, x in outputs.items()}


def synthetic_batch(spec: CoordCheckSpec) -> dict[str, np.ndarray]:
    """The batch every model trains on at every step and is measured on (`BATCH_FIELDS`,
    each [batch_size, seq_len]).

    Each row follows one random permutation π of the vocabulary from a random first
    token (x[t+1] = π(x[t])), one document per row, every target text. As in the `mup`
    package's check, the batch is the same at every step, so successive updates push
    the same way and their effect on each activation adds up within a few steps.
    """
    rng = np.random.default_rng(spec.seed)
    successor = rng.permutation(spec.vocab_size).astype(np.int32)
    tokens = np.empty((spec.batch_size, spec.seq_len + 1), np.int32)
    tokens[:, 0] = rng.integers(0, spec.vocab_size, spec.batch_size)
    for t in range(spec.seq_len):
        tokens[:, t + 1] = successor[tokens[:, t]]
    shape = (spec.batch_size, spec.seq_len)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(spec.seq_len, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "target_roles": np.full(shape, Role.TEXT, ROLE_DTYPE),
    }


def _train_and_measure(
    spec: CoordCheckSpec, config: ModelConfig, batch: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scales and changes ([steps + 1] each) of every activation of one model trained on `batch`."""
    model = Transformer(config)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params = nn.unbox(model.init(jax.random.key(spec.seed), batch["inputs"], batch["positions"], batch["segment_ids"])["params"])
    opt_config = spec.optimizer_config()
    optimizer = build_optimizer(opt_config, spec.steps, config)
    step = jax.jit(make_train_step(model, config, LossConfig(), optimizer, learning_rate_schedule(opt_config, spec.steps)))
    forward = jax.jit(lambda p: activations(model, p, config, batch, initial=params))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    initial = jax.device_get(forward(state.params))
    rows = []
    for t in range(spec.steps + 1):
        if t:
            state, _ = step(state, batch)
        now = jax.device_get(forward(state.params))
        rows.append({n: (np.mean(np.abs(x), dtype=np.float64), np.mean(np.abs(x - initial[n]), dtype=np.float64))
                     for n, x in now.items()})
    scales = {n: np.array([r[n][0] for r in rows]) for n in rows[0]}
    changes = {n: np.array([r[n][1] for r in rows]) for n in rows[0]}
    return scales, changes


def run_coord_check(spec: CoordCheckSpec, *, progress: Callable[[str], None] | None = None) -> CoordCheck:
    """Train and measure every (parametrization, width) of `spec`.

    Args:
        spec: the check.
        progress: called with one line per model trained (e.g. `print`), or None.
    """
    names = activation_names(spec.n_layers)
    batch = synthetic_batch(spec)
    scale: dict[str, dict[str, np.ndarray]] = {}
    change: dict[str, dict[str, np.ndarray]] = {}
    for parametrization in spec.parametrizations:
        per_width = []
        for width in spec.widths:
            per_width.append(_train_and_measure(spec, spec.model_config(width, parametrization), batch))
            if progress is not None:
                logit_scale = per_width[-1][0]["logits"]
                progress(f"{parametrization:<8} d_model {width:>5}: mean |logit| {logit_scale[0]:.3g} -> "
                         f"{logit_scale[-1]:.3g} after {spec.steps} steps")
        scale[parametrization] = {n: np.stack([w[0][n] for w in per_width]) for n in names}
        change[parametrization] = {n: np.stack([w[1][n] for w in per_width]) for n in names}
    return CoordCheck(spec, names, scale, change)


def growth_ratio(
    check: CoordCheck, parametrization: str, activation: str = "logits", statistic: str = "change", step: int = -1
) -> float:
    """`statistic` ("scale" or "change") of `activation` at the largest width over that
    at the smallest, after `step` updates (default: the last). About 1 when flat (μP);
    under standard parametrisation the change of the logits grows about as the width."""
    values = getattr(check, statistic)[parametrization][activation][:, step]
    return float(values[-1] / values[0])


def coord_check_figure(check: CoordCheck) -> Figure:
    """Rows: mean |x_t| and mean |x_t - x_0| after the last update; columns: the
    parametrizations; each panel one line per activation against d_model (log-log)."""
    step = check.spec.steps
    cols = len(check.scale)
    fig = Figure(figsize=(3.6 * cols + 1.4, 5.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2, cols, squeeze=False, sharey="row"))
    widths = np.array(check.spec.widths)
    colours = _activation_colours(len(check.activations))
    labels = {"scale": "mean |x_t|", "change": "mean |x_t - x_0|"}
    for r, stat in enumerate(STATISTICS):
        for c, (parametrization, by_act) in enumerate(getattr(check, stat).items()):
            ax = axes[r, c]
            for i, name in enumerate(check.activations):
                ax.plot(widths, by_act[name][:, step], marker="o", markersize=3, color=colours[i], label=name,
                        linestyle={"logits": "--", "readout": ":"}.get(name, "-"))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{'μP' if parametrization == 'mup' else parametrization}: {labels[stat]}", fontsize=9)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("d_model")
            if c == 0:
                ax.set_ylabel(f"{labels[stat]}, step {step}")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    spec = check.spec
    fig.suptitle(f"coordinate check: {spec.n_layers} layers, head_dim {spec.head_dim}, {step} Adam steps at "
                 f"lr {spec.learning_rate:g}, μP base width {spec.base_width}", fontsize=10)
    return fig


def _activation_colours(n: int) -> list:
    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def write_coord_check(check: CoordCheck, out: str | os.PathLike) -> list[StoragePath]:
    """`out/coord_check.json` (`CoordCheck.to_json`) and `out/coord_check.png` (the figure)."""
    out = _output_directory(out)
    written = [write_atomically(out / JSON_FILE, json.dumps(check.to_json(), indent=1) + "\n", option="--out")]
    buffer = io.BytesIO()
    coord_check_figure(check).savefig(buffer, dpi=90, format="png")
    written.append(write_atomically(out / PLOT_FILE, buffer.getvalue(), option="--out"))
    return written


def _output_directory(out: str | os.PathLike) -> StoragePath:
    """`out` as a directory ready for the files (made here when local).

    Raises:
        UserError: `out` exists and is not a directory.
    """
    out = as_path(out)
    if not is_remote(str(out)):
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; give a directory for {JSON_FILE} and {PLOT_FILE}")
        out.mkdir(parents=True, exist_ok=True)
    return out


def coord_check_report(check: CoordCheck) -> str:
    """A table: per activation and parametrization, the growth ratio (largest width over
    smallest) of the scale and of the change after the last update."""
    spec = check.spec
    lines = [
        f"coordinate check: d_model {spec.widths[0]}..{spec.widths[-1]}, {spec.n_layers} layers, {spec.steps} Adam "
        f"steps at lr {spec.learning_rate:g}; value at d_model {spec.widths[-1]} / at {spec.widths[0]} (1: flat)",
        f"{'activation':<12}" + "".join(f"{p + ' ' + stat:>18}" for p in check.scale for stat in STATISTICS),
    ]
    for name in check.activations:
        cells = "".join(f"{growth_ratio(check, p, name, stat):>18.3g}" for p in check.scale for stat in STATISTICS)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


def coord_check_and_write(spec: CoordCheckSpec, out: str | os.PathLike) -> CoordCheck:
    """`metatrain sweep coord-check`: run the check (a line per model), write its JSON
    and plot into `out`, print the growth-ratio table and the files written."""
    out = _output_directory(out)  # refused before the training, not after
    check = run_coord_check(spec, progress=lambda line: print(line, flush=True))
    written = write_coord_check(check, out)
    print(coord_check_report(check))
    for path in written:
        print(f"wrote {path}")
    return check
