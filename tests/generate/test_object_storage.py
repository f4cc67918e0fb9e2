"""`metatrain generate` and `metatrain eval` on a work directory in a bucket (a GCS emulator
on 127.0.0.1): the same samples and report as the same run on local disk."""

from __future__ import annotations

import json

import pytest

from metatrain.cli import main
from metatrain.io.paths import CONFIGS_DIR, REPO_ROOT
from metatrain.io.storage import as_path

SYNTHETIC = REPO_ROOT / "data" / "sample" / "synthetic.jsonl"
QUICK = ["--prompts", "2", "--samples", "2", "--max-new-tokens", "16", "--bootstrap", "200", "--batch-rows", "4"]


@pytest.fixture(scope="module")
def remote_workdir(gcs_emulator):
    """The session `workdir` run (same config, same steps), trained into a bucket."""
    from metatrain.config import load_config
    from metatrain.train.loop import train

    workdir = f"gs://{gcs_emulator.bucket()}/run"
    config = load_config(CONFIGS_DIR / "tiny.yaml", [
        "trainer.steps=1", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
        "trainer.progress=false", "checkpoint.every=1", "checkpoint.async_save=false",
    ])
    train(config, workdir)
    return workdir


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_generation_from_a_bucket_equals_generation_from_disk(remote_workdir, workdir, capsys):
    args = ["--prompt", "Background:", "--num-samples", "2", "--max-new-tokens", "24", "--seed", "3", "--json"]
    remote = _run(capsys, "generate", "--workdir", remote_workdir, *args)
    local = _run(capsys, "generate", "--workdir", str(workdir), *args)
    assert [json.loads(line)["ids"] for line in remote.splitlines()] == [json.loads(line)["ids"] for line in local.splitlines()]


def test_eval_reads_a_bucket_and_writes_its_report_there(remote_workdir, workdir, gcs_emulator, tmp_path, capsys):
    bucket = remote_workdir.split("/")[2]
    as_path(f"gs://{bucket}/docs/synthetic.jsonl").write_bytes(SYNTHETIC.read_bytes())
    _run(capsys, "eval", "--workdir", remote_workdir, "--data", f"gs://{bucket}/docs/*.jsonl", *QUICK)
    assert {"run/eval/1/report.json", "run/eval/1/probes.png"} <= set(gcs_emulator.objects(bucket, "run/eval/"))
    remote = json.loads(as_path(f"{remote_workdir}/eval/1/report.json").read_text())
    _run(capsys, "eval", "--workdir", str(workdir), "--data", str(SYNTHETIC), "--out", str(tmp_path / "e"), *QUICK)
    local = json.loads((tmp_path / "e" / "report.json").read_text())
    for key in ("bpb/text", "loss/text", "tokens/text", "documents", "ablation", "free_generation"):
        assert remote[key] == local[key], key
