"""Object storage: the data pipeline and checkpoint saves with everything in a bucket,
next to the same on local disk.

    python benchmarks/object_storage.py [--copies 10] [--seconds 5] [--json OUT]

The bucket is a GCS emulator (fake-gcs-server, in memory, on 127.0.0.1; the one the
tests use), so these numbers measure metatrain's and the libraries' per-request work
over loopback, not Cloud Storage's latency (tens of milliseconds a request, against
about a millisecond here): what costs one request per record here costs far more there.

Rows:
- pipeline tokens/s (default batch and sequence length, `num_workers=0` and 2) from the
  sample corpus repeated `--copies` times as plain JSON Lines and as a token cache,
  local and in the bucket;
- the token cache build, local and into the bucket;
- a checkpoint save and restore of the default model's train state (orbax), local and in
  the bucket.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from data_pipeline import build_corpus, measure_cache_build, measure_pipeline  # noqa: E402

_WORKER_FLAG = "--_measure"


def _emulator():
    spec = importlib.util.spec_from_file_location("gcs_emulator", REPO / "tests" / "gcs_emulator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Emulator()


def measure_checkpoint(directory: str, repeats: int) -> dict:
    """Seconds to save (until complete) and restore the default model's train state."""
    import jax

    from metatrain.config import load_config
    from metatrain.run.checkpoint import Checkpointer
    from metatrain.run.program import build_train_program
    from metatrain.run.state import init_state

    config = load_config(None)
    program = build_train_program(config)
    state = init_state(program.model, program.optimizer, program.shardings, 0)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    ckpt = Checkpointer(directory, config.checkpoint)
    saves, restores = [], []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        ckpt.save(step, state, {"format": "bench"}, {"model": {}})
        ckpt.wait()
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        restored = ckpt.restore_latest(program.abstract_state())
        jax.block_until_ready(restored.state)
        restores.append(time.perf_counter() - t)
    ckpt.close()
    return {"save_s": sorted(saves)[len(saves) // 2], "restore_s": sorted(restores)[len(restores) // 2],
            "bytes": nbytes}


def run_child(task: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, _WORKER_FLAG, json.dumps(task)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _WORKER_FLAG:
        task = json.loads(argv[1])
        kind = task.pop("kind")
        fn = {"pipeline": measure_pipeline, "cache_build": measure_cache_build, "checkpoint": measure_checkpoint}[kind]
        print(json.dumps(fn(**task)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=10, help="times the sample corpus is repeated")
    p.add_argument("--seconds", type=float, default=5.0, help="time per pipeline measurement")
    p.add_argument("--checkpoints", type=int, default=3, help="saves and restores timed (the median is shown)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from metatrain.config import load_config

    default = load_config(None).trainer
    emulator = _emulator()
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url, "JAX_PLATFORMS": "cpu"}
    os.environ.update(STORAGE_EMULATOR_HOST=emulator.url)
    from metatrain.io.storage import as_path, configure_emulator

    configure_emulator()
    tmp = Path(tempfile.mkdtemp(prefix="mt-storage-bench-"))
    rows: list[tuple[str, str, dict]] = []
    try:
        bucket = f"gs://{emulator.bucket()}"
        corpus = build_corpus(tmp, args.copies)
        remote_corpus = f"{bucket}/corpus/{corpus.name}"
        as_path(remote_corpus).write_bytes(corpus.read_bytes())
        builds = {
            "local": run_child({"kind": "cache_build", "corpus": str(corpus), "out": str(tmp / "cache")}, env),
            "bucket": run_child({"kind": "cache_build", "corpus": remote_corpus, "out": f"{bucket}/cache"}, env),
        }
        common = {"kind": "pipeline", "batch_size": default.batch_size, "seq_len": default.seq_len,
                  "seconds": args.seconds}
        for name, local, remote in (("raw JSON Lines", str(corpus), remote_corpus),
                                    ("token cache", str(tmp / "cache"), f"{bucket}/cache")):
            for workers in (0, 2):
                for where, source in (("local", local), ("bucket", remote)):
                    rows.append((name, f"{where}, {workers} workers",
                                 run_child({**common, "source": source, "workers": workers}, env)))
        checkpoints = {
            "local": run_child({"kind": "checkpoint", "directory": str(tmp / "run"), "repeats": args.checkpoints}, env),
            "bucket": run_child({"kind": "checkpoint", "directory": f"{bucket}/run", "repeats": args.checkpoints}, env),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        emulator.stop()

    tokens = builds["local"]["tokens"]
    print(f"\nobject storage benchmark (GCS emulator on 127.0.0.1)  corpus={tokens:,} tokens  "
          f"batch={default.batch_size} seq_len={default.seq_len}  cores={len(os.sched_getaffinity(0))}")
    print(f"| {'what':<32} | {'where':<20} | {'tokens/s':>10} | {'start-up s':>10} |")
    print(f"|{'-' * 34}|{'-' * 22}|{'-' * 12}|{'-' * 12}|")
    for name, where, r in rows:
        print(f"| {'pipeline from ' + name:<32} | {where:<20} | {r['tokens_per_s']:>10,.0f} | {r['startup_s']:>10.1f} |")
    for where, b in builds.items():
        print(f"| {'token cache build':<32} | {where:<20} | {b['tokens_per_s']:>10,.0f} | {'':>10} |")
    size = checkpoints["local"]["bytes"] / 2**20
    print(f"\n| checkpoint of the default model ({size:,.1f} MiB) | save s | restore s |")
    print("| --- | --- | --- |")
    for where, c in checkpoints.items():
        print(f"| {where} | {c['save_s']:.2f} | {c['restore_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"pipeline": [{"source": n, "where": w, **r} for n, w, r in rows],
                                         "cache_build": builds, "checkpoint": checkpoints}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
