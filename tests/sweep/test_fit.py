"""`sweep fit` on hand-written manifests: the report, variants, plots, and refused inputs; a sweep
planned and collected on local disk and in a bucket (`store`)."""

import json
import math

import numpy as np
import pytest

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.sweep.fit import fit_sweep
from metatrain.sweep.law import Law
from metatrain.io.storage import as_path
from metatrain.sweep.manifest import write_manifest
from metatrain.sweep.plan import plan_sweep

from .conftest import LAW, write_metrics

# Per variant and role: the law the losses are drawn from. "no_thinking_loss" has a
# steeper text curve and no thinking loss reported at all (null).
LAWS = {
    ("joint", "text"): Law(E=1.8, A=400.0, B=400.0, alpha=0.34, beta=0.28),
    ("joint", "thinking"): Law(E=2.2, A=300.0, B=500.0, alpha=0.30, beta=0.30),
    ("no_thinking_loss", "text"): Law(E=1.7, A=1500.0, B=400.0, alpha=0.45, beta=0.28),
}


def manifest(variants=("joint", "no_thinking_loss"), sizes=5, budgets=5, sigma=0.005, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for variant in variants:
        for n in np.geomspace(1e6, 1e9, sizes):
            for d in np.geomspace(1e8, 1e11, budgets):
                r = {"name": f"{variant}.{n:.3g}.{d:.3g}", "variant": variant, "params": int(n), "tokens": int(d),
                     "flops": 6 * int(n) * int(d), "status": "done"}
                for role in ("text", "thinking"):
                    law = LAWS.get((variant, role))
                    r[f"loss/{role}"] = None if law is None else float(law(n, d) * math.exp(rng.normal(0, sigma)))
                r["loss"] = r["loss/text"] if r["loss/thinking"] is None else (r["loss/text"] + r["loss/thinking"]) / 2
                records.append(r)
    return records


def test_fit_json_reports_each_variant_and_role_side_by_side(tmp_path, capsys):
    write_manifest(tmp_path, manifest())
    assert main(["sweep", "fit", str(tmp_path), "--json", "--bootstrap", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    fits = {(f["variant"], f["role"]): f for f in report["fits"]}
    assert set(fits) == {("joint", "text"), ("joint", "thinking"), ("joint", "joint"), ("no_thinking_loss", "text"),
                         ("no_thinking_loss", "joint")}
    for key, law in LAWS.items():
        f = fits[key]
        assert {"E", "A", "B", "alpha", "beta"} <= set(f)
        assert f["alpha"] == pytest.approx(law.alpha, abs=0.03)
        assert f["beta"] == pytest.approx(law.beta, abs=0.03)
        assert f["E"] == pytest.approx(law.E, rel=0.06)
        assert f["points"] == 25 and f["resamples"] == 8 and set(f["ci"]) == {"E", "A", "B", "alpha", "beta"}
    # thinking changes the text curve in this made-up data, and the fits say so
    assert fits[("no_thinking_loss", "text")]["alpha"] - fits[("joint", "text")]["alpha"] > 0.05
    assert any("no_thinking_loss" in n and "loss/thinking null" in n for n in report["notes"])
    assert json.loads((tmp_path / "fit.json").read_text())["fits"] == report["fits"]
    for path in report["plots"]:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 200_000
    assert sorted(p.rsplit("/", 1)[1] for p in report["plots"]) == ["frontier.png", "loss_vs_tokens.png"]


def test_fit_text_output_and_role_selection(tmp_path, capsys):
    write_manifest(tmp_path, manifest(variants=("joint",)))
    assert main(["sweep", "fit", str(tmp_path), "--role", "text", "--bootstrap", "0", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "variant joint, text loss (loss/text): 25 runs" in out and "thinking loss" not in out
    assert "alpha" in out and "compute-optimal (from alpha, beta)" in out
    assert not (tmp_path / "plots").exists()


def test_isoflop_runs_get_minima_and_power_laws(tmp_path):
    law = LAWS[("joint", "text")]
    a = law.beta / (law.alpha + law.beta)
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    records = []
    for budget in (1e18, 1e19, 1e20):
        for k in np.linspace(-1.5, 1.5, 5):
            n = G * (budget / 6) ** a * math.exp(k)
            d = budget / (6 * n)
            records.append({"name": f"C{budget:.0e}.{k:+.2f}", "params": n, "tokens": d, "flops": budget,
                            "budget": budget, "status": "done", "loss": law(n, d), "loss/text": law(n, d),
                            "loss/thinking": None})
    write_manifest(tmp_path, records)
    report = fit_sweep(tmp_path, role="text", resamples=10)
    (iso,) = report["isoflop"]
    assert [b["flops"] for b in iso["budgets"]] == [1e18, 1e19, 1e20]
    assert iso["N_opt"]["exponent"] == pytest.approx(a, abs=0.03)
    assert iso["D_opt"]["exponent"] == pytest.approx(1 - a, abs=0.03)
    assert report["fits"][0]["N_opt_exponent"] == pytest.approx(a, abs=0.03)  # approaches 2 and 3 agree
    assert [p.rsplit("/", 1)[1] for p in report["plots"]][-1] == "isoflop.png"


def run(i, n, d, loss=5.0, **extra):
    r = {"name": f"r{i}", "params": n, "tokens": d, "flops": 6 * n * d, "status": "done",
         "loss": loss, "loss/text": loss, "loss/thinking": None if loss is None else loss + 0.5}
    r.update(extra)
    return r


GOOD = [run(i, n, d, 3 + 100 / n + 100 / d) for i, (n, d) in enumerate((n, d) for n in (100, 1000, 10000) for d in (1e3, 1e4))]


@pytest.mark.parametrize(
    "records, role, words",
    [
        (GOOD[:4], "text", ["too few points: 4 finished run(s)", "5 parameters", "finish at least 5 runs"]),
        ([run(i, 1000, d) for i, d in enumerate((1e3, 1e4, 1e5, 1e6, 1e7))], "text",
         ["every run has the same model size (params=1,000)", "at least 2 sizes"]),
        ([run(i, n, 1e4) for i, n in enumerate((1e2, 1e3, 1e4, 1e5, 1e6))], "text",
         ["every run has the same tokens", "at least 2 token budgets"]),
        (GOOD[:5] + [run(5, 10000, 1e4, loss=float("nan"))], "text", ["run 'r5' has loss/text=nan", "finite number > 0"]),
        (GOOD[:5] + [run(5, 10000, 1e4, loss=-1.0)], "all", ["run 'r5' has loss/text=-1.0"]),
        ([dict(r, status="planned") for r in GOOD], "text", ["no finished run", "6 planned", "metatrain sweep run"]),
        ([{k: v for k, v in r.items() if k != "params"} for r in GOOD], "text", ["run 'r0' is done but has no 'params'"]),
        ([dict(r, **{"loss/thinking": None}) for r in GOOD], "thinking", ["loss/thinking null", "nothing to fit"]),
        (GOOD[:5] + [dict(GOOD[5], **{"loss/text": None})], "text", ["loss/text is null for r5 but not for the other"]),
    ],
    ids=["too-few", "one-size", "one-budget", "nan", "negative", "none-done", "missing-key", "no-thinking",
         "some-null"],
)
def test_degenerate_inputs_are_refused_saying_what_is_missing(tmp_path, records, role, words):
    # written as by hand (json.dumps writes a NaN loss as NaN)
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError) as e:
        fit_sweep(tmp_path, role=role, resamples=0, plots=False)
    for word in words:
        assert word in str(e.value)


def test_runs_not_done_are_left_out_with_a_note(tmp_path, capsys):
    write_manifest(tmp_path, GOOD + [run(9, 50, 1e3, status="failed", loss=None)])
    report = fit_sweep(tmp_path, role="text", resamples=0, plots=False)
    assert report["fits"][0]["points"] == 6
    assert report["notes"][0] == "1 run(s) not done are left out: r9"
    assert report["notes"][1].startswith("text: only 2 values of tokens, so B, beta and E are not separately")
    assert main(["sweep", "fit", str(tmp_path / "nowhere")]) == 2
    assert "manifest.jsonl does not exist" in capsys.readouterr().err


# -- --loss-key: any numeric manifest key --------------------------------------------------------

BPB_LAW = Law(E=0.7, A=120.0, B=300.0, alpha=0.30, beta=0.26)


def bpb_manifest(sizes=4, budgets=4, sigma=0.003, seed=1):
    """Runs whose bpb/text follows BPB_LAW; their role losses follow LAWS, so fitting the wrong key shows."""
    rng = np.random.default_rng(seed)
    records = manifest(variants=("joint",), sizes=sizes, budgets=budgets, sigma=sigma, seed=seed)
    for r in records:
        r["bpb/text"] = float(BPB_LAW(r["params"], r["tokens"]) * math.exp(rng.normal(0, sigma)))
    return records


def test_loss_key_fits_bits_per_byte_and_recovers_the_law(tmp_path, capsys):
    write_manifest(tmp_path, bpb_manifest())
    assert main(["sweep", "fit", str(tmp_path), "--loss-key", "bpb/text", "--json", "--bootstrap", "0",
                 "--no-plots"]) == 0
    report = json.loads(capsys.readouterr().out)
    (fit,) = report["fits"]
    assert fit["loss_key"] == "bpb/text" and fit["role"] == "bpb/text" and fit["variant"] == "joint"
    assert fit["points"] == 16
    assert fit["alpha"] == pytest.approx(BPB_LAW.alpha, abs=0.03)
    assert fit["beta"] == pytest.approx(BPB_LAW.beta, abs=0.03)
    assert fit["E"] == pytest.approx(BPB_LAW.E, rel=0.05)
    assert json.loads((tmp_path / "fit.json").read_text())["fits"] == report["fits"]

    assert main(["sweep", "fit", str(tmp_path), "--loss-key", "bpb/text", "--bootstrap", "0", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "variant joint, bpb/text: 16 runs" in out and "text loss" not in out


def test_loss_key_is_the_python_entry_too_and_plots_name_the_key(tmp_path):
    write_manifest(tmp_path, bpb_manifest(sizes=3, budgets=3))
    report = fit_sweep(tmp_path, loss_key="bpb/text", resamples=0)
    assert [(f["role"], f["loss_key"]) for f in report["fits"]] == [("bpb/text", "bpb/text")]
    assert sorted(p.rsplit("/", 1)[1] for p in report["plots"]) == ["frontier.png", "loss_vs_tokens.png"]
    # the role fits keep their labels and keys
    report = fit_sweep(tmp_path, resamples=0, plots=False)
    assert [(f["role"], f["loss_key"]) for f in report["fits"]] == [
        ("text", "loss/text"), ("thinking", "loss/thinking"), ("joint", "loss")]


def test_loss_key_and_a_role_together_are_refused_in_one_line(tmp_path, capsys):
    write_manifest(tmp_path, bpb_manifest(sizes=3, budgets=3))
    assert main(["sweep", "fit", str(tmp_path), "--role", "text", "--loss-key", "bpb/text"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--role text and --loss-key bpb/text" in err and "replaces --role" in err
    with pytest.raises(UserError, match="give one of them"):
        fit_sweep(tmp_path, role="thinking", loss_key="bpb/text", plots=False)


def without(records, key, runs=None):
    """`records` with `key` removed from the runs at indices `runs` (all by default)."""
    return [{k: v for k, v in r.items() if k != key} if runs is None or i in runs else r for i, r in enumerate(records)]


def with_value(records, key, value, run=4):
    return [dict(r, **{key: value}) if i == run else r for i, r in enumerate(records)]


BPB = bpb_manifest(sizes=3, budgets=3)


@pytest.mark.parametrize(
    "records, key, words",
    [
        (BPB, "bpb/txt", ["no finished run has the key 'bpb/txt'", "--loss-key bpb/txt", "bpb/text", "loss/text"]),
        (without(BPB, "bpb/text"), "bpb/text", ["no finished run has the key 'bpb/text'"]),
        (without(BPB, "bpb/text", runs={4}), "bpb/text", [f"run {BPB[4]['name']!r} is done but has no 'bpb/text'"]),
        ([dict(r, **{"bpb/text": None}) for r in BPB], "bpb/text",
         ["every finished run has bpb/text null", "nothing to fit for this key"]),
        (with_value(BPB, "bpb/text", None), "bpb/text", [f"bpb/text is null for {BPB[4]['name']} but not"]),
        (with_value(BPB, "bpb/text", 0.0), "bpb/text", ["has bpb/text=0.0", "finite number > 0"]),
        (with_value(BPB, "bpb/text", "1.2"), "bpb/text", ["has bpb/text='1.2'"]),
        (BPB, "", ["--loss-key ''", "e.g. --loss-key bpb/text"]),
    ],
    ids=["unknown", "absent", "missing-in-one", "all-null", "some-null", "zero", "string", "empty"],
)
def test_bad_loss_keys_are_refused_naming_the_key(tmp_path, records, key, words):
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError) as e:
        fit_sweep(tmp_path, loss_key=key, resamples=0, plots=False)
    for word in words:
        assert word in str(e.value)


def test_fit_reads_a_store_and_writes_report_and_plots_there(grid_spec, store, capsys):
    out = f"{store}/sweep"
    for run in plan_sweep(grid_spec, out):
        write_metrics(out, run.record)
    assert main(["sweep", "run", out, "--collect"]) == 0
    assert "6/6 runs done" in capsys.readouterr().out
    assert main(["sweep", "fit", out, "--role", "text", "--bootstrap", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (fit,) = report["fits"]
    assert fit["points"] == 6 and fit["alpha"] == pytest.approx(LAW.alpha, abs=0.05)
    assert report["sweep"] == out
    assert json.loads((as_path(out) / "fit.json").read_text())["fits"] == report["fits"]
    assert report["plots"] and all(p.startswith(f"{out}/plots/") for p in report["plots"])
    for name in report["plots"]:
        data = as_path(name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert {f"plots/{p.rsplit('/', 1)[1]}" for p in report["plots"]} | {"fit.json", "manifest.jsonl"} <= set(
        store.files("sweep"))


@pytest.mark.hostile
def test_fit_of_losses_that_do_not_vary_says_so(tmp_path, capsys):
    records = manifest(variants=("joint",), sizes=3, budgets=3)
    for r in records:
        r["loss"] = r["loss/text"] = r["loss/thinking"] = 2.5
    write_manifest(tmp_path, records)
    assert main(["sweep", "fit", str(tmp_path), "--role", "text", "--bootstrap", "0", "--no-plots"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "fit.json").read_text())
    notes = [n for n in report["notes"] if "do not vary" in n]
    assert notes and "joint/text" in notes[0] and "2.5" in notes[0], report["notes"]
    assert notes[0] in out
    assert report["fits"][0]["degenerate"] is True
