"""Decoding speed: the KV cache against recomputing the prefix, and the grammar mask's cost.

    python benchmarks/generate.py [--config configs/default.yaml] [--lengths 32,64,128,256]
                                  [--batch 1] [--mask-batches 1,8] [--repeats 7]

Model: the config's model (default: the embedded default run's), random parameters
(speed does not depend on them), tokenizer, tags and mantra of the config's data.
Every measurement runs the real jitted loop of `metatrain.engine.step` with a
16-token prompt and `length - 16` new tokens, greedy, after one warm-up call that
compiles it; the fastest of `--repeats` interleaved runs is reported (the run least
disturbed by other load on a shared machine).

  * KV cache: `generate_tokens` (prefill once, then one token per step over the cache).
  * Recompute: the same loop and token policy, but every step runs the whole model over
    the token buffer (fixed shape [B, length], so it too compiles once) and reads the
    logits at the current position: what decoding without a cache costs.
  * Grammar cost: per-step time of the KV loop with `GrammarChooser` (tag mask, grammar
    state, mantra forcing, lock) and with the same sampling and no grammar at all; and,
    because on a shared CPU the difference of two whole loops drowns in noise, the
    grammar's operations alone: the token policy with and without the grammar on
    precomputed logits, no model. Share = grammar operations / step with the grammar.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.config import load_config
from metatrain.engine.constraints import GrammarChooser, RowState, TagConstraints
from metatrain.engine.sampling import SamplingConfig, pick_tokens, scaled_scores
from metatrain.engine.step import PromptBatch, generate_tokens
from metatrain.generate.prompts import encode_prompt
from metatrain.models import ModelConfig, Transformer, init_params_shape, logits
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import DEFAULT_MANTRA

PROMPT_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class NoGrammar:
    """The same sampling with every token allowed and no grammar state: the baseline."""

    sampling: SamplingConfig

    def __call__(self, logits, rows, key, constraints):
        return pick_tokens(scaled_scores(logits, self.sampling), key, self.sampling), rows


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "chooser"))
def recompute_tokens(params, prompts, rows, constraints, key, *, model_config, max_new_tokens, chooser):
    """`generate_tokens` without a cache: the full forward pass over the buffer every step."""
    model = Transformer(model_config)
    batch, prompt_len = prompts.ids.shape
    length = prompt_len + max_new_tokens
    ids = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompts.ids)
    segments = jnp.ones((batch, length), jnp.int32).at[:, :prompt_len].set(prompts.segment_ids())
    positions = jnp.concatenate(
        [prompts.positions(), prompts.lengths[:, None] + jnp.arange(max_new_tokens)[None]], axis=1
    )

    def step(carry, step_key):
        ids, rows = carry
        hidden = model.apply({"params": params}, ids, positions, segments)  # [B, length, D]
        last = jax.lax.dynamic_slice_in_dim(hidden, prompt_len - 1 + step_key[1], 1, axis=1)
        tokens, rows = chooser(logits(last, params, model_config)[:, 0], rows, step_key[0], constraints)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, tokens[:, None], prompt_len + step_key[1], axis=1)
        return (ids, rows), None

    steps = (jax.random.split(key, max_new_tokens), jnp.arange(max_new_tokens))
    (ids, _), _ = jax.lax.scan(step, (ids, rows), steps)
    return ids[:, prompt_len:]


@functools.partial(jax.jit, static_argnames=("chooser",))
def choose_only(logits, rows, constraints, key, *, chooser):
    """The token policy alone over precomputed logits [N, B, V]: N steps, no model."""

    def step(rows, inputs):
        tokens, rows = chooser(inputs[0], rows, inputs[1], constraints)
        return rows, tokens

    return jax.lax.scan(step, rows, (logits, jax.random.split(key, logits.shape[0])))[1]


def random_params(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree.map(draw, nn.unbox(init_params_shape(config)))


def fastest(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Wall time of each `fns[name]()` (blocking): the fastest of `repeats` runs.

    One warm-up call each (compilation), then the functions take turns, so load from
    other processes on a shared machine hits them alike, and the minimum is the run
    least disturbed by it.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def setup(encoder: Encoder, batch: int):
    text = "The country lies on the coast of a wide bay, and its capital is"
    prompt = encode_prompt(encoder, text).ids[:PROMPT_TOKENS]
    constraints = TagConstraints.from_encoder(encoder)
    rows = RowState.start(np.zeros(batch, int), np.zeros(batch, int), constraints.mantra_length)
    return PromptBatch.left_padded([prompt] * batch, PROMPT_TOKENS), rows, constraints


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="run config (default: configs/default.yaml)")
    p.add_argument("--lengths", default="32,64,128,256", help="total sequence lengths (prompt + new)")
    p.add_argument("--batch", type=int, default=1, help="rows for the cache-vs-recompute table")
    p.add_argument("--mask-batches", default="1,8", help="rows for the mask-cost table")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each (the fastest counts)")
    args = p.parse_args(argv)

    run = load_config(args.config)
    config = run.model
    encoder = Encoder.from_files(run.data.tokenizer, run.data.tags, mantra=run.data.mantra or DEFAULT_MANTRA,
                                 mantra_policy=run.data.mantra_policy)
    params = random_params(config)
    key = jax.random.key(0)
    greedy = SamplingConfig(0.0)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, model: d_model={config.d_model} "
          f"n_layers={config.n_layers} vocab={config.vocab_size} dtype={config.dtype}", file=sys.stderr)

    print(f"\nKV cache vs recomputing the prefix (batch {args.batch}, greedy, with the grammar):\n")
    print("| length | new tokens | KV cache tokens/s | recompute tokens/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    prompts, rows, constraints = setup(encoder, args.batch)
    for length in (int(x) for x in args.lengths.split(",")):
        new = length - PROMPT_TOKENS
        kw = dict(model_config=config, max_new_tokens=new, chooser=GrammarChooser(greedy))
        out = generate_tokens(params, prompts, rows, constraints, key, **kw)
        steps = int(out.steps)
        best = fastest({
            "cache": lambda: generate_tokens(params, prompts, rows, constraints, key, **kw).tokens,
            "recompute": lambda: recompute_tokens(params, prompts, rows, constraints, key, **kw),
        }, args.repeats)
        kv_rate, re_rate = args.batch * steps / best["cache"], args.batch * new / best["recompute"]
        print(f"| {length} | {new} | {kv_rate:,.0f} | {re_rate:,.0f} | {kv_rate / re_rate:.1f}x |")

    length = max(int(x) for x in args.lengths.split(","))
    new = length - PROMPT_TOKENS
    print(f"\nCost of the grammar (KV cache, length {length}): per-step times\n")
    print("| batch | sampling | decode step, grammar (ms) | decode step, none (ms) "
          "| token policy alone, grammar (µs) | token policy alone, none (µs) | grammar share |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for batch in (int(x) for x in args.mask_batches.split(",")):
        prompts, rows, constraints = setup(encoder, batch)
        fixed_logits = jax.random.normal(jax.random.key(1), (new, batch, config.vocab_size))
        for name, sampling in (("greedy", greedy), ("T=1, top-p 0.9", SamplingConfig(1.0, 0, 0.9))):
            fns, steps = {}, {}
            for label, chooser in (("with", GrammarChooser(sampling)), ("without", NoGrammar(sampling))):
                kw = dict(model_config=config, max_new_tokens=new, chooser=chooser)
                steps[label] = int(generate_tokens(params, prompts, rows, constraints, key, **kw).steps)
                fns[label] = lambda kw=kw: generate_tokens(params, prompts, rows, constraints, key, **kw).tokens
                fns[f"{label} alone"] = lambda c=chooser: choose_only(fixed_logits, rows, constraints, key, chooser=c)
            best = fastest(fns, args.repeats)
            with_, without = best["with"] / steps["with"], best["without"] / steps["without"]
            alone_with, alone_without = best["with alone"] / new, best["without alone"] / new
            # Share: what the grammar adds to the policy alone, over the whole decode step
            # (0 when the difference is below the timing noise and comes out negative).
            share = max(alone_with - alone_without, 0.0) / with_
            print(f"| {batch} | {name} | {1e3 * with_:.3f} | {1e3 * without:.3f} | {1e6 * alone_with:.1f} "
                  f"| {1e6 * alone_without:.1f} | {100 * share:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
