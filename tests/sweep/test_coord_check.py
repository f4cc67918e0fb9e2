"""`metatrain sweep coord-check`: under standard parametrisation activations grow with
width within a few Adam steps, under μP they do not.

The check runs at widths 32 and 128 (m = 4), one layer, 5 steps: seconds of compute,
mostly compilation. Measured at these settings (width 128 over width 32): block output
scale 2.14 standard vs 1.04 μP; logits 1.27 vs 0.64 (under μP the logits' random
initial part shrinks as 1/sqrt(m), μP's design); the readout term's change 1.48 vs
0.61. Without μP's learning-rate scaling the μP block ratio is 2.66; without its output
multiplier the μP logit ratio is 2.07: either breaks these assertions, and a tied table
learning at lr / m would shrink the μP readout ratio below 0.4.
"""

import json

import numpy as np
import pytest

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.sweep.coord_check import (
    JSON_FILE,
    PLOT_FILE,
    CoordCheckSpec,
    activation_names,
    coord_check_figure,
    growth_ratio,
    run_coord_check,
)

SMALL = ["--widths", "32", "128", "--layers", "1", "--steps", "5", "--vocab", "32", "--seq-len", "32",
         "--batch-size", "8"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    assert main(["sweep", "coord-check", "--out", str(out), *SMALL]) == 0
    return out, json.loads((out / JSON_FILE).read_text())


def test_standard_grows_with_width_and_mup_stays_flat(written):
    _, report = written
    ratio = report["growth_ratio"]
    # Blocks: Adam's lr moves width-D hidden matrices D times more per coordinate of output.
    assert ratio["scale"]["standard"]["block_0"] > 1.8
    assert 0.85 < ratio["scale"]["mup"]["block_0"] < 1.15
    assert 0.85 < ratio["change"]["mup"]["block_0"] < 1.15
    # Logits: standard's grow with width; μP's do not (they shrink at init, as 1/sqrt(m)).
    assert ratio["scale"]["standard"]["logits"] > 1.15
    assert ratio["scale"]["mup"]["logits"] < 1.0
    assert ratio["scale"]["standard"]["logits"] > 1.6 * ratio["scale"]["mup"]["logits"]
    assert ratio["change"]["standard"]["logits"] > 1.6 * ratio["change"]["mup"]["logits"]
    # The readout's own update (the tied table's learning rate): about lr x base width
    # under μP at every width (0.61 at m = 4 after 5 steps; a table learning at lr / m, like
    # a hidden matrix, gives about a quarter of that), growing under standard.
    assert ratio["change"]["mup"]["readout"] > 0.4
    assert ratio["change"]["standard"]["readout"] > 2 * ratio["change"]["mup"]["readout"]
    assert 0.85 < ratio["change"]["mup"]["embedding"] < 1.2


def test_the_json_holds_every_step_and_the_plot_is_written(written):
    out, report = written
    assert report["activations"] == ["embedding", "block_0", "logits", "readout"]
    for stat in ("scale", "change"):
        for parametrization in ("standard", "mup"):
            for name in report["activations"]:
                values = np.array(report[stat][parametrization][name])
                assert values.shape == (2, 6)  # widths x (init + 5 steps)
                assert np.all(np.isfinite(values))
    assert np.all(np.array(report["change"]["mup"]["logits"])[:, 0] == 0)
    # At the base width (the smallest) μP is the standard model: the same numbers.
    for stat in ("scale", "change"):
        np.testing.assert_array_equal(
            np.array(report[stat]["mup"]["logits"])[0], np.array(report[stat]["standard"]["logits"])[0]
        )
    assert (out / PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_growth_ratio_and_figure_from_a_check_of_one_step():
    check = run_coord_check(CoordCheckSpec(widths=(16, 32), parametrizations=("mup",), n_layers=1, steps=1,
                                           vocab_size=16, seq_len=8, batch_size=8))
    assert check.activations == activation_names(1)
    expected = check.scale["mup"]["logits"][1, -1] / check.scale["mup"]["logits"][0, -1]
    assert growth_ratio(check, "mup", "logits", "scale") == pytest.approx(expected)
    fig = coord_check_figure(check)
    assert len(fig.axes) == 2  # scale and change rows, one column


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (64,)}, "at least two increasing widths"),
    ({"widths": (64, 32)}, "at least two increasing widths"),
    ({"widths": (32, 40)}, "multiple of head_dim=16"),
    ({"parametrizations": ("muP",)}, "choose among standard, mup"),
    ({"learning_rate": 0.0}, "--lr"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        CoordCheckSpec(**kwargs)
