"""`--generator metatrain`: a metatrain checkpoint writes the thinking itself.

The generational loop: generation N, trained on thinking-annotated text, annotates the
corpus for generation N+1. For each insertion point the model continues the document so
far (its text, and the thinking already in it) under the thinking lock
(`metatrain.engine.constraints.THINKING_LOCK`): `<thinking>` and the mantra are forced
as in training (the run's own mantra and policy), the model writes the block's text,
and the block ends at `</thinking>`. The chat template is not used: the model was
trained on documents, not on instructions.

The insertion points in flight (one per document, `--concurrency` documents) decode
together on the inference engine (`metatrain.engine.Engine`), at most `--max-batch`
rows at once, on the mesh `--set mesh.KEY=VALUE` chooses; a row that ends frees its
slot for the next point at once, and a document's next point starts from the KV cache
of its previous one when the text before it is the same (not cut to fit the context),
so only the new text is prefilled. Each point samples from its own stream (its `seed`), so a thought does not
depend on which others shared its batch. The context is cut from the front to leave
`max_new_tokens` under the model's `max_seq_len`. A block cut off by `max_new_tokens`
keeps the text written so far.

With `--samples K` a point's K candidates are K rows (one seed each) that decode
together; the default `--max-batch` is then `--concurrency` x K. The same checkpoint
scores the candidates (`scoring_model`: its parameters and mesh, not loaded twice).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatrain.annotate.generators import (
    GenerationError,
    ThinkReply,
    ThinkRequest,
    register_generator,
)
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
                 context_chars: int = DEFAULT_CONTEXT_CHARS, max_batch: int = 8,
                 mesh_settings: Sequence[str] | None = None):
        from metatrain.engine import (
            Engine,
            GrammarChooser,
            SamplingConfig,
            TagConstraints,
        )
        from metatrain.engine.constraints import THINKING_LOCK
        from metatrain.generate.generator import Generator

        if max_new_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_new_tokens}")
        self.sampling = SamplingConfig(temperature, top_k, top_p)
        self.generator = Generator.load(as_path(workdir) if workdir else None, as_path(checkpoint) if checkpoint else None,
                                        mesh_settings=mesh_settings)
        config = self.generator.model_config
        self.max_new_tokens = min(max_new_tokens, config.max_seq_len - 8)
        self.context_chars = context_chars
        self.model = str(absolute(workdir or checkpoint))
        self.settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                         "max_new_tokens": self.max_new_tokens}
        encoder = self.generator.encoder
        self.mantra = encoder.mantra or ""  # what the Annotator removes from a reply
        self.engine = Engine(self.generator.params, config, TagConstraints.from_encoder(encoder, lock_mode=THINKING_LOCK),
                             max_batch=max_batch, eos_id=encoder.eos_id, chooser=GrammarChooser(self.sampling),
                             mesh=self.generator.mesh)
        too_many = self.engine.memory().shortfall(self.engine.max_batch)
        if too_many:
            raise UserError(f"--max-batch {max_batch}: {too_many}; give a smaller --max-batch")
        import jax

        # Under `launch local` (jax.distributed) every process runs this generator on its
        # share of the mesh; process 0 writes the output (`metatrain.annotate.runner`).
        self.process_index = jax.process_index()
        if jax.process_count() > 1:
            self.barrier = _barrier

    def scoring_model(self) -> tuple[Any, Any, Any, Any]:
        """`(params, model_config, mesh, encoder)` of the checkpoint, for scoring
        candidate thoughts (`metatrain.annotate.gain`) with the weights already loaded."""
        g = self.generator
        return g.params, g.model_config, g.mesh, g.encoder

    async def prepare(self, example: ThinkRequest | None) -> None:
        """Nothing to check: the checkpoint loaded, and each request is fitted to its
        context. (The engine's loop starts with the first request: on several processes
        its collectives must not run beside the runner's barriers.)"""

    async def think(self, request: ThinkRequest) -> ThinkReply:
        from metatrain.engine import RowRequest
        from metatrain.generate.generator import recover_segments

        encoder = self.generator.encoder
        encoded = self._encode(request)
        self.engine.start()
        try:
            handle = self.engine.submit(RowRequest(encoded, self.max_new_tokens, seed=request.seed))
        except UserError as e:
            raise GenerationError(str(e)) from None
        try:
            while await handle.next() is not None:
                pass
        except asyncio.CancelledError:
            handle.cancel()
            raise
        ids = [*encoded.prefix, *handle.tokens]
        segments = recover_segments(encoder, ids, encoded.prompt_state)
        thinking = next((s.text for s in segments if s.kind == "thinking"), "")
        if encoder.mantra and thinking.startswith(encoder.mantra):
            thinking = thinking[len(encoder.mantra):]
        # `ids` starts with the forced prefix, already counted in `tokens_in`.
        return ThinkReply(thinking.strip(), tokens_in=len(encoded.ids), tokens_out=len(handle.tokens))

    def _encode(self, request: ThinkRequest) -> Any:
        """The point's prompt under the thinking lock, its context cut from the front to fit."""
        from metatrain.engine.constraints import THINKING_LOCK
        from metatrain.generate.prompts import encode_prompt

        encoder = self.generator.encoder
        room = self.generator.model_config.max_seq_len - self.max_new_tokens
        keep = self.context_chars
        while True:
            prompt = Document(request.doc_id, _last_chars(request.context, keep), mode=request.mode)
            encoded = encode_prompt(encoder, prompt, THINKING_LOCK)
            length = len(encoded.ids)  # the forced <thinking> and mantra included
            if length <= room:
                return encoded
            if keep <= 1:
                raise GenerationError(f"the mantra alone leaves no room in max_seq_len "
                                      f"{self.generator.model_config.max_seq_len}")
            keep = max(1, keep * room // (2 * length))

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.stop)


def _barrier(name: str) -> None:
    """Every process of the job waits here for the others."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
        max_batch=getattr(args, "max_batch", None) or getattr(args, "concurrency", 8) * (getattr(args, "samples", None) or 1),
        mesh_settings=getattr(args, "mesh_settings", None),
    )
