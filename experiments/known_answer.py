"""The known-answer experiment of docs/experiments.md: does thinking pay, and does `--select gain` help?

    python experiments/known_answer.py --out runs/known_answer            # the full experiment (~1 h, 2 cores)
    python experiments/known_answer.py --out /tmp/ka --quick              # a small version (tests/experiments)

Every step is a `metatrain` command (printed before it runs), so each can be rerun by hand;
a step whose output exists is skipped, and training and annotation resume themselves, so
running the script again after a stop continues it. The numbers end in `OUT/results.json`
and the plots in `OUT/*.png` (docs/images/ holds the recorded ones).

Runs:
    data        `data synthetic --task chain` and `--task chain-control` (same raw text)
    gain        `generations run` on the chain corpus: generation 0 trained on the teacher's
                thoughts, later ones on thoughts the previous model wrote, `--select gain`
    random      the same with `--select random` (the control of selection)
    floor       the same as `gain` with `--min-gain 0` (a point keeps a thought only if it
                helps), from `gain`'s generation 0 (its loop's generation k is generation k+1)
    control     a joint model trained on the control corpus (uninformative thoughts)
    text-only   models trained on the raw chain text, at several multiples of the text
                tokens generation 0 saw (the data-efficiency curve)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def metatrain(*args: str, log: Path | None = None) -> None:
    """Runs one `metatrain` command, printing it first; stops the script if it fails."""
    argv = [sys.executable, "-m", "metatrain", *args]
    print("$ metatrain " + shlex.join(args), flush=True)
    status = subprocess.run(argv, cwd=ROOT).returncode
    if status != 0:
        raise SystemExit(f"`metatrain {shlex.join(args)}` ended with status {status}")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def sources(path: Path) -> str:
    return f"data.sources=[{{path: {json.dumps(str(path))}, weight: 1.0}}]"


def text_only_corpus(teacher: Path, out: Path) -> Path:
    """The teacher's documents without their thinking: the text segments as they are (so
    the text tokens are those the joint model's `none` scores), as training documents."""
    if not out.is_file():
        lines = []
        for line in teacher.read_text().splitlines():
            record = json.loads(line)
            record["segments"] = [s for s in record["segments"] if s["kind"] == "text"]
            lines.append(json.dumps(record))
        out.write_text("\n".join(lines) + "\n")
    return out


def write_spec(path: Path, data: Path, *, select: str, generations: int, samples: int, extra_sets: list[str],
               eval_documents: int, min_gain: float | None = None, start: Path | None = None) -> Path:
    """A `generations run` spec (docs/generations.md) for the chain corpus under `data`;
    generation 0 is the teacher's corpus, or the corpus `start` (a trained run) writes."""
    import yaml

    annotate = {"where": "passage", "split": "paragraph", "samples": samples, "select": select,
                "gain_tokens": 16, "temperature": 1.0, "max_tokens": 24, "seed": 0, "concurrency": 32}
    if min_gain is not None:
        annotate["min_gain"] = min_gain
    spec = {
        "corpus": [str(data / "chain.raw.jsonl")],
        "heldout": [str(data / "chain.heldout.jsonl")],
        "generations": generations,
        "annotate": annotate,
        "generation0": {"checkpoint": str(start)} if start is not None else {"corpus": str(data / "chain.jsonl")},
        "train": {"config": str(DEFAULT_CONFIG), "set": extra_sets},
        "eval": {"self_think": True, "self_think_tokens": 24, "max_documents": eval_documents,
                 "args": ["--no-generation", "--no-probes"]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(spec, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def train(workdir: Path, corpus: Path, sets: list[str], steps: int | None = None) -> None:
    args = ["train", "--config", str(DEFAULT_CONFIG), "--workdir", str(workdir), "--set", sources(corpus)]
    for s in sets + ([f"trainer.steps={steps}"] if steps is not None else []):
        args += ["--set", s]
    metatrain(*args)


def evaluate(workdir: Path, data: Path, out: Path, *, self_think: bool, documents: int) -> dict[str, Any]:
    if not (out / "report.json").is_file():
        args = ["eval", "--workdir", str(workdir), "--data", str(data), "--out", str(out), "--no-generation",
                "--no-probes", "--max-documents", str(documents)]
        if self_think:
            args += ["--self-think", "--self-think-tokens", "24"]
        metatrain(*args)
    return read_json(out / "report.json")


def text_tokens_trained(workdir: Path) -> int:
    """Text tokens the run trained on: the sum of the trainer's `tokens/text` over its log windows."""
    total = 0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "tokens/text" in record:
            total += int(record["tokens/text"])
    return total


def answer_share(path: Path) -> dict[str, Any]:
    from metatrain.data.synthetic import thought_answers

    carried = total = 0
    for line in path.read_text().splitlines():
        c, t = thought_answers(json.loads(line))
        carried, total = carried + c, total + t
    return {"carried": carried, "total": total, "share": carried / total if total else None}


def document_sums(workdir: Path, documents: Path, *, remove_thinking: bool = False) -> tuple[Any, Any]:
    """Per-document text nll (nats) and text bytes of `documents` (JSON Lines, e.g. an
    evaluation's `self_think.jsonl`) under `workdir`'s newest checkpoint; with
    `remove_thinking` every block is cut out at token level first (the text tokens stay)."""
    from metatrain.config import load_config_dict
    from metatrain.documents import parse_document
    from metatrain.evaluation import ablation
    from metatrain.evaluation.report import EvalSettings, score_documents
    from metatrain.evaluation.text_bytes import token_byte_lengths
    from metatrain.run.reader import load_checkpoint

    loaded = load_checkpoint(workdir)
    config = load_config_dict(loaded.config, where=str(workdir))
    encoded = [loaded.encoder.encode(parse_document(json.loads(line), path=str(documents), line=i + 1))
               for i, line in enumerate(documents.read_text().splitlines())]
    if remove_thinking:
        encoded = [ablation.remove_thinking(loaded.encoder, d) for d in encoded]
    sums = score_documents(loaded.params, loaded.model_config, config.loss, encoded,
                           token_byte_lengths(loaded.encoder.tokenizer), EvalSettings(seq_len=config.trainer.seq_len))
    return sums.nll[:, 0], sums.text_bytes


def paired(a: tuple[Any, Any], b: tuple[Any, Any]) -> dict[str, Any]:
    """bpb/text of `a` minus `b` on the same documents' text, with a bootstrap interval over documents."""
    import numpy as np

    from metatrain.evaluation.stats import paired_ratio_difference
    from metatrain.evaluation.text_bytes import LN2

    if not np.array_equal(a[1], b[1]):
        raise SystemExit("the two scorings did not read the same text")
    result = paired_ratio_difference(a[0], b[0], a[1], scale=1 / LN2)
    return {"bpb/text": result.estimate, "ci": result.ci, "documents": result.documents}


def interval(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if not entry:
        return None
    return {"bpb/text": entry.get("bpb/text"), "ci": entry.get("ci"), "documents": entry.get("documents")}


def data_efficiency(points: list[tuple[int, float]], target: float) -> float | None:
    """Text tokens at which the text-only curve reaches `target` bits per byte, by linear
    interpolation in log(tokens); None when the curve never gets that low."""
    import math

    points = sorted(points)
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if (b0 - target) * (b1 - target) <= 0 and b0 != b1:
            w = (b0 - target) / (b0 - b1)
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where every run and the results go")
    parser.add_argument("--documents", type=int, default=2000, help="training documents of each corpus")
    parser.add_argument("--heldout", type=int, default=200, help="held-out documents")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="candidate thoughts per point in generations >= 1")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every joint model")
    parser.add_argument("--text-only-steps", default="50,100,200,400",
                        help="training steps of the text-only models (comma-separated)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="config overrides for every training run (e.g. the model size)")
    parser.add_argument("--quick", action="store_true",
                        help="a small version: tiny model, few documents and steps, 2 generations")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if args.quick:
        args.documents, args.heldout, args.generations, args.samples, args.steps = 120, 40, 2, 2, 30
        args.text_only_steps = "15,30"
        args.sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                     "model.d_ff=64", "trainer.batch_size=8", "trainer.eval_every=30", "checkpoint.every=30",
                     "optimizer.warmup_steps=5", *args.sets]
    # One thinking block in four gets the mantra in training otherwise: with `every`, a
    # model-annotated document (a thought at each of its four paragraphs) outgrows a row.
    sets = ["data.mantra_policy=first", "trainer.progress=false", f"trainer.steps={args.steps}", *args.sets]
    data = out / "data"
    for task, name in (("chain", "chain"), ("chain-control", "control")):
        if not (data / f"{name}.heldout.raw.jsonl").is_file():
            metatrain("data", "synthetic", "--task", task, "--documents", str(args.documents), "--heldout",
                      str(args.heldout), "--out", str(data / f"{name}.jsonl"), "--force")
    runs: dict[str, Path] = {}
    for select in ("gain", "random"):
        spec = write_spec(out / "specs" / f"{select}.yaml", data, select=select, generations=args.generations,
                          samples=args.samples, extra_sets=sets, eval_documents=args.heldout)
        runs[select] = out / select
        metatrain("generations", "run", str(spec), "--out", str(runs[select]))
    spec = write_spec(out / "specs" / "floor.yaml", data, select="gain", generations=args.generations - 1,
                      samples=args.samples, extra_sets=sets, eval_documents=args.heldout, min_gain=0.0,
                      start=runs["gain"] / "gen-0" / "work")
    runs["floor"] = out / "floor"
    metatrain("generations", "run", str(spec), "--out", str(runs["floor"]))
    # The control: a joint model on uninformative thoughts.
    if not (out / "control" / "done").is_file():
        train(out / "control", data / "control.jsonl", sets)
        (out / "control" / "done").write_text("")
    control = evaluate(out / "control", data / "control.heldout.jsonl", out / "control-eval", self_think=True,
                       documents=args.heldout)
    # Text-only models, scored on the same text tokens as the joint model's `none`.
    text_only = []
    text_corpus = text_only_corpus(data / "chain.jsonl", data / "chain.text.jsonl")
    for steps in (int(s) for s in args.text_only_steps.split(",")):
        workdir = out / f"text-only-{steps}"
        if not (workdir / "done").is_file():
            train(workdir, text_corpus, sets, steps=steps)
            (workdir / "done").write_text("")
        report = evaluate(workdir, data / "chain.heldout.jsonl", out / f"text-only-{steps}-eval", self_think=False,
                          documents=args.heldout)
        text_only.append({"steps": steps, "text_tokens": text_tokens_trained(workdir),
                          "bpb/text": report["ablation"]["removed"]["bpb/text"]})
    results = summarize(out, runs, control, text_only)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(out, results)
    print(json.dumps(results, indent=1))
    return 0


def summarize(out: Path, runs: dict[str, Path], control: dict[str, Any],
              text_only: list[dict[str, Any]]) -> dict[str, Any]:
    """The three questions of docs/experiments.md, answered from the runs' own files."""
    loops = {}
    for select, directory in runs.items():
        manifest = read_json(directory / "manifest.json")
        rows = []
        offset = 1 if select == "floor" else 0  # its generation 0 is written by `gain`'s generation 0
        for generation in manifest["generations"]:
            results = generation["results"]
            corpus, evaluation = results.get("corpus") or {}, results.get("eval") or {}
            self_think = evaluation.get("self_think") or {}
            rows.append({
                "generation": generation["generation"] + offset,
                "corpus_answers": (corpus.get("answers") or {}).get("share"),
                "corpus_gain": corpus.get("gain"),
                "bpb/text": evaluation.get("bpb/text"),
                "removed_minus_kept": evaluation.get("removed_minus_kept"),
                "self_think_bpb": (self_think.get("self") or {}).get("bpb/text"),
                "no_thought_bpb": (self_think.get("none") or {}).get("bpb/text"),
                "self_minus_none": self_think.get("self_minus_none"),
                "self_think_answers": (self_think.get("answers") or {}).get("share"),
                "text_tokens": text_tokens_trained(directory / f"gen-{generation['generation']}" / "work"),
            })
        loops[select] = rows
    joint = loops["gain"][0]
    control_self = control.get("self_think") or {}
    efficiency = data_efficiency([(t["text_tokens"], t["bpb/text"]) for t in text_only], joint["self_think_bpb"])
    # Paired comparisons between models, on the same held-out text (each model reading it
    # after its own greedy thoughts; a text-only model without any).
    def self_think(arm: str, generation: int) -> tuple[Any, Any]:
        offset = 1 if arm == "floor" else 0
        directory = runs[arm] / f"gen-{generation - offset}"
        return document_sums(directory / "work", directory / "eval" / "self_think.jsonl")

    generations = max(r["generation"] for r in loops["gain"])
    comparisons: dict[str, Any] = {}
    for g in range(1, generations + 1):
        gain = self_think("gain", g)
        comparisons[f"gen-{g}: gain - random"] = paired(gain, self_think("random", g))
        comparisons[f"gen-{g}: floor - gain"] = paired(self_think("floor", g), gain)
    # The same text read after the teacher's thoughts: informative ones against uninformative ones.
    data = out / "data"
    comparisons["joint informative - joint control, teacher thoughts kept"] = paired(
        document_sums(runs["gain"] / "gen-0" / "work", data / "chain.heldout.jsonl"),
        document_sums(out / "control", data / "control.heldout.jsonl"))
    joint_docs = runs["gain"] / "gen-0" / "eval" / "self_think.jsonl"
    nearest = min(text_only, key=lambda t: abs(t["text_tokens"] - joint["text_tokens"]))
    text_only_sums = document_sums(out / f"text-only-{nearest['steps']}", joint_docs, remove_thinking=True)
    comparisons[f"joint (self-thinking) - text-only {nearest['steps']} steps"] = paired(self_think("gain", 0),
                                                                                   text_only_sums)
    return {
        "uses_thoughts": {
            "informative": joint["removed_minus_kept"],
            "control": interval((control.get("ablation") or {}).get("removed", {}).get("minus_kept")),
        },
        "joint_vs_text_only": {
            "joint_text_tokens": joint["text_tokens"],
            "joint_self_think_bpb": joint["self_think_bpb"],
            "joint_no_thought_bpb": joint["no_thought_bpb"],
            "joint_self_minus_none": joint["self_minus_none"],
            "control_self_minus_none": interval(control_self.get("self_minus_none")),
            "text_only": text_only,
            "text_tokens_to_match_joint": efficiency,
            "text_only_nearest_steps": nearest["steps"],
            "data_efficiency": efficiency / joint["text_tokens"] if efficiency else None,
        },
        "generations": loops,
        "comparisons": comparisons,
    }


def plot(out: Path, results: dict[str, Any]) -> None:
    """`OUT/known_answer_generations.png` and `OUT/known_answer_text_only.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = {"gain": "select gain", "random": "select random", "floor": "select gain, min-gain 0"}
    for select, rows in results["generations"].items():
        gens = [r["generation"] for r in rows]
        select = names.get(select, select)
        left.plot(gens, [r["self_think_bpb"] for r in rows], marker="o", label=f"{select}: self-thinking")
        left.plot(gens, [r["no_thought_bpb"] for r in rows], marker="x", linestyle=":",
                  label=f"{select}: no thought")
        right.plot(gens, [r["self_think_answers"] for r in rows], marker="o", label=f"{select}: self-written")
        right.plot(gens, [r["corpus_answers"] for r in rows], marker="s", linestyle="--",
                   label=f"{select}: training corpus")
    left.set(xlabel="generation", ylabel="held-out bpb/text", title="text bits per byte")
    right.set(xlabel="generation", ylabel="share of known points", title="thoughts that carry the answer")
    for ax in (left, right):
        ax.set_xticks(sorted({r["generation"] for rows in results["generations"].values() for r in rows}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "known_answer_generations.png", dpi=110)
    plt.close(fig)

    comparison = results["joint_vs_text_only"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = sorted((t["text_tokens"], t["bpb/text"]) for t in comparison["text_only"])
    ax.plot(*zip(*points), marker="o", label="text-only models")
    ax.scatter([comparison["joint_text_tokens"]], [comparison["joint_self_think_bpb"]], color="C1", zorder=3,
               label="joint model, self-thinking")
    ax.scatter([comparison["joint_text_tokens"]], [comparison["joint_no_thought_bpb"]], color="C2", marker="x",
               zorder=3, label="joint model, no thought")
    ax.set(xscale="log", xlabel="text tokens trained on", ylabel="held-out bpb/text",
           title="joint against text-only training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "known_answer_text_only.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
