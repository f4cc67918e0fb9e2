"""Samples as `metatrain generate` prints them, and the one `metatrain train` ends with.

`sample_checkpoint` loads a checkpoint, continues the prompts and returns what the
command prints for each sample (`format_samples`: text, or one JSON object);
`training_sample` is the short sample printed after the embedded default training run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from metatrain.generate.generator import Generator, Sample

#: Prompt of the sample printed after the default training run (the sample corpus's
#: documents open with "Background:").
TRAINING_SAMPLE_PROMPT: str = "Background:"


def sample_checkpoint(
    workdir: Path | None,
    checkpoint: Path | None,
    prompts: Sequence[str],
    *,
    lock_mode: str | None = None,
    control: str | None = None,
    num_samples: int = 1,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh_settings: Sequence[str] = (),
    as_json: bool = False,
    hide_thinking: bool = False,
) -> list[str]:
    """Continue `prompts` with the checkpoint of `workdir` (its latest) or `checkpoint`.

    The prompts and the sampling settings are checked before the checkpoint loads.

    Args:
        workdir: a `metatrain train` work directory (None: `checkpoint` names the step).
        checkpoint: one checkpoint step directory (None: the latest of `workdir`).
        prompts: human-mode prompt texts, one batch.
        lock_mode: lock generation into this mode ("ai"), or None.
        control: condition the reply on this control token of the tag registry.
        num_samples: samples per prompt.
        max_new_tokens: token budget per sample (None: the generator's default).
        temperature, top_k, top_p: sampling (`SamplingConfig`).
        seed: PRNG seed.
        as_json: one JSON object per sample instead of text.
        hide_thinking: leave thinking blocks out of the text.

    Returns:
        What `metatrain generate` prints for each sample, in order (`format_samples`).

    Raises:
        UserError: a bad prompt, setting or seed, no loadable checkpoint, or more samples
            than the device's memory holds in one batch.
    """
    from metatrain.engine.sampling import SamplingConfig, check_seed
    from metatrain.generate.prompts import check_prompt_text

    for prompt in prompts:  # before the checkpoint loads
        check_prompt_text(prompt)
    check_seed(seed)
    sampling = SamplingConfig(temperature, top_k, top_p)
    generator = Generator.load(workdir, checkpoint, mesh_settings=list(mesh_settings))
    samples = generator.generate(
        prompts,
        lock_mode=lock_mode,
        control=control,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
    )
    return format_samples(generator, samples, prompts, as_json=as_json, hide_thinking=hide_thinking)


def format_samples(
    generator: Generator, samples: Sequence[Sample], prompts: Sequence[str], *, as_json: bool = False,
    hide_thinking: bool = False,
) -> list[str]:
    """Each sample as `metatrain generate` prints it.

    As JSON: `Sample.to_json` with the prompt and the rendered text. As text: the prompt
    and its continuation, under a `=== prompt P, sample S (reason) ===` header when there
    are several samples.
    """
    out = []
    for sample in samples:
        if as_json:
            record = sample.to_json()
            record["prompt"] = prompts[sample.prompt_index]
            record["text"] = generator.render(sample, hide_thinking=hide_thinking)
            out.append(json.dumps(record, ensure_ascii=False))
            continue
        text = generator.render(sample, prompts[sample.prompt_index], hide_thinking=hide_thinking)
        if len(samples) > 1:
            text = (f"=== prompt {sample.prompt_index + 1}, sample {sample.sample_index + 1} "
                    f"({sample.finish_reason}) ===\n{text}")
        out.append(text)
    return out


def training_sample(workdir: Path, *, max_new_tokens: int = 96, seed: int = 0) -> str:
    """One short sample from the latest checkpoint of `workdir`, for the end of training.

    Sampled at temperature 0.8 with top-p 0.95 after `TRAINING_SAMPLE_PROMPT`.
    """
    from metatrain.engine.sampling import SamplingConfig

    generator = Generator.load(workdir)
    budget = min(max_new_tokens, generator.model_config.max_seq_len - 16)
    (sample,) = generator.generate(
        [TRAINING_SAMPLE_PROMPT], max_new_tokens=budget, sampling=SamplingConfig(0.8, 0, 0.95), seed=seed
    )
    command = f'metatrain generate --workdir {workdir} --prompt "{TRAINING_SAMPLE_PROMPT}"'
    return f"sample ({command}):\n{generator.render(sample, TRAINING_SAMPLE_PROMPT)}"
