"""`metatrain compile`: the real training step compiled ahead of time for a TPU topology.

With libtpu installed (`pip install 'metatrain[tpu]'`), `jax.experimental.topologies`
describes any TPU slice (`v5e:2x2`, `v5p:4x4x4`, ..., several of them for multi-slice)
without a TPU, and XLA's TPU compiler runs on this CPU. This module builds the run's
mesh over those devices, the train state's and batch's shardings, and the jitted,
donating train step exactly as the trainer does (no data is read, nothing is
allocated: every input is a `ShapeDtypeStruct`), compiles it, and reports per-device
memory against the chip's HBM (`metatrain.hardware`) and the model FLOPs of one step.

A config that does not fit is refused: either XLA's TPU compiler itself runs out of
HBM (its numbers are quoted) or the compiled program needs more than the chip has.
A model whose `vocab_size` is not its tokenizer's is refused before compiling, when the
tokenizer file is here to read (a preset compiled without its data is not checked).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Sequence

from metatrain.config import RunConfig
from metatrain.errors import UserError
from metatrain.hardware import Chip, chip_for_device_kind, quiet_libtpu_off_tpu
from metatrain.io.storage import as_path

_GIB = float(1 << 30)
#: XLA's TPU out-of-memory messages, as of libtpu 0.0.5x:
#: "the total memory required for HLO temporaries (304.32G) exceeds available HBM (15.75G)"
_XLA_OOM_TEMPS = re.compile(r"HLO temporaries \((?P<n>[\d.]+)(?P<unit>[KMGT])\)")
#: "Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
_XLA_OOM_USED = re.compile(r"Used (?P<n>[\d.]+)(?P<unit>[KMGT]) of [\d.]+[KMGT] hbm")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: A Pallas (Mosaic) kernel's tiles did not fit VMEM, as XLA:TPU words it.
_VMEM_OOM = re.compile(r"CompileTimeScopedVmemOom|memory space vmem")
#: "size 39.24M and limit 38.00M exceeded scoped vmem limit" / "Used 17.30M of 16.00M vmem".
_VMEM_SIZES = (
    re.compile(r"size (?P<need>[\d.]+[KMGT]) and limit (?P<limit>[\d.]+[KMGT])"),
    re.compile(r"Used (?P<need>[\d.]+[KMGT]) of (?P<limit>[\d.]+[KMGT]) vmem"),
)
#: The kernel named in the message: "%cross_entropy_d_hidden.1 = " or "XLA label: ...".
_KERNEL_NAME = re.compile(r"(?:for %|label: (?:register allocator spill slots in HLO :: )?)(?P<name>[A-Za-z_][\w]*?)(?:\.\d+)?(?: =|\s)")


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs for the step (XLA's `memory_analysis`, or an estimate).

    Attributes:
        arguments: train state and batch shards (the state's are donated to the outputs).
        outputs: new train state and metrics.
        aliased: output bytes that reuse argument buffers (donation).
        temporaries: activations, gradients and workspace; None when unknown.
        code: compiled program.
        estimated: the arguments are computed from the shardings (compilation failed).
        xla_total: the total XLA reported when it refused (overrides the sum).
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int | None
    code: int = 0
    estimated: bool = False
    xla_total: int | None = None

    @property
    def total(self) -> int | None:
        """Peak bytes on one device: arguments + outputs not aliased + temporaries + code."""
        if self.xla_total is not None:
            return self.xla_total
        if self.temporaries is None:
            return None
        return self.arguments + max(self.outputs - self.aliased, 0) + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """The outcome of compiling a run's train step for a TPU topology.

    Attributes:
        topology: the topology name compiled for, e.g. "v5e:2x2".
        num_slices: slices (multi-slice when > 1).
        device_kind: what the devices report, e.g. "TPU v5 lite".
        chip: the hardware table's entry for it, None if unknown.
        num_devices: chips in all slices.
        num_hosts: processes a run on it has (one per host).
        mesh: mesh axis sizes.
        memory: per-device memory.
        model_flops_per_step: training FLOPs of one step (6·N·tokens + attention).
        xla_flops_per_device: XLA's count for one device's program, if it reports one.
        compile_seconds: wall time of the compile.
        xla_error: XLA's refusal (out of memory), if it refused.
    """

    topology: str
    num_slices: int
    device_kind: str
    chip: Chip | None
    num_devices: int
    num_hosts: int
    mesh: dict[str, int]
    memory: DeviceMemory
    model_flops_per_step: int
    xla_flops_per_device: float | None
    compile_seconds: float
    xla_error: str | None = None

    @property
    def fits(self) -> bool | None:
        """False if XLA refused or the total exceeds HBM; None if HBM is unknown."""
        if self.xla_error is not None:
            return False
        total = self.memory.total
        if self.chip is None or total is None:
            return None
        return total <= self.chip.hbm_bytes


def tpu_topology(name: str, num_slices: int = 1) -> Any:
    """`jax.experimental.topologies.get_topology_desc(name, "tpu")` with user-facing errors.

    Raises:
        UserError: libtpu is missing, or the topology name is not one libtpu knows.
    """
    # Several processes (pytest-xdist workers, parallel compiles) may each load libtpu to
    # compile; no TPU is opened, so the single-process lock does not apply.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_libtpu_off_tpu()
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(
            "compiling for a TPU topology needs libtpu: pip install 'metatrain[tpu]' (or 'jax[tpu]')"
        ) from None
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    if name.lower().startswith("v4"):
        # v4 chips hold two TensorCores; libtpu describes them one device per core unless
        # asked for megacore (one device per chip), which JAX's TPU meshes require.
        kwargs["chip_config_name"] = "megacore"
    try:
        return topologies.get_topology_desc(name, "tpu", **kwargs)
    except Exception as e:  # libtpu raises JaxRuntimeError(INVALID_ARGUMENT) for bad names
        raise UserError(
            f"--topology {name!r}: libtpu does not know this TPU topology ({str(e).splitlines()[0]}); "
            "use GENERATION:SHAPE such as v5e:2x2, v5e:4x8, v5p:4x4x4, v6e:8x8, v4:2x2x2"
        ) from None


def _bytes_per_device(tree: Any) -> int:
    """Bytes of the largest shard of every array in `tree`, summed (one device's share)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def lower_train_step(config: RunConfig, devices: Sequence[Any]) -> tuple[Any, Any, dict[str, int]]:
    """The train step as the trainer jits it, lowered over `devices` with abstract inputs.

    Returns:
        `(lowered, abstract_args, mesh_sizes)`.

    Raises:
        UserError: the mesh does not fit the devices or the model.
    """
    from metatrain.parallel.mesh import sharding_context
    from metatrain.run.program import build_train_program

    program = build_train_program(config, devices)
    mesh, rules = program.mesh, program.rules
    step = program.train_step
    args = (program.abstract_state(), program.abstract_batch())
    with sharding_context(mesh, rules):  # as the trainer traces it: activation constraints apply
        try:
            lowered = step.lower(*args)
        except Exception as e:  # lowering errors come from JAX, Pallas and Mosaic alike
            raise UserError(_lowering_error(e)) from None
    return lowered, args, dict(mesh.shape)


def _lowering_error(error: Exception) -> str:
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    hint = ""
    if "Mosaic kernels cannot be automatically partitioned" in str(error):
        hint = (
            "; the Pallas loss kernel must run inside shard_map on a multi-device TPU mesh, which "
            "needs the train step to pass the kernel its LossSharding (--set loss.impl=chunked "
            "compiles without the kernel)"
        )
    return f"the train step could not be lowered for TPU: {type(error).__name__}: {message}{hint}"


def _xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return float(flops) if flops and flops > 0 else None


def _quoted_bytes(pattern: re.Pattern, message: str) -> int | None:
    match = pattern.search(message)
    if match is None:
        return None
    return int(float(match["n"]) * _UNITS[match["unit"]])


def _refused_memory(args: Any, message: str) -> DeviceMemory:
    """Per-device memory of a program XLA refused: arguments from the shardings, the rest quoted."""
    state_bytes = _bytes_per_device(args)
    return DeviceMemory(
        arguments=state_bytes,
        outputs=state_bytes,
        aliased=state_bytes,  # the donated state is written in place
        temporaries=_quoted_bytes(_XLA_OOM_TEMPS, message),
        estimated=True,
        xla_total=_quoted_bytes(_XLA_OOM_USED, message),
    )


def check_tokenizer_vocab(config: RunConfig) -> None:
    """Refuse a `model.vocab_size` that is not the tokenizer's piece count, when the
    tokenizer is known (`data.tokenizer` is an existing file); otherwise check nothing.

    Raises:
        UserError: one line with both sizes and the fix.
    """
    if as_path(config.data.tokenizer).is_file():
        from metatrain.tokenizer.spm import check_vocab_size

        check_vocab_size(config.model.vocab_size, config.data.tokenizer)


def compile_for_topology(config: RunConfig, topology: str, num_slices: int = 1) -> CompileReport:
    """Compile `config`'s train step for `topology` (x `num_slices`) and measure it.

    Raises:
        UserError: `model.vocab_size` is not the tokenizer's (when the tokenizer file
            exists), no libtpu, unknown topology, a mesh that does not fit the chips, or
            a compile error other than running out of memory.
    """
    check_tokenizer_vocab(config)
    if num_slices < 1:
        raise UserError(f"--num-slices {num_slices}: need at least 1 slice")
    if num_slices > 1 and config.mesh.dcn_data not in (1, num_slices):
        raise UserError(
            f"--num-slices {num_slices} but the config has mesh.dcn_data={config.mesh.dcn_data}; "
            f"they must agree (set --set mesh.dcn_data={num_slices}, or leave it at 1 and it is set for you)"
        )
    if num_slices > 1:
        config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, dcn_data=num_slices))
    devices = list(tpu_topology(topology, num_slices).devices)
    lowered, args, mesh_sizes = lower_train_step(config, devices)
    kind = devices[0].device_kind
    common = dict(
        topology=topology,
        num_slices=num_slices,
        device_kind=kind,
        chip=chip_for_device_kind(kind),
        num_devices=len(devices),
        num_hosts=len({(getattr(d, "slice_index", 0), d.process_index) for d in devices}),
        mesh=mesh_sizes,
        model_flops_per_step=config.flops_per_step,
    )
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        message = str(e)
        if _VMEM_OOM.search(message):
            raise UserError(vmem_refusal(message, topology, kind)) from None
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            first = " ".join(message.strip().splitlines()[:2])[:600]
            raise UserError(
                f"XLA could not compile the train step for {topology} (not a memory limit): {first}"
            ) from None
        return CompileReport(
            **common,
            memory=_refused_memory(args, message),
            xla_flops_per_device=None,
            compile_seconds=time.perf_counter() - start,
            xla_error=message.strip().splitlines()[0],
        )
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = DeviceMemory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
    )
    return CompileReport(**common, memory=memory, xla_flops_per_device=_xla_flops(compiled), compile_seconds=seconds)


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / _GIB:9.3f} GiB"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} FLOP"


def format_report(report: CompileReport) -> str:
    """The report as `metatrain compile` prints it."""
    m = report.memory
    slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    if report.num_slices > 1:
        mesh += f" (data spans the {report.num_slices} slices: mesh.dcn_data={report.num_slices})"
    chip = report.chip.name if report.chip else f"unknown chip ({report.device_kind!r} is not in metatrain/hardware.py)"
    est = " (estimated from the shardings)" if m.estimated else ""
    lines = [
        f"topology     {report.topology}{slices}: {report.num_devices} chips ({chip}), {report.num_hosts} host(s)",
        f"mesh         {mesh}",
        "memory per device:",
        f"  arguments    {_gib(m.arguments)}   train state and batch shards{est}",
        f"  outputs      {_gib(max(m.outputs - m.aliased, 0))}   not aliased to arguments (donated state reused)",
        f"  temporaries  {_gib(m.temporaries)}   activations, gradients, workspace",
        f"  code         {_gib(m.code)}",
        f"  total        {_gib(m.total)}",
        f"  HBM          {_gib(report.chip.hbm_bytes) if report.chip else 'unknown'}",
    ]
    flops = report.model_flops_per_step
    line = f"model FLOPs per step  {_flops(flops)} ({_flops(flops / report.num_devices)} per device)"
    if report.chip is not None:
        floor = flops / (report.num_devices * report.chip.peak_bf16_flops)
        line += f"; at peak bf16 a step takes >= {floor * 1e3:.2f} ms"
    lines.append(line)
    if report.xla_flops_per_device is not None:
        lines.append(f"XLA's count for one device's program  {_flops(report.xla_flops_per_device)}")
    lines.append(f"compiled in {report.compile_seconds:.1f} s")
    if report.xla_error is not None:
        lines.append(f"XLA: {report.xla_error}")
    fits = report.fits
    if fits is None:
        lines.append("fits: unknown (no HBM size for this chip)")
    else:
        lines.append("fits: yes" if fits else "fits: NO")
    return "\n".join(lines)


def vmem_refusal(message: str, topology: str, device_kind: str) -> str:
    """Why a Pallas kernel did not fit the chip's VMEM (on-core scratch memory, not HBM),
    with XLA's sizes, the kernel, and a change that avoids it."""
    sizes = next((m for m in (p.search(message) for p in _VMEM_SIZES) if m), None)
    found = _KERNEL_NAME.search(message)
    kernel = found["name"] if found else "a Pallas kernel"
    amount = f" needs {sizes['need']} of VMEM against a limit of {sizes['limit']} (XLA's sizes)" if sizes else " does not fit VMEM"
    if kernel.startswith("cross_entropy"):
        fix = ("--set loss.impl=chunked compiles the loss without the kernel (or --set loss.precision=compute "
               "if it is float32); the kernel's tiles are chosen for the chip, so please report the chip, D and dtype")
    elif "attention" in kernel or "splash" in kernel or "flash" in kernel:
        fix = "--set model.attention=xla compiles attention without the kernel"
    else:
        fix = "use the XLA implementation of that part of the model"
    return (
        f"kernel {kernel}{amount} on {topology} ({device_kind}): its tiles do not fit the chip's "
        f"on-core VMEM. This is not HBM: a larger topology, sharding or a smaller batch do not change it. "
        f"Fix: {fix}"
    )


def refusal(report: CompileReport) -> str:
    """Why the config does not fit, and what to change."""
    m, hbm = report.memory, report.chip.hbm_bytes if report.chip else None
    need = f"{m.total / _GIB:.2f} GiB" if m.total is not None else "more than the chip has"
    have = f"{hbm / _GIB:.2f} GiB of HBM" if hbm else "its HBM"
    return (
        f"the config does not fit {report.topology}: one device needs {need} "
        f"(arguments {m.arguments / _GIB:.2f} GiB) but a chip has {have}. Shard the state over more "
        "chips (a larger topology, mesh.fsdp=-1), lower the activation memory (trainer.grad_accum, "
        "a smaller trainer.batch_size or seq_len, model.remat=full), and compile again"
    )


@dataclasses.dataclass(frozen=True)
class MaxBatch:
    """What `find_max_batch` found.

    Attributes:
        batch_size: the largest global batch (sequences) that fits; None if none does.
        per_chip: `batch_size` over the chips.
        report: the compile report at `batch_size` (None if none fits).
        tried: `(batch_size, fits)` of every compile, in order.
    """

    batch_size: int | None
    per_chip: float | None
    report: CompileReport | None
    tried: tuple[tuple[int, bool], ...]


def batch_unit(config: RunConfig, devices: Sequence[Any]) -> int:
    """The step between valid global batches: the devices the batch is split over, times
    the micro-batches (every micro-batch must split evenly over them)."""
    from metatrain.parallel.mesh import build_mesh, mesh_axes_of

    mesh = build_mesh(config.mesh, devices)
    entry = mesh_axes_of(("batch",), config.mesh.rules)[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    shards = 1
    for name in names:
        shards *= mesh.shape[name]
    return shards * config.trainer.grad_accum


def find_max_batch(
    config: RunConfig, topology: str, num_slices: int = 1, *, limit: int = 1 << 16, log: Any = None
) -> MaxBatch:
    """The largest global `trainer.batch_size` whose train step fits the chips' HBM, found
    by compiling: doubling from one batch unit until a compile does not fit, then bisecting.

    Args:
        limit: the largest batch tried (sequences).
        log: `log(message)` after every compile (None: quiet).
    """
    check_tokenizer_vocab(config)
    devices = list(tpu_topology(topology, num_slices).devices)
    unit = batch_unit(config, devices)
    tried: list[tuple[int, bool]] = []
    reports: dict[int, CompileReport] = {}

    def fits(units: int) -> bool:
        batch = units * unit
        trainer = dataclasses.replace(config.trainer, batch_size=batch)
        report = compile_for_topology(dataclasses.replace(config, trainer=trainer), topology, num_slices)
        ok = report.fits is not False
        tried.append((batch, ok))
        if ok:
            reports[batch] = report
        if log is not None:
            total = f"{report.memory.total / _GIB:.2f} GiB" if report.memory.total is not None else "?"
            log(f"batch {batch:6d} ({batch / len(devices):g} a chip): {total} a chip, {'fits' if ok else 'does not fit'}")
        return ok

    if not fits(1):
        return MaxBatch(None, None, None, tuple(tried))
    low, high = 1, None  # low fits; high (if known) does not
    while high is None:
        if 2 * low * unit > limit:
            break
        if fits(2 * low):
            low *= 2
        else:
            high = 2 * low
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    batch = low * unit
    return MaxBatch(batch, batch / len(devices), reports[batch], tuple(tried))
