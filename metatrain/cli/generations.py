"""`metatrain generations run|report`: the generational loop from the command line.

    metatrain generations run SPEC.yaml --out DIR
    metatrain generations report DIR [--json] [--no-plot]

`run` annotates, trains and evaluates generation after generation as SPEC says, each
generation under DIR/gen-<n>/, and resumes where it stopped when run again; `report`
prints a table per generation and writes DIR/generations.png. See docs/generations.md.
Parsing only; the work is `metatrain.generations.run` and `metatrain.generations.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metatrain.cli.options import output_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generations",
        help="the generational loop: annotate with generation N, train N+1, evaluate, repeat",
        description="Run the generational loop of a spec as one resumable command, and report it.",
    )
    sub = p.add_subparsers(dest="generations_command", required=True, metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="run (or resume) the loop of SPEC in DIR",
                         description="Run the loop of SPEC in DIR: per generation annotate, train and evaluate, "
                                     "as child `metatrain` commands. Run the same command again to resume.")
    run.add_argument("spec", metavar="SPEC", type=Path, help="generations spec YAML (see configs/generations/)")
    run.add_argument("--out", required=True, type=output_path("--out", Path), metavar="DIR",
                     help="the loop's directory: new, empty, or one this command started (resumed)")
    run.set_defaults(func=run_run)

    report = sub.add_parser("report", help="a table per generation and DIR/generations.png")
    report.add_argument("directory", metavar="DIR", type=Path, help="a `generations run` directory")
    report.add_argument("--json", action="store_true", help="print the manifest's results as JSON")
    report.add_argument("--no-plot", action="store_true", help="do not write DIR/generations.png")
    report.set_defaults(func=run_report)


def run_run(args: argparse.Namespace) -> int:
    from metatrain.generations.run import run_generations

    return run_generations(args.spec, args.out)


def run_report(args: argparse.Namespace) -> int:
    from metatrain.generations.report import report_generations

    print(report_generations(args.directory, as_json=args.json, plot=not (args.json or args.no_plot)))
    return 0
