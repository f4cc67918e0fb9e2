"""`metatrain eval`: does the thinking help, what did the model learn, can it be monitored.

    metatrain eval --workdir W [--data DOCS.jsonl] [--step N] [--out DIR] [--json]
    metatrain eval --workdir W --self-think [--samples K] [--self-think-tokens N]

Reads one checkpoint of a run (its newest, or `--step N`) onto a mesh of the visible
devices (`--set mesh.KEY=VALUE`) and the run's
held-out split (or `--data`), and writes `DIR/report.json` (default
`W/eval/<step>/`) and `DIR/probes.png` (with `--self-think`, `DIR/self_think.jsonl`); prints the report as tables (`--json`: the JSON).
What each number means: docs/eval.md. Parsing only; the work is
`metatrain.evaluation.evaluate.evaluate_workdir`.
"""

from __future__ import annotations

import argparse
import json
import sys

from metatrain.cli.options import add_mesh_option, output_path
from metatrain.io.storage import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: per-role loss, text bits per byte, thinking ablations, "
             "free-generation grammar, probes, self-thinking",
        description=(
            "Evaluate a checkpoint on the run's held-out split (or --data): per-role loss and text bits "
            "per byte; the text's bits per byte with thinking removed, shuffled or reduced to the mantra, "
            "with bootstrap intervals over documents; tag-grammar and mantra rates of free generation; "
            "linear probes for mode and role at every layer; with --self-think, the text's bits per byte "
            "after thoughts the model writes itself where the documents' thinking blocks are. See docs/eval.md."
        ),
    )
    p.add_argument("--workdir", type=as_path, required=True, metavar="W",
                   help="a `metatrain train` work directory, or gs://BUCKET/PATH")
    p.add_argument("--data", type=str, action="append", default=None, metavar="DOCS.jsonl",
                   help="evaluate these documents (JSON Lines, compressed or a glob; repeatable) instead of "
                        "the run's held-out split")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the newest)")
    p.add_argument("--out", type=output_path("--out", as_path), default=None, metavar="DIR",
                   help="where report.json and probes.png go (default: W/eval/<step>)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    p.add_argument("--max-documents", type=int, default=2000, metavar="N",
                   help="evaluate the first N documents (default 2000; 0: all of them)")
    p.add_argument("--seq-len", type=int, default=None, metavar="L", help="row length (default: the run's trainer.seq_len)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="window step inside documents longer than a row (default seq-len / 2; seq-len: no overlap)")
    p.add_argument("--batch-rows", type=int, default=8, metavar="B", help="rows per forward pass (default 8)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--min-documents", type=int, default=20, metavar="N",
                   help="fewer documents give no interval (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle, the bootstrap, sampling and probes")
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="free-generation prompts (default 8)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="with --self-think: sampled trajectories per document (default: one greedy "
                        "trajectory; free generation then keeps 4); without it: free generation's samples "
                        "per prompt and mode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="free-generation budget (default 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of free generation and of --self-think --samples (default 1.0)")
    p.add_argument("--probe-tokens", type=int, default=50_000, metavar="N",
                   help="tokens the probes use at most (default 50000)")
    p.add_argument("--no-generation", action="store_true", help="leave out free generation")
    p.add_argument("--no-probes", action="store_true", help="leave out the probes")
    p.add_argument("--self-think", action="store_true",
                   help="also score the text after thoughts the model writes itself at each thinking block's "
                        "place (a decode per block; the documents must carry blocks where thoughts go), "
                        "against no thoughts; writes DIR/self_think.jsonl")
    p.add_argument("--self-think-tokens", type=int, default=64, metavar="N",
                   help="--self-think: tokens a thought may have (default 64)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    add_mesh_option(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from metatrain.engine.compilation_cache import enable_compilation_cache
    from metatrain.evaluation.evaluate import EvalOptions, evaluate_workdir

    enable_compilation_cache()
    from metatrain.evaluation.report import EvalSettings, format_report

    settings = EvalSettings(
        seq_len=args.seq_len, stride=args.stride, batch_rows=args.batch_rows, resamples=args.bootstrap,
        level=args.level, seed=args.seed, min_documents=args.min_documents, prompts=args.prompts,
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        probe_tokens=args.probe_tokens, generation=not args.no_generation, probes=not args.no_probes,
        self_think=args.self_think, self_think_tokens=args.self_think_tokens,
    )
    options = EvalOptions(data=args.data, step=args.step, out=args.out, max_documents=args.max_documents,
                          strict=args.strict, settings=settings, mesh_settings=args.mesh_settings)
    result = evaluate_workdir(args.workdir, options)
    if not result.wrote:  # a process other than 0 of a multi-process run: process 0 prints and writes
        return 0
    if args.json:
        print(json.dumps(result.report))
    else:
        print(format_report(result.report))
        if result.skips.count:
            print(result.skips.summary())
        print(f"report: {result.path}")
        return 0
    print(f"metatrain eval: report in {result.path}", file=sys.stderr)
    return 0
