"""The device mesh, the logical-to-mesh axis rules, and the checks that a model fits them.

Model code names the logical axes of every parameter and activation (`batch`, `seq`,
`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, `norm`); this module
owns the one table (`MeshConfig.rules`, default `DEFAULT_RULES`) that maps them onto
the mesh axes `data`, `fsdp` and `tensor`:

- `data`: pure data parallelism (parameters replicated, batch split).
- `fsdp`: batch split *and* parameters/optimizer state sharded along `embed`
  (ZeRO-3 style; XLA all-gathers a layer's weights when it needs them).
- `tensor`: Megatron-style tensor parallelism over heads, MLP hidden and vocab.

Multi-slice (several TPU slices joined by the data-centre network): `dcn_data` slices
each run the `data x fsdp x tensor` mesh over their fast interconnect, and the mesh's
`data` axis spans `dcn_data * data` (only gradients cross the slow network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from metatrain.errors import UserError
from metatrain.models.config import ModelConfig

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

#: One rule: a logical axis name and the mesh axis (or axes, or None) it is split over.
LogicalRule = tuple[str, Union[str, tuple[str, ...], None]]
LogicalRules = tuple[LogicalRule, ...]

#: Rules in priority order (flax semantics: a mesh axis is used at most once per array,
#: so `batch` claims `fsdp` for activations before `embed` could).
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("seq", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes and the logical-to-mesh rules.

    Attributes:
        data: data-parallel size within a slice; -1 absorbs the devices left over.
        fsdp: fully-sharded data-parallel size; -1 absorbs the rest.
        tensor: tensor-parallel size; -1 absorbs the rest.
        dcn_data: number of slices (multi-slice data parallelism over the network).
        rules: logical axis -> mesh axis rules, highest priority first; in YAML a list
            of pairs such as `[batch, [data, fsdp]]`, `[embed, fsdp]`, `[seq, null]`.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    rules: LogicalRules = DEFAULT_RULES

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            size = getattr(self, name)
            if size != -1 and size < 1:
                raise UserError(f"{name}={size}: a mesh axis size must be >= 1, or -1 to absorb the remaining devices")
        absorbing = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(absorbing) > 1:
            raise UserError(
                f"{' and '.join(absorbing)} are both -1; only one mesh axis may absorb the remaining devices"
            )
        if self.dcn_data < 1:
            raise UserError(f"dcn_data={self.dcn_data}: the number of slices must be >= 1")
        _check_rules(self.rules)

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """The size of every mesh axis for `num_devices` devices (data includes dcn_data).

        Raises:
            UserError: if the sizes cannot multiply to the device count.
        """
        if num_devices % self.dcn_data:
            raise UserError(
                f"mesh.dcn_data={self.dcn_data} slices do not divide the {num_devices} devices"
            )
        per_slice = num_devices // self.dcn_data
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fixed = math.prod(s for s in sizes.values() if s != -1)
        shown = " x ".join(f"{n}={s}" for n, s in sizes.items())
        absorbing = [name for name, s in sizes.items() if s == -1]
        if absorbing:
            if per_slice % fixed:
                raise UserError(
                    f"mesh {shown}: the fixed axes ({fixed} devices) do not divide the "
                    f"{per_slice} devices per slice, so mesh.{absorbing[0]} cannot absorb the rest"
                )
            sizes[absorbing[0]] = per_slice // fixed
        elif fixed != per_slice:
            raise UserError(
                f"mesh {shown} uses {fixed} devices but there are {per_slice} "
                f"{'per slice' if self.dcn_data > 1 else 'devices'}; make the sizes multiply "
                f"to {per_slice}, or set one axis to -1 to absorb the rest (e.g. --set mesh.data=-1)"
            )
        sizes["data"] *= self.dcn_data
        return sizes


def _check_rules(rules: LogicalRules) -> None:
    seen: set[str] = set()
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"rules: each rule is [logical_axis, mesh_axes], got {list(rule)!r}")
        logical, mesh_axes = rule
        if logical in seen:
            raise UserError(f"rules: logical axis {logical!r} appears twice")
        seen.add(logical)
        names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        for name in names:
            if name not in MESH_AXES:
                raise UserError(
                    f"rules: {logical!r} maps to unknown mesh axis {name!r}; the mesh axes are {', '.join(MESH_AXES)}"
                )


def build_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all).

    With `dcn_data > 1` the devices are grouped by slice (`device.slice_index`, as TPU
    multi-slice reports it) with `create_hybrid_device_mesh`; devices without a slice
    index (CPU, single-slice) are taken as consecutive equal blocks, one per slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    if config.dcn_data > 1 and all(hasattr(d, "slice_index") for d in devices):
        ici_shape = (sizes["data"] // config.dcn_data, sizes["fsdp"], sizes["tensor"])
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, (config.dcn_data, 1, 1), devices
        )
    elif config.dcn_data > 1:
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_axes_of(logical: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedSharding for every leaf of a boxed parameter tree (result is unboxed-shaped).

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda spec: NamedSharding(
            mesh, nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else PartitionSpec()
        ),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
    )


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of the [B, T] batch arrays: rows split over the `batch` mesh axes."""
    return NamedSharding(mesh, mesh_axes_of(("batch", "seq"), rules))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Make the model's activation constraints (`nn.with_logical_constraint`) take effect.

    Trace (call or first-run) the jitted step inside this context. Outside it the
    constraints are no-ops and XLA chooses activation layouts from the parameters'.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _axis_sizes_of(mesh: Mesh | Mapping[str, int]) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def _split_factor(spec_entry: str | tuple[str, ...] | None, sizes: Mapping[str, int]) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(sizes[n] for n in names)


def check_fits(
    model_config: ModelConfig,
    mesh: Mesh | Mapping[str, int],
    batch_size: int,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    grad_accum: int = 1,
) -> None:
    """Refuse, before compiling, a model or batch that cannot be split over the mesh.

    Every model dimension that the rules shard must be divisible by the product of the
    mesh axes it is split over; so must each micro-batch (batch_size / grad_accum).

    Args:
        model_config: the model.
        mesh: a Mesh, or a mapping from mesh axis name to size.
        batch_size: global batch size (rows per step).
        rules: the logical-to-mesh rules.
        grad_accum: micro-batches per step; each is split over the batch axes.

    Raises:
        UserError: listing every dimension that does not divide, and how to fix it.
    """
    sizes = _axis_sizes_of(mesh)
    problems = []
    if grad_accum > 1:
        batch_size, batch_key = batch_size // grad_accum, "trainer.batch_size / trainer.grad_accum"
    else:
        batch_key = "trainer.batch_size"
    dims = {
        "batch": (batch_key, batch_size),
        "vocab": ("model.vocab_size", model_config.vocab_size),
        "embed": ("model.d_model", model_config.d_model),
        "heads": ("model.n_heads", model_config.n_heads),
        "kv_heads": ("model.n_kv_heads", model_config.n_kv_heads),
        "head_dim": ("model.head_dim", model_config.head_dim),
        "mlp": ("model.d_ff", model_config.d_ff),
        "layers": ("model.n_layers", model_config.n_layers),
    }
    for logical, (key, size) in dims.items():
        spec_entry = mesh_axes_of((logical,), rules)[0]
        factor = _split_factor(spec_entry, sizes)
        if size % factor:
            axes = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
            shown = " x ".join(f"{a}={sizes[a]}" for a in axes)
            problems.append(
                f"{key}={size} is not divisible by {factor} (mesh {shown}), the devices its "
                f"'{logical}' axis is split over; change {key} or the mesh "
                f"({' or '.join('mesh.' + a for a in axes)}) so that {factor} divides {size}"
            )
    if problems:
        raise UserError("the model does not fit the mesh:\n  " + "\n  ".join(problems))


def param_bytes_per_device(
    abstract_params: Any, mesh: Mesh | Mapping[str, int], rules: LogicalRules = DEFAULT_RULES
) -> int:
    """Bytes of parameters one device holds (the largest shard of each array)."""
    sizes = _axis_sizes_of(mesh)
    specs = nn.get_partition_spec(abstract_params)
    leaves = jax.tree.leaves(nn.unbox(abstract_params))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
    total = 0
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else PartitionSpec()
        mesh_spec = tuple(mesh_spec) + (None,) * (len(leaf.shape) - len(mesh_spec))
        shard = [-(-dim // _split_factor(entry, sizes)) for dim, entry in zip(leaf.shape, mesh_spec)]
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
