"""`metatrain import`: a Llama-family Hugging Face checkpoint -> a metatrain work directory.

    FROM/config.json                      -> the `model` section of OUT/config.yaml
    FROM/model*.safetensors (+ index)     -> OUT/checkpoints/0 (parameters; fresh optimizer)
    FROM/tokenizer.model (SentencePiece)  -> OUT/tokenizer.model, with every tag of the
                                             registry it lacks appended (`extend_tokenizer`)

`metatrain train --workdir OUT --set trainer.steps=N` then trains on from the imported
weights (step 0, empty Adam moments, warmup from the config). The rest of the run config
(data, loss, optimizer, trainer, compute dtypes) comes from `--config` (default: the
embedded default) and `--set`; the architecture always comes from config.json.

New tag ids follow the tokenizer's own, so every old id keeps its row; the new rows of
the embedding (and untied output projection) start as `metatrain tokenizer
resize-checkpoint` starts them: the mean of the old rows plus small noise
(`metatrain.run.create.grow_train_state`). A checkpoint whose function metatrain's
model cannot compute exactly (RoPE scaling, biases, another activation, a sliding
window, tensors the model has no place for) is refused, naming the field or tensor.

Hostile or broken inputs are refused before anything is built: only regular files inside
FROM are read (`input_file`: a weight_map entry outside it, a named pipe or a device is
named, never opened), and config.json's sizes are bounded (`check_llama_sizes`) and must
fit in the weight files present (`check_weights_hold`). OUT is built in a hidden
directory beside it (`staging_dir`) and renamed into place whole (`publish_dir`), so an
interrupted import leaves nothing under OUT for `train` to take for an empty run.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import jax.numpy as jnp
import numpy as np

from metatrain.config import RunConfig, load_config
from metatrain.data.pipeline import make_batch_iterator
from metatrain.errors import FaultError, UserError, describe_cause
from metatrain.hf.convert import (
    ARCHITECTURE_FIELDS,
    COMPUTE_FIELDS,
    LLAMA_FAMILY,
    check_hf_names,
    check_llama_sizes,
    from_hf_tensors,
    model_fields_from_llama,
)
from metatrain.hf.export import require_hf
from metatrain.io.outputs import built_dir, check_output_dir, describe_kind
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import absolute
from metatrain.models.config import ModelConfig
from metatrain.run.create import grow_train_state, host_devices, on_one_device, write_run
from metatrain.run.layout import (
    TAGS_FILE,
    TOKENIZER_FILE,
    refuse_inside_checkpoints,
)
from metatrain.run.program import build_train_program
from metatrain.run.state import TrainState
from metatrain.tokenizer.build import extend_tokenizer
from metatrain.tokenizer.registry import load_registry
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE
from metatrain.tokenizer.spm import vocab_size_of

SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What `import_checkpoint` wrote.

    Attributes:
        source: the Hugging Face directory (only read).
        out: the new work directory.
        model: the imported model's shape.
        added_tags: tags appended to the tokenizer, with their ids.
        grown: parameter leaves that gained rows for them.
    """

    source: Path
    out: Path
    model: ModelConfig
    added_tags: dict[str, int]
    grown: tuple[str, ...]

    def summary(self) -> str:
        """One line for the command line."""
        added = ", ".join(f"{t}={i}" for t, i in self.added_tags.items()) or "none"
        return (f"wrote {self.out} from {self.source}: {self.model.num_params:,} parameters, vocabulary "
                f"{self.model.vocab_size} (tags added: {added}); continue with "
                f"`metatrain train --workdir {self.out} --set trainer.steps=N`")


def source_dir(source: str | Path) -> Path:
    """`--from` as an absolute directory, its symbolic links resolved.

    Raises:
        UserError: it does not exist, is not a directory, or is a loop of symbolic links.
    """
    try:
        resolved = Path(source).resolve(strict=True)
    except FileNotFoundError:
        raise UserError(f"--from {source} does not exist; give a Hugging Face model directory") from None
    except (OSError, RuntimeError) as e:  # ELOOP (a RuntimeError before Python 3.13)
        if isinstance(e, RuntimeError) or e.errno == errno.ELOOP:
            raise UserError(f"--from {source} is a loop of symbolic links; give a Hugging Face model "
                            "directory") from None
        raise UserError(f"--from {source}: cannot open it ({describe_cause(e)})") from None
    if not resolved.is_dir():
        raise UserError(f"--from {source} is not a directory; give a Hugging Face model directory")
    return resolved


def input_file(source: Path, name: str, *, listed_in: Path | None = None) -> Path:
    """`source/name` once it is a regular file in `source`: `name` is relative and has no
    `..`, and the file (a symbolic link is followed, as in a Hugging Face cache snapshot)
    is not a named pipe, a device or a directory, which would block or never end. Nothing
    is opened.

    Args:
        source: the `--from` directory.
        name: a file name from the layout, or an entry of `listed_in`.
        listed_in: the index that names it (for the message), None for a fixed name.

    Raises:
        FileNotFoundError: no such file (the caller says what is missing).
        UserError: `name` points outside `source`, or is not a regular file.
    """
    where = f"{listed_in}: weight_map entry {name!r}" if listed_in is not None else f"--from {source}: {name!r}"
    parts = PurePosixPath(name).parts
    if not name or "\0" in name or PurePosixPath(name).is_absolute() or ".." in parts:
        raise UserError(f"{where} is not a file in --from; metatrain reads only the files of the model directory: "
                        "give the file's name relative to it")
    path = source.joinpath(*parts)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as e:
        raise UserError(f"{where}: cannot open {path} ({describe_cause(e)})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{where}: {path} is {describe_kind(mode)}, not a regular file; put the file itself there")
    return path


def read_hf_config(source: Path) -> dict[str, Any]:
    """config.json with the installed transformers' defaults filled in (Llama family only),
    its sizes checked (`check_llama_sizes`) before transformers builds anything from them.

    Raises:
        UserError: no config.json, a size out of bounds, or not a Llama-family model (its
            `model_type` is named).
    """
    try:
        path = input_file(source, "config.json")
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--from {source}: no config.json; give a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{source / 'config.json'}: cannot read it ({describe_cause(e)})") from None
    if not isinstance(raw, dict) or raw.get("model_type") not in LLAMA_FAMILY:
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(f"{path}: model_type={model_type!r} is not a Llama-family model ({', '.join(LLAMA_FAMILY)}); "
                        "metatrain cannot represent it exactly, so it is not imported")
    check_llama_sizes(raw, source=str(path))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except Exception as e:  # noqa: BLE001 - transformers' validation raises several kinds (strict dataclasses)
        raise UserError(f"{path}: transformers refuses it: {str(e).splitlines()[-1].strip() or e}") from None


def weight_files(source: Path) -> list[Path]:
    """The safetensors files of `source`: those its index names, else model.safetensors;
    each a regular file in `source` (`input_file`).

    Raises:
        UserError: no weights, an unreadable index, or an entry outside `source` or not a
            regular file (named).
    """
    try:
        index = input_file(source, SAFETENSORS_INDEX)
    except FileNotFoundError:
        index = None
    if index is None:
        try:
            return [input_file(source, SAFETENSORS_FILE)]
        except FileNotFoundError:
            raise UserError(f"--from {source}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; metatrain imports "
                            "safetensors weights only (save the model with `save_pretrained(..., "
                            "safe_serialization=True)`)") from None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: not a safetensors index ({describe_cause(e)})") from None
    files = []
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"{index}: weight_map entry {name!r} is not a file name")
        try:
            files.append(input_file(source, name, listed_in=index))
        except FileNotFoundError:
            raise UserError(f"{index}: weight_map entry {name!r} is missing from --from; give the directory with "
                            "all of its weight files") from None
    return files


def check_weights_hold(model: ModelConfig, files: Sequence[Path], *, source: Path) -> None:
    """Refuse a config.json that implies more parameters than the weight files could hold
    at 16 bits each (the narrowest unquantised dtype), before any of them is read.

    Raises:
        UserError: the parameter count and the sizes it comes from, named.
    """
    size = sum(path.stat().st_size for path in files)
    if model.num_params * 2 > size:
        raise UserError(
            f"{source}/config.json implies {model.num_params:,} parameters (vocab_size={model.vocab_size}, "
            f"hidden_size={model.d_model}, intermediate_size={model.d_ff}, num_hidden_layers={model.n_layers}, "
            f"num_attention_heads={model.n_heads}, num_key_value_heads={model.n_kv_heads}, head_dim={model.head_dim}) "
            f"but its weight files hold {size:,} bytes, at most {size // 2:,} parameters; correct config.json or "
            "give the directory with all of its weight files"
        )


def read_hf_tensors(files: Sequence[Path], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors `files` (`weight_files`) as NumPy `dtype` arrays
    (float32 holds float32, bfloat16 and float16 exactly)."""
    import torch
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name).to(torch.float32).numpy().astype(dtype, copy=False)
        except OSError as e:
            raise FaultError(f"cannot read {path}: {describe_cause(e)}") from None
        except SafetensorError as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def _base_config(config_file: Path | None, overrides: Sequence[str]) -> RunConfig:
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key.startswith("model.") and key[len("model."):] in ARCHITECTURE_FIELDS:
            raise UserError(f"--set {override}: {key} comes from the checkpoint's config.json and cannot be set on import")
    return load_config(config_file, overrides)


def _initial_data_state(config: RunConfig, tokenizer: Path, tags: Path) -> dict:
    """The data iterator's state before its first batch, as a fresh run would save it."""
    data = dataclasses.replace(config.data, tokenizer=tokenizer, tags=tags)
    tc = config.trainer
    with make_batch_iterator(data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="train") as it:
        return it.get_state()


def import_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    tags: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    noise_scale: float = DEFAULT_NOISE_SCALE,
) -> ImportReport:
    """Writes the work directory `out` from the Hugging Face directory `source`.

    Args:
        source: holds config.json, tokenizer.model and safetensors weights.
        out: the new work directory; must not exist, or be empty.
        tags: the tag registry (default: the shipped `tokenizer/tags.yaml`).
        config_file: run config the non-model sections come from (default: the embedded
            default config).
        overrides: `--set KEY=VALUE` on that config (not the model's architecture).
        seed: seed of the noise in the new tag rows.
        noise_scale: that noise's standard deviation, as a fraction of each feature's
            spread over the old rows.

    Raises:
        UserError: `out` is not empty; a file is missing; the architecture (a field or a
            tensor, named) is not one metatrain computes exactly; the tokenizer does not
            match the embedding or has a tag as an ordinary piece.
        FaultError: a file cannot be read, or `out` cannot be written.
    """
    require_hf()
    refuse_inside_checkpoints(out, "--out")
    check_output_dir(out, option="--out")
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise UserError(f"--noise-scale {noise_scale}: must be a finite number >= 0")
    source = source_dir(source)
    tags = absolute(tags) if tags is not None else DEFAULT_TAGS
    registry = load_registry(tags)
    base = _base_config(Path(config_file) if config_file is not None else None, overrides)

    fields = model_fields_from_llama(read_hf_config(source), source=str(source / "config.json"))
    compute = {name: getattr(base.model, name) for name in COMPUTE_FIELDS}
    try:
        old_model = ModelConfig(**fields, **compute)
    except UserError as e:
        raise UserError(f"{source}/config.json: {e}") from None
    files = weight_files(source)
    check_weights_hold(old_model, files, source=source)
    try:
        spm_file = input_file(source, TOKENIZER_FILE)
    except FileNotFoundError:
        raise UserError(f"--from {source}: no {TOKENIZER_FILE}; metatrain imports models with a SentencePiece "
                        "tokenizer") from None
    pieces = vocab_size_of(spm_file)
    if pieces != old_model.vocab_size:
        raise UserError(
            f"{source}/config.json: vocab_size={old_model.vocab_size} but {spm_file} has {pieces} pieces; metatrain "
            "needs one embedding row per SentencePiece piece (tags are appended after them)"
        )
    tensors = read_hf_tensors(files, np.dtype(old_model.param_dtype))
    check_hf_names(list(tensors), old_model, source=str(source))
    try:
        params = from_hf_tensors(tensors, old_model)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    del tensors

    out = absolute(out)
    with built_dir(out, what="the work directory") as staging:
        extended = extend_tokenizer(spm_file, registry, staging / TOKENIZER_FILE)
        model = dataclasses.replace(old_model, vocab_size=extended.vocab_size)
        config = _run_config(base, model, out)
        shutil.copyfile(tags, staging / TAGS_FILE)
        program = build_train_program(on_one_device(config), host_devices())
        old_state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=program.optimizer.init(params))
        state, grown = grow_train_state(
            old_state, program.abstract_state(), old_vocab_size=old_model.vocab_size,
            new_vocab_size=model.vocab_size, seed=seed, noise_scale=noise_scale,
        )
        write_run(staging, config, 0, state, _initial_data_state(config, staging / TOKENIZER_FILE, tags))
    return ImportReport(source, out, model, dict(extended.added), grown)


def _run_config(base: RunConfig, model: ModelConfig, out: Path) -> RunConfig:
    """The imported run's config: `model` from config.json, its tokenizer and tags the
    copies in `out` (where the directory will be once published)."""
    data = dataclasses.replace(base.data, tokenizer=out / TOKENIZER_FILE, tags=out / TAGS_FILE)
    try:
        return dataclasses.replace(base, model=model, data=data)
    except UserError as e:
        raise UserError(f"{e} (model.max_seq_len is config.json's max_position_embeddings; "
                        "shorten trainer.seq_len with --set)") from None
