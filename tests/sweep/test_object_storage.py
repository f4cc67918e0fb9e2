"""Sweep directories in a bucket (`gs://`, a GCS emulator): plan, manifest updates, results
read from each run's `metrics.jsonl` in the bucket, `sweep fit` with its report and plots."""

import json

import pytest

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR
from metatrain.io.storage import as_path, split_bucket
from metatrain.sweep.law import Law
from metatrain.sweep.manifest import read_manifest
from metatrain.sweep.plan import plan_sweep
from metatrain.sweep.run import collect_results, collect_sweep, launch_commands, run_sweep

SPEC = f"""\
base: {CONFIGS_DIR / 'tiny.yaml'}
overrides: {{trainer.eval_every: 2}}
grid:
  sizes: [tiny-1, tiny-2, tiny-3]
  tokens: [2048, 4096]
"""
LAW = Law(E=1.8, A=400.0, B=400.0, alpha=0.34, beta=0.28)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SPEC)
    return path


def objects(gcs_emulator, url):
    bucket, prefix = split_bucket(url)
    return sorted(name[len(prefix) + 1:] for name in gcs_emulator.objects(bucket, prefix + "/"))


def upload_metrics(directory, record, last=None):
    """metrics.jsonl as the trainer writes it, up to step `last` (default: the run's last
    step): evaluations at step 2 and the last."""
    last = record["steps"] if last is None else last
    lines = [{"step": 1, "loss": 9.0}]
    for step in sorted({min(2, last), last}):
        loss = LAW(record["params"], record["tokens"] * step / record["steps"])
        lines.append({"step": step, "eval/loss": loss + 0.1, "eval/loss/text": loss, "eval/loss/thinking": loss + 0.4,
                      "eval/bpb/text": loss / 4})
    (as_path(directory) / record["workdir"] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_plan_writes_configs_and_manifest_into_the_bucket(spec, bucket, gcs_emulator, capsys):
    out = f"{bucket}/sweep"
    assert main(["sweep", "plan", "--spec", str(spec), "--out", out]) == 0
    assert f"planned 6 runs in {out}/manifest.jsonl" in capsys.readouterr().out
    records = read_manifest(out)
    assert objects(gcs_emulator, out) == sorted(["manifest.jsonl", *(r["config"] for r in records)])
    assert all(r["status"] == "planned" for r in records)

    assert main(["sweep", "plan", "--spec", str(spec), "--out", out]) == 0  # the same plan: a no-op
    assert "already holds this plan" in capsys.readouterr().out
    spec.write_text(SPEC.replace("4096", "8192"))
    with pytest.raises(UserError, match="already holds a different sweep"):
        plan_sweep(spec, out)

    commands = launch_commands(out, "local")  # reads every point's config from the bucket
    assert commands[0] == (f"metatrain train --config {out}/runs/tiny-1.D2048/config.yaml "
                           f"--workdir {out}/runs/tiny-1.D2048")


def test_results_are_read_from_the_bucket_and_the_manifest_updated_there(spec, bucket, gcs_emulator):
    out = f"{bucket}/sweep"
    records = {r.record["name"]: r.record for r in plan_sweep(spec, out)}
    first = records["tiny-1.D2048"]
    assert collect_results(as_path(out) / first["workdir"], first["steps"]) is None
    upload_metrics(out, first)
    upload_metrics(out, records["tiny-2.D2048"], last=1)  # not finished
    result = collect_results(f"{out}/{first['workdir']}", first["steps"])
    assert result["final_step"] == first["steps"] and result["loss/text"] == pytest.approx(LAW(first["params"], first["tokens"]))

    collected = {r["name"]: r for r in collect_sweep(out, log=lambda _: None)}
    assert collected["tiny-1.D2048"]["status"] == "done" and collected["tiny-2.D2048"]["status"] == "planned"
    assert read_manifest(out) == list(collected.values())

    trained = []  # run_sweep collects what the bucket shows and trains the rest in the bucket
    records_after = run_sweep(out, runner=lambda config, workdir: trained.append(str(workdir)), log=lambda _: None)
    assert f"{out}/runs/tiny-1.D2048" not in trained and f"{out}/runs/tiny-2.D2048" in trained
    assert [r["status"] for r in records_after].count("failed") == 5  # the runner wrote no metrics
    assert "no evaluation at step" in records_after[1]["error"] and out in records_after[1]["error"]
    assert read_manifest(out) == records_after


def test_fit_reads_the_bucket_and_writes_report_and_plots_there(spec, bucket, gcs_emulator, capsys):
    out = f"{bucket}/sweep"
    for run in plan_sweep(spec, out):
        upload_metrics(out, run.record)
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
        objects(gcs_emulator, out))
