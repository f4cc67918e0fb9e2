"""`metatrain eval` on the default run, and what the in-loop part costs the trainer.

    python benchmarks/eval.py [--workdir RUN] [--steps 20]

1. `metatrain eval --workdir RUN` as a user runs it (its own process: imports, JAX
   start-up and compilation included), then the parts of the report timed in this
   process after a warm-up run: per-role losses with the four ablation variants, free
   generation, probes. Without `--workdir` the default run is trained first
   (`metatrain train` on `configs/default.yaml`, about 3 minutes).
2. The trainer's in-loop part (`eval/bpb/text` and `eval/ablation/removed_minus_kept`)
   against training time, on the default config: the median time of a training step,
   of an evaluation without the ablation and of one with it (each after a compiling
   warm-up). Its share of a run is

       evaluations per run x (eval with ablation - eval without) / (steps x step time)

   with the default cadence (`trainer.eval_every`, the final step included).

Prints tables; the numbers go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str]) -> float:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "metatrain.cli", *argv], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"metatrain {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def _timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eval_parts(workdir: Path) -> list[tuple[str, float]]:
    """Seconds of `metatrain eval` and of each part of its report (warm)."""
    from metatrain.config import load_config_dict
    from metatrain.evaluation.documents import split_documents
    from metatrain.evaluation.report import EvalSettings, evaluate_checkpoint
    from metatrain.run.reader import load_checkpoint

    out = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    rows = [("metatrain eval (whole command, cold)", _run(["eval", "--workdir", str(workdir), "--out", str(out)]))]
    loaded = load_checkpoint(workdir)
    config = load_config_dict(loaded.config, where=str(workdir))
    docs = split_documents(config.data, loaded.encoder, "eval")
    base = EvalSettings(seq_len=config.trainer.seq_len, generation=False, probes=False)

    def run(**parts):
        settings = dataclasses.replace(base, **parts)
        return evaluate_checkpoint(loaded.params, loaded.model_config, config.loss, loaded.encoder, docs, settings)

    run(generation=True, probes=True)  # compile everything once
    losses = _timed(run, 3)
    rows.append((f"losses + 4 ablation variants + bootstrap ({len(docs)} documents)", losses))
    rows.append(("free generation (free and masked)", _timed(lambda: run(generation=True), 3) - losses))
    rows.append(("probes (mode and role, every layer)", _timed(lambda: run(probes=True), 3) - losses))
    rows.append(("whole report in process (warm)", _timed(lambda: run(generation=True, probes=True), 3)))
    return rows


def in_loop_share(steps: int) -> list[tuple[str, str]]:
    """Step time, eval time with and without the ablation, and the ablation's share of a run."""
    import jax

    from metatrain.config import load_config
    from metatrain.parallel.mesh import sharding_context
    from metatrain.train.loop import Trainer

    config = load_config(None, ["trainer.progress=false"])
    workdir = Path(tempfile.mkdtemp(prefix="inloop-bench-"))
    trainer = Trainer(config, workdir)
    tc = config.trainer
    with sharding_context(trainer.mesh, trainer.rules):
        state, _ = trainer.initial_state()
        for _ in range(3):  # compile and warm up
            state, metrics = trainer.train_step(state, trainer.next_batch())
        jax.block_until_ready(metrics)
        step_times = []
        for _ in range(steps):
            batch = trainer.next_batch()
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
            step_times.append(time.perf_counter() - start)
        step = statistics.median(step_times)
        trainer.config = dataclasses.replace(config, trainer=dataclasses.replace(tc, eval_ablation=True))
        trainer.evaluate(state.params)  # builds the ablation set and compiles
        with_ablation = _timed(lambda: trainer.evaluate(state.params), 3)
        trainer.config = dataclasses.replace(config, trainer=dataclasses.replace(tc, eval_ablation=False))
        without = _timed(lambda: trainer.evaluate(state.params), 3)
        ablation = trainer._in_loop_ablation()
    trainer.close()
    evals = len({*range(tc.eval_every, tc.steps + 1, tc.eval_every), tc.steps}) if tc.eval_every else 0
    train_time = tc.steps * step
    share = evals * (with_ablation - without) / train_time
    return [
        ("training step (median)", f"{step * 1000:.0f} ms"),
        (f"evaluation, {tc.eval_batches} batches, no ablation", f"{without:.3f} s"),
        (f"evaluation with the ablation ({ablation.documents} documents, {ablation.batches} batches x 2)",
         f"{with_ablation:.3f} s"),
        (f"in-loop part per run ({evals} evaluations / {tc.steps} steps)", f"{100 * share:.2f}% of training time"),
        ("regular evaluation per run, for comparison", f"{100 * evals * without / train_time:.2f}% of training time"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="a default-run work directory (default: train one)")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed for the in-loop share")
    args = parser.parse_args()
    workdir = args.workdir
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="default-run-"))
        seconds = _run(["train", "--workdir", str(workdir), "--set", "trainer.progress=false"])
        print(f"trained the default run in {seconds:.0f} s: {workdir}")
    print(f"\n{'metatrain eval on the default run':<62}{'seconds':>10}")
    for name, seconds in eval_parts(workdir):
        print(f"{name:<62}{seconds:>10.2f}")
    print(f"\n{'in-loop part (default config)':<62}{'':>10}")
    for name, value in in_loop_share(args.steps):
        print(f"{name:<72}{value:>22}")


if __name__ == "__main__":
    main()
