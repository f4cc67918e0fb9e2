"""Peak throughput and memory of the accelerators metatrain reports against.

One table, used for MFU in training metrics and for fit checks when compiling for
a target ahead of time. Numbers are dense bf16 matrix-unit peaks per chip from the
vendors' datasheets (no sparsity), and HBM per chip.
"""

from __future__ import annotations

import dataclasses
import glob
import os

#: What libtpu is told off a TPU VM: no metadata server, one local worker. Neither
#: running on CPU/GPU nor compiling ahead of time for a TPU topology needs more.
_NO_LOCAL_TPU = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4"}


def on_tpu_vm() -> bool:
    """Whether this machine has TPU chips attached (their device files exist)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_off_tpu() -> None:
    """Off a TPU VM, keep an installed libtpu from looking for one (metadata server, worker
    hostnames) and printing initialisation errors; JAX then falls back to CPU or GPU. A TPU
    VM's own settings, and any the user set, are kept. Call before JAX's backends start.
    """
    if not on_tpu_vm():
        for variable, value in _NO_LOCAL_TPU.items():
            os.environ.setdefault(variable, value)


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: int  # per chip


_GIB = 1 << 30

CHIPS: dict[str, Chip] = {
    "tpu v4": Chip("TPU v4", 275e12, 32 * _GIB),
    "tpu v5e": Chip("TPU v5e", 197e12, 16 * _GIB),
    "tpu v5p": Chip("TPU v5p", 459e12, 95 * _GIB),
    "tpu v6e": Chip("TPU v6e", 918e12, 32 * _GIB),
    "a100": Chip("NVIDIA A100", 312e12, 80 * _GIB),
    "h100": Chip("NVIDIA H100", 989e12, 80 * _GIB),
    "h200": Chip("NVIDIA H200", 989e12, 141 * _GIB),
}

# device_kind strings as JAX reports them, matched by substring (lower case).
_KIND_ALIASES: tuple[tuple[str, str], ...] = (
    ("v5 lite", "tpu v5e"),
    ("v5litepod", "tpu v5e"),
    ("v5e", "tpu v5e"),
    ("v5p", "tpu v5p"),
    ("tpu v5", "tpu v5p"),  # v5p devices report "TPU v5" (v5e reports "TPU v5 lite", above)
    ("v6 lite", "tpu v6e"),
    ("v6e", "tpu v6e"),
    ("tpu v4", "tpu v4"),
    ("a100", "a100"),
    ("h100", "h100"),
    ("h200", "h200"),
)


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The table entry for a JAX `device.device_kind`, or None if unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for alias, key in _KIND_ALIASES:
        if alias in kind:
            return CHIPS[key]
    return None


def local_chip() -> Chip | None:
    """The chip of this process's first device, or None where the peak is unknown."""
    import jax  # here, not at the top: commands that never touch a device do not load JAX

    return chip_for_device_kind(jax.devices()[0].device_kind)
