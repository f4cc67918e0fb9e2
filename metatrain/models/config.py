"""`ModelConfig`: the shape of a decoder, its derived sizes and its FLOPs.

This is the only configuration the model code sees (never the run config). Counts
are closed-form, so a 7B preset can be sized without allocating it; the tests check
them against `jax.eval_shape` of the real module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from metatrain.errors import UserError

ComputeDtype = Literal["bfloat16", "float32", "float16"]
ParamDtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots", "offload"]
AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
Parametrization = Literal["standard", "mup"]

#: The largest size of one dimension (XLA indexes some axes with 32-bit integers).
MAX_DIMENSION: int = 2**31 - 1
#: The most parameters a config may describe (100 trillion: past any machine's memory).
MAX_PARAMS: int = 10**14

_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("bfloat16", "float32", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots", "offload"),
    "attention": ("auto", "xla", "cudnn", "splash"),
    "parametrization": ("standard", "mup"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention.

    Attributes:
        vocab_size: V, rows of the embedding table (must equal the tokenizer's size).
        d_model: D, width of the residual stream.
        n_layers: L, decoder blocks.
        n_heads: N, query heads.
        n_kv_heads: K, key/value heads; divides n_heads (None: = n_heads, plain MHA).
        head_dim: H (None: d_model // n_heads).
        d_ff: F, hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model is meant for (training seq_len <= this).
        rope_theta: rotary base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: reuse the embedding table as the output projection.
        dtype: compute dtype of activations and matmuls.
        param_dtype: dtype parameters (and so optimizer state) are stored in.
        remat: rematerialisation of each block in the backward pass: "none" keeps all
            activations, "full" recomputes the whole block, "dots" keeps the outputs of
            weight matmuls and recomputes attention scores and elementwise work, "offload"
            keeps the same outputs in host memory (TPU) instead of the accelerator's.
        scan_layers: stack the blocks with `nn.scan` (one compiled block, parameters with
            a leading `layers` axis) instead of unrolling them.
        attention: "auto" (splash on TPU when seq_len is a multiple of 128, else xla),
            "xla" (einsum attention, any backend; materialises [B, N, T, T] f32 scores),
            "cudnn" (fused cuDNN flash attention via `jax.nn.dot_product_attention`, NVIDIA
            GPUs only) or "splash" (JAX's TPU splash attention kernel; interpret mode off TPU).
        parametrization: "standard", or "mup" (Yang et al. 2022, arXiv 2203.03466):
            with m = d_model / `mup_base_width`, the embedding keeps its base-width
            initialisation, hidden matrices (attention, MLP) get Adam learning rate
            lr / m and the output logits are multiplied by 1 / m, so the best learning
            rate found at the base width holds at other widths (docs/sweeps.md, "μP").
        mup_base_width: with "mup", the width the learning rate is tuned at (a size
            family's `mup_base_width`); at this width "mup" is the standard model.
            Unused under "standard".
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: ComputeDtype = "bfloat16"
    param_dtype: ParamDtype = "float32"
    remat: Remat = "none"
    scan_layers: bool = True
    attention: AttentionImpl = "auto"
    parametrization: Parametrization = "standard"
    mup_base_width: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_positive_int("n_kv_heads", self.n_kv_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise UserError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}, so "
                    f"head_dim cannot be derived; set head_dim explicitly or pick n_heads "
                    f"dividing {self.d_model}"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                f"each key/value head is shared by a whole number of query heads; choose "
                f"n_kv_heads among {_divisors(self.n_heads)}"
            )
        if self.head_dim % 2:
            raise UserError(
                f"head_dim={self.head_dim} is odd; rotary embeddings rotate pairs of "
                f"dimensions, so head_dim must be even"
            )
        if not self.rope_theta > 0:
            raise UserError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise UserError(f"norm_eps must be > 0, got {self.norm_eps}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}"
                )
        if self.parametrization == "mup":
            if self.mup_base_width is None:
                raise UserError("model.parametrization is mup but model.mup_base_width is not set; set it to the "
                                "width the learning rate was tuned at (a size family's mup_base_width)")
            _check_positive_int("mup_base_width", self.mup_base_width)
        if self.num_params > MAX_PARAMS:
            raise UserError(
                f"this model has {self.num_params:.3g} parameters, past the {MAX_PARAMS:.0e} any machine can "
                f"hold; check vocab_size, d_model, d_ff and n_layers"
            )

    # -- μP (Yang et al. 2022) -----------------------------------------------------------
    @property
    def mup_width_multiplier(self) -> float:
        """m = d_model / mup_base_width under "mup", 1.0 under "standard".

        μP divides the Adam learning rate of hidden matrices and the output logits by m;
        at m = 1 the model is the standard one.
        """
        if self.parametrization == "standard":
            return 1.0
        return self.d_model / self.mup_base_width

    @property
    def embedding_init_std(self) -> float:
        """Standard deviation of the embedding table (and of an untied output projection).

        Standard: 1/sqrt(d_model). μP: 1/sqrt(mup_base_width) at every width (the standard
        value at the base width), so embedding coordinates do not shrink as width grows.
        """
        width = self.mup_base_width if self.parametrization == "mup" else self.d_model
        return width**-0.5

    # -- parameter counts (closed form) ------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        """Query [D,N,H], key and value [D,K,H], output [N,H,D]."""
        D, N, K, H = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        return 2 * D * N * H + 2 * D * K * H

    @property
    def mlp_params_per_layer(self) -> int:
        """Gate and up [D,F], down [F,D]."""
        return 3 * self.d_model * self.d_ff

    @property
    def params_per_layer(self) -> int:
        """Attention, MLP and the block's two RMSNorm scales."""
        return self.attention_params_per_layer + self.mlp_params_per_layer + 2 * self.d_model

    @property
    def num_embedding_params(self) -> int:
        """The [V, D] embedding table, plus the [D, V] output projection when untied."""
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * self.d_model

    @property
    def num_non_embedding_params(self) -> int:
        """All blocks and the final norm."""
        return self.n_layers * self.params_per_layer + self.d_model

    @property
    def num_params(self) -> int:
        """Every parameter of the model."""
        return self.num_embedding_params + self.num_non_embedding_params

    # -- FLOPs ---------------------------------------------------------------------------
    @property
    def matmul_params_per_token(self) -> int:
        """Weights every token is multiplied by: all block matrices and the output projection.

        The input embedding is a lookup (no FLOPs); the output projection [D, V] is a
        matmul whether or not it is tied; norm scales are negligible and left out.
        """
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer
        return self.n_layers * per_layer + self.d_model * self.vocab_size

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward-pass FLOPs per token at `seq_len` (default `max_seq_len`).

        `2 * P + 4 * L * seq_len * N * H`: a multiply-add per matmul weight P
        (`matmul_params_per_token`), plus the attention scores `Q K^T` and the weighted
        sum `A V`, each `2 * seq_len * N * H` per token and layer. As in Kaplan et al.
        (2020) and PaLM's MFU (Chowdhery et al. 2022, appendix B), attention is counted
        over the full sequence although the causal mask makes half of it zero.
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        attention = 4 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 2 * self.matmul_params_per_token + attention

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: forward plus backward (twice the forward), i.e.

        `6 * P + 12 * L * seq_len * N * H`, PaLM's `6N + 12 L H Q T`. Rematerialisation
        is not counted (this is model FLOPs, the numerator of MFU, not hardware FLOPs).
        """
        return 3 * self.forward_flops_per_token(seq_len)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_DIMENSION:
        raise UserError(f"{name}={value} is past the largest size an array axis may have ({MAX_DIMENSION:,}); "
                        f"give a smaller {name}")


def _divisors(n: int) -> str:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return ", ".join(str(d) for d in sorted({*small, *(n // d for d in small)}))
