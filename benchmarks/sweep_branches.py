"""Cooldown branches against separate runs: the loss gap per point and the compute saved.

    python benchmarks/sweep_branches.py [--spec configs/sweeps/tiny_branches.yaml]
                                        [--sizes tiny-1 tiny-2] [--json OUT.json]

Plans the spec twice into a temporary directory: as it is (`branches:`: one "wsd" trunk
per size and a cooldown branch per smaller budget) and with the same budgets as
`grid.tokens:` (a separate "wsd" run per budget). Both sweeps are trained here with the
real trainer (`metatrain.sweep.run.run_sweep`), the branched one first. Printed:

    per point   steps, the branch step, final eval loss (joint and text) both ways, the gap
    compute     training FLOPs both ways (the manifest's `spent_flops` and `flops`), and
                seconds both ways: the sum of the points' `train_seconds` (each a trainer
                start-up, compilation included) and the sweep's wall clock

`--json` writes the same numbers (benchmarks/results/sweep_branches.json holds the
recorded run). Wall-clock seconds depend on the machine and its load; FLOPs and losses
do not (the runs are deterministic on one machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from metatrain.sweep.plan import compute_summary, plan_sweep  # noqa: E402
from metatrain.sweep.run import run_sweep  # noqa: E402


def specs(spec: Path, sizes: list[str] | None, tmp: Path) -> tuple[Path, Path]:
    """`spec` (with `sizes` if given) as it is and with its `branches` as `grid.tokens`."""
    raw = yaml.safe_load(spec.read_text())
    raw["base"] = str((spec.parent / raw["base"]).resolve())
    if sizes:
        raw["grid"]["sizes"] = sizes
    branched, separate = tmp / "branched.yaml", tmp / "separate.yaml"
    branched.write_text(yaml.safe_dump(raw))
    raw["grid"]["tokens"] = raw.pop("branches")
    separate.write_text(yaml.safe_dump(raw))
    return branched, separate


def train(spec: Path, out: Path) -> tuple[list[dict], float]:
    """Plan and train the sweep; its records and wall-clock seconds."""
    plan_sweep(spec, out)
    start = time.perf_counter()
    records = run_sweep(out, log=lambda line: print("  " + line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    failed = [r["name"] for r in records if r.get("status") != "done"]
    if failed:
        raise SystemExit(f"runs not done in {out}: {', '.join(failed)}")
    return records, seconds


def measure(spec: Path, sizes: list[str] | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        branched_spec, separate_spec = specs(spec, sizes, Path(tmp))
        branched, branched_wall = train(branched_spec, Path(tmp) / "branched")
        separate, separate_wall = train(separate_spec, Path(tmp) / "separate")
    theirs = {r["name"]: r for r in separate}
    points = []
    for r in branched:
        s = theirs[r["name"]]
        points.append({
            "name": r["name"], "steps": r["steps"], "branch_of": r.get("branch_of"), "branch_step": r.get("branch_step"),
            "loss_branched": r["loss"], "loss_separate": s["loss"], "gap": r["loss"] - s["loss"],
            "text_branched": r["loss/text"], "text_separate": s["loss/text"], "text_gap": r["loss/text"] - s["loss/text"],
            "flops": r["flops"], "spent_flops": r.get("spent_flops", r["flops"]),
            "seconds_branched": r["train_seconds"], "seconds_separate": s["train_seconds"],
        })
    compute = compute_summary(branched)
    seconds = {
        "branched_train_seconds": sum(p["seconds_branched"] for p in points),
        "separate_train_seconds": sum(p["seconds_separate"] for p in points),
        "branched_wall_seconds": branched_wall, "separate_wall_seconds": separate_wall,
    }
    return {
        "spec": str(spec.relative_to(REPO) if spec.is_relative_to(REPO) else spec), "sizes": sizes,
        "machine": f"{platform.machine()}, {_cores()} CPU cores, JAX on CPU",
        "points": points, "flops": compute, "seconds": seconds,
        "max_abs_gap": max(abs(p["gap"]) for p in points if p["branch_of"]),
        "max_abs_text_gap": max(abs(p["text_gap"]) for p in points if p["branch_of"]),
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def report(result: dict) -> str:
    lines = [f"{'point':<16}{'steps':>6}{'from':>6}{'loss branched':>15}{'loss separate':>15}{'gap':>11}"
             f"{'text gap':>11}{'s branched':>12}{'s separate':>12}"]
    for p in result["points"]:
        lines.append(f"{p['name']:<16}{p['steps']:>6}{p['branch_step'] or '-':>6}{p['loss_branched']:>15.6f}"
                     f"{p['loss_separate']:>15.6f}{p['gap']:>11.2e}{p['text_gap']:>11.2e}"
                     f"{p['seconds_branched']:>12.1f}{p['seconds_separate']:>12.1f}")
    f, s = result["flops"], result["seconds"]
    lines += [
        f"largest |gap| over the branches: joint {result['max_abs_gap']:.2e}, text {result['max_abs_text_gap']:.2e}",
        f"FLOPs:   branched {f['branched']:.4g}, separate {f['separate']:.4g}: {f['saving']:.1%} saved",
        f"trainer seconds (sum of train_seconds): branched {s['branched_train_seconds']:.1f}, separate "
        f"{s['separate_train_seconds']:.1f}: {1 - s['branched_train_seconds'] / s['separate_train_seconds']:.1%} saved",
        f"wall clock of each sweep: branched {s['branched_wall_seconds']:.1f} s, separate "
        f"{s['separate_wall_seconds']:.1f} s: {1 - s['branched_wall_seconds'] / s['separate_wall_seconds']:.1%} saved",
        f"machine: {result['machine']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=REPO / "configs/sweeps/tiny_branches.yaml")
    parser.add_argument("--sizes", nargs="+", default=None, help="grid sizes instead of the spec's")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    result = measure(args.spec.resolve(), args.sizes)
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
