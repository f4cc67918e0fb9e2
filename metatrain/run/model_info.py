"""A run config's model sized without allocating it (`metatrain model-info`).

Closed-form parameter counts (checked against `jax.eval_shape` of the real module),
training FLOPs per token at the configured `trainer.seq_len`, and the parameter + AdamW
state one device holds on the configured mesh. Works for presets far larger than this
machine (7B) in a second or two.

`model_info` returns a JSON-ready dict; `format_model_info` prints it as text and
`model_info_json` as one JSON object. jax, flax and the model are imported when
`model_info` runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from metatrain.config import RunConfig


def model_info(config: RunConfig, num_devices: int | None = None) -> dict[str, Any]:
    """Sizes of `config.model` laid over `config.mesh` (see the module docstring).

    Args:
        config: a `RunConfig`.
        num_devices: devices for the mesh; None: the mesh's fixed size, or this machine's
            devices when an axis is -1.

    Returns:
        A JSON-ready dict.

    Raises:
        UserError: the model cannot be laid over the mesh (`check_fits`).
    """
    import flax.linen as nn
    import jax

    from metatrain.models import init_params_shape
    from metatrain.parallel.mesh import MESH_AXES, check_fits, param_bytes_per_device

    model, mesh = config.model, config.mesh
    if num_devices is None:
        sizes = [getattr(mesh, a) for a in MESH_AXES]
        num_devices = jax.device_count() if -1 in sizes else math.prod(sizes) * mesh.dcn_data
    axis_sizes = mesh.axis_sizes(num_devices)
    check_fits(model, axis_sizes, config.trainer.batch_size, mesh.rules, grad_accum=config.trainer.grad_accum)

    abstract = init_params_shape(model)
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract)))
    if counted != model.num_params:
        raise AssertionError(
            f"closed-form count {model.num_params} != eval_shape count {counted}: "
            f"ModelConfig.num_params is out of date with the Transformer"
        )
    param_bytes = param_bytes_per_device(abstract, axis_sizes, mesh.rules)
    seq_len = config.trainer.seq_len
    return {
        "params": {
            "total": model.num_params,
            "embedding": model.num_embedding_params,
            "non_embedding": model.num_non_embedding_params,
        },
        "seq_len": seq_len,
        "flops_per_token": model.flops_per_token(seq_len),
        "forward_flops_per_token": model.forward_flops_per_token(seq_len),
        "tokens_per_step": config.tokens_per_step,
        "flops_per_step": config.flops_per_step,
        "mesh": {"devices": num_devices, **axis_sizes},
        "per_device_bytes": {
            "params": param_bytes,
            # AdamW keeps two moments of each parameter, in the parameter dtype.
            "optimizer": 2 * param_bytes,
            "total": 3 * param_bytes,
        },
    }


def _count(n: int) -> str:
    """`n` with thousands separators, and in B/M/K when it is that large."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    """`n` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_model_info(config: RunConfig, info: dict[str, Any]) -> str:
    """`info` (from `model_info(config)`) as the lines `metatrain model-info` prints."""
    m = config.model
    mesh = info["mesh"]
    mem = info["per_device_bytes"]
    lines = [
        f"model: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
        f"n_kv_heads={m.n_kv_heads} head_dim={m.head_dim} d_ff={m.d_ff} vocab={m.vocab_size} "
        f"tied={m.tie_embeddings} remat={m.remat}",
        f"parameters: total {_count(info['params']['total'])}",
        f"            embedding {_count(info['params']['embedding'])}, "
        f"non-embedding {_count(info['params']['non_embedding'])}",
        f"FLOPs/token at seq_len {info['seq_len']}: {info['flops_per_token']:.4g} train "
        f"({info['forward_flops_per_token']:.4g} forward)",
        f"per step: {info['tokens_per_step']:,} tokens, {info['flops_per_step']:.4g} FLOPs",
        f"mesh: {mesh['devices']} devices, data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}",
        f"per device: params {_bytes(mem['params'])} + AdamW state {_bytes(mem['optimizer'])} "
        f"= {_bytes(mem['total'])} (activations not included)",
    ]
    return "\n".join(lines)


def model_info_json(info: dict[str, Any]) -> str:
    """`info` as one line of JSON (NumPy scalars as numbers, anything else as text)."""
    return json.dumps(info, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
