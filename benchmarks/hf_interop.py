"""Export and import time and peak memory for a preset (default: 125m).

    python benchmarks/hf_interop.py [--config configs/125m.yaml] [--dtype float32]

A work directory is made by the real trainer: one step of the preset's model at batch 2
and sequence length 128, with the shipped sample tokenizer (4,096 pieces: the presets
name a 32k tokenizer that is not shipped, so the embedding and output matrices are
4,096 rows instead of 32,000; every other tensor is the preset's). Then, each in its own process so that peak memory is that
command's alone (`ru_maxrss` of the child):

- `metatrain export --workdir RUN --out EXPORTED`
- `metatrain import --from EXPORTED --out IMPORTED` (the tags are already in the tokenizer)

Seconds include each process's start (imports, JAX initialisation).

Needs the `hf` extra. Prints a table; the numbers go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The presets name a 32k tokenizer that is not shipped; the shipped one has 4,096 pieces.
SAMPLE = REPO / "tokenizer" / "sample.model"


_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run([sys.executable, '-m', 'metatrain.cli', *sys.argv[1:]]).returncode\n"
    "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GiB) of one `metatrain` command: it runs under a fresh
    wrapper process, whose only child it is, so `ru_maxrss` of the wrapper's children is
    that command's peak alone."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"metatrain {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    kib = int(result.stderr.strip().splitlines()[-1].split()[-1])
    return seconds, kib / 2**20


def _size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "125m.yaml"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as tmp:
        tmp = Path(tmp)
        run, exported, imported = tmp / "run", tmp / "exported", tmp / "imported"
        rows = []
        rows.append(("train 1 step (makes the work directory)", *_timed([
            "train", "--config", args.config, "--workdir", str(run), "--set", "trainer.steps=1",
            "--set", "trainer.batch_size=2", "--set", "trainer.seq_len=128", "--set", "trainer.eval_every=0",
            "--set", "trainer.progress=false", "--set", "checkpoint.async_save=false",
            "--set", "data.num_workers=0", "--set", f"data.tokenizer={SAMPLE}", "--set", "model.vocab_size=4096"]),
            _size(run / "checkpoints")))
        rows.append((f"export ({args.dtype})", *_timed(["export", "--workdir", str(run), "--out", str(exported),
                                                         "--dtype", args.dtype]), _size(exported)))
        rows.append(("import", *_timed(["import", "--from", str(exported), "--out", str(imported),
                                         "--set", "trainer.batch_size=2", "--set", "trainer.seq_len=128"]),
                     _size(imported)))
    print(f"\n{Path(args.config).name}, {os.cpu_count()} CPUs\n")
    print("| command | seconds | peak resident memory (GiB) | size written (GiB) |")
    print("|---|---:|---:|---:|")
    for name, seconds, peak, size in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.2f} | {size:.2f} |")


if __name__ == "__main__":
    main()
