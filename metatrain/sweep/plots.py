"""PNG plots of a fitted sweep, one column per role (text and thinking side by side).

    loss_vs_tokens.png   loss against training tokens, one line per model size, with
                         the fitted L(N, D) dashed through each size
    frontier.png         loss against compute for every run, with the fitted
                         compute-optimal frontier (the lower envelope of the fitted law
                         over the sweep's sizes) and IsoFLOP minima where there are any
    isoflop.png          (IsoFLOP sweeps) loss against N per budget with its parabola and
                         minimum; below, N_opt(C) and D_opt(C) with their power laws

Variants share the axes: colour is model size (or budget), line style is the variant.
Figures are built with `matplotlib.figure.Figure` (Agg), never pyplot, so no global
state or display is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from metatrain.outputs import write_atomically
from metatrain.sweep.fit import RoleFit

_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")
_ROLE_ORDER = ("text", "thinking", "joint")


def write_plots(fits: Sequence[RoleFit], out: Path) -> list[Path]:
    """Write the plots of `fits` into `out` (created); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(fits)
    variants = list(dict.fromkeys(f.series.variant for f in fits))
    paths = [
        _save(_loss_vs_tokens(columns, variants), out / "loss_vs_tokens.png"),
        _save(_frontier(columns, variants), out / "frontier.png"),
    ]
    if any(f.isoflop is not None and f.isoflop.minima for f in fits):
        paths.append(_save(_isoflop(columns, variants), out / "isoflop.png"))
    return paths


def _columns(fits: Sequence[RoleFit]) -> list[tuple[str, list[RoleFit]]]:
    roles = [r for r in _ROLE_ORDER if any(f.series.role == r for f in fits)]
    return [(r, [f for f in fits if f.series.role == r]) for r in roles]


def _save(fig: Figure, path: Path) -> Path:
    for ax in fig.axes:  # log axes label decades only; minor labels collide
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    # The temporary has no .png suffix, so the format is named.
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix.lstrip(".") or "png"),
                            option="plot")


def _figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _style(variants: list, variant) -> dict:
    i = variants.index(variant)
    return {"linestyle": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)]}


def _fit_ylim_to_data(ax, losses: list[np.ndarray]) -> None:
    """Keep the axis on the observed losses; fitted curves may shoot up beyond the data."""
    values = np.concatenate(losses)
    low, high = values.min(), values.max()
    pad = 0.15 * (high - low) or 0.05 * high
    ax.set_ylim(low - pad, high + pad)


def _variant_label(variant) -> str:
    return "" if variant is None else f"{variant}, "


def _loss_vs_tokens(columns, variants) -> Figure:
    fig, axes = _figure(1, len(columns))
    for ax, (role, fits) in zip(axes[0], columns):
        sizes = np.unique(np.concatenate([f.series.N for f in fits]))
        colours = colormaps["viridis"](np.linspace(0.05, 0.85, len(sizes)))
        for fit in fits:
            s, style = fit.series, _style(variants, fit.series.variant)
            d_grid = np.geomspace(s.D.min() / 1.3, s.D.max() * 1.3, 60)
            for n, colour in zip(sizes, colours):
                on = s.N == n
                if not on.any():
                    continue
                order = np.argsort(s.D[on])
                ax.plot(s.D[on][order], s.L[on][order], color=colour, marker=style["marker"], linestyle="none",
                        label=f"{_variant_label(s.variant)}N={n:.3g}")
                ax.plot(d_grid, fit.law.law(n, d_grid), color=colour, linestyle=style["linestyle"], linewidth=1)
        _fit_ylim_to_data(ax, [f.series.L for f in fits])
        ax.set_xscale("log")
        ax.set_xlabel("training tokens D")
        ax.set_ylabel(f"{role} loss")
        ax.set_title(f"{role} loss vs tokens (lines: fitted L(N, D))", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def _frontier_curve(fit: RoleFit, c_grid: np.ndarray) -> np.ndarray:
    """min over the sweep's sizes of L(N, C / flops_per_token(N)): the fitted frontier."""
    s = fit.series
    sizes = {n: s.flops_per_token[s.N == n][0] for n in np.unique(s.N)}
    curves = [fit.law.law(n, c_grid / fpt) for n, fpt in sizes.items()]
    return np.min(curves, axis=0)


def _frontier(columns, variants) -> Figure:
    fig, axes = _figure(1, len(columns))
    for ax, (role, fits) in zip(axes[0], columns):
        colours = colormaps["tab10"](np.arange(len(variants)) % 10)
        for fit in fits:
            s, style = fit.series, _style(variants, fit.series.variant)
            colour = colours[variants.index(s.variant)]
            c_grid = np.geomspace(s.flops.min() / 1.3, s.flops.max() * 1.3, 80)
            label = s.variant if s.variant is not None else "runs"
            ax.scatter(s.flops, s.L, color=colour, marker=style["marker"], s=14, label=label)
            ax.plot(c_grid, _frontier_curve(fit, c_grid), color=colour, linestyle=style["linestyle"], linewidth=1.2,
                    label=f"{_variant_label(s.variant)}fitted frontier")
            if fit.isoflop is not None and fit.isoflop.minima:
                m = fit.isoflop.minima
                ax.scatter([x.budget for x in m], [x.loss for x in m], color=colour, marker="*", s=80,
                           edgecolor="black", linewidth=0.5, zorder=3, label=f"{_variant_label(s.variant)}IsoFLOP minima")
        _fit_ylim_to_data(ax, [f.series.L for f in fits])
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(f"{role} loss")
        ax.set_title(f"{role} loss vs compute", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def _isoflop(columns, variants) -> Figure:
    fig, axes = _figure(2, len(columns))
    for col, (role, fits) in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        for fit in fits:
            iso, s, style = fit.isoflop, fit.series, _style(variants, fit.series.variant)
            if iso is None or not iso.minima:
                continue
            budgets = np.unique(s.budget[np.isfinite(s.budget)])
            minima = {m.budget: m for m in iso.minima}
            colours = colormaps["plasma"](np.linspace(0.05, 0.8, len(budgets)))
            for budget, colour in zip(budgets, colours):
                on = s.budget == budget
                fitted = "" if budget in minima else " (no minimum)"
                top.plot(s.N[on], s.L[on], color=colour, marker=style["marker"], linestyle="none",
                         label=f"{_variant_label(s.variant)}C={budget:.2g}{fitted}")
                if budget in minima:
                    m = minima[budget]
                    x = np.linspace(np.log(s.N[on]).min() - 0.2, np.log(s.N[on]).max() + 0.2, 50)
                    top.plot(np.exp(x), m.in_n(x), color=colour, linestyle=style["linestyle"], linewidth=1)
                    top.scatter([m.n_opt], [m.loss], color=colour, marker="*", s=90, edgecolor="black",
                                linewidth=0.5, zorder=3)
            budgets = np.array([m.budget for m in iso.minima])
            grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 20)
            for key, points, law, colour in (
                ("N_opt", [m.n_opt for m in iso.minima], iso.n_opt, "tab:blue"),
                ("D_opt", [m.d_opt for m in iso.minima], iso.d_opt, "tab:orange"),
            ):
                label = f"{_variant_label(s.variant)}{key}"
                if law is not None:
                    label += f" ~ C^{law.exponent:.2f}"
                    bottom.plot(grid, law(grid), color=colour, linestyle=style["linestyle"], linewidth=1)
                bottom.scatter(budgets, points, color=colour, marker=style["marker"], s=16, label=label)
        _fit_ylim_to_data(top, [f.series.L[np.isfinite(f.series.budget)] for f in fits if f.isoflop is not None])
        top.set_xscale("log")
        top.set_xlabel("non-embedding parameters N")
        top.set_ylabel(f"{role} loss")
        top.set_title(f"IsoFLOP curves, {role} loss (stars: minima)", fontsize=9)
        top.legend(fontsize=6)
        bottom.set_xscale("log")
        bottom.set_yscale("log")
        bottom.set_xlabel("training compute C (FLOPs)")
        bottom.set_ylabel("compute-optimal N and D")
        bottom.legend(fontsize=6)
    return fig
