"""The plots stay readable at any number of model sizes: legends bounded, colour bars for many sizes.

Checked on the `Figure` objects (`plots.figures`), drawn without rendering, so legend and
axes extents are the ones a saved PNG has.
"""

import math

import numpy as np
import pytest

from metatrain.sweep.fit import fit_series, select_series, targets_for
from metatrain.sweep.plots import figures

from .conftest import LAW


def isoflop_runs(variants, budgets=12, sizes_per_budget=10):
    """An IsoFLOP sweep whose every run has its own model size: budgets x sizes_per_budget sizes."""
    a = LAW.beta / (LAW.alpha + LAW.beta)
    g = (LAW.alpha * LAW.A / (LAW.beta * LAW.B)) ** (1 / (LAW.alpha + LAW.beta))
    records = []
    for variant in variants:
        for budget in np.geomspace(1e17, 1e21, budgets):
            for k in np.linspace(-1.5, 1.5, sizes_per_budget):
                n = g * (budget / 6) ** a * math.exp(k)
                d = budget / (6 * n)
                loss = float(LAW(n, d))
                records.append({"name": f"{variant}.{budget:.3g}.{k:+.2f}", "variant": variant, "params": n,
                                "tokens": d, "flops": budget, "budget": budget, "status": "done", "loss": loss,
                                "loss/text": loss, "loss/thinking": None, "bpb/text": loss / 3})
    return records


def grid_runs(variants, sizes, budgets=3):
    records = []
    for variant in variants:
        for n in np.geomspace(1e6, 1e9, sizes):
            for d in np.geomspace(1e8, 1e11, budgets):
                loss = float(LAW(n, d))
                records.append({"name": f"{variant}.{n:.3g}.{d:.3g}", "variant": variant, "params": n, "tokens": d,
                                "flops": 6 * n * d, "status": "done", "loss": loss, "loss/text": loss,
                                "loss/thinking": loss + 0.3, "bpb/text": loss / 3})
    return records


def built(records, **targets):
    series, _ = select_series(records, targets_for(**targets))
    fits = [fit_series(s, resamples=0) for s in series]
    built = figures(fits)
    for fig in built.values():
        fig.draw_without_rendering()
    return built


def legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)


def colour_bars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def area(bbox) -> float:
    return bbox.width * bbox.height


@pytest.fixture(scope="module")
def many_sizes():
    records = isoflop_runs(("joint", "no_thinking_loss"))
    assert len({r["params"] for r in records}) == 120
    return built(records, loss_key="bpb/text")


def test_many_sizes_get_a_colour_bar_and_short_legends(many_sizes):
    assert sorted(many_sizes) == ["frontier.png", "isoflop.png", "loss_vs_tokens.png"]
    for name, fig in many_sizes.items():
        for legend in legends(fig):
            assert len(legend.get_texts()) <= 12, name
            ax = legend.axes
            ratio = area(legend.get_window_extent()) / area(ax.get_window_extent())
            assert ratio < 0.25, (name, ratio)
            box = legend.get_window_extent()
            assert fig.bbox.contains(*box.p0) and fig.bbox.contains(*box.p1), name  # not cut off
    (bar,) = colour_bars(many_sizes["loss_vs_tokens.png"])
    assert bar.get_ylabel() == "non-embedding parameters N" and bar.get_yscale() == "log"
    (bar,) = colour_bars(many_sizes["isoflop.png"])  # 12 budgets
    assert "budget" in bar.get_ylabel() and bar.get_yscale() == "log"
    # the legend of loss_vs_tokens shows the variants' styles only
    (legend,) = legends(many_sizes["loss_vs_tokens.png"])
    assert [t.get_text() for t in legend.get_texts()] == ["joint", "no_thinking_loss"]


def test_the_y_axes_name_the_key_fitted(many_sizes):
    plotted = [ax for ax in many_sizes["loss_vs_tokens.png"].axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_ylabel() for ax in plotted] == ["bpb/text"]
    assert many_sizes["frontier.png"].axes[0].get_ylabel() == "bpb/text"
    assert many_sizes["isoflop.png"].axes[0].get_ylabel() == "bpb/text"


def test_many_sizes_and_one_variant_need_no_legend_on_loss_vs_tokens():
    fig = built(isoflop_runs((None,)), role="text")["loss_vs_tokens.png"]
    assert legends(fig) == [] and len(colour_bars(fig)) == 1


def test_few_sizes_keep_one_legend_entry_per_size():
    fig = built(grid_runs((None,), sizes=3), role="all")["loss_vs_tokens.png"]
    assert colour_bars(fig) == []
    for ax in fig.axes:  # text, thinking, joint
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["N=1e+06", "N=3.16e+07", "N=1e+09"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["text loss (loss/text)", "thinking loss (loss/thinking)",
                                                    "joint loss (loss)"]


def test_few_sizes_with_variants_list_sizes_then_variants():
    fig = built(grid_runs(("joint", "no_thinking_loss"), sizes=3), role="text")["loss_vs_tokens.png"]
    (legend,) = legends(fig)
    assert [t.get_text() for t in legend.get_texts()] == ["N=1e+06", "N=3.16e+07", "N=1e+09", "joint",
                                                          "no_thinking_loss"]


def test_a_long_legend_goes_beside_the_axes():
    fig = built(grid_runs(("a", "b"), sizes=8, budgets=2), role="text")["loss_vs_tokens.png"]
    (legend,) = legends(fig)
    (ax,) = fig.axes
    assert len(legend.get_texts()) == 10 and colour_bars(fig) == []
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # outside, to the right
    assert fig.bbox.contains(*legend.get_window_extent().p1)  # and not cut off
