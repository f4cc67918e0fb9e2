"""metatrain parameters <-> Hugging Face Llama tensors, and `ModelConfig` <-> `LlamaConfig`.

The one home of the mapping; pure functions of NumPy arrays and plain dicts (no torch,
no transformers: `export.py` and `importer.py` do the files). Every tensor moves by
reshapes and transposes only, so a round trip is bit-exact.

    metatrain (scan_layers: [L, ...] leading)    Hugging Face LlamaForCausalLM, layer i
    embedding/table           [V, D]             model.embed_tokens.weight            [V, D]
    attention_norm/scale      [D]                model.layers.i.input_layernorm.weight [D]
    attention/query           [D, N, H]          ...self_attn.q_proj.weight     [N*H, D]
    attention/key, value      [D, K, H]          ...self_attn.k_proj/v_proj.weight [K*H, D]
    attention/out             [N, H, D]          ...self_attn.o_proj.weight     [D, N*H]
    mlp_norm/scale            [D]                ...post_attention_layernorm.weight [D]
    mlp/gate, up              [D, F]             ...mlp.gate_proj/up_proj.weight  [F, D]
    mlp/down                  [F, D]             ...mlp.down_proj.weight          [D, F]
    final_norm/scale          [D]                model.norm.weight                  [D]
    output_projection         [D, V] (untied)    lm_head.weight                  [V, D]

Why no other change is needed: metatrain's RoPE rotates the two halves of each head
(`rotate_half`, `metatrain.layers.rotary`) with HF's frequencies `theta^(-2i/H)`, so the
query and key rows are *not* permuted (the permutation of Meta's original checkpoints
is for interleaved pairs). Both scale scores by `H^-0.5`, compute RMSNorm as
`x * rsqrt(mean(x^2) + eps) * scale` (scale itself, not `1 + scale`), use SwiGLU
`down(silu(gate) * up)` and no biases, and neither scales the embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from metatrain.errors import UserError
from metatrain.models.config import ModelConfig

#: `ModelConfig` fields with a Llama equivalent (the architecture).
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
    "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings",
)
#: `ModelConfig` fields that say how metatrain computes, not what: they do not travel.
COMPUTE_FIELDS: tuple[str, ...] = ("dtype", "param_dtype", "remat", "scan_layers", "attention")

#: Hugging Face `model_type`s whose checkpoints are Llama's layout and function.
LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral")

#: The largest value of each size in a config.json that `metatrain import` accepts: far
#: above any released Llama-family model (Llama 3.1 405B: 126 layers, 16,384 wide, a
#: 128,256 vocabulary, 131,072 positions), and small enough that a typo or a hostile file
#: is refused before anything of that size is allocated (RoPE tables, caches, names).
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 20,
}

#: Tensors of block i, under `model.layers.i.` (see the table above).
_LAYER_TENSORS: tuple[str, ...] = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
#: Buffers some older checkpoints store; recomputed from the config, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# -- config ----------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """Refuse a model that `LlamaForCausalLM` cannot compute exactly, naming the field.

    Raises:
        UserError: a `ModelConfig` field this converter does not know has a non-default
            value (a newer metatrain feature Llama may lack), or d_model is not
            n_heads * k (Hugging Face's `LlamaConfig` refuses that).
    """
    if config.parametrization == "mup":
        raise UserError(
            f"model.parametrization=mup multiplies the logits by mup_base_width/d_model = "
            f"{1 / config.mup_width_multiplier:g}, which LlamaForCausalLM has no setting for (and with tied "
            "embeddings no weight can absorb it: the table is also the input embedding); this run cannot be "
            "exported as LlamaForCausalLM"
        )
    for field in dataclasses.fields(config):
        if field.name in ARCHITECTURE_FIELDS or field.name in COMPUTE_FIELDS or field.name == "mup_base_width":
            continue  # mup_base_width is unused under "standard" (and "mup" is refused above)
        value = getattr(config, field.name)
        if value != field.default:
            raise UserError(
                f"model.{field.name}={value!r} has no equivalent in a Hugging Face Llama model "
                f"(only the default {field.default!r} does); this run cannot be exported "
                "as LlamaForCausalLM"
            )
    if config.d_model % config.n_heads:
        raise UserError(
            f"model.n_heads={config.n_heads} does not divide model.d_model={config.d_model}; Hugging "
            "Face's LlamaConfig requires hidden_size to be a multiple of num_attention_heads, so this "
            "run cannot be exported as LlamaForCausalLM"
        )


def llama_config_kwargs(config: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int | None) -> dict[str, Any]:
    """Keyword arguments of `transformers.LlamaConfig` for `config` (call `check_exportable` first).

    `rope_theta` is given the legacy way, which every transformers version reads
    (5.x moves it into `rope_parameters` itself).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def _refuse(source: str, key: str, value: Any, why: str) -> UserError:
    return UserError(f"{source}: {key}={value!r} {why}; metatrain cannot represent this model exactly, "
                     "so it is not imported")


def _rope_theta(hf: Mapping[str, Any], source: str) -> float:
    """The RoPE base of a config dict of any transformers version; refuses any scaling."""
    scaling = hf.get("rope_scaling")
    if scaling:  # transformers 4.x (5.x folds it into rope_parameters)
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
        if kind != "default":
            raise _refuse(source, "rope_scaling", scaling, "rescales RoPE frequencies (metatrain has plain RoPE only)")
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or "full_attention" in params:
        raise _refuse(source, "rope_parameters", params, "is per layer type (metatrain has one RoPE for all layers)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _refuse(source, "rope_parameters.rope_type", kind, "rescales RoPE frequencies (metatrain has plain RoPE only)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise _refuse(source, f"rope_parameters.{extra[0]}", params[extra[0]], "changes RoPE (metatrain has plain RoPE only)")
    partial = hf.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise _refuse(source, "partial_rotary_factor", partial, "rotates part of each head (metatrain rotates all of it)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UserError(f"{source} names no rope_theta (neither at the top level nor in rope_parameters)")
    return float(theta)


def check_llama_sizes(hf: Mapping[str, Any], *, source: str = "config.json") -> None:
    """Refuse a config.json size (`SIZE_LIMITS`) that is not a whole number from 1 to its
    limit, before anything is built from it. Sizes the file leaves out are not checked
    (transformers fills in its defaults).

    Raises:
        UserError: the first such size, named, with its limit.
    """
    for key, limit in SIZE_LIMITS.items():
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{source}: {key}={value!r} is not a whole number >= 1; correct config.json")
        if value > limit:
            raise UserError(f"{source}: {key}={value!r} is above {limit:,}, the most metatrain imports (no "
                            "Llama-family model has that many); correct config.json")


def model_fields_from_llama(hf: Mapping[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """`ModelConfig` architecture fields (`ARCHITECTURE_FIELDS`) of a Llama-family config dict.

    Args:
        hf: `PretrainedConfig.to_dict()` of the checkpoint (defaults filled in by the
            installed transformers), or the raw config.json.
        source: the file, for messages.

    Raises:
        UserError: a field metatrain cannot represent exactly (model type, activation,
            biases, RoPE scaling, sliding window, quantisation), named.
    """
    model_type = hf.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise _refuse(source, "model_type", model_type, f"is not a Llama-family model ({', '.join(LLAMA_FAMILY)})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(source, "hidden_act", act, "is not SiLU (metatrain's MLP is SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(source, key, hf[key], "adds biases (metatrain's projections have none)")
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:  # a window as long as the model: full attention
        raise _refuse(source, "sliding_window", hf["sliding_window"], "limits attention to a window (metatrain attends to "
                      "the whole document)")
    if hf.get("quantization_config"):
        raise _refuse(source, "quantization_config", "...", "holds quantised weights; import the unquantised checkpoint")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    return {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": hidden,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "d_ff": int(hf["intermediate_size"]),
        "max_seq_len": int(hf["max_position_embeddings"]),
        "rope_theta": _rope_theta(hf, source),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


# -- tensors ---------------------------------------------------------------------------


def _layer_to_hf(layer: Mapping[str, Mapping[str, np.ndarray]], config: ModelConfig) -> dict[str, np.ndarray]:
    """One block's parameters -> its HF tensors (suffixes of `model.layers.i.`)."""
    D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    attn, mlp = layer["attention"], layer["mlp"]
    return {
        "input_layernorm.weight": layer["attention_norm"]["scale"],
        "self_attn.q_proj.weight": attn["query"].reshape(D, N * H).T,
        "self_attn.k_proj.weight": attn["key"].reshape(D, K * H).T,
        "self_attn.v_proj.weight": attn["value"].reshape(D, K * H).T,
        "self_attn.o_proj.weight": attn["out"].reshape(N * H, D).T,
        "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
        "mlp.gate_proj.weight": mlp["gate"].T,
        "mlp.up_proj.weight": mlp["up"].T,
        "mlp.down_proj.weight": mlp["down"].T,
    }


def _layer_from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, dict[str, np.ndarray]]:
    """HF tensors of one block (suffix -> array) -> its metatrain parameters."""
    D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    t = tensors
    return {
        "attention_norm": {"scale": t["input_layernorm.weight"]},
        "attention": {
            "query": t["self_attn.q_proj.weight"].T.reshape(D, N, H),
            "key": t["self_attn.k_proj.weight"].T.reshape(D, K, H),
            "value": t["self_attn.v_proj.weight"].T.reshape(D, K, H),
            "out": t["self_attn.o_proj.weight"].T.reshape(N, H, D),
        },
        "mlp_norm": {"scale": t["post_attention_layernorm.weight"]},
        "mlp": {
            "gate": t["mlp.gate_proj.weight"].T,
            "up": t["mlp.up_proj.weight"].T,
            "down": t["mlp.down_proj.weight"].T,
        },
    }


def _layers_of(params: Mapping[str, Any], config: ModelConfig) -> list[Mapping[str, Any]]:
    """Per-block parameter dicts, from a stacked (`layers`, [L, ...]) or unrolled tree."""
    if config.scan_layers:
        stacked = params["layers"]
        return [
            {module: {name: np.asarray(a)[i] for name, a in leaves.items()} for module, leaves in stacked.items()}
            for i in range(config.n_layers)
        ]
    return [params[f"layers_{i}"] for i in range(config.n_layers)]


def to_hf_tensors(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """metatrain parameters (unboxed) -> `LlamaForCausalLM` state-dict arrays, same dtype.

    Tied models have no `lm_head.weight` (as transformers saves them). Arrays are made
    C-contiguous (transposes copy), ready for safetensors.
    """
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(params["embedding"]["table"])}
    for i, layer in enumerate(_layers_of(params, config)):
        layer = {m: {n: np.asarray(a) for n, a in leaves.items()} for m, leaves in layer.items()}
        for suffix, array in _layer_to_hf(layer, config).items():
            tensors[f"model.layers.{i}.{suffix}"] = array
    tensors["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["output_projection"]).T
    return {name: np.ascontiguousarray(a) for name, a in tensors.items()}


def expected_hf_names(config: ModelConfig) -> list[str]:
    """Every tensor name a `LlamaForCausalLM` checkpoint of `config` holds."""
    return list(hf_tensor_shapes(config))


def check_hf_names(names: list[str], config: ModelConfig, *, source: str) -> None:
    """Refuse a checkpoint whose tensors are not exactly those of `config` (a bias, a
    missing layer, an extra norm...), naming the first offending tensor.

    A tied model may also carry `lm_head.weight` (some exporters write it); it is ignored.
    """
    expected = set(expected_hf_names(config))
    present = {n for n in names if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings:
        present.discard("lm_head.weight")
    extra, missing = sorted(present - expected), sorted(expected - present)
    if extra:
        raise UserError(f"{source}: tensor {extra[0]} has no place in metatrain's model "
                        f"({len(extra)} such tensors); metatrain cannot represent this checkpoint exactly")
    if missing:
        raise UserError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing) for the model its "
                        "config.json describes")


def from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, Any]:
    """`LlamaForCausalLM` state-dict arrays -> metatrain parameters laid out for `config`
    (stacked `layers` when `config.scan_layers`, else `layers_0..`), same dtype.

    `config.vocab_size` must be the rows of `model.embed_tokens.weight`.

    Raises:
        UserError: a tensor's shape is not the one `config` needs.
    """
    for name, want in hf_tensor_shapes(config).items():
        got = tuple(tensors[name].shape)
        if got != want:
            raise UserError(f"tensor {name} has shape {list(got)}, but config.json implies {list(want)}")
    layers = []
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        layers.append(_layer_from_hf({s: np.asarray(tensors[prefix + s]) for s in _LAYER_TENSORS}, config))
    params: dict[str, Any] = {
        "embedding": {"table": np.asarray(tensors["model.embed_tokens.weight"])},
        "final_norm": {"scale": np.asarray(tensors["model.norm.weight"])},
    }
    if config.scan_layers:
        params["layers"] = {
            module: {name: np.stack([layer[module][name] for layer in layers]) for name in leaves}
            for module, leaves in layers[0].items()
        }
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    if not config.tie_embeddings:
        params["output_projection"] = np.ascontiguousarray(np.asarray(tensors["lm_head.weight"]).T)
    return params


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a `LlamaForCausalLM` checkpoint of `config`."""
    V, D, N, K, H, F = (config.vocab_size, config.d_model, config.n_heads, config.n_kv_heads,
                        config.head_dim, config.d_ff)
    per_layer = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (N * H, D), "self_attn.k_proj.weight": (K * H, D),
        "self_attn.v_proj.weight": (K * H, D), "self_attn.o_proj.weight": (D, N * H),
        "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    shapes.update({f"model.layers.{i}.{s}": shape for i in range(config.n_layers) for s, shape in per_layer.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes
