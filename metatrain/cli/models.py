"""`metatrain model-info --config FILE [--set k=v ...] [--devices N] [--json]`.

Sizes a model without allocating it: closed-form parameter counts (checked against
`jax.eval_shape` of the real module), training FLOPs per token at the configured
`trainer.seq_len`, and the parameter + AdamW state one device holds on the configured
mesh. Works for presets far larger than this machine (7B) in a second or two.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# jax, flax and the model are imported inside the command: every `metatrain` invocation
# imports this module to register the subcommand, and should not pay for them.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model-info",
        help="parameter counts, FLOPs per token and per-device memory of a config's model",
        description=(
            "Print a model's parameter counts (total, embedding, non-embedding), its training "
            "FLOPs per token at trainer.seq_len, and the parameters + optimizer state each "
            "device holds on the configured mesh. Nothing is allocated."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--devices", type=int, default=None,
                   help="device count to lay the mesh over (default: the mesh's fixed size, "
                        "or this machine's devices when an axis is -1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_model_info)


def model_info(config: Any, num_devices: int | None = None) -> dict[str, Any]:
    """Sizes of `config.model` laid over `config.mesh` (see module docstring).

    Args:
        config: a `RunConfig`.
        num_devices: devices for the mesh; None as described for `--devices`.

    Returns:
        A JSON-ready dict.
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
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_model_info(config: Any, info: dict[str, Any]) -> str:
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


def run_model_info(args: argparse.Namespace) -> int:
    from metatrain.config import load_config

    config = load_config(args.config, args.overrides)
    info = model_info(config, args.devices)
    if args.json:
        print(json.dumps(info, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))
    else:
        print(format_model_info(config, info))
    return 0
