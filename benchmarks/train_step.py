"""Training-loop overhead and throughput: the full loop against the bare jitted step.

    python benchmarks/train_step.py [--config configs/default.yaml] [--steps 60] [--rounds 3] [--set k=v ...]

The bare step is the same jitted, donating `train_step` called on one fixed device
batch; the loop is `Trainer.run()` with data, metrics, evaluation off and async
checkpoints on. Overhead = loop step time / bare step time - 1 (goal: under 5%).
On a GPU/TPU it also reports MFU from `metatrain.hardware`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from metatrain.config import load_config
from metatrain.hardware import local_chip
from metatrain.parallel.mesh import sharding_context
from metatrain.train.loop import Trainer


def bare_step_time(trainer: Trainer, steps: int) -> float:
    with sharding_context(trainer.mesh, trainer.rules):  # traced exactly as the loop traces it
        return _bare_step_time(trainer, steps)


def _bare_step_time(trainer: Trainer, steps: int) -> float:
    state, _ = trainer.initial_state()
    batch = trainer.next_batch()
    state, m = trainer.train_step(state, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def loop_step_time(config, workdir: Path, steps: int) -> float:
    trainer = Trainer(config, workdir)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    # Mean step time over every logging window after the first (which includes
    # compilation): the windows with checkpoint saves count, as they do in a real run.
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["step_time"] for r in records if "step_time" in r][1:]
    return statistics.fmean(windows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3, help="alternations of bare and loop measurements")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    overrides = [
        f"trainer.steps={args.steps}",
        "trainer.log_every=10",
        "trainer.eval_every=0",
        "trainer.progress=false",
        f"checkpoint.every={args.steps // 2}",
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="mt-bench-"))
    # Alternate bare and loop measurements (`--rounds` of each) so that drift in a noisy
    # machine's speed hits both alike; report medians.
    bares, loops = [], []
    try:
        bare_trainer = Trainer(config, tmp / "bare")
        try:
            for r in range(args.rounds):
                bares.append(bare_step_time(bare_trainer, 10))
                loops.append(loop_step_time(config, tmp / f"loop{r}", args.steps))
        finally:
            bare_trainer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare, loop = statistics.median(bares), statistics.median(loops)
    print("rounds (bare ms / loop ms): " + ", ".join(f"{1000*b:.0f}/{1000*l:.0f}" for b, l in zip(bares, loops)))

    tc = config.trainer
    tokens = tc.batch_size * tc.seq_len
    chip = local_chip()
    flops = config.model.flops_per_token(tc.seq_len)
    n_dev = jax.device_count()

    def mfu(t):
        return None if chip is None else flops * tokens / t / (chip.peak_bf16_flops * n_dev)

    device = f"{jax.devices()[0].device_kind} x{n_dev}"
    rows = [
        ("bare jitted step", bare, tokens / bare, mfu(bare)),
        ("full loop", loop, tokens / loop, mfu(loop)),
    ]
    overhead = loop / bare - 1
    print(f"\ntrain step benchmark  device={device}  params={config.model.num_params/1e6:.1f}M  "
          f"batch={tc.batch_size} seq={tc.seq_len}")
    print(f"| {'what':<18} | {'step time (ms)':>14} | {'tokens/s':>12} | {'MFU':>6} |")
    print(f"|{'-'*20}|{'-'*16}|{'-'*14}|{'-'*8}|")
    for name, t, tps, m in rows:
        ms = "n/a" if m is None else f"{100*m:.1f}%"
        print(f"| {name:<18} | {1000*t:>14.2f} | {tps:>12,.0f} | {ms:>6} |")
    print(f"loop overhead: {100*overhead:+.1f}% (goal < 5%)")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "bare_s": bare, "loop_s": loop, "overhead": overhead,
                                          "tokens_per_step": tokens, "mfu_bare": mfu(bare), "mfu_loop": mfu(loop)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
