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

Inference (a trained checkpoint decoded on a mesh; `metatrain.run.reader`) uses the same
table with one change (`inference_rules`): the batch rows are split over `data` only,
while `fsdp` still shards the parameters along `embed`. Its mesh comes from
`--set mesh.KEY=VALUE` settings (`inference_mesh_config`): without any, every visible
device with `fsdp` as large as the model's `d_model` allows and the rest on `data`; a
mesh without a -1 axis may use fewer devices than there are (the first ones,
`build_inference_mesh`).
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
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
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
    dims = {"batch": (batch_key, batch_size), **_model_dims(model_config)}
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


# -- inference: the training rules with rows over `data` only, the mesh the CLI chooses ------------

#: The `--set` keys an inference mesh takes, each `mesh.<axis>`.
INFERENCE_SETTING_PREFIX = "mesh."


def inference_rules(rules: LogicalRules = DEFAULT_RULES) -> LogicalRules:
    """`rules` with the logical `batch` axis split over `data` only (every other rule kept).

    At inference the rows of a batch are split over `data`; `fsdp` shards the parameters
    along `embed` (and the activations' `embed`, as `batch` no longer claims it) but does
    not split the rows.
    """
    rows: LogicalRule = ("batch", "data")
    if all(logical != "batch" for logical, _ in rules):
        return (rows,) + tuple(rules)
    return tuple(rows if logical == "batch" else (logical, axes) for logical, axes in rules)


def kv_cache_spec() -> PartitionSpec:
    """PartitionSpec of a KV cache array [L, B, S, K, H] (layers, rows, positions, KV
    heads, head dim): rows over `data`, KV heads over `tensor` (so `tensor` must divide
    `n_kv_heads`; `check_inference_fits` checks it)."""
    return PartitionSpec(None, "data", None, "tensor", None)


def parse_mesh_setting(setting: str) -> tuple[str, int]:
    """`(axis, size)` of one `--set` value such as "mesh.tensor=2" (size -1: absorb the rest).

    Raises:
        UserError: not `mesh.KEY=VALUE`, a key other than data, fsdp or tensor, or a size
            that is not an integer >= 1 or -1.
    """
    keys = ", ".join(INFERENCE_SETTING_PREFIX + a for a in MESH_AXES)
    key, eq, value = setting.partition("=")
    if not key.startswith(INFERENCE_SETTING_PREFIX) or not eq:
        raise UserError(
            f"--set {setting}: not a mesh setting; give --set mesh.KEY=VALUE, KEY one of {', '.join(MESH_AXES)}"
        )
    axis = key[len(INFERENCE_SETTING_PREFIX):]
    if axis not in MESH_AXES:
        raise UserError(f"--set {setting}: {key} is not a mesh axis of inference; give one of {keys}")
    try:
        size = int(value.strip())
    except ValueError:
        raise UserError(
            f"--set {setting}: {value!r} is not an integer; give a size such as --set {key}=2 "
            "(or -1 to absorb the remaining devices)"
        ) from None
    if size != -1 and size < 1:
        raise UserError(f"--set {setting}: a mesh axis size must be >= 1, or -1 to absorb the remaining devices")
    return axis, size


def inference_mesh_config(
    settings: Sequence[str], model_config: ModelConfig, num_devices: int, *, rules: LogicalRules = DEFAULT_RULES
) -> MeshConfig:
    """The inference mesh chosen by `--set mesh.KEY=VALUE` settings (later ones win).

    - No setting: all `num_devices` devices, `fsdp` the largest divisor of `num_devices`
      for which the model fits (with the default rules: the largest that divides
      `d_model`; parameters sharded, rows not split), the rest on `data`, `tensor=1`.
    - Some settings: the axes not given take MeshConfig's defaults (`data=-1` absorbs
      the remaining devices, `fsdp=1`, `tensor=1`; `data=1` when another axis is -1).
      Without a -1 axis the sizes may multiply to fewer than `num_devices`: the mesh
      then uses the first devices only (`--set mesh.data=1`: one device).

    Args:
        settings: the strings after `--set`, e.g. ["mesh.tensor=2"].
        model_config: the model to place (its dimensions must divide the split axes).
        num_devices: visible devices.
        rules: the training rules; the result carries `inference_rules(rules)`.

    Raises:
        UserError: a malformed setting, sizes needing more devices than there are, or a
            model dimension the mesh cannot split (one line naming it).
    """
    placed = inference_rules(rules)
    if not settings:
        return _default_inference_mesh(model_config, num_devices, placed)
    sizes = dict(parse_mesh_setting(s) for s in settings)
    absorbing = [f"mesh.{axis}=-1" for axis, size in sizes.items() if size == -1]
    if len(absorbing) > 1:
        raise UserError(f"--set {' and '.join(absorbing)}: only one mesh axis may absorb the remaining devices")
    if "data" not in sizes and absorbing:
        sizes["data"] = 1
    config = MeshConfig(**sizes, rules=placed)
    check_inference_fits(model_config, inference_axis_sizes(config, num_devices), placed)
    return config


def _default_inference_mesh(model_config: ModelConfig, num_devices: int, rules: LogicalRules) -> MeshConfig:
    """`data x fsdp` over all devices, `fsdp` the largest divisor that the model fits."""
    divisors = [f for f in range(num_devices, 0, -1) if num_devices % f == 0]
    for fsdp in divisors:
        config = MeshConfig(data=num_devices // fsdp, fsdp=fsdp, tensor=1, rules=rules)
        try:
            check_inference_fits(model_config, config.axis_sizes(num_devices), rules)
        except UserError:
            if fsdp == 1:
                raise
            continue
        return config
    raise UserError(f"num_devices={num_devices}: there must be at least one device")


def inference_axis_sizes(config: MeshConfig, num_devices: int) -> dict[str, int]:
    """The size of every mesh axis of an inference mesh on `num_devices` visible devices.

    Like `MeshConfig.axis_sizes`, except that sizes without a -1 may multiply to fewer
    than `num_devices` (the mesh then uses the first of them).

    Raises:
        UserError: the sizes need more devices than there are, or cannot absorb the rest.
    """
    sizes = {name: getattr(config, name) for name in MESH_AXES}
    if -1 in sizes.values():
        return config.axis_sizes(num_devices)
    used = math.prod(sizes.values()) * config.dcn_data
    if used > num_devices:
        shown = " x ".join(f"{n}={s}" for n, s in sizes.items())
        raise UserError(
            f"mesh {shown} needs {used} devices but {num_devices} are visible; give sizes whose product is "
            f"at most {num_devices} (--set mesh.KEY=VALUE), or -1 on one axis to use every device"
        )
    return config.axis_sizes(used)


def build_inference_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over the first prod(sizes) of
    `devices` (default: all visible), as `inference_axis_sizes` resolves them.

    Raises:
        UserError: the sizes need more devices than there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    used = math.prod(inference_axis_sizes(config, len(devices)).values())
    if used == len(devices):
        return build_mesh(config, devices)
    subset = devices[:used]
    shape = tuple(config.axis_sizes(used)[name] for name in MESH_AXES)
    try:
        device_array = mesh_utils.create_device_mesh(shape, subset, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError):  # a subset that is no physical sub-box
        device_array = np.asarray(subset, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_inference_fits(
    model_config: ModelConfig, mesh: Mesh | Mapping[str, int], rules: LogicalRules = DEFAULT_RULES
) -> None:
    """Refuse, in one line naming the dimension, a model the inference mesh cannot split.

    As `check_fits` without the batch (splitting the rows over `data` is the engine's
    job), plus the KV cache: `n_kv_heads` must divide by `tensor` (`kv_cache_spec`).

    Args:
        model_config: the model.
        mesh: a Mesh, or a mapping from mesh axis name to size.
        rules: the inference rules (`inference_rules(...)`).

    Raises:
        UserError: e.g. "model.n_kv_heads=2 is not divisible by mesh tensor=4 (...); give
            --set mesh.tensor=2 or 1"; several problems are joined on the same line.
    """
    sizes = _axis_sizes_of(mesh)
    dims = _model_dims(model_config)
    split = {logical: _axes_of(mesh_axes_of((logical,), rules)[0]) for logical in dims}
    problems = [
        _fit_problem(key, size, f"its '{logical}' axis is split over it", split[logical], sizes, dims, split)
        for logical, (key, size) in dims.items()
        if size % _split_factor(split[logical] or None, sizes)
    ]
    key, kv_heads = dims["kv_heads"]
    if split["kv_heads"] != ("tensor",) and kv_heads % sizes["tensor"]:
        problems.append(_fit_problem(key, kv_heads, "the KV cache's heads are split over it", ("tensor",), sizes, dims,
                                     {**split, "kv_heads": ("tensor",)}))
    if problems:
        raise UserError("; also ".join(problems))


def _model_dims(model_config: ModelConfig) -> dict[str, tuple[str, int]]:
    """Logical axis -> (config key, size) of every model dimension the rules may split."""
    return {
        "vocab": ("model.vocab_size", model_config.vocab_size),
        "embed": ("model.d_model", model_config.d_model),
        "heads": ("model.n_heads", model_config.n_heads),
        "kv_heads": ("model.n_kv_heads", model_config.n_kv_heads),
        "head_dim": ("model.head_dim", model_config.head_dim),
        "mlp": ("model.d_ff", model_config.d_ff),
        "layers": ("model.n_layers", model_config.n_layers),
    }


def _axes_of(spec_entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _fit_problem(
    key: str, size: int, why: str, axes: tuple[str, ...], sizes: Mapping[str, int],
    dims: Mapping[str, tuple[str, int]], split: Mapping[str, tuple[str, ...]],
) -> str:
    """"model.X=N is not divisible by mesh a=S (why); give --set mesh.a=... ": one problem."""
    shown = " x ".join(f"{a}={sizes[a]}" for a in axes)
    if len(axes) != 1:
        return (f"{key}={size} is not divisible by mesh {shown} ({why}); give mesh sizes "
                f"({', '.join('mesh.' + a for a in axes)}) whose product divides {size}")
    axis = axes[0]
    together = [n for logical, (_, n) in dims.items() if split[logical] == (axis,)]
    fitting = [v for v in range(sizes[axis] - 1, 1, -1) if all(n % v == 0 for n in together)][:3] + [1]
    shown_fits = ", ".join(map(str, fitting[:-1])) + " or 1" if len(fitting) > 1 else "1"
    return f"{key}={size} is not divisible by mesh {shown} ({why}); give --set mesh.{axis}={shown_fits}"
