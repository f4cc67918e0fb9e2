"""`--generator metatrain`: a metatrain checkpoint writes the thinking itself.

The generational loop: generation N, trained on thinking-annotated text, annotates the
corpus for generation N+1. For each insertion point the model continues the document so
far (its text, and the thinking already in it) under the thinking lock
(`metatrain.generate.constraints.THINKING_LOCK`): `<thinking>` and the mantra are forced
as in training (the run's own mantra and policy), the model writes the block's text,
and the block ends at `</thinking>`. The chat template is not used: the model was
trained on documents, not on instructions.

One request runs at a time (one device); the context is cut from the front to leave
`max_new_tokens` under the model's `max_seq_len`. A block cut off by `max_new_tokens`
keeps the text written so far.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from metatrain.annotate.generators import GenerationError, ThinkReply, ThinkRequest, register_generator
from metatrain.documents import Document, Segment
from metatrain.errors import UserError
from metatrain.io.storage import absolute, as_path

#: Characters of document text the model sees before the point (then cut to fit).
DEFAULT_CONTEXT_CHARS = 4000


class MetatrainGenerator:
    """Thoughts from a metatrain checkpoint (see the module docstring)."""

    kind = "metatrain"

    def __init__(self, workdir: str | Path | None = None, *, checkpoint: str | Path | None = None,
                 temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 96,
                 context_chars: int = DEFAULT_CONTEXT_CHARS):
        from metatrain.generate.generator import Generator
        from metatrain.generate.sampling import SamplingConfig

        if max_new_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_new_tokens}")
        self.sampling = SamplingConfig(temperature, top_k, top_p)
        self.generator = Generator.load(as_path(workdir) if workdir else None, as_path(checkpoint) if checkpoint else None)
        self.max_new_tokens = min(max_new_tokens, self.generator.model_config.max_seq_len - 8)
        self.context_chars = context_chars
        self.model = str(absolute(workdir or checkpoint))
        self.settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                         "max_new_tokens": self.max_new_tokens}
        self.mantra = self.generator.encoder.mantra or ""  # what the Annotator removes from a reply
        self._lock = asyncio.Lock()

    async def prepare(self, example: ThinkRequest | None) -> None:
        """Nothing to check: the checkpoint loaded, and each request is fitted to its context."""

    async def think(self, request: ThinkRequest) -> ThinkReply:
        async with self._lock:  # one device: requests take turns
            return await asyncio.to_thread(self._think, request)

    def _think(self, request: ThinkRequest) -> ThinkReply:
        from metatrain.generate.constraints import THINKING_LOCK
        from metatrain.generate.prompts import encode_prompt

        encoder = self.generator.encoder
        room = self.generator.model_config.max_seq_len - self.max_new_tokens
        keep = self.context_chars
        while True:
            prompt = Document(request.doc_id, _last_chars(request.context, keep), mode=request.mode)
            encoded = encode_prompt(encoder, prompt, THINKING_LOCK)
            length = len(encoded.ids)  # the forced <thinking> and mantra included
            if length <= room:
                break
            if keep <= 1:
                raise GenerationError(f"the mantra alone leaves no room in max_seq_len "
                                      f"{self.generator.model_config.max_seq_len}")
            keep = max(1, keep * room // (2 * length))
        try:
            sample = self.generator.generate([prompt], lock_mode=THINKING_LOCK, max_new_tokens=self.max_new_tokens,
                                             sampling=self.sampling, seed=request.seed)[0]
        except UserError as e:
            raise GenerationError(str(e)) from None
        thinking = next((s.text for s in sample.segments if s.kind == "thinking"), "")
        if encoder.mantra and thinking.startswith(encoder.mantra):
            thinking = thinking[len(encoder.mantra):]
        # `sample.ids` starts with the forced prefix, already counted in `tokens_in`.
        return ThinkReply(thinking.strip(), tokens_in=length, tokens_out=len(sample.ids) - len(encoded.prefix))

    async def aclose(self) -> None:
        return None


def _last_chars(segments: tuple[Segment, ...], keep: int) -> tuple[Segment, ...]:
    """The end of `segments` holding at most `keep` characters of text (a cut segment
    loses its front; at least one text segment remains)."""
    out: list[Segment] = []
    left = keep
    for seg in reversed(segments):
        if left <= 0:
            break
        if len(seg.text) > left:
            seg = dataclasses.replace(seg, text=seg.text[-left:])
        out.append(seg)
        left -= len(seg.text)
    out.reverse()
    while out and out[0].kind != "text":
        out.pop(0)  # a context starts with text, never with a cut-off thought
    return tuple(out) or (Segment("text", " "),)


@register_generator("metatrain")
def build_metatrain_generator(args: Any) -> MetatrainGenerator:
    if not getattr(args, "workdir", None) and not getattr(args, "checkpoint", None):
        raise UserError("--generator metatrain needs --workdir DIR (a trained run) or --checkpoint PATH")
    return MetatrainGenerator(
        args.workdir, checkpoint=getattr(args, "checkpoint", None),
        temperature=args.temperature, top_p=args.top_p, top_k=getattr(args, "top_k", 0),
        max_new_tokens=args.max_tokens,
    )
