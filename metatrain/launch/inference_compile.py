"""`metatrain compile --inference`: the inference engine's programs compiled for a TPU topology.

The engine (`metatrain.engine`) keeps `max_batch` slots of `context` tokens on the
device for its whole life and runs two jitted programs over them: the prefill
(`step.admit_call`: n prompts of width T written into their slots, their first logits
kept) and the decode (`step.steps_call`: a few decode steps of the first k slots,
each row with its own `RowSampling`). This module lowers both exactly as the engine
calls them, on a mesh over a TPU topology's chips (`jax.experimental.topologies`,
libtpu on this CPU: no TPU, nothing allocated, every input a `ShapeDtypeStruct` with
its sharding), compiles them with XLA's TPU compiler and reports what one chip holds:

  * parameters: the model's, sharded by the inference rules (`inference_rules`);
  * slots: the KV cache [L, B, S, K, H] (rows over `data`, KV heads over `tensor`)
    and each row's logits and state;
  * temporaries: the working memory of the program whose total is larger (in practice
    the prefill, which works on a copy of the cache rows it admits);

against the chip's HBM. What is compiled is the engine's worst case: the most prompts
one prefill call takes (`engine.PREFILL_ROWS`, or B if fewer), every slot live in the
decode call (k = B), `STEPS_WHEN_ALONE` steps a call.

A layout that cannot work is refused in one line before compiling: a mesh that does
not divide the model (the dimension named), or parameters and slots that alone exceed
the chip's HBM (the larger part named, with a mesh that holds them when there is one).
A layout whose compiled programs exceed HBM is refused after the report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

from metatrain.config import RunConfig
from metatrain.errors import UserError
from metatrain.hardware import Chip, chip_for_device_kind
from metatrain.io.storage import as_path
from metatrain.launch.compile import (
    _VMEM_OOM,
    _XLA_OOM_TEMPS,
    _XLA_OOM_USED,
    DeviceMemory,
    _quoted_bytes,
    check_tokenizer_vocab,
    tpu_topology,
    vmem_refusal,
)
from metatrain.models import ModelConfig

_GIB = float(1 << 30)
#: Default prefill width (`--prompt`): prompts of up to this many tokens, padded to the
#: engine's prompt bucket; less when the context is shorter.
DEFAULT_PROMPT: int = 512
#: Default `--batch`: slots, the rows decoded at once.
DEFAULT_BATCH: int = 32
#: The inference mesh's `--set` keys (every other `--set` is a run config override).
MESH_KEYS: tuple[str, ...] = ("mesh.data", "mesh.fsdp", "mesh.tensor")


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """The engine compiled: its slots and the widths of its two programs.

    Attributes:
        batch: B, slots (rows decoded at once), rounded up to a multiple of `data`.
        context: tokens a row holds, prompt and reply.
        cache_length: S, cache positions a row has (`step.cache_length(context)`).
        prompt: T, the prefill width (prompt tokens, padded to the prompt bucket).
        admitted: n, prompts prefilled in one call.
        steps: decode steps in one call.
    """

    batch: int
    context: int
    cache_length: int
    prompt: int
    admitted: int
    steps: int


@dataclasses.dataclass(frozen=True)
class InferenceReport:
    """What one chip needs to run the engine on a topology.

    Attributes:
        topology: e.g. "v5e:2x4".
        num_slices: slices of it (the mesh's `data` axis spans them).
        device_kind: what the devices report.
        chip: the hardware table's entry, None if unknown.
        num_devices: chips in all slices.
        num_hosts: processes a job on it has (one per host).
        mesh: the inference mesh's axis sizes.
        mesh_chips: chips the mesh uses (fewer than `num_devices` when its sizes say so).
        shape: the engine compiled.
        parameters: bytes of parameters one chip holds.
        kv_cache: bytes of KV cache (keys, values, segment ids, positions) one chip holds.
        row_state: bytes of the other slot arrays (logits, row states, keys, budgets).
        prefill: the prefill program's memory (estimated, temporaries unknown, when it
            was not compiled; arguments and temporaries quoted when XLA refused it).
        decode: the decode program's memory (likewise).
        constraints: where the grammar's arrays came from (the tokenizer, or its shapes).
        compile_seconds: wall time of both compiles.
        xla_error: XLA's refusal (out of memory) of either program, if any.
    """

    topology: str
    num_slices: int
    device_kind: str
    chip: Chip | None
    num_devices: int
    num_hosts: int
    mesh: dict[str, int]
    mesh_chips: int
    shape: EngineShape
    parameters: int
    kv_cache: int
    row_state: int
    prefill: DeviceMemory
    decode: DeviceMemory
    constraints: str
    compile_seconds: float
    xla_error: str | None = None

    @property
    def slots(self) -> int:
        return self.kv_cache + self.row_state

    @property
    def total(self) -> int | None:
        """Peak bytes on one chip: the larger program's (parameters and slots included)."""
        totals = [m.total for m in (self.prefill, self.decode)]
        return None if None in totals else max(totals)

    @property
    def larger(self) -> tuple[str, DeviceMemory]:
        """`(name, memory)` of the program with the larger total ("prefill" or "decode")."""
        p, d = self.prefill, self.decode
        return ("prefill", p) if (p.total or 0) >= (d.total or 0) else ("decode", d)

    @property
    def fits(self) -> bool | None:
        """False if XLA refused or the total exceeds HBM; None if HBM is unknown."""
        if self.xla_error is not None:
            return False
        if self.chip is None or self.total is None:
            return None
        return self.total <= self.chip.hbm_bytes


def split_settings(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(run config overrides, inference mesh settings)` of `--set` values: `mesh.data`,
    `mesh.fsdp` and `mesh.tensor` choose the inference mesh, everything else is the run's."""
    mesh = [s for s in overrides if s.partition("=")[0].strip() in MESH_KEYS]
    return [s for s in overrides if s not in mesh], mesh


def _sharded(shapes: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _replicated(shapes: Any, mesh: Any) -> Any:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    everywhere = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=everywhere), shapes)


def _shard_bytes(shape: Sequence[int], dtype: Any, spec: Any, sizes: dict[str, int]) -> int:
    """Bytes of the largest shard of an array of `shape` split by `spec` over axes of `sizes`."""
    import numpy as np

    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    shard = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        shard.append(-(-dim // math.prod(sizes[n] for n in names)))
    itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else np.dtype(dtype).itemsize  # PRNG keys: 8
    return math.prod(shard) * itemsize


def slot_bytes(slots: Any, sizes: dict[str, int]) -> tuple[int, int]:
    """`(KV cache, other slot arrays)` bytes one device holds of abstract `slots` on a
    mesh of axis `sizes`."""
    import jax

    from metatrain.engine.step import slot_spec

    cache, other = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(slots)[0]:
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        n = _shard_bytes(leaf.shape, leaf.dtype, slot_spec(path, leaf), sizes)
        if "cache" in names:
            cache += n
        else:
            other += n
    return cache, other


def abstract_slots(model_config: ModelConfig, batch: int, context: int) -> Any:
    """`step.empty_slots(...)` as ShapeDtypeStructs (nothing allocated)."""
    import jax

    from metatrain.engine.step import empty_slots

    return jax.eval_shape(functools.partial(empty_slots, model_config, batch, context))


def abstract_constraints(config: RunConfig) -> tuple[Any, str]:
    """The grammar's `TagConstraints` as the engine receives it: from the run's tokenizer,
    tag registry and mantra when the tokenizer file is here; otherwise arrays of the
    same shapes (the registry's states and tags, the model's vocabulary, a one-token
    mantra), since only their shapes enter the compiled program.

    Returns:
        `(constraints, where they came from)`; leaves are numpy arrays or ShapeDtypeStructs.
    """
    import jax
    import numpy as np

    from metatrain.engine.constraints import TagConstraints
    from metatrain.tokenizer import DEFAULT_MANTRA, Encoder, Grammar, load_registry

    data = config.data
    if as_path(data.tokenizer).is_file():
        mantra = DEFAULT_MANTRA if data.mantra is None else data.mantra
        encoder = Encoder.from_files(data.tokenizer, data.tags, mantra=mantra, mantra_policy=data.mantra_policy)
        built = TagConstraints.from_encoder(encoder)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), built)
        return shapes, f"the grammar of {data.tokenizer}"
    grammar = Grammar(load_registry(data.tags))
    vocab = config.model.vocab_size
    # Columns some state forbids depend on the grammar alone: bind it to stand-in ids.
    ids = {tag: 2 + i for i, tag in enumerate(grammar.tags)}
    if len(ids) + 2 > vocab:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tag registry {data.tags} "
                        f"({len(ids)} tags, EOS and BOS); give a vocabulary that holds them")
    allowed = grammar.bind(ids, vocab, eos_id=1).generation_allowed()
    columns = int((~allowed.all(axis=0)).sum())
    states, tags = grammar.num_states, grammar.num_tags

    def s(shape: tuple[int, ...], dtype: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype))

    shapes = TagConstraints(
        masked_ids=s((columns,), np.int32), masked_allowed=s((states, columns), bool), token_to_tag=s((vocab,), np.int32),
        transitions=s((states, tags), np.int32), ends=s((states,), bool), mantra=s((1,), np.int32),
        mantra_table=s((2,), bool), thinking_open=s((), np.int32), eos_id=s((), np.int32), mantra_length=1,
    )
    return shapes, f"shapes of the grammar {data.tags} (the tokenizer {data.tokenizer} is not here)"


def abstract_admission(mesh: Any, admitted: int, width: int) -> Any:
    """An `Admission` of `admitted` prompts of `width` ids, replicated over `mesh`, as the
    engine builds it (`Engine._admit`) and puts it there."""
    from metatrain.engine.step import abstract_admission as admission

    return _replicated(admission(admitted, width), mesh)


def check_engine_shape(model_config: ModelConfig, batch: int, context: int | None, prompt: int | None
                       ) -> tuple[int, int]:
    """`(context, prompt)` resolved (defaults: `max_seq_len`, min(512, context - 1)).

    Raises:
        UserError: a batch below 1, a context outside 2 .. `max_seq_len`, or a prompt
            outside 1 .. context - 1 (a row needs room for one generated token).
    """
    if batch < 1:
        raise UserError(f"--batch {batch}: the engine needs at least 1 slot")
    limit = model_config.max_seq_len
    context = limit if context is None else context
    if not 2 <= context <= limit:
        raise UserError(f"--context {context}: a row holds 2 to model.max_seq_len={limit} tokens; "
                        f"give --context {limit} or less")
    prompt = min(DEFAULT_PROMPT, context - 1) if prompt is None else prompt
    if not 1 <= prompt <= context - 1:
        raise UserError(f"--prompt {prompt}: a prompt has 1 to context - 1 = {context - 1} tokens "
                        f"(the reply needs one); give --prompt {context - 1} or less")
    return context, prompt


@dataclasses.dataclass(frozen=True)
class _Placement:
    """A candidate mesh's per-chip bytes of parameters and slots (nothing compiled)."""

    settings: tuple[str, ...]
    sizes: dict[str, int]
    parameters: int
    kv_cache: int
    row_state: int

    @property
    def held(self) -> int:
        return self.parameters + self.kv_cache + self.row_state


def _placement(model_config: ModelConfig, boxed: Any, rules: Any, sizes: dict[str, int], batch: int, context: int,
               settings: tuple[str, ...] = ()) -> _Placement:
    from metatrain.parallel.mesh import param_bytes_per_device

    rows = -(-batch // sizes["data"]) * sizes["data"]
    kv, other = slot_bytes(abstract_slots(model_config, rows, context), sizes)
    return _Placement(settings, sizes, param_bytes_per_device(boxed, sizes, rules), kv, other)


def _best_placement(model_config: ModelConfig, boxed: Any, training_rules: Any, chips: int, batch: int,
                    context: int) -> _Placement | None:
    """The mesh over all `chips` (every data x fsdp x tensor the model divides) whose
    parameters and slots take the least memory a chip; None when no mesh fits the model."""
    from metatrain.parallel.mesh import (
        inference_axis_sizes,
        inference_mesh_config,
        inference_rules,
    )

    best = None
    for tensor in (t for t in range(1, chips + 1) if chips % t == 0):
        for fsdp in (f for f in range(1, chips // tensor + 1) if (chips // tensor) % f == 0):
            data = chips // tensor // fsdp
            settings = (f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
            try:
                mesh_config = inference_mesh_config(settings, model_config, chips, rules=training_rules)
            except UserError:
                continue
            sizes = inference_axis_sizes(mesh_config, chips)
            found = _placement(model_config, boxed, inference_rules(training_rules), sizes, batch, context, settings)
            if best is None or found.held < best.held:
                best = found
    return best


def _gib_short(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


def mesh_options(placement: _Placement) -> str:
    """The `--set` options that choose `placement`'s mesh (`data` absorbs the chips left)."""
    shown = [s for s in placement.settings if not s.startswith("mesh.data=") and not s.endswith("=1")]
    return " ".join(f"--set {s}" for s in shown or [s for s in placement.settings if s.startswith("mesh.data=")])


def refusal(report: InferenceReport, better: _Placement | None = None) -> str:
    """Why the engine does not fit the topology, in one line: the sizes a chip needs, the
    largest part, and what to change (with `better`, a mesh that holds more)."""
    hbm = report.chip.hbm_bytes if report.chip else 0
    parts = {"parameters": report.parameters, "KV cache": report.kv_cache}
    name, program = report.larger
    if report.total is None:
        need = f"parameters and slots alone need {_gib_short(report.parameters + report.slots)} a chip"
    else:
        need = f"one chip needs {_gib_short(report.total)}"
        parts[f"{name} temporaries"] = program.temporaries or 0
    largest = max(parts, key=parts.get)
    current = _Placement((), report.mesh, report.parameters, report.kv_cache, report.row_state)
    mesh = ""
    if better is not None and better.held < current.held:
        verdict = "fit" if better.held <= hbm else "still exceed the HBM"
        mesh = (f"; or the mesh {mesh_options(better)}, where parameters and slots take {_gib_short(better.held)} "
                f"a chip (they {verdict}, before temporaries)")
    if largest == "KV cache":
        fix = f"the KV cache is the largest part: give a smaller --batch or --context, or more chips (a larger --topology){mesh}"
    elif largest == "parameters":
        fix = f"the parameters are the largest part: shard them over more chips (a larger --topology){mesh}"
    elif name == "prefill":
        fix = ("the prefill's temporaries are the largest part (it works on a copy of the KV cache of the rows it "
               f"admits, and at some sizes XLA copies the whole cache): give a smaller --batch or --context{mesh}")
    else:
        fix = f"the decode's temporaries are the largest part: give a smaller --batch{mesh}"
    shown = ", ".join(f"{k} {_gib_short(v)}" for k, v in parts.items())
    layout = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    s = report.shape
    return (
        f"the engine ({s.batch} slots x {s.context} tokens, prompts of {s.prompt}) does not fit {report.topology} "
        f"on the mesh {layout}: {need} ({shown}) and a chip has {_gib_short(hbm)} of HBM; {fix}"
    )


def compile_inference(
    config: RunConfig,
    topology: str,
    *,
    batch: int = DEFAULT_BATCH,
    context: int | None = None,
    prompt: int | None = None,
    mesh_settings: Sequence[str] = (),
    num_slices: int = 1,
) -> InferenceReport:
    """Compile the engine's prefill and decode for `topology` and measure one chip.

    Args:
        config: the run config (its model, tokenizer, tags, mantra and mesh rules).
        topology: TPU topology, e.g. "v5e:2x4".
        batch: slots (rows decoded at once); rounded up to a multiple of `data`.
        context: tokens a row holds (default: `model.max_seq_len`).
        prompt: prefill width in tokens (default: min(512, context - 1)); padded to the
            engine's prompt bucket.
        mesh_settings: `mesh.KEY=VALUE` strings (`inference_mesh_config`); none: the
            default layout over the chips of one slice.
        num_slices: slices of `topology`; the mesh's `data` axis spans them.

    Raises:
        UserError: the vocabulary is not the tokenizer's, no libtpu, an unknown topology,
            a batch, context or prompt out of range, a mesh that does not divide the
            model, parameters and slots that alone exceed HBM, or a compile error other
            than running out of memory.
    """
    import flax.linen as nn
    import jax

    from metatrain.engine.capacity import PREFILL_ROWS
    from metatrain.engine.engine import STEPS_WHEN_ALONE
    from metatrain.engine.step import (
        SlotLayout,
        admit_call,
        cache_length,
        prefill_width,
        slot_spec,
        steps_call,
    )
    from metatrain.models import init_params_shape
    from metatrain.parallel.mesh import (
        build_inference_mesh,
        inference_mesh_config,
        inference_rules,
        param_shardings,
        sharding_context,
    )

    check_tokenizer_vocab(config)
    model_config = config.model
    context, prompt = check_engine_shape(model_config, batch, context, prompt)
    if num_slices < 1:
        raise UserError(f"--num-slices {num_slices}: need at least 1 slice")
    devices = list(tpu_topology(topology, num_slices).devices)
    per_slice = len(devices) // num_slices
    training_rules = config.mesh.rules
    mesh_config = inference_mesh_config(list(mesh_settings), model_config, per_slice, rules=training_rules)
    if num_slices > 1:
        mesh_config = dataclasses.replace(mesh_config, dcn_data=num_slices)
    try:
        mesh = build_inference_mesh(mesh_config, devices)
    except (NotImplementedError, ValueError, AssertionError) as e:  # mesh_utils: no sub-box of the chips fits
        shown = " ".join(f"{k}={getattr(mesh_config, k)}" for k in ("data", "fsdp", "tensor"))
        raise UserError(f"the mesh {shown} cannot be laid over the chips of {topology}: each axis must be a product "
                        f"of the topology's sides ({str(e).splitlines()[0][:200]}); choose other sizes with "
                        "--set mesh.KEY=VALUE") from None
    rules = inference_rules(training_rules)
    sizes = dict(mesh.shape)
    unit = sizes["data"]
    rows = -(-batch // unit) * unit

    boxed = init_params_shape(model_config)
    params = _sharded(nn.unbox(boxed), param_shardings(boxed, mesh, rules))
    slot_shapes = abstract_slots(model_config, rows, context)
    slots = _sharded(slot_shapes, jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.sharding.NamedSharding(mesh, slot_spec(path, leaf)), slot_shapes))
    kind = devices[0].device_kind
    chip = chip_for_device_kind(kind)
    current = _placement(model_config, boxed, rules, sizes, rows, context)
    width = prefill_width(prompt, context)
    admitted = min(rows, PREFILL_ROWS)
    shape = EngineShape(rows, context, cache_length(context), width, admitted, STEPS_WHEN_ALONE)
    common: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "device_kind": kind, "chip": chip,
        "num_devices": len(devices), "num_hosts": len({(getattr(d, "slice_index", 0), d.process_index) for d in devices}),
        "mesh": sizes, "mesh_chips": mesh.size, "shape": shape, "parameters": current.parameters,
        "kv_cache": current.kv_cache, "row_state": current.row_state,
    }
    if chip is not None and current.held > chip.hbm_bytes:  # refused before compiling: no program could fit
        unknown = DeviceMemory(arguments=current.held, outputs=0, aliased=0, temporaries=None, estimated=True)
        report = InferenceReport(**common, prefill=unknown, decode=unknown, constraints="", compile_seconds=0.0)
        better = _best_placement(model_config, boxed, training_rules, per_slice, rows, context)
        raise UserError(refusal(report, better))

    constraints, source = abstract_constraints(config)
    constraints = _replicated(constraints, mesh)
    new = abstract_admission(mesh, admitted, width)
    cancel = _replicated(jax.ShapeDtypeStruct((rows,), jax.numpy.bool_), mesh)
    layout = SlotLayout(mesh) if mesh.size > 1 else None
    with sharding_context(mesh, rules):  # as the engine traces them
        try:
            lowered = {
                "prefill": admit_call.lower(params, slots, new, model_config=model_config, layout=layout),
                "decode": steps_call.lower(params, slots, cancel, constraints, model_config=model_config,
                                           chooser=None, rows=rows, steps=shape.steps, layout=layout),
            }
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - lowering errors come from JAX, Pallas and Mosaic alike
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"the engine could not be lowered for TPU: {type(e).__name__}: {message}") from None
    start = time.perf_counter()
    memory, refused = {}, None
    for name, program in lowered.items():
        memory[name], error = _compile(program, name, topology, kind, current.held)
        refused = refused or error
    report = InferenceReport(**common, prefill=memory["prefill"], decode=memory["decode"], constraints=source,
                             compile_seconds=time.perf_counter() - start, xla_error=refused)
    return report


def _compile(lowered: Any, name: str, topology: str, kind: str, held: int) -> tuple[DeviceMemory, str | None]:
    """`(memory, XLA's out-of-memory refusal or None)` of one lowered program."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA's refusals are plain runtime errors
        message = str(e)
        if _VMEM_OOM.search(message):
            raise UserError(vmem_refusal(message, topology, kind)) from None
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            first = " ".join(message.strip().splitlines()[:2])[:600]
            raise UserError(f"XLA could not compile the engine's {name} for {topology} (not a memory limit): {first}"
                            ) from None
        memory = DeviceMemory(arguments=held, outputs=held, aliased=held,
                              temporaries=_quoted_bytes(_XLA_OOM_TEMPS, message), estimated=True,
                              xla_total=_quoted_bytes(_XLA_OOM_USED, message))
        return memory, f"{name}: {message.strip().splitlines()[0]}"
    stats = compiled.memory_analysis()
    return DeviceMemory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
    ), None


def _unit(report: InferenceReport) -> tuple[str, float]:
    """GiB, or MiB for an engine that needs less than one GiB a chip."""
    largest = max(report.total or 0, report.parameters + report.slots)
    return ("GiB", _GIB) if largest >= _GIB else ("MiB", float(1 << 20))


def format_report(report: InferenceReport) -> str:
    """The report as `metatrain compile --inference` prints it."""
    s, p, d = report.shape, report.prefill, report.decode
    unit, scale = _unit(report)

    def size(n: int | None) -> str:
        return "unknown" if n is None else f"{n / scale:9.3f} {unit}"

    slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
    chip = report.chip.name if report.chip else f"unknown chip ({report.device_kind!r} is not in metatrain/hardware.py)"
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    if report.num_slices > 1:
        mesh += f" (data spans the {report.num_slices} slices)"
    if report.mesh_chips < report.num_devices:
        mesh += f" (the first {report.mesh_chips} of {report.num_devices} chips)"
    name, larger = report.larger
    smaller, other_program = ("decode", d) if name == "prefill" else ("prefill", p)
    other = None if larger.total is None or larger.temporaries is None else (
        larger.total - report.parameters - report.slots - larger.temporaries)
    lines = [
        f"topology     {report.topology}{slices}: {report.num_devices} chips ({chip}), {report.num_hosts} host(s)",
        f"mesh         {mesh}",
        (f"engine       {s.batch} slots x {s.context} tokens ({s.cache_length} cache positions a row); "
         f"prefill: {s.admitted} prompts x {s.prompt} tokens a call; decode: {s.batch} rows x {s.steps} steps a call"),
        f"grammar      {report.constraints}",
        "memory per chip:",
        f"  parameters   {size(report.parameters)}   the model's, sharded by the inference rules",
        f"  KV cache     {size(report.kv_cache)}   keys and values of every slot [L, B, S, K, H], segment ids",
        f"  row state    {size(report.row_state)}   each slot's logits [B, V] float32, grammar state, key, budget",
        (f"  temporaries  {size(larger.temporaries)}   the {name}'s, the larger program "
         f"({smaller}: {size(other_program.temporaries).strip()})"),
        f"  other        {size(other)}   its other inputs, outputs not aliased to the slots, code",
        f"  total        {size(report.total)}",
        f"  HBM          {size(report.chip.hbm_bytes) if report.chip else 'unknown'}",
        f"compiled in {report.compile_seconds:.1f} s",
    ]
    if report.xla_error is not None:
        lines.append(f"XLA: {report.xla_error}")
    fits = report.fits
    lines.append("fits: unknown (no HBM size for this chip)" if fits is None else "fits: yes" if fits else "fits: NO")
    return "\n".join(lines)


def better_mesh(config: RunConfig, report: InferenceReport) -> _Placement | None:
    """The mesh over the report's chips (of one slice) whose parameters and slots take the
    least memory a chip, for a refusal's suggestion."""
    from metatrain.models import init_params_shape

    per_slice = report.num_devices // report.num_slices
    return _best_placement(config.model, init_params_shape(config.model), config.mesh.rules, per_slice,
                           report.shape.batch, report.shape.context)


def check_inference_fit(config: RunConfig, topology: str, *, batch: int = DEFAULT_BATCH, context: int | None = None,
                        prompt: int | None = None, mesh_settings: Sequence[str] = (), num_slices: int = 1) -> int:
    """`compile_inference`, its report printed; 0 (the exit status) when it fits.

    Raises:
        UserError: as `compile_inference`, or (after the report) the programs exceed HBM.
    """
    import sys

    report = compile_inference(config, topology, batch=batch, context=context, prompt=prompt,
                               mesh_settings=mesh_settings, num_slices=num_slices)
    print(format_report(report))
    sys.stdout.flush()
    if report.fits is False:
        raise UserError(refusal(report, better_mesh(config, report)))
    return 0
