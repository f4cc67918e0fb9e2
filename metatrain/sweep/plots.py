"""PNG plots of a fitted sweep, one column per loss fitted (text and thinking side by side).

    loss_vs_tokens.png   loss against training tokens, one colour per model size, with
                         the fitted L(N, D) through each size
    frontier.png         loss against compute for every run, with the fitted
                         compute-optimal frontier (the lower envelope of the fitted law
                         over the sweep's sizes) and IsoFLOP minima where there are any
    isoflop.png          (IsoFLOP sweeps) loss against N per budget with its parabola and
                         minimum; below, N_opt(C) and D_opt(C) with their power laws

Colour is model size (or budget), line style and marker are the variant. The plots stay
readable at any number of sizes: with up to `MAX_LEGEND_COLOURS` sizes (budgets) each
has a legend entry; with more, colour follows log N (log C) on a colour bar and the
legend shows only the variants' styles (nothing for a single variant). A legend of more
than `MAX_LEGEND_INSIDE` entries goes beside the axes, and the figure widens for it and
for a colour bar. The y axis names the manifest key fitted ("text loss (loss/text)",
"bpb/text").

`figures` builds the `matplotlib.figure.Figure`s (Agg), never pyplot, so no global state
or display is touched; `write_plots` saves them (into a bucket too: each PNG is
rendered in memory and written as one object).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from metatrain.io.outputs import write_atomically
from metatrain.io.storage import StoragePath, as_path, is_remote
from metatrain.sweep.series import RoleFit, loss_name

#: More model sizes (or budgets) than this in a figure: a colour bar instead of a legend entry each.
MAX_LEGEND_COLOURS = 8
#: More legend entries than this: the legend goes outside the axes, beside the last column.
MAX_LEGEND_INSIDE = 6

_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")
_ROLE_ORDER = ("text", "thinking", "joint")
_NEUTRAL = "0.35"  # legend entries that stand for a style, not a colour
_WIDTH, _HEIGHT = 4.4, 3.6  # inches per panel
_COLOUR_BAR_WIDTH, _LEGEND_WIDTH = 1.0, 1.7  # inches added to the figure for each


@dataclasses.dataclass(frozen=True)
class _Column:
    """The fits of one loss (label and manifest key), one per variant."""

    label: str
    key: str
    fits: list[RoleFit]

    @property
    def ylabel(self) -> str:
        return loss_name(self.label, self.key, with_key=True)

    @property
    def name(self) -> str:
        return loss_name(self.label, self.key)


@dataclasses.dataclass(frozen=True)
class _Colours:
    """The colour of each value of N (or C) in a figure: a colour per value when there are
    at most `MAX_LEGEND_COLOURS`, else a position on a log scale read from a colour bar."""

    values: np.ndarray  # sorted, unique
    cmap: Colormap

    @classmethod
    def of(cls, values: Sequence[np.ndarray], cmap: str, low: float, high: float) -> "_Colours":
        # Only part of the map: viridis' yellow and plasma's end are hard to see on white.
        listed = ListedColormap(colormaps[cmap](np.linspace(low, high, 256)))
        return cls(values=np.unique(np.concatenate(values)), cmap=listed)

    @property
    def continuous(self) -> bool:
        return len(self.values) > MAX_LEGEND_COLOURS

    @property
    def norm(self) -> LogNorm:
        return LogNorm(vmin=self.values[0], vmax=self.values[-1])

    def __call__(self, value: float):
        if self.continuous:
            return self.cmap(self.norm(value))
        return self.cmap(np.searchsorted(self.values, value) / max(len(self.values) - 1, 1))

    def colour_bar(self, fig: Figure, axes: Sequence, label: str) -> None:
        fig.colorbar(ScalarMappable(norm=self.norm, cmap=self.cmap), ax=list(axes), label=label, aspect=30)


def figures(fits: Sequence[RoleFit]) -> dict[str, Figure]:
    """The plots of `fits`, by file name (`loss_vs_tokens.png`, ...), built but not saved."""
    columns = _columns(fits)
    variants = list(dict.fromkeys(f.series.variant for f in fits))
    built = {
        "loss_vs_tokens.png": _loss_vs_tokens(columns, variants),
        "frontier.png": _frontier(columns, variants),
    }
    if any(f.isoflop is not None and f.isoflop.minima for f in fits):
        built["isoflop.png"] = _isoflop(columns, variants)
    for fig in built.values():
        for ax in fig.axes:  # log axes label decades only; minor labels collide
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
    return built


def write_plots(fits: Sequence[RoleFit], out: str | os.PathLike) -> list[StoragePath]:
    """Write the plots of `fits` into `out` (created; in a bucket, the prefix the PNGs
    are written under); returns the files written."""
    out = as_path(out)
    if not is_remote(str(out)):
        out.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out / name) for name, fig in figures(fits).items()]


def _columns(fits: Sequence[RoleFit]) -> list[_Column]:
    """Roles in their usual order, then other keys (`--loss-key`) as they come."""
    labels = list(dict.fromkeys(f.series.label for f in fits))
    labels.sort(key=lambda label: _ROLE_ORDER.index(label) if label in _ROLE_ORDER else len(_ROLE_ORDER))
    columns = []
    for label in labels:
        chosen = [f for f in fits if f.series.label == label]
        columns.append(_Column(label=label, key=chosen[0].series.loss_key, fits=chosen))
    return columns


def _save(fig: Figure, path: StoragePath) -> StoragePath:
    """Render `fig` in memory (the format named by the suffix) and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format=path.suffix.lstrip(".") or "png")
    return write_atomically(path, buffer.getvalue(), option="plot")


def _figure(rows: int, cols: int, *, colour_bar: bool = False, legends_outside: int = 0) -> tuple[Figure, np.ndarray]:
    """A grid of panels, wider by a colour bar and by each legend beside the axes."""
    width = _WIDTH * cols + _COLOUR_BAR_WIDTH * colour_bar + _LEGEND_WIDTH * legends_outside
    fig = Figure(figsize=(width, _HEIGHT * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _style(variants: list, variant) -> dict:
    i = variants.index(variant)
    return {"linestyle": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)]}


def _variant_handles(variants: list) -> list[Line2D]:
    """One neutral entry per variant showing its marker and line style (none for a single one)."""
    if len(variants) < 2:
        return []
    return [Line2D([], [], color=_NEUTRAL, label=str(v), **_style(variants, v)) for v in variants]


def _colour_handles(colours: _Colours, variants: list, label) -> list[Line2D]:
    """One entry per value of a discrete colour scale: the single variant's style, or a swatch."""
    if colours.continuous:
        return []
    style = _style(variants, variants[0]) if len(variants) == 1 else {"linestyle": "-", "linewidth": 3}
    return [Line2D([], [], color=colours(v), label=label(v), **style) for v in colours.values]


def _outside(handles: list) -> bool:
    return len(handles) > MAX_LEGEND_INSIDE


def _legend(row: Sequence, handles: list) -> None:
    """The same legend on every axes of `row`, or once beside the last one when it is long."""
    if not handles:
        return
    if len(handles) > MAX_LEGEND_INSIDE:
        row[-1].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        return
    for ax in row:
        ax.legend(handles=handles, fontsize=6)


def _fit_ylim_to_data(ax, losses: list[np.ndarray]) -> None:
    """Keep the axis on the observed losses; fitted curves may shoot up beyond the data."""
    values = np.concatenate(losses)
    low, high = values.min(), values.max()
    pad = 0.15 * (high - low) or 0.05 * high
    ax.set_ylim(low - pad, high + pad)


def _variant_label(variant) -> str:
    return "" if variant is None else f"{variant}, "


def _loss_vs_tokens(columns: list[_Column], variants: list) -> Figure:
    colours = _Colours.of([f.series.N for c in columns for f in c.fits], "viridis", 0.05, 0.85)
    handles = _colour_handles(colours, variants, lambda n: f"N={n:.3g}") + _variant_handles(variants)
    fig, axes = _figure(1, len(columns), colour_bar=colours.continuous, legends_outside=_outside(handles))
    for ax, column in zip(axes[0], columns):
        for fit in column.fits:
            s, style = fit.series, _style(variants, fit.series.variant)
            d_grid = np.geomspace(s.D.min() / 1.3, s.D.max() * 1.3, 60)
            for n in np.unique(s.N):
                on = s.N == n
                order = np.argsort(s.D[on])
                ax.plot(s.D[on][order], s.L[on][order], color=colours(n), marker=style["marker"], linestyle="none",
                        markersize=4 if colours.continuous else 6)
                ax.plot(d_grid, fit.law.law(n, d_grid), color=colours(n), linestyle=style["linestyle"],
                        linewidth=0.6 if colours.continuous else 1)
        _fit_ylim_to_data(ax, [f.series.L for f in column.fits])
        ax.set_xscale("log")
        ax.set_xlabel("training tokens D")
        ax.set_ylabel(column.ylabel)
        ax.set_title(f"{column.name} vs tokens (lines: fitted L(N, D))", fontsize=9)
    _legend(axes[0], handles)
    if colours.continuous:
        colours.colour_bar(fig, axes[0], "non-embedding parameters N")
    return fig


def _frontier_curve(fit: RoleFit, c_grid: np.ndarray) -> np.ndarray:
    """min over the sweep's sizes of L(N, C / flops_per_token(N)): the fitted frontier."""
    s = fit.series
    sizes = {n: s.flops_per_token[s.N == n][0] for n in np.unique(s.N)}
    curves = [fit.law.law(n, c_grid / fpt) for n, fpt in sizes.items()]
    return np.min(curves, axis=0)


def _frontier(columns: list[_Column], variants: list) -> Figure:
    """Colour is the variant here: the frontier compares variants, not sizes."""
    colours = colormaps["tab10"](np.arange(len(variants)) % 10)
    has_minima = any(f.isoflop is not None and f.isoflop.minima for c in columns for f in c.fits)
    one = colours[0] if len(variants) == 1 else _NEUTRAL
    handles = [Line2D([], [], color=one, marker="o", linestyle="none", markersize=4, label="runs"),
               Line2D([], [], color=one, linestyle="-", label="fitted frontier")]
    if has_minima:
        handles.append(Line2D([], [], color=one, marker="*", markersize=9, markeredgecolor="black",
                              markeredgewidth=0.5, linestyle="none", label="IsoFLOP minima"))
    if len(variants) > 1:
        handles += [Line2D([], [], color=colours[i], label=str(v), **_style(variants, v))
                    for i, v in enumerate(variants)]
    elif variants[0] is not None:
        handles[0].set_label(f"runs ({variants[0]})")
    fig, axes = _figure(1, len(columns), legends_outside=_outside(handles))
    for ax, column in zip(axes[0], columns):
        for fit in column.fits:
            s, style = fit.series, _style(variants, fit.series.variant)
            colour = colours[variants.index(s.variant)]
            c_grid = np.geomspace(s.flops.min() / 1.3, s.flops.max() * 1.3, 80)
            ax.scatter(s.flops, s.L, color=colour, marker=style["marker"], s=14 if len(s.L) <= 100 else 6)
            ax.plot(c_grid, _frontier_curve(fit, c_grid), color=colour, linestyle=style["linestyle"], linewidth=1.2)
            if fit.isoflop is not None and fit.isoflop.minima:
                m = fit.isoflop.minima
                ax.scatter([x.budget for x in m], [x.loss for x in m], color=colour, marker="*", s=80,
                           edgecolor="black", linewidth=0.5, zorder=3)
        _fit_ylim_to_data(ax, [f.series.L for f in column.fits])
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(column.ylabel)
        ax.set_title(f"{column.name} vs compute", fontsize=9)
    _legend(axes[0], handles)
    return fig


def _budget_handles(columns: list[_Column], colours: _Colours, variants: list) -> list[Line2D]:
    """One entry per budget (few budgets), saying which variants found no minimum there."""
    def label(budget) -> str:
        lacking = [f.series.variant for c in columns for f in c.fits if f.isoflop is not None
                   and budget in f.series.budget and budget not in {m.budget for m in f.isoflop.minima}]
        if not lacking:
            return f"C={budget:.2g}"
        if len(variants) == 1:
            return f"C={budget:.2g} (no minimum)"
        return f"C={budget:.2g} (no minimum: {', '.join(dict.fromkeys(str(v) for v in lacking))})"

    return _colour_handles(colours, variants, label)


def _isoflop(columns: list[_Column], variants: list) -> Figure:
    budgets = [f.series.budget[np.isfinite(f.series.budget)] for c in columns for f in c.fits]
    colours = _Colours.of(budgets, "plasma", 0.05, 0.8)
    top_handles = _budget_handles(columns, colours, variants) + _variant_handles(variants)
    # Below, each column has its own legend (the exponents differ): N_opt and D_opt per variant.
    bottom_entries = max(sum(2 for f in c.fits if f.isoflop is not None and f.isoflop.minima) for c in columns)
    beside = len(columns) if bottom_entries > MAX_LEGEND_INSIDE else int(_outside(top_handles))
    fig, axes = _figure(2, len(columns), colour_bar=colours.continuous, legends_outside=beside)
    for col, column in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        for fit in column.fits:
            iso, s, style = fit.isoflop, fit.series, _style(variants, fit.series.variant)
            if iso is None or not iso.minima:
                continue
            minima = {m.budget: m for m in iso.minima}
            for budget in np.unique(s.budget[np.isfinite(s.budget)]):
                on = s.budget == budget
                top.plot(s.N[on], s.L[on], color=colours(budget), marker=style["marker"], linestyle="none",
                         markersize=4 if colours.continuous else 6)
                if budget in minima:
                    m = minima[budget]
                    x = np.linspace(np.log(s.N[on]).min() - 0.2, np.log(s.N[on]).max() + 0.2, 50)
                    top.plot(np.exp(x), m.in_n(x), color=colours(budget), linestyle=style["linestyle"], linewidth=1)
                    top.scatter([m.n_opt], [m.loss], color=colours(budget), marker="*", s=90, edgecolor="black",
                                linewidth=0.5, zorder=3)
            at = np.array([m.budget for m in iso.minima])
            grid = np.geomspace(at.min() / 2, at.max() * 2, 20)
            for key, points, law, colour in (
                ("N_opt", [m.n_opt for m in iso.minima], iso.n_opt, "tab:blue"),
                ("D_opt", [m.d_opt for m in iso.minima], iso.d_opt, "tab:orange"),
            ):
                label = f"{_variant_label(s.variant)}{key}"
                if law is not None:
                    label += f" ~ C^{law.exponent:.2f}"
                    bottom.plot(grid, law(grid), color=colour, linestyle=style["linestyle"], linewidth=1)
                bottom.scatter(at, points, color=colour, marker=style["marker"], s=16, label=label)
        _fit_ylim_to_data(top, [f.series.L[np.isfinite(f.series.budget)] for f in column.fits if f.isoflop is not None])
        top.set_xscale("log")
        top.set_xlabel("non-embedding parameters N")
        top.set_ylabel(column.ylabel)
        top.set_title(f"IsoFLOP curves, {column.name} (stars: minima)", fontsize=9)
        bottom.set_xscale("log")
        bottom.set_yscale("log")
        bottom.set_xlabel("training compute C (FLOPs)")
        bottom.set_ylabel("compute-optimal N and D")
        _legend([bottom], bottom.get_legend_handles_labels()[0])
    _legend(axes[0], top_handles)
    if colours.continuous:
        colours.colour_bar(fig, axes[0], "IsoFLOP budget C (FLOPs)")
    return fig
