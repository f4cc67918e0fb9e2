"""The inference engine's decoding speed: against Hugging Face transformers on the same
weights (CPU), and decode tokens/s of a ~1B shape (an accelerator).

    python benchmarks/inference.py [--workdir RUN] [--train-steps 10] [--batches 1,8]
                                   [--prompt-tokens 32] [--new-tokens 128] [--rounds 7]
                                   [--torch-threads 1,2] [--before REV] [--no-profile] [--json OUT]
    python benchmarks/inference.py --device-decode [--config configs/1b.yaml] [--batches 1,8,64]
                                   [--contexts 160,4096] [--new-tokens 128] [--rounds 3] [--smoke]

**Against transformers** (default). One run of `configs/default.yaml` (trained
`--train-steps` steps by `metatrain train` into a temporary directory, or `--workdir`),
exported by `metatrain export` and loaded by `AutoModelForCausalLM.from_pretrained`
(float32, torch on the CPU). Both decode the same prompts greedily: `--prompt-tokens`
ids of the sample corpus's documents (one document a row, no padding) and exactly
`--new-tokens` new tokens a row.

  * metatrain: `Generator.decode_rows`, the path of `metatrain generate`: an `Engine`
    over the rows, `Engine.run` (admission, then decode calls of `STEPS_WHEN_ALONE`
    steps), with the tag grammar on (`GrammarChooser`, greedy: tag mask, grammar state,
    mantra forcing). EOS is masked in every state, so that every row decodes its whole
    budget, as `min_new_tokens` makes transformers do.
  * transformers: `model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`,
    at each of `--torch-threads` (on a shared machine more threads than free cores can
    make torch many times slower); the comparison takes the faster.
  * `--before REV`: the same `decode_rows` of the tree at git revision REV (`git
    archive`), in a child process (e.g. the commit before the engine).

One warm-up call each (compilation), then `--rounds` rounds in which they take turns,
the order rotating from round to round, so load from other processes on a shared
machine hits all alike; the table has each one's median tokens/s (rows x new tokens /
wall time) and the ratios. Both sides being greedy on the same weights, their tokens
agree (the table shows where each row's first differ). Then where metatrain's time goes
(`--no-profile` skips it): the admission call, the decode calls and the host between
them (each call waited for and timed), and the engine changed, in alternating rounds:
all steps in one call (no host round trips), calls of `--profile-steps` steps,
`--profile-extra-slots` more cache slots a row (what a slot costs a step: the cache
has `context + 16` slots), and no grammar (argmax only).

**`--device-decode`**: decode tokens/s of the `--config` model's shape (default: the 1b
preset, random parameters; its 32k vocabulary, the ids past the sample tokenizer's
being ordinary tokens to the grammar) on the default device, at each batch: B rows of
a 32-token prompt through `Engine.run`, `--new-tokens` each (EOS masked), median of
`--rounds` after a warm-up; prefill and decode rates apart (the admission call timed
alone). `--contexts`: the engine's context (default: prompt + new tokens, as `metatrain
generate` sizes it; a server's is the model's `max_seq_len`, and every step attends
its whole cache). `--smoke`: a toy shape, for a check of the script on a CPU
(`benchmarks/gpu_suite.sh` step 4).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: Slots a row's cache has past its context (`metatrain.engine.step.cache_length`: one prompt bucket).
PROMPT_BUCKET_SLOTS = 16


# -- shared ---------------------------------------------------------------------------------------


def machine() -> str:
    import jax

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), cpu)
    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, "
            f"{device.platform} {device.device_kind} x{jax.device_count()}")


def no_eos(constraints, eos_id: int):
    """`constraints` with EOS forbidden in every state (rows decode their whole budget)."""
    import jax.numpy as jnp

    masked = np.array(constraints.masked_ids)
    allowed = np.array(constraints.masked_allowed)
    if eos_id in masked:
        allowed[:, int(np.flatnonzero(masked == eos_id)[0])] = False
    else:
        masked = np.append(masked, eos_id).astype(np.int32)
        allowed = np.concatenate([allowed, np.zeros((allowed.shape[0], 1), bool)], axis=1)
    return constraints.replace(masked_ids=jnp.asarray(masked), masked_allowed=jnp.asarray(allowed))


def corpus_prompts(encoder, count: int, length: int) -> list:
    """`count` prompts of exactly `length` ids: BOS and the start of successive documents
    of the sample corpus (plain text, so no tags), with the grammar state after them."""
    from metatrain.generate.prompts import EncodedPrompt, encode_prompt, grammar_states

    prompts = []
    with open(REPO / "data" / "sample" / "factbook.jsonl", encoding="utf-8") as f:
        for line in f:
            text = "".join(s.get("text", "") for s in json.loads(line).get("segments", [])
                           if s.get("kind", "text") == "text")
            ids = encode_prompt(encoder, text[:4000]).ids[:length]
            if len(ids) < length:
                continue
            state = int(grammar_states(encoder, ids)[-1])
            prompts.append(EncodedPrompt(ids.astype(np.int32), (), state, state, 0))
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"the sample corpus has fewer than {count} documents of {length} tokens")


@contextlib.contextmanager
def timed_engine_calls():
    """Times every admission and decode call the engine makes (each waited for), by
    wrapping the jitted calls `metatrain.engine.engine` uses. Yields the record."""
    import jax

    from metatrain.engine import engine as engine_module

    record = {"admit": [], "steps": [], "fetch": []}
    admit, steps, device_get = engine_module.admit_call, engine_module.steps_call, engine_module.jax.device_get

    def admit_timed(*a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(admit(*a, **k))
        record["admit"].append(time.perf_counter() - t0)
        return out

    def steps_timed(*a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(steps(*a, **k))
        record["steps"].append((k["steps"], k["rows"], time.perf_counter() - t0))
        return out

    class _Jax:  # the module's `jax`, with `device_get` timed
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def device_get(x):
            t0 = time.perf_counter()
            out = device_get(x)
            record["fetch"].append(time.perf_counter() - t0)
            return out

    engine_module.admit_call, engine_module.steps_call, engine_module.jax = admit_timed, steps_timed, _Jax()
    try:
        yield record
    finally:
        engine_module.admit_call, engine_module.steps_call, engine_module.jax = admit, steps, jax


# -- against transformers -------------------------------------------------------------------------


def make_run(tmp: Path, steps: int) -> Path:
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "metatrain.cli", "train", "--config", str(REPO / "configs" / "default.yaml"),
                    "--workdir", str(run), "--set", f"trainer.steps={steps}", "--set", "trainer.eval_every=0",
                    "--set", "trainer.progress=false", "--set", f"checkpoint.every={steps}",
                    "--set", "checkpoint.async_save=false"],
                   check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return run


def export_run(run: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "metatrain.cli", "export", "--workdir", str(run), "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out


class Decoder:
    """metatrain's side: `Generator.decode_rows` over prompts, greedy with the grammar, EOS
    masked. Works with this tree and with a tree from before the engine (the same
    `decode_rows` signature), so `--before` can run it in a child process."""

    def __init__(self, workdir: Path):
        import metatrain

        if (Path(metatrain.__file__).parent / "engine").is_dir():
            from metatrain.engine import GrammarChooser, SamplingConfig, TagConstraints
        else:  # a tree from before the engine (an editable install would still find this one's)
            from metatrain.generate.constraints import GrammarChooser, TagConstraints
            from metatrain.generate.sampling import SamplingConfig
        from metatrain.generate.generator import Generator

        self.generator = Generator.load(workdir)
        encoder = self.generator.encoder
        self.constraints = no_eos(TagConstraints.from_encoder(encoder), encoder.eos_id)
        self.chooser = GrammarChooser(SamplingConfig(0.0))

    def __call__(self, prompts: list, new: int) -> np.ndarray:
        """tokens [B, new] (-1 past a row's end)."""
        tokens, _, _ = self.generator.decode_rows(prompts, self.constraints, max_new_tokens=new, chooser=self.chooser)
        return np.asarray(tokens)


_ANSWER = "decoded: "  # how the worker's answers start (anything else on its stdout is not one)


def worker(workdir: Path) -> None:
    """`--worker`: a `Decoder` of whatever tree is on the path, driven over stdin/stdout:
    each line `{"batch", "prompt_tokens", "new"}` decodes once and answers `{"seconds", "tokens"}`."""
    decoder = Decoder(workdir)
    for line in sys.stdin:
        job = json.loads(line)
        prompts = corpus_prompts(decoder.generator.encoder, job["batch"], job["prompt_tokens"])
        t0 = time.perf_counter()
        tokens = decoder(prompts, job["new"])
        seconds = time.perf_counter() - t0
        print(_ANSWER + json.dumps({"seconds": seconds, "tokens": tokens.tolist()}), flush=True)


class Before:
    """The decoder of another tree (`--before REV`: `git archive REV`), in a child process."""

    def __init__(self, rev: str, workdir: Path, tmp: Path):
        tree = tmp / "before"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
        self.child = subprocess.Popen([sys.executable, __file__, "--worker", "--workdir", str(workdir)], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.rev = rev

    def __call__(self, batch: int, prompt_tokens: int, new: int) -> tuple[float, np.ndarray]:
        try:
            self.child.stdin.write(json.dumps({"batch": batch, "prompt_tokens": prompt_tokens, "new": new}) + "\n")
            self.child.stdin.flush()
        except BrokenPipeError:
            raise SystemExit(f"the decoder of {self.rev} exited (its stderr is above)") from None
        while not (line := self.child.stdout.readline()).startswith(_ANSWER):
            if not line:
                raise SystemExit(f"the decoder of {self.rev} exited (its stderr is above)")
        answer = json.loads(line[len(_ANSWER):])
        return answer["seconds"], np.asarray(answer["tokens"])

    def close(self) -> None:
        try:
            self.child.stdin.close()
        except BrokenPipeError:
            pass  # it has exited already
        self.child.wait(timeout=60)


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each `fns[name]()` over `rounds` rounds, after one warm-up call each; a
    function returning a float gives its own seconds (a child's), else it is timed here. Within a round
    they take turns, in an order that rotates from round to round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            own = fns[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return times


@dataclasses.dataclass(frozen=True)
class ArgmaxOnly:
    """A token policy without the grammar (no tag mask, no grammar state, no mantra): the
    argmax of the logits, for the profile's cost of the grammar."""

    def __call__(self, logits, rows, key, constraints):
        import jax.numpy as jnp

        return jnp.argmax(logits, axis=-1).astype(jnp.int32), rows


def engine_decode(decoder: Decoder, prompts: list, new: int, *, extra_slots: int = 0, steps: int | None = None,
                  chooser=None) -> None:
    """The decode `Generator.decode_rows` runs (an `Engine` over the rows, `Engine.run`),
    changed for the profile: `extra_slots` more cache slots a row, every call `steps`
    steps (the mode a server's engine is in: `_serving`), or another token policy."""
    from metatrain.engine.engine import Engine, RowRequest
    from metatrain.engine.step import padded_length

    generator = decoder.generator
    context = padded_length(max(len(p.ids) for p in prompts)) + new + extra_slots
    engine = Engine(generator.params, generator.model_config, decoder.constraints, max_batch=len(prompts),
                    eos_id=generator.encoder.eos_id, context=context, chooser=chooser or decoder.chooser,
                    **({} if steps is None else {"steps_per_call": steps}))
    engine._serving = steps is not None
    engine.run([RowRequest(p, new, seed=0, stream=i) for i, p in enumerate(prompts)])


def bench_transformers(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="mt-inference-") as tmp:
        tmp = Path(tmp)
        run = Path(args.workdir) if args.workdir else make_run(tmp, args.train_steps)
        exported = export_run(run, tmp / "export")
        decoder = Decoder(run)
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        before = Before(args.before, run, tmp) if args.before else None
        try:
            rows = _compare(args, decoder, model, before)
        finally:
            if before:
                before.close()
    config = decoder.generator.model_config
    print(f"\nmachine: {machine()}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: default preset (d_model={config.d_model}, n_layers={config.n_layers}, vocab={config.vocab_size}, "
          f"{config.dtype}), {'--workdir ' + str(args.workdir) if args.workdir else f'trained {args.train_steps} steps'}")
    _print_comparison(args, rows)
    return {"rows": rows}


def _compare(args, decoder: Decoder, model, before: Before | None) -> list[dict]:
    import torch

    encoder = decoder.generator.encoder
    new = args.new_tokens
    rows = []
    for batch in args.batches:
        prompts = corpus_prompts(encoder, batch, args.prompt_tokens)
        ids = torch.as_tensor(np.stack([p.ids for p in prompts]), dtype=torch.long)
        mask = torch.ones_like(ids)
        out: dict = {}

        def metatrain_decode():
            out["metatrain"] = decoder(prompts, new)

        def hf_decode(threads: int):
            def run():
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    out["transformers"] = model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                         min_new_tokens=new, do_sample=False,
                                                         pad_token_id=encoder.eos_id)
            return run

        def before_decode():
            seconds, out["before"] = before(batch, args.prompt_tokens, new)
            return seconds

        fns = {"metatrain": metatrain_decode, **{f"transformers, {n} thread{'s' if n > 1 else ''}": hf_decode(n)
                                                 for n in args.torch_threads}}
        if before:
            fns["before"] = before_decode
        times = timed_rounds(fns, args.rounds)
        hf_tokens = out["transformers"][:, args.prompt_tokens:].numpy()
        assert out["metatrain"].shape == hf_tokens.shape == (batch, new) and (out["metatrain"] >= 0).all()
        # Same weights, both greedy: a row agrees until the grammar masks a token the
        # unconstrained model takes (or float rounding tips a near tie).
        row = {"batch": batch, "prompt_tokens": args.prompt_tokens, "new_tokens": new, "seconds": times,
               "agreeing_prefix": [int(np.argmax(np.append(t != h, True)))
                                   for t, h in zip(out["metatrain"], hf_tokens)]}
        if before:
            row["before_equal"] = bool((out["before"] == out["metatrain"]).all())
        row["tokens_per_s"] = {name: batch * new / statistics.median(t) for name, t in times.items()}
        # transformers at its best thread count here (on a loaded machine, more threads
        # than free cores can make torch many times slower)
        row["tokens_per_s"]["transformers"] = max(v for k, v in row["tokens_per_s"].items() if k.startswith("trans"))
        if args.profile:
            row["profile"] = _profile(args, decoder, prompts)
        rows.append(row)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in row["tokens_per_s"].items()),
              file=sys.stderr)
    return rows


def _profile(args, decoder: Decoder, prompts: list) -> dict:
    """Where metatrain's time goes: one call with every engine call timed (and waited
    for), then the engine as shipped against variants, in alternating rounds."""
    new = args.new_tokens
    parts: dict[str, list[float]] = {"total": [], "admit": [], "steps": [], "fetch": []}
    decoder(prompts, new)
    for _ in range(args.rounds):
        with timed_engine_calls() as record:
            t0 = time.perf_counter()
            decoder(prompts, new)
            parts["total"].append(time.perf_counter() - t0)
        parts["admit"].append(sum(record["admit"]))
        parts["steps"].append(sum(t for _, _, t in record["steps"]))
        parts["fetch"].append(sum(record["fetch"]))
    calls = [(s, r) for s, r, _ in record["steps"]]

    extra = args.profile_extra_slots
    times = timed_rounds({
        "as shipped": lambda: decoder(prompts, new),
        "one call of all steps": lambda: engine_decode(decoder, prompts, new, steps=new),
        f"calls of {args.profile_steps} steps": lambda: engine_decode(decoder, prompts, new, steps=args.profile_steps),
        f"{extra} more cache slots a row": lambda: engine_decode(decoder, prompts, new, extra_slots=extra),
        "no grammar (argmax only)": lambda: engine_decode(decoder, prompts, new, chooser=ArgmaxOnly()),
    }, args.rounds)
    return {**{f"{k}_s": statistics.median(v) for k, v in parts.items()}, "calls": calls,
            "rest_s": statistics.median(t - a - s - f for t, a, s, f in zip(*parts.values())),
            "variants": {k: statistics.median(v) for k, v in times.items()}}


def _print_comparison(args, rows: list[dict]) -> None:
    new = args.new_tokens
    before = f"before ({args.before})"
    print(f"\nmetatrain's engine vs transformers `generate`, same weights, greedy, {args.prompt_tokens}-token prompts, "
          f"{new} new tokens a row, median of {args.rounds} alternating rounds:\n")
    hf = [k for k in rows[0]["tokens_per_s"] if k.startswith("transformers, ")]
    head = "| batch | metatrain tokens/s | " + " | ".join(f"{k} tokens/s" for k in hf)
    head += " | **metatrain / transformers (faster)** "
    if args.before:
        head += f"| {before} tokens/s | {before} / transformers | metatrain / {before} "
    print(head + "| greedy tokens equal to transformers' (first difference, per row) |")
    print("|---:|---:|" + "---:|" * len(hf) + "---:|" + ("---:|---:|---:|" if args.before else "") + "---|")
    for r in rows:
        rate = r["tokens_per_s"]
        line = (f"| {r['batch']} | {rate['metatrain']:,.0f} | " + " | ".join(f"{rate[k]:,.0f}" for k in hf)
                + f" | **{rate['metatrain'] / rate['transformers']:.1f}x** ")
        if args.before:
            line += (f"| {rate['before']:,.0f} | {rate['before'] / rate['transformers']:.1f}x "
                     f"| {rate['metatrain'] / rate['before']:.2f}x ")
        print(line + f"| {', '.join(str(a) for a in r['agreeing_prefix'])} |")
    print("\nseconds per round (min / median / max): " + "; ".join(
        f"batch {r['batch']} {k} {min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f}"
        for r in rows for k, v in r["seconds"].items()))
    if args.before:
        print("tokens identical to the tree before: " + ", ".join(
            f"batch {r['batch']} {'yes' if r['before_equal'] else 'NO'}" for r in rows))
    if not args.profile:
        return
    print("\nWhere metatrain's time goes (ms, medians of the rounds): calls with each engine call waited for and "
          "timed; then the engine as shipped and changed, in alternating rounds:\n")
    names = list(rows[0]["profile"]["variants"])
    print("| batch | whole call | admission | decode calls (steps x calls) | in decode calls | fetching tokens "
          "| host between calls | " + " | ".join(names) + " |")
    print("|---:|---:|---:|---|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        p = r["profile"]
        shapes: dict = {}
        for steps, k in p["calls"]:
            shapes[(steps, k)] = shapes.get((steps, k), 0) + 1
        calls = ", ".join(f"{s} x {n}" for (s, _), n in shapes.items())
        rest = p["rest_s"]
        print(f"| {r['batch']} | {1e3 * p['total_s']:.1f} | {1e3 * p['admit_s']:.1f} | {calls} "
              f"| {1e3 * p['steps_s']:.1f} | {1e3 * p['fetch_s']:.1f} | {1e3 * rest:.1f} | "
              + " | ".join(f"{1e3 * p['variants'][n]:.1f}" for n in names) + " |")
    extra = args.profile_extra_slots
    for r in rows:
        v = r["profile"]["variants"]
        slot = (v[f"{extra} more cache slots a row"] - v["as shipped"]) / (extra * new)
        print(f"\nbatch {r['batch']}: a cache slot costs {1e6 * slot:.2f} µs a decode step; the {PROMPT_BUCKET_SLOTS} "
              f"slots a row has past its context (S = context + {PROMPT_BUCKET_SLOTS}) cost "
              f"{100 * PROMPT_BUCKET_SLOTS * slot * new / v['as shipped']:.1f}% of the call", end="")
    print()


# -- decode on a device ---------------------------------------------------------------------------


def random_params(config, seed: int = 0):
    """Random parameters of `config`'s shape, made on the device (speed does not depend on them)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from metatrain.models import init_params_shape

    shapes = nn.unbox(init_params_shape(config))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = [(jax.random.normal(k, s.shape, jnp.float32) / np.sqrt(s.shape[-2] if len(s.shape) >= 2 else 1)
             ).astype(s.dtype) for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(tree, made)


def bench_device(args) -> dict:
    import jax
    import jax.numpy as jnp

    from metatrain.config import load_config
    from metatrain.engine import GrammarChooser, SamplingConfig, TagConstraints
    from metatrain.tokenizer.encoder import Encoder
    from metatrain.tokenizer.mantra import DEFAULT_MANTRA

    overrides = [f"data.tokenizer={REPO / 'tokenizer' / 'sample.model'}"]
    if args.smoke:
        overrides += ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                      "model.d_ff=128", "model.vocab_size=4096", "model.max_seq_len=256",
                      "trainer.seq_len=256"]
    run = load_config(args.config or REPO / "configs" / "1b.yaml", overrides)
    config = run.model
    encoder = Encoder.from_files(run.data.tokenizer, run.data.tags, mantra=run.data.mantra or DEFAULT_MANTRA,
                                 mantra_policy=run.data.mantra_policy)
    constraints = no_eos(TagConstraints.from_encoder(encoder), encoder.eos_id)
    if config.vocab_size > encoder.vocab_size:  # ids past the tokenizer's: ordinary tokens
        constraints = constraints.replace(token_to_tag=jnp.pad(
            constraints.token_to_tag, (0, config.vocab_size - encoder.vocab_size), constant_values=-1))
    params = random_params(config)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    chooser = GrammarChooser(SamplingConfig(0.0))
    new = args.new_tokens
    prompt = corpus_prompts(encoder, 1, 32)[0]
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"model: {Path(args.config).name if args.config else '1b.yaml'}{' (smoke)' if args.smoke else ''} "
          f"d_model={config.d_model} n_layers={config.n_layers} heads={config.n_heads}/{config.n_kv_heads} "
          f"vocab={config.vocab_size} {config.dtype}, {n_params / 1e9:.2f}B parameters (random)", file=sys.stderr)

    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else [32 + new]
    rows = []
    for context in contexts:
        for batch in args.batches:
            rows.append(_device_decode(params, config, constraints, encoder, chooser, prompt, batch, new, context,
                                       args.rounds))
    print(f"\nEngine decode on {jax.devices()[0].device_kind}: {config.n_layers} x {config.d_model}, "
          f"vocab {config.vocab_size}, {config.dtype}, 32-token prompt, {new} new tokens, greedy with the grammar, "
          f"median of {args.rounds}; context = the engine's tokens a row (its cache: context + 16 slots):\n")
    print("| context | batch | tokens/s (whole run) | decode tokens/s | ms a decode step | prefill tokens/s "
          "| decode calls |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} "
              f"| {r['step_ms']:.2f} | {r['prefill_tokens_per_s']:,.0f} | {r['calls']} |")
    return {"rows": rows, "parameters": n_params}


def _device_decode(params, config, constraints, encoder, chooser, prompt, batch: int, new: int, context: int,
                   rounds: int) -> dict:
    """One batch size at one context: the median run, and the admission call timed alone."""
    from metatrain.engine.engine import Engine, RowRequest

    # no prefix reuse: every run admits its prompts whole, as the first did (one compile)
    engine = Engine(params, config, constraints, max_batch=batch, eos_id=encoder.eos_id, context=context,
                    chooser=chooser, prefix_reuse=False)
    requests = [RowRequest(prompt, new, seed=0, stream=i) for i in range(batch)]
    times = timed_rounds({"run": lambda: engine.run(requests)}, rounds)["run"]
    with timed_engine_calls() as record:
        handles = engine.run(requests)
    assert all(len(h.tokens) == new for h in handles)
    total = statistics.median(times)
    admit = record["admit"][0]
    row = {"context": context, "batch": batch, "new_tokens": new, "seconds": times, "admit_s": admit,
           "tokens_per_s": batch * new / total, "decode_tokens_per_s": batch * new / max(total - admit, 1e-9),
           "prefill_tokens_per_s": batch * len(prompt.ids) / admit, "step_ms": 1e3 * (total - admit) / new,
           "calls": len(record["steps"])}
    print(f"  context {context}, batch {batch}: {row['decode_tokens_per_s']:,.0f} decode tokens/s", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-decode", action="store_true", help="decode tokens/s of the --config shape (1b)")
    p.add_argument("--workdir", default=None, help="a default-preset run (default: train one)")
    p.add_argument("--train-steps", type=int, default=10, help="steps of the run trained when no --workdir")
    p.add_argument("--config", default=None, help="--device-decode: the model's config (default configs/1b.yaml)")
    p.add_argument("--batches", default=None, help="rows, comma-separated (default 1,8; --device-decode 1,8,64)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; --device-decode 3)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip where the time goes")
    p.add_argument("--torch-threads", default="1,2",
                   help="torch thread counts timed (the fastest is the comparison's), comma-separated")
    p.add_argument("--profile-steps", type=int, default=4, help="steps a call in one of the profile's variants")
    p.add_argument("--profile-extra-slots", type=int, default=128,
                   help="cache slots a row added in one of the profile's variants (what a slot costs)")
    p.add_argument("--before", default=None, metavar="REV",
                   help="also time the decoder of git revision REV (e.g. the commit before the engine)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contexts", default=None,
                   help="--device-decode: the engine's context(s), comma-separated (default: prompt + new tokens; "
                        "a server's is the model's max_seq_len)")
    p.add_argument("--smoke", action="store_true", help="--device-decode at a toy shape")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.worker:
        worker(Path(args.workdir))
        return 0
    args.batches = [int(x) for x in (args.batches or ("1,8,64" if args.device_decode else "1,8")).split(",")]
    args.rounds = args.rounds or (3 if args.device_decode else 7)
    args.torch_threads = [int(x) for x in args.torch_threads.split(",")]
    if not args.device_decode:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = bench_device(args) if args.device_decode else bench_transformers(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
