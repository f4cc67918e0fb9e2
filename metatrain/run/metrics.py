"""Turning step sums into reported metrics, and writing them (JSON Lines, TensorBoard, W&B).

Only process 0 writes. Metric keys are a contract read by scripts and by
`metatrain sweep`: `loss`, `loss/<role>`, `accuracy/<role>`, `tokens/<role>`,
`learning_rate`, `grad_norm`, `tokens_per_sec`, `step_time`, `mfu`, and where the
wall time went, `goodput/*` (`metatrain.run.goodput`). A run's last record may hold only
`goodput/*` keys (the time after its last window: final evaluation and checkpoint), at
the same step as the window before it.

In a work directory in a bucket, `metrics.jsonl` is appended by GCS compose
(`metatrain.io.storage.ObjectAppender`): lines reach the bucket every 30 s, before each
checkpoint is saved and at the end, so every step up to a checkpoint is logged there.
TensorBoard's event files are written there by tensorboardX itself.

With `trainer.wandb`, every record also goes to Weights & Biases with the same keys and
step (`metatrain.run.wandb_log`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from metatrain.config import WandbConfig
from metatrain.errors import fault_from_os_error
from metatrain.io.storage import ObjectAppender, as_path, is_remote
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.run.layout import METRICS_FILE, TENSORBOARD_DIR
from metatrain.run.wandb_log import WandbRun


def role_metrics(sums: Mapping[str, float], prefix: str = "") -> dict[str, float | None]:
    """Per-role mean loss, accuracy and token counts from summed statistics.

    A role with no tokens in the window reports `None` for its loss and accuracy
    (not 0, which would read as a perfect model).
    """
    out: dict[str, float | None] = {}
    for role in LOSS_ROLE_LABELS:
        count = float(sums[f"count/{role}"])
        out[f"{prefix}tokens/{role}"] = int(count)
        if count > 0:
            out[f"{prefix}loss/{role}"] = float(sums[f"nll_sum/{role}"]) / count
            out[f"{prefix}accuracy/{role}"] = float(sums[f"correct/{role}"]) / count
        else:
            out[f"{prefix}loss/{role}"] = None
            out[f"{prefix}accuracy/{role}"] = None
    return out


def add_sums(acc: dict[str, float] | None, new: Mapping[str, object]) -> dict[str, float]:
    """Accumulate device metric sums on the host (float64)."""
    new_np = {k: float(np.asarray(v, dtype=np.float64)) for k, v in new.items()}
    if acc is None:
        return new_np
    return {k: acc[k] + new_np[k] for k in acc}


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops_per_device: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilisation, or None where the device's peak is unknown (e.g. CPU)."""
    if peak_flops_per_device is None or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / (peak_flops_per_device * num_devices)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def _register_gcs_event_writer() -> None:
    """tensorboardX's own `gs://` event writer, closed once: its `__del__` closes (and so
    uploads the whole event file) again, at garbage collection, after `close()` did."""
    from tensorboardX import record_writer

    class ClosedOnce(record_writer.GCSRecordWriter):
        closed = False

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                self.flush()

    class Factory(record_writer.GCSRecordWriterFactory):
        def open(self, path):
            return ClosedOnce(path)

    record_writer.register_writer_factory("gs", Factory())


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` and mirrors scalars to TensorBoard,
    and every record to Weights & Biases when `wandb` is given.

    Nothing is opened until `open()` (the trainer calls it once the run has started from
    a validated state, so a refused resume starts no W&B run). A failed write is a
    `FaultError` naming the file.

    Args:
        workdir: the run's work directory.
        enabled: whether this process writes (process 0 only).
        wandb: where the W&B run lives (`trainer.wandb`; None: no W&B).
        run_config: the run's resolved config (`config_to_dict`), the W&B run's config.
    """

    def __init__(self, workdir: Path, enabled: bool = True, *, wandb: WandbConfig | None = None,
                 run_config: Mapping[str, object] | None = None):
        self.enabled = enabled
        self.wandb_config = wandb
        self.run_config = run_config
        self.path = as_path(workdir) / METRICS_FILE
        self._file = None
        self._tb = None
        self._wandb: WandbRun | None = None

    def open(self) -> None:
        """Open `metrics.jsonl`, TensorBoard's writer and the W&B run (once).

        Raises:
            FaultError: `metrics.jsonl` cannot be opened.
            UserError: W&B is asked for but not installed, or did not start.
        """
        if not self.enabled or self._file is not None:
            return
        try:
            self._file = (ObjectAppender(self.path) if is_remote(str(self.path))
                          else open(self.path, "a", encoding="utf-8"))
        except OSError as e:
            raise fault_from_os_error(e, f"cannot open {self.path} for writing") from None
        try:
            from tensorboardX import SummaryWriter

            if is_remote(str(self.path)):
                _register_gcs_event_writer()
            self._tb = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR))
        except ImportError:  # TensorBoard output is optional; metrics.jsonl is not.
            self._tb = None
        if self.wandb_config is not None:
            self._wandb = WandbRun.start(self.wandb_config, self.path.parent, self.run_config)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        self.open()
        cleaned = {k: _clean(v) for k, v in metrics.items()}
        record = {"step": int(step), **cleaned}
        try:
            self._file.write(json.dumps(record) + "\n")
            if not isinstance(self._file, ObjectAppender):  # a bucket is written in batches
                self._file.flush()
        except OSError as e:
            raise fault_from_os_error(e, f"writing metrics of step {step} to {self.path} failed") from None
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, cleaned)

    def flush(self) -> None:
        """Make every line written so far durable (before a checkpoint is saved)."""
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            raise fault_from_os_error(e, f"writing metrics to {self.path} failed") from None
        if self._tb is not None:
            self._tb.flush()

    def close(self, failed: bool | None = None) -> None:
        """Close the files and finish the W&B run, marked failed when `failed` (None: when
        `close` runs while an exception is being handled)."""
        if failed is None:
            failed = sys.exc_info()[0] is not None
        try:
            if self._file is not None:
                file, self._file = self._file, None
                try:
                    file.close()
                except OSError as e:
                    if isinstance(file, ObjectAppender):  # the last lines never reached the bucket
                        raise fault_from_os_error(e, f"writing metrics to {self.path} failed") from None
                    # a local write that failed has already been reported
            if self._tb is not None:
                try:
                    self._tb.close()
                except OSError:
                    pass
                self._tb = None
        finally:
            if self._wandb is not None:
                run, self._wandb = self._wandb, None
                run.finish(failed=failed)
