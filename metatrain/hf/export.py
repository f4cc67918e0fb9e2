"""`metatrain export`: a run's checkpoint as a Hugging Face `LlamaForCausalLM` directory.

    OUT/config.json                      LlamaConfig (serialized by transformers itself)
    OUT/generation_config.json           BOS, EOS, PAD
    OUT/model.safetensors                weights; above --max-shard-size, transformers'
    OUT/model-0000i-of-0000n.safetensors   sharded layout with model.safetensors.index.json
    OUT/tokenizer.model                  the run's SentencePiece model (for `metatrain import`)
    OUT/tokenizer.json, tokenizer_config.json   the same tokenizer for `AutoTokenizer`
    OUT/tags.yaml, OUT/mantra.txt        the run's tag registry and mantra
    OUT/metatrain.json                   mantra policy, file names, BOS/EOS/PAD ids: what
                                           `metatrain.hf.logits_processor` reads
    OUT/README.md                        model card: config, tokens per role, losses, grammar

`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it
with no custom code. Tags are special tokens of the tokenizer, and `split_special_tokens`
is on in its config, so a literal `<AI>` in text encodes as characters, never as the tag
(docs/design.md section 2); the tag ids are reached with `convert_tokens_to_ids`. The tokenizer
is checked against SentencePiece before the directory is published.

The directory is built beside OUT and renamed into place when complete. In a bucket
(`--out gs://bucket/export`), where a prefix cannot be renamed, it is built in place:
every file is written as one object, `config.json` (what transformers reads first, and
what marks the export complete) last, and what a failed export wrote is removed. The work
directory may be in a bucket too (`--workdir gs://...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import yaml

from metatrain.errors import FaultError, UserError, describe_cause
from metatrain.hf.convert import check_exportable, llama_config_kwargs, to_hf_tensors
from metatrain.io.outputs import built_dir
from metatrain.io.storage import StoragePath, absolute, as_path, is_remote
from metatrain.models.config import ModelConfig
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.run.checkpoint import split_step_dir
from metatrain.run.layout import METRICS_FILE, refuse_inside_checkpoints
from metatrain.run.reader import LoadedCheckpoint, load_checkpoint
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.registry import TagRegistry

ExportDtype = Literal["float32", "bfloat16"]
EXPORT_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
#: transformers' own default shard size for `save_pretrained`.
DEFAULT_MAX_SHARD_SIZE = "5GB"
_META_SPACE = "\u2581"
#: Texts the exported tokenizer must encode exactly as SentencePiece does (with the mantra).
_TOKENIZER_CHECK_TEXTS: tuple[str, ...] = (
    "Hello, world! The study found a 23% reduction.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\n\nand\r\nCRLF",
    "naïve café – “quotes” — 日本語のテキスト, emoji 🙂👍🏽, combining e\u0301",
    "literal tags: <AI> </AI> <thinking></thinking> <|good|> <s> </s> <unk> <0x41>",
    "digits 1234567890 and 3.14159",
)


def require_hf() -> None:
    """Raise a `UserError` naming the extra when torch, transformers or safetensors is missing."""
    missing = []
    for module in ("torch", "transformers", "safetensors", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"Hugging Face interop needs {', '.join(missing)}; install them with "
            "`pip install 'metatrain[hf]'`"
        )


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_workdir` wrote.

    Attributes:
        out: the exported directory (an `epath.Path` in a bucket).
        step: the checkpoint's training step.
        dtype: dtype of the saved weights.
        num_params: parameters in the model.
        weight_files: the safetensors files (one, or the shards).
    """

    out: StoragePath
    step: int
    dtype: str
    num_params: int
    weight_files: tuple[str, ...]

    def summary(self) -> str:
        """One line for the command line (for a bucket, how to load it: transformers cannot
        read gs://)."""
        files = self.weight_files[0] if len(self.weight_files) == 1 else f"{len(self.weight_files)} shards"
        if is_remote(str(self.out)):  # transformers reads local directories (and the Hub), not buckets
            load = "copy it to a local directory and load that with transformers' AutoModelForCausalLM.from_pretrained"
        else:
            load = f"load it with transformers' AutoModelForCausalLM.from_pretrained({str(self.out)!r})"
        return f"wrote {self.out}: step {self.step}, {self.num_params:,} parameters in {self.dtype} ({files}); {load}"


def export_workdir(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: ExportDtype = "float32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportReport:
    """Writes `out`: the run in `workdir` (its newest intact checkpoint, or `step`) as a
    Hugging Face Llama directory (see the module docstring).

    Args:
        workdir: a `metatrain train` work directory (only read), local or in a bucket.
        out: the directory to create; must not exist, or be empty. In a bucket it is
            built in place, with `config.json` written last.
        step: that checkpoint; None: the newest that restores.
        dtype: dtype of the saved weights (parameters are cast; float32 is exact for
            float32 and bfloat16 parameters).
        max_shard_size: above this the weights are sharded (e.g. "5GB", or bytes).

    Raises:
        UserError: the extra is not installed; `out` is not empty or lies inside a run's
            checkpoints; no such checkpoint; the model has a feature Llama lacks (the
            field is named).
        FaultError: the checkpoint does not restore, or `out` cannot be written.
    """
    require_hf()
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    refuse_inside_checkpoints(out, "--out")
    workdir = absolute(workdir)
    with built_dir(out, what="the export") as staging:
        loaded = load_checkpoint(workdir, step=step)
        config = loaded.model_config
        check_exportable(config)
        tensors = to_hf_tensors(jax.device_get(loaded.params), config)
        encoder = loaded.encoder
        pad_id = pad_id_of(encoder)
        model_files = _model_config_files(config, encoder, pad_id, dtype)
        (staging / "generation_config.json").write_text(model_files["generation_config.json"], encoding="utf-8")
        files = _write_weights(staging, tensors, dtype, max_shard_size)
        _write_tokenizer(staging, encoder, config.max_seq_len, pad_id)
        (staging / "tags.yaml").write_bytes(as_path(encoder.grammar.registry.source).read_bytes())
        (staging / "mantra.txt").write_text(encoder.mantra, encoding="utf-8")
        (staging / "metatrain.json").write_text(json.dumps(_metatrain_info(encoder, pad_id), indent=1) + "\n")
        card = model_card(loaded, loaded.config, run_metrics(workdir, loaded.step, loaded.config), dtype)
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / "config.json").write_text(model_files["config.json"], encoding="utf-8")  # last: complete
    return ExportReport(absolute(out), loaded.step, dtype, config.num_params, files)


# -- files -----------------------------------------------------------------------------


def _model_config_files(config: ModelConfig, encoder: Encoder, pad_id: int, dtype: str) -> dict[str, str]:
    """The text of config.json (its pad id only when the tokenizer has a PAD piece:
    transformers makes it the embedding's `padding_idx`) and generation_config.json, as
    transformers' `save_pretrained` writes them (made in memory, so they can be written
    anywhere, and config.json last)."""
    from transformers import GenerationConfig, LlamaConfig

    real_pad = encoder.pad_id if encoder.pad_id >= 0 else None
    kwargs = llama_config_kwargs(config, bos_id=encoder.bos_id, eos_id=encoder.eos_id, pad_id=real_pad)
    generation = GenerationConfig(bos_token_id=encoder.bos_id, eos_token_id=encoder.eos_id, pad_token_id=pad_id)
    return {"config.json": LlamaConfig(**kwargs, dtype=dtype).to_json_string(use_diff=True),
            "generation_config.json": generation.to_json_string(use_diff=True)}


def _to_torch(array: np.ndarray, dtype: str):
    import torch

    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch cannot read directly
        tensor = torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    else:
        with warnings.catch_warnings():  # read-only arrays from JAX: torch never writes to them here
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    return tensor.to(getattr(torch, dtype)).contiguous()


def _write_weights(out: StoragePath, tensors: dict[str, np.ndarray], dtype: str,
                   max_shard_size: int | str) -> tuple[str, ...]:
    """safetensors files in transformers' layout: one file, or shards and their index.
    In a bucket each file is serialized in memory and written as one object."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save, save_file

    state = {name: _to_torch(array, dtype) for name, array in tensors.items()}
    try:
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size {max_shard_size!r}: {e} (give bytes, or a size such as 5GB)") from None
    mode = 0o666 & ~_umask()
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state[name] for name in names}
        if is_remote(str(out)):
            (out / filename).write_bytes(save(shard, metadata={"format": "pt"}))
            continue
        save_file(shard, out / filename, metadata={"format": "pt"})
        (out / filename).chmod(mode)  # safetensors creates files readable by their owner only
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return tuple(split.filename_to_tensors)


def _write_tokenizer(out: StoragePath, encoder: Encoder, max_length: int, pad_id: int) -> None:
    """tokenizer.model, and the `tokenizers` conversion transformers makes of it, with every
    tag a special token, BOS prepended (as in training documents) and special tokens split.

    transformers reads and writes tokenizers in local directories only, so for an `out`
    in a bucket the tokenizer is converted and checked in a local scratch directory and
    each file it saved is written into `out` as one object.

    Raises:
        UserError: the installed transformers converts the model into a tokenizer that
            encodes some text differently from SentencePiece (named).
    """
    if not is_remote(str(out)):
        _build_tokenizer(out, encoder, max_length, pad_id)
        return
    with tempfile.TemporaryDirectory(prefix="metatrain-tokenizer-") as scratch:
        _build_tokenizer(Path(scratch), encoder, max_length, pad_id)
        for path in sorted(Path(scratch).iterdir()):
            (out / path.name).write_bytes(path.read_bytes())


def _build_tokenizer(out: Path, encoder: Encoder, max_length: int, pad_id: int) -> None:
    """`_write_tokenizer` into a local directory."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    (out / "tokenizer.model").write_bytes(as_path(encoder.tokenizer.source).read_bytes())
    tok = AutoTokenizer.from_pretrained(out, split_special_tokens=True, model_max_length=max_length)
    specials = [t for t in encoder.tag_ids if t not in tok.all_special_tokens]
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    bos = tok.convert_ids_to_tokens(encoder.bos_id)
    tok.pad_token = tok.convert_ids_to_tokens(pad_id)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, encoder.bos_id)]
    )
    tok.save_pretrained(out)
    check_tokenizer(out, encoder)


def check_tokenizer(directory: Path, encoder: Encoder) -> None:
    """The saved tokenizer gives SentencePiece's ids on tricky texts and the mantra, and
    every tag (and BOS/EOS) is one special token with its metatrain id.

    Raises:
        UserError: a text or a tag differs (the first is named).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    special = set(tok.all_special_ids)
    for name, token_id in {**encoder.tag_ids, "BOS": encoder.bos_id, "EOS": encoder.eos_id}.items():
        piece = tok.convert_ids_to_tokens(token_id)
        if token_id not in special or (name in encoder.tag_ids and piece != name):
            raise UserError(f"exported tokenizer: id {token_id} ({name}) is {piece!r}, not a special token of its "
                            "own; the installed transformers converts this SentencePiece model differently")
    texts = [t for t in (*_TOKENIZER_CHECK_TEXTS, encoder.mantra) if _META_SPACE not in t]
    expected = encoder.tokenizer.encode_texts(texts)
    for text, want in zip(texts, expected):
        got = tok.encode(text, add_special_tokens=False)
        if got != list(want):
            raise UserError(
                f"exported tokenizer encodes {text[:60]!r} as {got[:12]}..., SentencePiece as {list(want)[:12]}...; "
                "the installed transformers converts this SentencePiece model differently, so it is not exported"
            )
    if tok.encode("x")[:1] != [encoder.bos_id]:
        raise UserError("exported tokenizer does not prepend BOS")


def _metatrain_info(encoder: Encoder, pad_id: int) -> dict[str, Any]:
    """metatrain.json: what `metatrain.hf.logits_processor` reads to rebuild the encoder."""
    return {
        "mantra_policy": encoder.mantra_policy,
        "mantra_file": "mantra.txt",
        "tags": "tags.yaml",
        "tokenizer": "tokenizer.model",
        "bos_id": encoder.bos_id,
        "eos_id": encoder.eos_id,
        "pad_id": pad_id,
    }


def pad_id_of(encoder: Encoder) -> int:
    """The id batched prompts are padded with: the tokenizer's PAD, else `<unk>` (which
    byte fallback never produces from text), else EOS."""
    for candidate in (encoder.pad_id, encoder.tokenizer.unk_id):
        if candidate >= 0:
            return candidate
    return encoder.eos_id


# -- the model card --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """What `metrics.jsonl` says about a run up to a step.

    Attributes:
        tokens: tokens of each role trained on (targets, padding excluded), summed over
            every logged step up to the step.
        train: the last training record at or before the step (losses of its window).
        eval: the last evaluation record at or before the step.
    """

    tokens: dict[str, int]
    train: dict[str, Any]
    eval: dict[str, Any]


def run_metrics(workdir: str | os.PathLike, step: int, config: dict) -> RunMetrics | None:
    """`read_metrics` of the run in `workdir` up to `step`, with the tokens of the run it
    branched from (`checkpoint.branch_from`) up to the branch point: a cooldown branch was
    trained on the stable run's tokens too (one level: the stable run's own origin is not
    followed)."""
    metrics = read_metrics(as_path(workdir) / METRICS_FILE, step)
    source = (config.get("checkpoint") or {}).get("branch_from")
    found = split_step_dir(as_path(source), must_exist=False) if source and metrics is not None else None
    before = read_metrics(found[0] / METRICS_FILE, found[1]) if found is not None else None
    if before is not None:
        metrics = dataclasses.replace(metrics, tokens={r: metrics.tokens[r] + before.tokens[r] for r in metrics.tokens})
    return metrics


def read_metrics(path: str | os.PathLike, step: int) -> RunMetrics | None:
    """Tokens per role and the last losses up to `step` from a run's `metrics.jsonl` (local
    or in a bucket), None when there is no such file. A step logged twice (a run resumed from an earlier
    checkpoint) counts once, its last record."""
    path = as_path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FaultError(f"cannot read {path}: {describe_cause(e)}") from None
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
            continue
        if "eval/loss" in record:
            evals[record["step"]] = record
        elif f"tokens/{LOSS_ROLE_LABELS[0]}" in record:
            train[record["step"]] = record
    tokens = {role: sum(int(r.get(f"tokens/{role}") or 0) for r in train.values()) for role in LOSS_ROLE_LABELS}
    last = lambda records: records[max(records)] if records else {}  # noqa: E731
    return RunMetrics(tokens, last(train), last(evals))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _grammar_lines(registry: TagRegistry, tag_ids: dict[str, int]) -> list[str]:
    """The registry as a Markdown table (a `|` inside a tag is escaped for the table)."""
    def cell(tag: str) -> str:
        return "`" + tag.replace("|", "\\|") + "`"

    lines = [f"Documents start and end in mode `{registry.base_mode}`; modes: "
             + ", ".join(f"`{m}`" for m in registry.modes) + ".", "",
             "| tag | id | meaning |", "| --- | --- | --- |"]
    lines += [f"| {cell(t.tag)} | {tag_ids[t.tag]} | mode `{t.source}` → `{t.target}` |" for t in registry.transitions]
    allowed = ", ".join(f"`{m}`" for m in registry.thinking_modes)
    lines.append(f"| {cell(registry.thinking_open)} | {tag_ids[registry.thinking_open]} | opens a thinking block "
                 f"(in {allowed}; nothing nests inside) |")
    lines.append(f"| {cell(registry.thinking_close)} | {tag_ids[registry.thinking_close]} | closes it, back to "
                 "the mode it opened in |")
    lines += [f"| {cell(tag)} | {tag_ids[tag]} | control `{name}`: legal anywhere outside thinking |"
              for name, tag in registry.controls]
    lines += [f"| {cell(tag)} | {tag_ids[tag]} | reserved: illegal everywhere for now |" for tag in registry.reserved]
    return lines


def model_card(loaded: LoadedCheckpoint, stored_config: dict, metrics: RunMetrics | None, dtype: str) -> str:
    """README.md of an export: what was trained, on how much of each role, how well, and
    the tag grammar a decoder must respect."""
    cfg, enc = loaded.model_config, loaded.encoder
    registry = enc.grammar.registry
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [metatrain, llama]", "---", "",
        f"# {loaded.path.parent.parent.name} (step {loaded.step})", "",
        f"A Llama-architecture decoder trained with metatrain (metacognitive pretraining: text interleaved "
        f"with thinking blocks, single-token tags), exported at step {loaded.step} as `LlamaForCausalLM` "
        f"weights in {dtype}. {cfg.num_params:,} parameters: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} query heads and {cfg.n_kv_heads} key/value heads of size {cfg.head_dim}, SwiGLU "
        f"width {cfg.d_ff}, vocabulary {cfg.vocab_size}, RoPE theta {cfg.rope_theta:g}, RMSNorm eps "
        f"{cfg.norm_eps:g}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings, trained with "
        f"sequences up to {cfg.max_seq_len} tokens in {cfg.dtype} compute.", "",
        "## Tokens seen per role", "",
    ]
    if metrics is None:
        lines += ["No `metrics.jsonl` in the work directory (an imported or copied run): not known.", ""]
    else:
        lines += ["| role | tokens | train loss (last window) | eval loss |", "| --- | --- | --- | --- |"]
        for role in LOSS_ROLE_LABELS:
            lines.append(f"| {role} | {metrics.tokens[role]:,} | {_fmt(metrics.train.get(f'loss/{role}'))} | "
                         f"{_fmt(metrics.eval.get(f'eval/loss/{role}'))} |")
        lines += ["", f"Total: {sum(metrics.tokens.values()):,} target tokens up to step {loaded.step} "
                  f"(last logged train step {metrics.train.get('step', '—')}, eval step "
                  f"{metrics.eval.get('step', '—')}; eval loss overall {_fmt(metrics.eval.get('eval/loss'))}).", ""]
    lines += [
        "## Tags", "",
        "Every tag is one special token. Tags are structure, never text: the saved tokenizer has "
        "`split_special_tokens=True`, so a literal `<AI>` in a string encodes as ordinary characters. "
        "Put a tag in a prompt by id: `tokenizer.convert_tokens_to_ids(\"<AI>\")`. Training documents are "
        f"`<s>` (id {enc.bos_id}) … `</s>` (id {enc.eos_id}); the tokenizer prepends `<s>`. Batched prompts are "
        f"padded with id {pad_id_of(enc)} (`generation_config.json`).", "",
        *_grammar_lines(registry, enc.tag_ids), "",
        "Plain `generate` does not enforce this grammar; metatrain's own decoder masks illegal tags.", "",
        "## Mantra", "",
        f"Thinking blocks open with the mantra (policy `{enc.mantra_policy}`), in `mantra.txt`:", "",
        *[f"    {line}" for line in enc.mantra.splitlines()], "",
        "## Differences from metatrain", "",
        "- A literal `\u2581` (U+2581) in text encodes as the word-boundary piece, as in SentencePiece itself; "
        "metatrain's encoder spells it with byte pieces. Other text encodes to the same ids.",
        "- metatrain computed activations in " + cfg.dtype + "; logits agree with metatrain's to float "
        "rounding when both run in float32.", "",
        "## Training config", "", "```yaml",
        yaml.safe_dump(stored_config, sort_keys=False, default_flow_style=None).rstrip(), "```", "",
    ]
    return "\n".join(lines)
