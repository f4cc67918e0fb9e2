"""`metatrain launch tpu`: TPU slices and multi-slice, through gcloud or xpk.

A slice is named by its topology as `metatrain compile` takes it (`v5e:4x4`,
`v5p:4x4x4`, ...), so the config compiled for a target is launched on the same string.
From it come the chip count, the hosts (one process each), gcloud's accelerator type
(`v5litepod-16`, `v5p-128`) and GKE's node labels.

- One slice, `--via gcloud` (default): every worker of an existing TPU VM runs the same
  command through `gcloud compute tpus tpu-vm ssh --worker=all`; first (unless
  `--no-setup`) the code is cloned and installed on each worker.
- Multi-slice (`--num-slices S > 1`) or `--via xpk`: one `xpk workload create` on a GKE
  cluster; the train command gets `--set mesh.dcn_data=S` so the mesh's data axis spans
  the slices (only gradients cross the data-centre network).

Every process is started with `METATRAIN_DISTRIBUTED=auto`: `jax.distributed` finds the
coordinator (worker 0), process count and id from the TPU environment itself.

Paths: the train command runs in `--code-dir` of a clone of `--git-url` (gcloud) or of
the image (xpk), so a relative `--config` is a file of this repository, relative to its
root (the launcher reads it from this checkout to check the run); an absolute one is read
at that path on the workers too (shared storage); `--workdir` and `--set` paths are the
worker's. Names are validated (`metatrain.launch.validate`) and every value
in the workers' shell command is `shlex.quote`d.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from typing import Mapping

from metatrain.errors import UserError
from metatrain.launch import distributed as dist
from metatrain.launch import validate
from metatrain.launch.plan import Command, Plan, TrainCommand, check_run_shape, set_override

_TOPOLOGY = re.compile(r"(?P<gen>v4|v5e|v5p|v6e):(?P<shape>[0-9]+(x[0-9]+){1,2})")


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a TPU generation's names and hosts look like.

    Attributes:
        name: the topology prefix (`v5e`).
        accelerator_prefix: gcloud / xpk accelerator-type prefix (`v5litepod`).
        counts_cores: accelerator types count TensorCores (2 per chip), not chips.
        gke_accelerator: GKE's `cloud.google.com/gke-tpu-accelerator` label.
        dims: topology dimensions (2 or 3).
        single_host_max: chips of the largest single-host slice.
        runtime_version: TPU VM software version to create the VMs with.
    """

    name: str
    accelerator_prefix: str
    counts_cores: bool
    gke_accelerator: str
    dims: int
    single_host_max: int
    runtime_version: str


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", "v4", True, "tpu-v4-podslice", 3, 4, "tpu-ubuntu2204-base"),
    "v5p": TpuGeneration("v5p", "v5p", True, "tpu-v5p-slice", 3, 4, "v2-alpha-tpuv5"),
    "v5e": TpuGeneration("v5e", "v5litepod", False, "tpu-v5-lite-podslice", 2, 8, "v2-alpha-tpuv5-lite"),
    "v6e": TpuGeneration("v6e", "v6e", False, "tpu-v6e-slice", 2, 8, "v2-alpha-tpuv6e"),
}

#: Chips per host in multi-host slices (every generation here).
CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice of a given topology.

    Attributes:
        topology: e.g. "v5p:4x4x4".
        generation: its generation's naming.
        shape: e.g. "4x4x4".
        chips: chips in the slice.
    """

    topology: str
    generation: TpuGeneration
    shape: str
    chips: int

    @property
    def hosts(self) -> int:
        """TPU VM hosts (one process each): single-host slices up to 4 or 8 chips, else 4 per host."""
        if self.chips <= self.generation.single_host_max:
            return 1
        return self.chips // CHIPS_PER_HOST

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def accelerator_type(self) -> str:
        """gcloud's and xpk's name: `v5litepod-16`, `v5p-128` (TensorCores for v4/v5p)."""
        count = self.chips * 2 if self.generation.counts_cores else self.chips
        return f"{self.generation.accelerator_prefix}-{count}"


def parse_topology(topology: str) -> TpuSlice:
    """`v5e:4x4` -> a `TpuSlice`.

    Raises:
        UserError: not GENERATION:SHAPE for a known generation, or the wrong number of dims.
    """
    match = _TOPOLOGY.fullmatch(topology.strip())
    if match is None:
        raise UserError(
            f"--topology {topology!r}: expected GENERATION:SHAPE with GENERATION one of "
            f"{', '.join(GENERATIONS)}, e.g. v5e:4x4, v5p:4x4x4, v6e:8x8 (the names `metatrain compile` takes)"
        )
    generation = GENERATIONS[match["gen"]]
    dims = [int(d) for d in match["shape"].split("x")]
    if len(dims) != generation.dims or min(dims) < 1:
        example = "2x2x2" if generation.dims == 3 else "4x4"
        raise UserError(
            f"--topology {topology!r}: {generation.name} topologies have {generation.dims} dimensions, e.g. "
            f"{generation.name}:{example}"
        )
    chips = math.prod(dims)
    if chips > generation.single_host_max and chips % CHIPS_PER_HOST:
        raise UserError(f"--topology {topology!r}: a multi-host slice has a multiple of {CHIPS_PER_HOST} chips")
    return TpuSlice(topology.strip(), generation, match["shape"], chips)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuOptions:
    """Options of `metatrain launch tpu` (placeholders such as `<PROJECT>` under --dry-run)."""

    topology: str
    num_slices: int = 1
    via: str | None = None  # "gcloud" | "xpk"; None: gcloud for one slice, xpk for several
    project: str
    zone: str
    tpu_name: str
    cluster: str
    image: str
    workload: str = "metatrain"
    git_url: str
    git_ref: str = "main"
    code_dir: str = "~/metatrain"
    setup: bool = True
    max_restarts: int = 3
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        validate.GCP_PROJECT.check("--project", self.project)
        validate.GCP_ZONE.check("--zone", self.zone)
        validate.TPU_NAME.check("--tpu-name", self.tpu_name)
        validate.GKE_CLUSTER.check("--cluster", self.cluster)
        validate.IMAGE.check("--image", self.image)
        validate.XPK_WORKLOAD.check("--workload", self.workload)
        validate.GIT_URL.check("--git-url", self.git_url)
        validate.GIT_REF.check("--git-ref", self.git_ref)
        validate.check_path("--code-dir", self.code_dir)
        validate.check_range("--max-restarts", self.max_restarts, 0, what="the restart count")
        validate.check_env("--env", self.env)


def _remote_path(path: str) -> str:
    """`path` as one word of the worker's shell, quoted; a leading `~/` stays bare so the
    worker's shell expands it to the home directory."""
    if path == "~" or path.startswith("~/"):
        return path[:2] + (shlex.quote(path[2:]) if path[2:] else "")
    return shlex.quote(path)


def _train_shell(train: TrainCommand, env: Mapping[str, str]) -> str:
    """`VAR=... python3 -m metatrain.cli train ...` as one shell line."""
    assignments = {dist.ENV_MODE: "auto", **env}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in assignments.items())
    return f"{prefix} python3 -m metatrain.cli {shlex.join(train.args)}"


def _notes(tpu: TpuSlice, slices: int, mesh: str, train: TrainCommand) -> list[str]:
    total_hosts = tpu.hosts * slices
    lines = [
        f"# TPU {tpu.accelerator_type} (topology {tpu.topology}) x {slices} slice(s): "
        f"{tpu.chips * slices} chips, {total_hosts} hosts x {tpu.chips_per_host} chips",
        f"# processes: {total_hosts} (one per host); coordinator: worker 0 of slice 0, found by "
        f"jax.distributed ({dist.ENV_MODE}=auto)",
        f"# {mesh}",
    ]
    if not train.has_workdir and total_hosts > 1:
        lines.append("# note: pass --workdir gs://BUCKET/PATH (or storage every host mounts); checkpoints are collective")
    return lines


def _gcloud_plan(options: TpuOptions, tpu: TpuSlice, train: TrainCommand, notes: list[str]) -> Plan:
    where = [f"--project={options.project}", f"--zone={options.zone}", "--worker=all"]
    ssh = ("gcloud", "compute", "tpus", "tpu-vm", "ssh", options.tpu_name, *where)
    code = _remote_path(options.code_dir)
    create = (
        "gcloud", "compute", "tpus", "tpu-vm", "create", options.tpu_name, f"--project={options.project}",
        f"--zone={options.zone}", f"--accelerator-type={tpu.accelerator_type}",
        f"--version={tpu.generation.runtime_version}",
    )
    commands = []
    text = [
        "# metatrain launch tpu: run these from a machine with gcloud access to the TPU VM",
        f"#   (create it first: {shlex.join(create)})",
        *notes,
    ]
    if options.setup:
        setup = (
            f"git clone --branch {shlex.quote(options.git_ref)} -- {shlex.quote(options.git_url)} {code} 2>/dev/null "
            f'|| git -C {code} pull --ff-only; cd {code} && pip install -e ".[tpu]"'
        )
        commands.append(Command((*ssh, f"--command={setup}")))
        text += ["", "# 1. every worker: fetch and install metatrain", commands[-1].shell()]
    run = f"cd {code} && {_train_shell(train, options.env)}"
    commands.append(Command((*ssh, f"--command={run}")))
    step = "2. " if options.setup else ""
    text += ["", f"# {step}every worker: train (all {tpu.hosts} hosts join one run)", commands[-1].shell()]
    return Plan("\n".join(text), tuple(commands))


def _xpk_plan(options: TpuOptions, tpu: TpuSlice, train: TrainCommand, notes: list[str]) -> Plan:
    command = Command(
        (
            "xpk", "workload", "create",
            f"--cluster={options.cluster}",
            f"--project={options.project}",
            f"--zone={options.zone}",
            f"--workload={options.workload}",
            f"--docker-image={options.image}",
            f"--tpu-type={tpu.accelerator_type}",
            f"--num-slices={options.num_slices}",
            f"--max-restarts={options.max_restarts}",
            f"--command={_train_shell(train, options.env)}",
        )
    )
    text = [
        "# metatrain launch tpu (xpk): one workload on a GKE cluster with TPU node pools",
        "#   (create it first: xpk cluster create --cluster=... --tpu-type="
        f"{tpu.accelerator_type} --num-slices={options.num_slices}); the image must contain metatrain",
        *notes,
        f"# on preemption every process saves and exits 75; xpk restarts the workload (up to "
        f"{options.max_restarts} times) and it resumes",
        "",
        command.shell(),
    ]
    return Plan("\n".join(text), (command,))


def tpu_plan(options: TpuOptions, train: TrainCommand) -> Plan:
    """The plan for `metatrain launch tpu`.

    Raises:
        UserError: bad topology, slices with gcloud, or a run that does not fit the chips.
    """
    tpu = parse_topology(options.topology)
    if options.num_slices < 1:
        raise UserError(f"--num-slices {options.num_slices}: need at least 1 slice")
    via = options.via or ("gcloud" if options.num_slices == 1 else "xpk")
    if via == "gcloud" and options.num_slices > 1:
        raise UserError(
            f"--num-slices {options.num_slices} with --via gcloud: multi-slice runs are launched with xpk "
            "(drop --via, or use --via xpk)"
        )
    train = set_override(train, "mesh.dcn_data", options.num_slices)
    mesh = check_run_shape(train.config, tpu.chips * options.num_slices, tpu.hosts * options.num_slices)
    notes = _notes(tpu, options.num_slices, mesh, train)
    if via == "gcloud":
        return _gcloud_plan(options, tpu, train, notes)
    return _xpk_plan(options, tpu, train, notes)

