"""Joining the processes of a multi-host run: `jax.distributed.initialize`, once, first.

Every process of a run calls `initialize_from_env()` before anything touches a device
(`metatrain` does it in its CLI, before `train`, `eval` or `annotate` runs). What to join comes from the
environment, which the launchers in this package set:

    METATRAIN_DISTRIBUTED           "auto": let JAX detect the cluster (Cloud TPU, GKE,
                                    Slurm, Open MPI); "off": stay a single process
    METATRAIN_COORDINATOR_ADDRESS   host:port of process 0's coordinator service
    METATRAIN_NUM_PROCESSES         number of processes in the run
    METATRAIN_PROCESS_ID            this process, in [0, METATRAIN_NUM_PROCESSES)
    METATRAIN_LOCAL_DEVICE_IDS      optional: the local devices this process uses ("0,1")
    METATRAIN_INIT_TIMEOUT          optional: seconds to wait for every process (300)

With none of them set, a Slurm job step of several tasks (`SLURM_NTASKS` > 1) and a
multi-host or multi-slice TPU environment (`TPU_WORKER_HOSTNAMES` listing several hosts,
`MEGASCALE_COORDINATOR_ADDRESS`) are detected as `auto`; anything else is one process,
which needs no initialisation at all.

After joining, processes other than 0 log warnings and errors only, so a run's log is
process 0's (metrics files are written by process 0 only, see `metatrain.run.metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal, Mapping

from metatrain.errors import UserError

ENV_MODE = "METATRAIN_DISTRIBUTED"
ENV_COORDINATOR = "METATRAIN_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "METATRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "METATRAIN_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "METATRAIN_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "METATRAIN_INIT_TIMEOUT"

_EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
DEFAULT_INIT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    Attributes:
        mode: "explicit" (coordinator, counts and id given) or "auto" (JAX detects the
            cluster: Cloud TPU, GKE, Slurm, Open MPI).
        coordinator_address: host:port of process 0's coordinator (explicit mode).
        num_processes: number of processes (explicit mode).
        process_id: this process's index (explicit mode).
        local_device_ids: local devices this process drives (None: all, or JAX's
            per-cluster default).
        init_timeout_s: how long to wait for every process to join.
        source: where the settings came from, for messages.
    """

    mode: Literal["explicit", "auto"]
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S
    source: str = "environment"

    def __post_init__(self) -> None:
        if self.mode == "auto":
            return
        if not self.coordinator_address or ":" not in self.coordinator_address:
            raise UserError(
                f"{self.source}: coordinator address {self.coordinator_address!r} must be host:port "
                f"(process 0's address and a free port, e.g. 10.0.0.2:8476)"
            )
        if self.num_processes is None or self.num_processes < 1:
            raise UserError(f"{self.source}: the number of processes must be >= 1, got {self.num_processes}")
        if self.process_id is None or not 0 <= self.process_id < self.num_processes:
            raise UserError(
                f"{self.source}: process id {self.process_id} must be in [0, {self.num_processes}) "
                f"(one distinct id per process)"
            )

    def describe(self) -> str:
        """One line for logs: which process of how many, and where the coordinator is."""
        if self.mode == "auto":
            return f"distributed: auto-detected cluster ({self.source})"
        return (
            f"distributed: process {self.process_id} of {self.num_processes}, "
            f"coordinator {self.coordinator_address} ({self.source})"
        )


def _int_var(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} must be an integer") from None


def _device_ids_var(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    text = environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(
            f"environment variable {ENV_LOCAL_DEVICE_IDS}={text!r} must be comma-separated integers, e.g. 0,1"
        ) from None


def _detected_cluster(environ: Mapping[str, str]) -> str | None:
    """The name of a multi-process cluster environment JAX can join on its own, or None."""
    ntasks = environ.get("SLURM_NTASKS", "")
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and ntasks.isdigit() and int(ntasks) > 1:
        return f"Slurm job {environ['SLURM_JOB_ID']}, {ntasks} tasks"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
    if "," in hosts:
        return f"multi-host TPU ({len(hosts.split(','))} workers in TPU_WORKER_HOSTNAMES)"
    return None


def distributed_from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """The `DistributedConfig` the environment asks for, or None for a single process.

    Raises:
        UserError: an unknown `METATRAIN_DISTRIBUTED` value, or an incomplete or
            invalid explicit setting (names the missing variables).
    """
    environ = os.environ if environ is None else environ
    timeout = _int_var(environ, ENV_INIT_TIMEOUT) if environ.get(ENV_INIT_TIMEOUT) else DEFAULT_INIT_TIMEOUT_S
    mode = environ.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise UserError(f"environment variable {ENV_MODE}={environ[ENV_MODE]!r} must be 'auto' or 'off'")
    if mode == "off":
        return None
    present = [name for name in _EXPLICIT_VARS if environ.get(name)]
    if present:
        missing = [name for name in _EXPLICIT_VARS if name not in present]
        if missing:
            raise UserError(
                f"{', '.join(present)} set but {', '.join(missing)} not: a multi-process run "
                f"needs all of {', '.join(_EXPLICIT_VARS)} (or {ENV_MODE}=auto on a cluster JAX detects)"
            )
        return DistributedConfig(
            mode="explicit",
            coordinator_address=environ[ENV_COORDINATOR],
            num_processes=_int_var(environ, ENV_NUM_PROCESSES),
            process_id=_int_var(environ, ENV_PROCESS_ID),
            local_device_ids=_device_ids_var(environ),
            init_timeout_s=timeout,
            source=f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}",
        )
    if mode == "auto":
        return DistributedConfig(
            mode="auto", local_device_ids=_device_ids_var(environ), init_timeout_s=timeout, source=f"{ENV_MODE}=auto"
        )
    cluster = _detected_cluster(environ)
    if cluster is not None:
        return DistributedConfig(
            mode="auto", local_device_ids=_device_ids_var(environ), init_timeout_s=timeout, source=cluster
        )
    return None


def initialize(config: DistributedConfig) -> None:
    """Call `jax.distributed.initialize` for `config`; quiet the logs of processes > 0.

    Raises:
        UserError: JAX's backend is already running in this process (a device was
            touched first), or the processes could not join (with the coordinator).
    """
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        return
    if xla_bridge.backends_are_initialized():
        raise UserError(
            "jax.distributed.initialize must run before anything touches a device, but JAX's "
            "backend is already initialised in this process; initialise first (metatrain's CLI "
            "does it before `train`, `eval` and `annotate`)"
        )
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Collectives between CPU processes (tests, `launch local`) go over loopback TCP.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict = {"initialization_timeout": config.init_timeout_s}
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = list(config.local_device_ids)
    if config.mode == "explicit":
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join the multi-process run ({config.describe()}): {e}") from None
    if jax.process_index() != 0:
        quiet_logging()


def quiet_logging() -> None:
    """Only warnings and errors from this process (used on every process but 0)."""
    logging.getLogger().setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # absl comes with orbax and grain; without it there is nothing to quiet
        pass


def initialize_from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """Join the run the environment describes (see the module docstring); None: one process."""
    config = distributed_from_env(environ)
    if config is not None:
        initialize(config)
    return config
