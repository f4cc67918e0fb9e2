"""`metatrain generate`: sample text and thinking from a checkpoint under the tag grammar.

Parsing only; the work is `metatrain.generate.sample.sample_checkpoint`.
"""

from __future__ import annotations

import argparse

from metatrain.cli.options import add_mesh_option
from metatrain.io.storage import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text and thinking from a checkpoint",
        description=(
            "Continue prompts with a trained model. Tags the grammar forbids where they would "
            "stand are masked out of the logits, the mantra is forced after every <thinking> "
            "(under the run's mantra policy), --mode ai locks generation into AI mode, and --control "
            "conditions the reply on a control token."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=as_path, metavar="DIR",
                        help="a `metatrain train` work directory, or gs://BUCKET/PATH (its latest checkpoint)")
    source.add_argument("--checkpoint", type=as_path, metavar="PATH",
                        help="one checkpoint step directory, WORKDIR/checkpoints/<step>")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text, human mode (repeatable: one batch)")
    p.add_argument("--mode", choices=("human", "ai"), default="human",
                   help="ai: start after <AI> and stop at </AI>; human (default): no lock, start in the prompt's mode")
    p.add_argument("--control", default=None, metavar="NAME",
                   help="condition the reply on this control token of the tag registry (e.g. good: <|good|>), "
                        "placed as training places a segment's control; control tokens are never generated")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="token budget per sample, forced ones included (default 128, or what max_seq_len leaves)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed (default 0)")
    p.add_argument("--hide-thinking", action="store_true", help="leave thinking blocks out of the text")
    p.add_argument("--json", action="store_true", help="one JSON object per sample: ids, text, segments, ...")
    add_mesh_option(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from metatrain.engine.compilation_cache import enable_compilation_cache
    from metatrain.generate.sample import sample_checkpoint

    enable_compilation_cache()

    for text in sample_checkpoint(
        args.workdir, args.checkpoint, args.prompt,
        lock_mode=None if args.mode == "human" else args.mode,
        control=args.control,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
        as_json=args.json,
        mesh_settings=args.mesh_settings,
        hide_thinking=args.hide_thinking,
    ):
        print(text)
    return 0
