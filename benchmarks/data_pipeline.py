"""Data pipeline throughput: tokens/s from raw JSON Lines, Parquet, ArrayRecord, a
scheduled two-source mixture and the token cache, next to the tokens/s the default
model consumes in training.

    python benchmarks/data_pipeline.py [--copies 30] [--seconds 5] [--seq-len N] [--batch-size N] [--json OUT]

The corpus is the bundled sample (`data/sample/*.jsonl`) repeated `--copies` times
with fresh document ids (so the split and the shuffle see a corpus of realistic size;
grain's index shuffle is slow for tiny corpora). The pipeline is measured on one CPU
core: each measurement runs in a child process pinned to core 0, `num_workers=0`,
single process (the path every host runs), train split. Tokens counted are non-padding
positions of the batches produced. The Parquet copy has row groups of
`PARQUET_ROW_GROUP` documents (a shuffled read decodes a row group per record); the
ArrayRecord copy is written with `group_size:1`. The mixture reads the JSON Lines corpus
and its Parquet copy as two sources under a two-stage `data.schedule`. With the `seqio`
extra installed, a seqio Mixture of two document Tasks (the corpus halves, rates 3:1) is
measured too; its start-up (reading both Tasks into the spill file) is not in its tokens/s. A row with `num_workers=2` (all cores) is added when
the machine has more than one core.

The model column times the lead's jitted, donating train step (`metatrain.train`) on
the default config (`configs/default.yaml`: batch and sequence length as there) on one
fixed batch, using every core of the machine; if the trainer cannot be imported it
times a forward + backward of `metatrain.models.Transformer` instead, and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WORKER_FLAG = "--_measure"
PARQUET_ROW_GROUP = 64


def build_corpus(out: Path, copies: int) -> Path:
    """The sample corpus repeated `copies` times, each copy with its own document ids."""
    from metatrain.io.paths import SAMPLE_DIR

    lines = []
    for src in sorted(SAMPLE_DIR.glob("*.jsonl")):
        lines += [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    path = out / "corpus.jsonl"
    with path.open("w") as f:
        for c in range(copies):
            for doc in lines:
                f.write(json.dumps({**doc, "id": f"{doc.get('id', 'doc')}#{c}"}) + "\n")
    return path


def write_formats(corpus: Path) -> tuple[Path, Path]:
    """The corpus as Parquet (`segments` column) and as ArrayRecord, beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    lines = [line for line in corpus.read_bytes().splitlines() if line.strip()]
    parquet, array_record = corpus.with_suffix(".parquet"), corpus.with_suffix(".array_record")
    records = [json.loads(line) for line in lines]
    for r in records:
        r["segments"] = json.dumps(r["segments"])  # one string column: the schema of any document
    columns = {key: [r.get(key) for r in records] for key in ("id", "segments", "mode")}
    pq.write_table(pa.table(columns), parquet, row_group_size=PARQUET_ROW_GROUP)
    writer = ArrayRecordWriter(str(array_record), "group_size:1")
    for line in lines:
        writer.write(line)
    writer.close()
    return parquet, array_record


def write_seqio_registry(corpus: Path) -> Path | None:
    """A seqio registry module: the corpus halves as two document Tasks and a Mixture
    `bench_mix` of them at rates 3:1; None without the `seqio` extra."""
    if importlib.util.find_spec("seqio") is None:
        return None
    from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    halves = [corpus.with_name("first.jsonl"), corpus.with_name("second.jsonl")]
    halves[0].write_text("\n".join(lines[0::2]) + "\n")
    halves[1].write_text("\n".join(lines[1::2]) + "\n")
    module = corpus.with_name("bench_registry.py")
    module.write_text(
        "import seqio\n"
        "from metatrain.data.seqio import register_document_task\n"
        f"register_document_task('bench_a', {str(halves[0])!r}, {str(SAMPLE_TOKENIZER)!r}, {str(DEFAULT_TAGS)!r})\n"
        f"register_document_task('bench_b', {str(halves[1])!r}, {str(SAMPLE_TOKENIZER)!r}, {str(DEFAULT_TAGS)!r})\n"
        "seqio.MixtureRegistry.add('bench_mix', [('bench_a', 3.0), ('bench_b', 1.0)])\n"
    )
    return module


def measure_pipeline(source: str | list, batch_size: int, seq_len: int, seconds: float, workers: int,
                     schedule: list | None = None) -> dict:
    """Tokens/s of `make_batch_iterator` over `source` (one path or several; runs in the pinned child)."""
    from metatrain.data import DataConfig, SourceConfig, make_batch_iterator
    from metatrain.data.config import ScheduleStage

    given = [source] if isinstance(source, (str, dict)) else source
    sources = tuple(SourceConfig(**s) if isinstance(s, dict) else SourceConfig(s) for s in given)
    stages = tuple(ScheduleStage(**stage) for stage in schedule or ())
    cfg = DataConfig(sources=sources, num_workers=workers, schedule=stages)
    t0 = time.perf_counter()
    it = make_batch_iterator(cfg, batch_size=batch_size, seq_len=seq_len)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    tokens = batches = 0
    while time.perf_counter() - start < seconds:
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
        batches += 1
    elapsed = time.perf_counter() - start
    it.close()
    return {"tokens_per_s": tokens / elapsed, "batches": batches, "startup_s": start - t0}


def measure_cache_build(corpus: str, out: str) -> dict:
    from metatrain.data.cache import write_cache
    from metatrain.data.sources import EncoderSpec
    from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

    t = time.perf_counter()
    meta = write_cache([corpus], out, EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every"),
                       progress=False)
    elapsed = time.perf_counter() - t
    return {"tokens_per_s": meta["tokens"] / elapsed, "documents": meta["documents"], "tokens": meta["tokens"]}


def run_pinned(task: dict, cores: set[int] | None) -> dict:
    """Runs one measurement in a fresh child process, pinned to `cores` (None: all)."""
    task = {**task, "cores": None if cores is None else sorted(cores)}
    out = subprocess.run([sys.executable, __file__, _WORKER_FLAG, json.dumps(task)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_tokens_per_s(steps: int = 10) -> tuple[float, str, int, int]:
    """Tokens/s the default model consumes in training on this machine, and how it was measured."""
    from metatrain.config import load_config

    config = load_config(None, ["trainer.progress=false"])
    tc = config.trainer
    tokens = tc.batch_size * tc.seq_len
    try:
        return _trainer_tokens_per_s(config, steps), "jitted train step (metatrain.train.Trainer), default config", \
            tc.batch_size, tc.seq_len
    except Exception as e:  # the trainer is optional here: fall back to the model alone
        why = f"the trainer failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return _model_tokens_per_s(config, steps), (
        f"forward+backward of Transformer + tied logits + cross entropy, no optimizer update ({why})"
    ), tc.batch_size, tc.seq_len


def _trainer_tokens_per_s(config, steps: int) -> float:
    import jax

    from metatrain.train.loop import Trainer

    tc = config.trainer
    tmp = Path(tempfile.mkdtemp(prefix="mt-data-bench-"))
    trainer = Trainer(config, tmp)
    try:
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
    finally:
        close = getattr(trainer, "close", None)
        if close:
            close()
        shutil.rmtree(tmp, ignore_errors=True)
    return tc.batch_size * tc.seq_len / statistics.median(times)


def _model_tokens_per_s(config, steps: int) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    from metatrain.models.transformer import Transformer, logits

    tc, mc = config.trainer, config.model
    model = Transformer(mc)
    shape = (tc.batch_size, tc.seq_len)
    ids = jax.random.randint(jax.random.key(1), shape, 0, mc.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(tc.seq_len, dtype=jnp.int32), shape)
    segments = jnp.ones(shape, jnp.int32)
    params = model.init(jax.random.key(0), ids, positions, segments)["params"]

    def loss(p):
        hidden = model.apply({"params": p}, ids, positions, segments)
        return optax.softmax_cross_entropy_with_integer_labels(logits(hidden, p, mc), ids).mean()

    step = jax.jit(jax.grad(loss))
    jax.block_until_ready(step(params))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            g = step(params)
        jax.block_until_ready(g)
        times.append((time.perf_counter() - t0) / steps)
    return tc.batch_size * tc.seq_len / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _WORKER_FLAG:
        task = json.loads(argv[1])
        cores = task.pop("cores")
        if cores is not None:  # before anything starts a thread
            os.sched_setaffinity(0, set(cores))
        kind = task.pop("kind")
        result = measure_cache_build(**task) if kind == "cache_build" else measure_pipeline(**task)
        print(json.dumps(result))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=30, help="times the sample corpus is repeated")
    p.add_argument("--seconds", type=float, default=5.0, help="time per pipeline measurement")
    p.add_argument("--batch-size", type=int, default=None, help="default: the default config's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the default config's")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from metatrain.config import load_config

    default = load_config(None).trainer
    batch_size = args.batch_size or default.batch_size
    seq_len = args.seq_len or default.seq_len

    tmp = Path(tempfile.mkdtemp(prefix="mt-data-bench-"))
    one_core = {min(os.sched_getaffinity(0))}
    try:
        corpus = build_corpus(tmp, args.copies)
        parquet, array_record = write_formats(corpus)
        cache_dir = tmp / "cache"
        build = run_pinned({"kind": "cache_build", "corpus": str(corpus), "out": str(cache_dir)}, one_core)
        common = {"kind": "pipeline", "batch_size": batch_size, "seq_len": seq_len, "seconds": args.seconds}
        rows = [
            ("raw JSON Lines", "1 core", run_pinned({**common, "source": str(corpus), "workers": 0}, one_core)),
            ("token cache", "1 core", run_pinned({**common, "source": str(cache_dir), "workers": 0}, one_core)),
            ("ArrayRecord", "1 core", run_pinned({**common, "source": str(array_record), "workers": 0}, one_core)),
            (f"Parquet ({PARQUET_ROW_GROUP}-doc groups)", "1 core",
             run_pinned({**common, "source": str(parquet), "workers": 0}, one_core)),
            ("JSONL + Parquet, scheduled", "1 core", run_pinned({
                **common, "source": [str(corpus), str(parquet)], "workers": 0,
                "schedule": [{"step": 0, "weights": [0.8, 0.2]}, {"step": 10, "weights": [0.2, 0.8]}]}, one_core)),
        ]
        registry = write_seqio_registry(corpus)
        if registry is not None:
            rows.append(("seqio mixture (2 Tasks, 3:1)", "1 core", run_pinned({
                **common, "source": {"seqio": "bench_mix", "module": str(registry)}, "workers": 0}, one_core)))
        n_cores = len(os.sched_getaffinity(0))
        if n_cores > 1:
            rows.append(("token cache", f"{n_cores} cores, 2 workers",
                         run_pinned({**common, "source": str(cache_dir), "workers": 2}, None)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_tps, how, model_batch, model_seq = model_tokens_per_s()  # last: JAX threads and fork do not mix

    print(f"\ndata pipeline benchmark  corpus={build['documents']:,} documents, {build['tokens']:,} tokens  "
          f"batch={batch_size} seq_len={seq_len}  cores={len(os.sched_getaffinity(0))}")
    print(f"| {'what':<42} | {'where':<20} | {'tokens/s':>12} | {'x model':>8} |")
    print(f"|{'-' * 44}|{'-' * 22}|{'-' * 14}|{'-' * 10}|")
    print(f"| {'cache build (tokenize once)':<42} | {'1 core':<20} | {build['tokens_per_s']:>12,.0f} | {'':>8} |")
    for name, where, r in rows:
        print(f"| {'pipeline from ' + name:<42} | {where:<20} | {r['tokens_per_s']:>12,.0f} | "
              f"{r['tokens_per_s'] / model_tps:>7.1f}x |")
    print(f"| {'default model consumes':<42} | {'all cores':<20} | {model_tps:>12,.0f} | {1:>7.1f}x |")
    print(f"model: {how}, batch={model_batch} seq_len={model_seq}")
    cached = rows[1][2]["tokens_per_s"]
    print(f"goals: cached >= 20x model: {'met' if cached >= 20 * model_tps else 'NOT met'} ({cached / model_tps:.1f}x); "
          f"cached >= 1M tokens/s per host process: {'met' if cached >= 1e6 else 'NOT met'} ({cached / 1e6:.2f}M)")
    if args.json:
        args.json.write_text(json.dumps({
            "batch_size": batch_size, "seq_len": seq_len, "model_tokens_per_s": model_tps, "model_measured": how,
            "cache_build": build, "pipeline": [{"source": n, "where": w, **r} for n, w, r in rows],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
