"""Weights & Biases logging (`trainer.wandb`, `metatrain.run.wandb_log`) with the real `wandb`
package in offline mode, read back from the `.wandb` files it writes.

Nothing here reaches the network: every W&B run is offline (or refused before it starts),
and W&B's settings, cache and credentials live in the test's own folders.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

from metatrain.config import WandbConfig, config_to_dict
from metatrain.errors import UserError
from metatrain.run.layout import CHECKPOINTS_DIR, WANDB_DIR, WANDB_RUN_FILE
from metatrain.run.metrics import MetricsWriter
from metatrain.train.loop import train

from ..conftest import TINY, read_records, run_cli, tiny_config

OFFLINE = "trainer.wandb={project: metatrain-test, mode: offline, tags: [tiny]}"


# -- reading what wandb wrote -------------------------------------------------------------
#
# A `.wandb` file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version)
# then LevelDB's log format (32 KiB blocks of chunks: CRC-32 of type and data, length, type
# FULL/FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record`. wandb's own reader is
# in its Go service now; this one is enough for the records a run writes.


def wandb_records(path: Path) -> list:
    """The `Record` protos of one `.wandb` file, in order (every chunk's CRC checked)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    block, head = 32768, 7
    records, pos, pending = [], 7, b""
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:  # a block's trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if (crc, length, kind) == (0, 0, 0):  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + head:pos + head + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk at byte {pos}"
        pos += head + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def segments(workdir: Path) -> list[list]:
    """The records of each time the run was started, oldest first (one offline-run folder each).

    W&B's service is shut down first: `run.finish()` returns once the run is finished, but
    the service may still be writing the `.wandb` file (the process's exit waits for it).
    """
    import wandb

    wandb.teardown()
    files = sorted((workdir / WANDB_DIR).glob("offline-run-*/run-*.wandb"))
    return [wandb_records(f) for f in files]


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    """Each W&B row, without W&B's own keys (`_step`, `_runtime`, `_timestamp`)."""
    rows = []
    for h in of_kind(records, "history"):
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def jsonl_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl's records, None values left out (as W&B gets them)."""
    return [{k: v for k, v in r.items() if v is not None} for r in read_records(workdir)]


def uploaded_config(run_record) -> dict:
    return {item.key: json.loads(item.value_json) for item in run_record.config.update if not item.key.startswith("_")}


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """W&B in offline mode, with its settings, cache, data and credentials under a folder
    of the test's own, set up afresh (wandb reads its environment once per process)."""
    import wandb

    home = tmp_path / "wandb-home"
    for var, sub in {"WANDB_CONFIG_DIR": "config", "WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data",
                     "WANDB_ARTIFACT_DIR": "artifacts"}.items():
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    wandb.teardown()
    yield home
    wandb.teardown()


# -- a trained run, read back ---------------------------------------------------------------


def test_every_record_and_the_config_go_to_wandb(tmp_path, wandb_home):
    workdir = tmp_path / "run"
    config = tiny_config(OFFLINE)
    train(config, workdir)

    rid = json.loads((workdir / WANDB_RUN_FILE).read_text())["id"]
    (records,) = segments(workdir)
    (run,) = of_kind(records, "run")
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (rid, "metatrain-test", "run", ["tiny"])
    # The resolved config, as YAML-ready data, is the W&B run's config.
    assert uploaded_config(run) == json.loads(json.dumps(config_to_dict(config)))
    # Every metrics.jsonl record is one W&B row: same keys, same values, the step as `step`.
    rows = history(records)
    assert rows == jsonl_rows(workdir)
    assert any("eval/loss" in r for r in rows) and any("loss/text" in r for r in rows)
    # ...and every chart's x axis is that step, not W&B's own row counter.
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in of_kind(records, "metric"))
    (exit_record,) = of_kind(records, "exit")
    assert exit_record.exit_code == 0


def test_a_resumed_run_continues_the_same_wandb_run_and_keeps_replayed_steps(tmp_path, wandb_home):
    workdir = tmp_path / "run"
    config = tiny_config(OFFLINE)
    train(config, workdir)  # checkpoints at steps 3 and 6
    shutil.rmtree(workdir / CHECKPOINTS_DIR / "6")
    train(config, workdir)  # resumes at step 3: steps 4-6 are logged again

    rid = json.loads((workdir / WANDB_RUN_FILE).read_text())["id"]
    first, second = segments(workdir)
    assert [r.run_id for r in of_kind(first + second, "run")] == [rid, rid]
    steps = [r["step"] for r in history(first + second) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    # No row is dropped for going back in steps: W&B has what metrics.jsonl has.
    assert history(first) + history(second) == jsonl_rows(workdir)


def test_the_api_key_is_written_nowhere(tmp_path):
    """The key W&B reads from the environment appears in no file of the work directory
    (W&B's logs included), in W&B's own folders, or in anything the run prints."""
    key = "metatrainfakekey" + "0123456789abcdef" * 2 + "zz"  # 50 characters: W&B's length for a new key
    home = tmp_path / "wandb-home"
    env = {"WANDB_API_KEY": key, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
           "WANDB_ARTIFACT_DIR": str(home / "artifacts"), "NETRC": str(home / "netrc"), "HOME": str(home)}
    workdir = tmp_path / "run"
    done = run_cli("train", "--config", str(TINY), "--workdir", str(workdir), "--set", "trainer.steps=2",
                   "--set", "trainer.eval_every=0", "--set", "trainer.log_every=1", "--set", OFFLINE, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(segments(workdir)) == 1  # W&B ran and wrote its run
    files = [p for root in (workdir, home) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files)  # W&B's own logs are among them
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaks == []
    assert key not in done.stdout and key not in done.stderr


# -- failures: one line each ----------------------------------------------------------------


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="p", mode="offline"), run_config={})
    with pytest.raises(UserError, match=r"wandb package is not installed: pip install 'metatrain\[wandb\]'"):
        writer.open()
    writer.close()


def test_online_without_an_api_key_is_refused_before_wandb_starts(tmp_path, wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(wandb_home))
    import wandb

    wandb.teardown()  # set up again with the online mode
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="p", mode="online"), run_config={})
    with pytest.raises(UserError) as caught:
        writer.open()
    writer.close()
    message = str(caught.value)
    assert "\n" not in message
    assert "no W&B API key is set: export WANDB_API_KEY or run `wandb login`" in message
    assert not (tmp_path / WANDB_DIR).exists()


def test_a_trainer_checks_wandb_before_it_reads_or_writes_anything(tmp_path, monkeypatch):
    from metatrain.train.loop import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)
    workdir = tmp_path / "w"
    with pytest.raises(UserError, match="wandb package is not installed"):
        Trainer(tiny_config("trainer.wandb={project: p, mode: offline}"), workdir)
    assert not workdir.exists()


def test_wandb_refusing_to_start_is_one_line(tmp_path, wandb_home):
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="bad/name", mode="offline"), run_config={})
    with pytest.raises(UserError) as caught:
        writer.open()
    writer.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("trainer.wandb: W&B did not start the run")
    assert "Invalid project name 'bad/name'" in message and "trainer.wandb.mode=offline" in message


def test_a_failed_log_is_reported_once_and_metrics_jsonl_goes_on(tmp_path, wandb_home, capsys):
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="p", mode="offline"), run_config={"a": 1})
    writer.open()
    run = writer._wandb.run

    def broken(row):
        raise RuntimeError("the service is gone\ntraceback...")

    run.log = broken
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    writer.close()
    run.finish()
    err = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line]
    assert err == [("metatrain train: W&B stopped taking metrics at step 1 (the service is gone); "
                    "metrics.jsonl keeps every record")]
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2]


def test_disabled_mode_writes_nothing_of_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even imported
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="p", mode="disabled"), run_config={})
    writer.open()
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / WANDB_RUN_FILE).exists() and not (tmp_path / WANDB_DIR).exists()
    assert read_records(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_a_failed_run_is_finished_as_failed(tmp_path, wandb_home):
    writer = MetricsWriter(tmp_path, wandb=WandbConfig(project="p", mode="offline"), run_config={})
    writer.open()
    writer.write(1, {"loss": 1.0})
    try:
        raise RuntimeError("training failed")
    except RuntimeError:
        writer.close()  # as `train` closes the trainer when a step raised
    (records,) = segments(tmp_path)
    (exit_record,) = of_kind(records, "exit")
    assert exit_record.exit_code == 1


@pytest.mark.bucket
def test_a_work_directory_in_a_bucket_keeps_the_id_there_and_wandb_files_in_wandb_dir(bucket, tmp_path, wandb_home,
                                                                                       monkeypatch):
    from metatrain.io.storage import as_path

    local = tmp_path / "local"
    local.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(local))
    workdir = as_path(f"{bucket}/run")
    writer = MetricsWriter(workdir, wandb=WandbConfig(project="p", mode="offline"), run_config={"a": 1})
    writer.open()
    writer.write(1, {"loss": 1.0, "mfu": None})
    writer.close()
    rid = json.loads((workdir / WANDB_RUN_FILE).read_text())["id"]
    (records,) = segments(local)
    (run,) = of_kind(records, "run")
    assert (run.run_id, run.display_name) == (rid, "run")
    assert history(records) == [{"step": 1, "loss": 1.0}]


def test_without_wandb_dir_a_bucket_run_keeps_wandb_files_in_a_named_temporary_folder(monkeypatch, capsys):
    from metatrain.run.wandb_log import local_dir

    monkeypatch.delenv("WANDB_DIR", raising=False)
    folder = local_dir("gs://bucket/run")
    assert Path(folder).is_dir()
    assert capsys.readouterr().err == (f"metatrain train: W&B keeps its local files for gs://bucket/run in {folder} "
                                       "(a work directory in a bucket; set WANDB_DIR to choose the folder)\n")
    Path(folder).rmdir()
