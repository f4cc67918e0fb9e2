"""Which parts of a run config may change when a run resumes, and the check that says so.

A checkpoint stores the resolved config it was trained with. Resuming compares the
new resolved config with it key by key (dotted keys, lists compared whole) before
anything is written. Keys in `RESUMABLE_KEYS` (or under a prefix there) say *how* or
*how long* to train and may change; every other key says *what* is trained (model
shape and dtypes, tokenizer, data stream and order, batch, loss weights, optimizer),
and a change is refused with one line per key, `key: old -> new`. A key added to the
config after a checkpoint was written (`ADDED_KEYS`) reads, in that checkpoint's config,
as the value that keeps the old behaviour.

The tokenizer and tag registry are compared by content: the run keeps copies of them,
so pointing `data.tokenizer` at the same file in another place is not a change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from metatrain.errors import UserError
from metatrain.io.storage import as_path
from metatrain.run.layout import TAGS_FILE, TOKENIZER_FILE

#: Keys that may differ from the checkpoint's config on resume, and why each is safe.
RESUMABLE_KEYS: dict[str, str] = {
    "trainer.steps": "how long to train (the learning-rate schedule is recomputed for the new total)",
    "trainer.log_every": "metric cadence",
    "trainer.eval_every": "evaluation cadence",
    "trainer.eval_batches": "evaluation size",
    "trainer.eval_ablation": "whether evaluations also score held-out text without its thinking",
    "trainer.progress": "the progress bar",
    "trainer.profile": "a profiler trace of some steps",
    "trainer.wandb.": "where metrics are mirrored (Weights & Biases)",
    "trainer.grad_accum": "micro-batching: the same gradient, less memory",
    "checkpoint.": "checkpoint cadence, retention and async saving",
    "mesh.": "the device layout: checkpoints restore onto any mesh",
    "loss.impl": "the kernel computing the same loss",
    "loss.precision": "the matmul dtype of the same loss",
    "model.remat": "what is recomputed in the backward pass",
    "model.attention": "the kernel computing the same attention",
    "data.strict": "whether a bad record stops the run",
}

#: Prefixes of the keys `--allow-change KEY` may accept: the training recipe, which
#: changes what is learnt from here on but not the shape of anything restored (lowering
#: the learning rate after a divergence, say). Model, data and batch keys never.
CHANGEABLE_ON_REQUEST: tuple[str, ...] = ("optimizer.", "loss.")

#: Keys added to the config after checkpoints were written without them, and the value
#: such a checkpoint's config means by their absence (so its resume is not refused).
ADDED_KEYS: dict[str, Any] = {
    "data.schedule": [],
    "optimizer.decay_fraction": 0.2,
    "optimizer.cooldown_shape": "linear",
    "model.parametrization": "standard",
    "model.mup_base_width": None,
    "trainer.wandb": None,
}

#: Keys compared by the content of the file they name, not by the path.
CONTENT_KEYS: dict[str, str] = {"data.tokenizer": TOKENIZER_FILE, "data.tags": TAGS_FILE}


class ResumeRefused(UserError):
    """The new config changes what the checkpoint was trained on."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _normal(value: Any) -> Any:
    """JSON round trip: tuples become lists, so stored and new configs compare alike."""
    return json.loads(json.dumps(value))


def is_resumable(key: str) -> bool:
    # A prefix `a.b.` also covers `a.b` itself: a section that is null in one config.
    return any(key == k or (k.endswith(".") and (key.startswith(k) or key == k[:-1])) for k in RESUMABLE_KEYS)


def _same_file(workdir: Path | None, name: str, new: Any) -> bool:
    if workdir is None or not isinstance(new, str):
        return False
    copy, path = as_path(workdir) / name, as_path(new)
    try:
        return copy.is_file() and path.is_file() and copy.read_bytes() == path.read_bytes()
    except OSError:
        return False


def check_allowed_changes(keys: Iterable[str]) -> tuple[str, ...]:
    """The `--allow-change` keys, each refused unless under `CHANGEABLE_ON_REQUEST`.

    Raises:
        UserError: a key outside the training recipe (it would change a restored shape
            or the data stream).
    """
    keys = tuple(keys)
    for key in keys:
        if not key.startswith(CHANGEABLE_ON_REQUEST) or key in CHANGEABLE_ON_REQUEST:
            raise UserError(
                f"--allow-change {key}: only keys of the training recipe ({', '.join(p + '*' for p in CHANGEABLE_ON_REQUEST)}) "
                "may be changed on resume on request; for anything else train in another --workdir"
            )
    return keys


def config_differences(
    stored: Mapping[str, Any], new: Mapping[str, Any], workdir: Path | None = None, allowed: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """`(key, old, new)` for every key that differs and may not change on resume
    (`allowed`: keys accepted by `--allow-change`, see `check_allowed_changes`)."""
    old_flat, new_flat = flatten(_normal(stored)), flatten(_normal(new))
    allowed = set(check_allowed_changes(allowed))
    out = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key, ADDED_KEYS.get(key, "<unset>")), new_flat.get(key, "<unset>")
        if old == value or is_resumable(key) or key in allowed:
            continue
        if key in CONTENT_KEYS and _same_file(workdir, CONTENT_KEYS[key], value):
            continue
        out.append((key, old, value))
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_resume(
    stored: Mapping[str, Any], new: Mapping[str, Any], *, step: int, workdir: Path, allowed: Iterable[str] = ()
) -> None:
    """Refuse to resume from a checkpoint whose config differs in a key that may not change.

    Raises:
        ResumeRefused: one line per differing key, `key: old -> new`, and the fix.
    """
    diffs = config_differences(stored, new, workdir, allowed)
    if not diffs:
        return
    lines = [f"  {key}: {_show(old)} -> {_show(value)}" for key, old, value in diffs]
    sets = " ".join(f"--set {key}={_show(old)}" for key, old, _ in diffs if old != "<unset>")
    fix = f"train in another --workdir, or set the keys back ({sets})"
    if all(key.startswith(CHANGEABLE_ON_REQUEST) for key, _, _ in diffs):
        fix += ", or keep them with " + " ".join(f"--allow-change {key}" for key, _, _ in diffs)
    raise ResumeRefused(
        f"cannot resume {workdir} from its checkpoint at step {step}: the config changes what was trained\n"
        + "\n".join(lines)
        + f"\n  fix: {fix}"
    )


def resumable_keys_doc(keys: Iterable[str] = RESUMABLE_KEYS) -> str:
    """The Markdown table of `RESUMABLE_KEYS` (kept in docs/train.md; a test compares)."""
    rows = [f"| `{k}{'*' if k.endswith('.') else ''}` | {RESUMABLE_KEYS[k]} |" for k in keys]
    return "\n".join(["| key | why it may change |", "| --- | --- |", *rows])
