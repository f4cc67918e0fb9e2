"""The smallest real sweep, end to end from one command, with the real trainer.

3 sizes x 2 token budgets of the tiny family (2 and 4 steps of 8 x 128 tokens, one eval
batch) on the bundled sample corpus: plan, train, fit, plot. The numbers fitted from
six runs this short say little about scaling; the test checks that every stage works
on real runs, not the fitted values.

Six trainer start-ups (three compilations each) take 1-2 minutes on the 2-core CPU, so
this test is marked slow:

    python -m pytest tests/sweep -m slow -p no:cacheprovider

The default suite covers the real trainer with one point (tests/sweep/test_run.py).
"""

import json
import math

import pytest

from metatrain.cli import main
from metatrain.io.paths import CONFIGS_DIR
from metatrain.sweep.manifest import read_manifest

SPEC = f"""\
base: {CONFIGS_DIR / 'tiny.yaml'}
family: tiny
overrides:
  trainer.eval_batches: 1
  trainer.log_every: 2
  trainer.progress: false
  optimizer.warmup_steps: 1
  checkpoint.every: 1000
  checkpoint.async_save: false
grid:
  sizes: [tiny-1, tiny-2, tiny-3]
  tokens: [2048, 4096]
"""


@pytest.mark.slow
def test_tiny_sweep_runs_fits_and_plots_from_one_command(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "sweep"
    assert main(["sweep", "run", str(out), "--spec", str(spec), "--fit", "--bootstrap", "10"]) == 0
    text = capsys.readouterr().out
    print(text)

    records = read_manifest(out)
    assert len(records) == 6 and all(r["status"] == "done" for r in records)
    for r in records:
        for key in ("loss", "loss/text", "loss/thinking", "best_loss", "best_loss/text", "best_loss/thinking"):
            assert math.isfinite(r[key]) and 0 < r[key] < math.log(4096) + 1, (r["name"], key, r[key])
        assert r["final_step"] == r["steps"] == r["tokens"] // 1024
    by_name = {r["name"]: r for r in records}
    for size in ("tiny-1", "tiny-2", "tiny-3"):  # two more steps lower the loss
        assert by_name[f"{size}.D4096"]["loss"] < by_name[f"{size}.D2048"]["loss"]

    report = json.loads((out / "fit.json").read_text())
    fitted = {f["role"]: f for f in report["fits"]}
    assert set(fitted) == {"text", "thinking", "joint"}
    for f in fitted.values():
        assert all(math.isfinite(f[p]) for p in ("E", "A", "B", "alpha", "beta"))
        assert f["points"] == 6
    assert "text loss (loss/text): 6 runs" in text and "report:" in text
    assert sorted(p.rsplit("/", 1)[1] for p in report["plots"]) == ["frontier.png", "loss_vs_tokens.png"]
    assert all((out / "plots" / name).stat().st_size > 10_000 for name in ("frontier.png", "loss_vs_tokens.png"))

    # Running again trains nothing: every point is skipped.
    assert main(["sweep", "run", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("done, skipped") == 6 and "6/6 runs done" in again
