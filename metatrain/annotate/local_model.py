"""`--generator metatrain`: a metatrain checkpoint writes the thinking itself.

The generational loop: generation N, trained on thinking-annotated text, annotates the
corpus for generation N+1. For each insertion point the model continues the document so
far (its text, and the thinking already in it) under the thinking lock
(`metatrain.engine.constraints.THINKING_LOCK`): `<thinking>` and the mantra are forced
as in training (the run's own mantra and policy), the model writes the block's text,
and the block ends at `</thinking>`. The chat template is not used: the model was
trained on documents, not on instructions.

The thought is written by `metatrain.generate.thoughts.ThoughtWriter` (shared with
`metatrain eval --self-think`): the insertion points in flight (one per document,
`--concurrency` documents) decode together on the inference engine (`metatrain.engine.Engine`), at most `--max-batch`
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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatrain.annotate.generators import (
    GenerationError,
    ThinkReply,
    ThinkRequest,
    register_generator,
)
from metatrain.errors import UserError
from metatrain.io.storage import absolute, as_path


class MetatrainGenerator:
    """Thoughts from a metatrain checkpoint (see the module docstring)."""

    kind = "metatrain"

    def __init__(self, workdir: str | Path | None = None, *, checkpoint: str | Path | None = None,
                 temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 96,
                 context_chars: int | None = None, max_batch: int = 8,
                 mesh_settings: Sequence[str] | None = None):
        from metatrain.engine import SamplingConfig
        from metatrain.generate.generator import Generator
        from metatrain.generate.thoughts import DEFAULT_CONTEXT_CHARS, ThoughtWriter

        if max_new_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_new_tokens}")
        self.generator = Generator.load(as_path(workdir) if workdir else None, as_path(checkpoint) if checkpoint else None,
                                        mesh_settings=mesh_settings)
        self.writer = ThoughtWriter(self.generator, sampling=SamplingConfig(temperature, top_k, top_p),
                                    max_new_tokens=max_new_tokens, max_batch=max_batch,
                                    context_chars=DEFAULT_CONTEXT_CHARS if context_chars is None else context_chars)
        self.model = str(absolute(workdir or checkpoint))
        self.settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                         "max_new_tokens": self.writer.max_new_tokens}
        self.mantra = self.writer.mantra  # what the Annotator removes from a reply
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
        from metatrain.generate.thoughts import ThoughtPrefix

        try:
            thought = await self.writer.think(ThoughtPrefix(request.doc_id, request.context, request.mode, request.seed))
        except UserError as e:
            raise GenerationError(str(e)) from None
        return ThinkReply(thought.text, tokens_in=thought.tokens_in, tokens_out=thought.tokens_out)

    async def aclose(self) -> None:
        await self.writer.aclose()


def _barrier(name: str) -> None:
    """Every process of the job waits here for the others."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
