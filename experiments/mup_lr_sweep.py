"""μP's learning-rate transfer on the tiny family (docs/sweeps.md, "μP").

    python experiments/mup_lr_sweep.py --out runs/tiny-mup-lr        # ~15 min on a 2-core CPU
    python experiments/mup_lr_sweep.py --out runs/tiny-mup-lr --report-only
    python experiments/mup_lr_sweep.py --spec configs/sweeps/tiny_width_mup_lr.yaml --out runs/tiny-width-mup-lr

Trains `configs/sweeps/tiny_mup_lr.yaml` (or `--spec`: `tiny_width_mup_lr.yaml` holds the
depth at 2 layers, on the `tiny-width` family) with `metatrain sweep run` (printed before it
runs; rerunning continues an interrupted sweep), then reads its manifest and writes

    OUT/results.json      final eval loss per width x learning rate x parametrization,
                          and the best learning rate of each width (experiments/results/
                          mup_lr_sweep.json and mup_lr_sweep_width.json hold the recorded ones)
    OUT/mup_lr_sweep.png  loss against learning rate, one line per width, one panel per
                          parametrization (docs/images/mup_lr_sweep.png)

and prints the table as Markdown. Each point's parametrization and learning rate are
read from its own config, not from the variant's name.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "sweeps" / "tiny_mup_lr.yaml"
LOSS_KEYS = ("loss", "loss/text")


def run_sweep(out: Path, spec: Path) -> None:
    """`metatrain sweep run OUT --spec SPEC`, printed first; stops the script if it fails."""
    args = ["sweep", "run", str(out), "--spec", str(spec)]
    print("$ metatrain " + shlex.join(args), flush=True)
    status = subprocess.run([sys.executable, "-m", "metatrain", *args], cwd=ROOT).returncode
    if status != 0:
        raise SystemExit(f"`metatrain {shlex.join(args)}` ended with status {status}")


def collect(out: Path, spec: Path = SPEC) -> dict[str, Any]:
    """The sweep's points as rows, and per parametrization, width and loss key the best
    learning rate (None where a point is missing or diverged)."""
    from metatrain.config import load_config
    from metatrain.sweep.manifest import read_manifest

    rows = []
    for record in read_manifest(out):
        config = load_config(out / record["config"])
        rows.append({
            "name": record["name"], "size": record["size"], "d_model": record["d_model"],
            "n_layers": record["n_layers"], "parametrization": config.model.parametrization,
            "width_multiplier": config.model.mup_width_multiplier,
            "learning_rate": config.optimizer.learning_rate, "status": record["status"],
            "steps": record["steps"], "tokens": record["tokens"], "train_seconds": record.get("train_seconds"),
            **{key: record.get(key) for key in LOSS_KEYS},
        })
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for key in LOSS_KEYS:
        for row in rows:
            value = row[key]
            if row["status"] != "done" or value is None or not math.isfinite(value):
                continue
            slot = best.setdefault(key, {}).setdefault(row["parametrization"], {})
            current = slot.get(row["size"])
            if current is None or value < current[key]:
                slot[row["size"]] = {"learning_rate": row["learning_rate"], key: value}
    from metatrain.sweep.spec import load_spec

    spec = spec.resolve()
    shown = spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec
    loaded = load_spec(spec)
    planned = set(loaded.grid.sizes if loaded.grid is not None else ())
    if {row["size"] for row in rows} - planned:
        raise SystemExit(f"{out} holds sizes {sorted({row['size'] for row in rows})}, not those of {shown} "
                         f"({sorted(planned)}): pass the spec it was planned from with --spec")
    return {"spec": str(shown), "family": loaded.family, "rows": rows, "best": best}


def markdown_table(results: dict[str, Any], key: str = "loss") -> str:
    """One row per size and parametrization, one column per learning rate; the best of
    each row in bold."""
    rows = results["rows"]
    rates = sorted({r["learning_rate"] for r in rows})
    lines = ["| size (d_model, layers) | parametrization | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best lr |",
             "|---|---|" + "---|" * (len(rates) + 1)]
    sizes = sorted({(r["d_model"], r["size"], r["n_layers"]) for r in rows})
    for parametrization in ("standard", "mup"):
        for d_model, size, layers in sizes:
            by_rate = {r["learning_rate"]: r[key] for r in rows
                       if r["size"] == size and r["parametrization"] == parametrization and r["status"] == "done"}
            best = results["best"].get(key, {}).get(parametrization, {}).get(size)
            cells = []
            for lr in rates:
                value = by_rate.get(lr)
                text = "—" if value is None else f"{value:.3f}"
                cells.append(f"**{text}**" if best and lr == best["learning_rate"] else text)
            name = "μP" if parametrization == "mup" else "standard"
            best_text = f"{best['learning_rate']:g}" if best else "—"
            lines.append(f"| {size} ({d_model}, {layers}) | {name} | " + " | ".join(cells) + f" | {best_text} |")
    return "\n".join(lines)


def figure(results: dict[str, Any]):
    """Rows: joint eval loss and text eval loss; columns: standard and μP; loss against
    learning rate, one line per width, the best point of each ringed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = results["rows"]
    sizes = sorted({(r["d_model"], r["size"]) for r in rows})
    fig = Figure(figsize=(9.5, 6.4), layout="constrained")
    axes = fig.subplots(len(LOSS_KEYS), 2, squeeze=False, sharex=True, sharey="row")
    cmap = colormaps["viridis"]
    for r, key in enumerate(LOSS_KEYS):
        for c, parametrization in enumerate(("standard", "mup")):
            ax = axes[r, c]
            for i, (d_model, size) in enumerate(sizes):
                points = sorted((p["learning_rate"], p[key]) for p in rows if p["size"] == size
                                and p["parametrization"] == parametrization and p["status"] == "done"
                                and p[key] is not None and math.isfinite(p[key]))
                if not points:
                    continue
                colour = cmap(0.85 * i / max(len(sizes) - 1, 1))
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour,
                        label=f"{size} (d_model {d_model})")
                low = min(points, key=lambda p: p[1])
                ax.plot([low[0]], [low[1]], marker="o", markersize=12, markerfacecolor="none", color=colour)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_title(f"{'μP (base width 64)' if parametrization == 'mup' else 'standard'}: "
                         f"{'eval loss' if key == 'loss' else 'eval text loss'}", fontsize=9)
            if r == len(LOSS_KEYS) - 1:
                ax.set_xlabel("learning rate (μP: the base width's)")
            if c == 0:
                ax.set_ylabel("final eval loss" if key == "loss" else "final eval text loss")
        axes[r, 0].legend(fontsize=7)
    fig.suptitle(f"{results.get('family', 'tiny')} family, 40 steps of 8 x 64 tokens: final loss against learning rate",
                 fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="sweep directory")
    p.add_argument("--spec", type=Path, default=SPEC, help=f"sweep spec (default {SPEC.relative_to(ROOT)})")
    p.add_argument("--report-only", action="store_true", help="do not train: read the sweep directory as it is")
    args = p.parse_args(argv)
    if not args.report_only:
        run_sweep(args.out, args.spec)
    results = collect(args.out, args.spec)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    buffer = io.BytesIO()
    figure(results).savefig(buffer, dpi=90, format="png")
    (args.out / "mup_lr_sweep.png").write_bytes(buffer.getvalue())
    for key in LOSS_KEYS:
        print(f"\nfinal eval {key}:\n" + markdown_table(results, key))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'mup_lr_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
