import dataclasses

import pytest

from metatrain.errors import UserError
from metatrain.models import ModelConfig

BASE = dict(vocab_size=37, d_model=26, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=34, max_seq_len=11)


def test_derived_defaults():
    cfg = ModelConfig(vocab_size=37, d_model=24, n_layers=2, n_heads=6, d_ff=34, max_seq_len=11)
    assert cfg.n_kv_heads == 6 and cfg.head_dim == 4
    assert dataclasses.replace(cfg) == cfg  # resolved values survive a round trip


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(n_kv_heads=4), ["n_heads=6", "n_kv_heads=4", "1, 2, 3, 6"]),
        (dict(head_dim=None, d_model=25), ["d_model=25", "n_heads=6", "head_dim"]),
        (dict(head_dim=7), ["head_dim=7", "even"]),
        (dict(d_ff=0), ["d_ff", "positive"]),
        (dict(n_layers=2.0), ["n_layers", "positive integer"]),
        (dict(remat="some"), ["remat", "none, full, dots"]),
        (dict(attention="flash"), ["attention", "xla, cudnn"]),
        (dict(dtype="float8"), ["dtype"]),
        (dict(rope_theta=0.0), ["rope_theta"]),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(change, words):
    with pytest.raises(UserError) as e:
        ModelConfig(**{**BASE, **change})
    for word in words:
        assert word in str(e.value)


def test_parameter_counts_closed_form_by_hand():
    cfg = ModelConfig(**BASE)
    D, N, K, H, F, V, L = 26, 6, 2, 10, 34, 37, 3
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D
    assert cfg.num_embedding_params == V * D
    assert cfg.num_non_embedding_params == L * per_layer + D
    assert cfg.num_params == V * D + L * per_layer + D
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    assert untied.num_params == cfg.num_params + D * V
    assert untied.num_embedding_params == 2 * V * D


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(**BASE)
    D, N, K, H, F, V, L = 26, 6, 2, 10, 34, 37, 3
    matmul = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F) + D * V
    assert cfg.forward_flops_per_token(7) == 2 * matmul + 4 * L * 7 * N * H
    assert cfg.flops_per_token(7) == 6 * matmul + 12 * L * 7 * N * H
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_seq_len)
    # tying does not change the FLOPs: the output projection is a matmul either way
    assert dataclasses.replace(cfg, tie_embeddings=False).flops_per_token(7) == cfg.flops_per_token(7)


@pytest.mark.hostile
@pytest.mark.parametrize(
    "change, words",
    [
        (dict(vocab_size=2**40), ["vocab_size=1099511627776", "largest size"]),
        (dict(d_model=2**62, head_dim=None), ["d_model", "largest size"]),
        (dict(n_layers=10**6, d_model=4096, head_dim=None, n_heads=32, n_kv_heads=8, d_ff=16384),
         ["parameters", "n_layers"]),
        (dict(n_heads=2**31 - 2, n_kv_heads=2**30 - 3, head_dim=2), ["n_kv_heads", "1, 2, "]),
    ],
)
def test_sizes_no_machine_could_hold_are_refused_at_once(change, words):
    with pytest.raises(UserError) as e:
        ModelConfig(**{**BASE, **change})
    for word in words:
        assert word in str(e.value)
