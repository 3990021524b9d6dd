"""Rotary embeddings against independent float64 computations."""

import math

import numpy as np
import pytest
import torch

from torchtitan.models.common.rope import (
    RoPEScalingArgs,
    apply_rope_scaling,
    apply_rotary_emb,
    precompute_freqs_cis,
)


def reference_freqs(dim: int, theta: float, scaling: RoPEScalingArgs | None) -> np.ndarray:
    """Per-frequency Python loop in float64, written from the Llama 3.1 description."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        if scaling is not None:
            wavelen = 2 * math.pi / freq
            low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
            high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
            if wavelen < high_wavelen:
                pass
            elif wavelen > low_wavelen:
                freq = freq / scaling.factor
            else:
                smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor
                )
                freq = (1 - smooth) * freq / scaling.factor + smooth * freq
        out.append(freq)
    return np.array(out, dtype=np.float64)


def rotate_reference(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x [bs, seq, heads, d] by angles [seq, d/2]."""
    cos = np.cos(angles)[None, :, None, :]
    sin = np.sin(angles)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_scaled_frequencies_match_reference(dim):
    scaling = RoPEScalingArgs()
    base = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    got = apply_rope_scaling(base, scaling).numpy()
    expected = reference_freqs(dim, 500000.0, scaling)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # The three regimes are all exercised for head_dim 128 (the real models).
    if dim == 128:
        unscaled = reference_freqs(dim, 500000.0, None)
        ratio = unscaled / expected
        assert np.isclose(ratio, 1.0).any()
        assert np.isclose(ratio, 8.0).any()
        assert ((ratio > 1.0 + 1e-9) & (ratio < 8.0 - 1e-9)).any()


@pytest.mark.parametrize("scaling", [None, RoPEScalingArgs(), RoPEScalingArgs(factor=32.0)])
def test_table_matches_reference(scaling):
    dim, end, theta = 128, 9000, 500000.0
    table = precompute_freqs_cis(dim, end, theta, scaling)
    assert table.shape == (end, dim // 2) and table.dtype == torch.complex64
    angles = np.outer(np.arange(end, dtype=np.float64), reference_freqs(dim, theta, scaling))
    np.testing.assert_allclose(table.real.numpy(), np.cos(angles), atol=2e-7)
    np.testing.assert_allclose(table.imag.numpy(), np.sin(angles), atol=2e-7)


def test_bad_scaling_factors_rejected():
    with pytest.raises(ValueError, match="high_freq_factor"):
        precompute_freqs_cis(16, 8, 10000.0, RoPEScalingArgs(low_freq_factor=4.0, high_freq_factor=1.0))


def test_table_on_meta_allocates_nothing():
    with torch.device("meta"):
        table = precompute_freqs_cis(128, 131072, 500000.0, RoPEScalingArgs())
    assert table.is_meta and table.shape == (131072, 64)


def test_apply_rotary_emb_matches_real_rotation():
    gen = torch.Generator().manual_seed(0)
    bs, seq, n_heads, n_kv, dim = 2, 12, 4, 2, 16
    xq = torch.randn(bs, seq, n_heads, dim, generator=gen)
    xk = torch.randn(bs, seq, n_kv, dim, generator=gen)
    theta = 10000.0
    # A table longer than the sequence: its first rows are used.
    table = precompute_freqs_cis(dim, seq + 5, theta)
    q_out, k_out = apply_rotary_emb(xq, xk, table)
    angles = np.outer(np.arange(seq, dtype=np.float64), reference_freqs(dim, theta, None))
    np.testing.assert_allclose(q_out.numpy(), rotate_reference(xq.double().numpy(), angles), atol=1e-5)
    np.testing.assert_allclose(k_out.numpy(), rotate_reference(xk.double().numpy(), angles), atol=1e-5)
    assert q_out.shape == xq.shape and k_out.shape == xk.shape


def test_rotary_scores_depend_on_relative_position_only():
    dim = 32
    table = precompute_freqs_cis(dim, 64, 500000.0, RoPEScalingArgs())
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, dim, generator=gen).expand(1, 64, 1, dim)
    k = torch.randn(1, 1, 1, dim, generator=gen).expand(1, 64, 1, dim)
    q_rot, k_rot = apply_rotary_emb(q, k, table)
    scores = torch.einsum("bshd,bthd->st", q_rot.double(), k_rot.double())
    # Same offset m - n, different absolute positions: same score.
    torch.testing.assert_close(scores[10, 3], scores[50, 43], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[7, 7], scores[63, 63], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[10, 3], scores[10, 4])


def test_per_sample_table_equals_gathered_positions():
    dim, seq = 16, 6
    table = precompute_freqs_cis(dim, 32, 10000.0)
    gen = torch.Generator().manual_seed(2)
    xq = torch.randn(2, seq, 2, dim, generator=gen)
    xk = torch.randn(2, seq, 2, dim, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    q_out, k_out = apply_rotary_emb(xq, xk, table[positions])
    q1, k1 = apply_rotary_emb(xq[1:], xk[1:], table[10:16])
    q0, k0 = apply_rotary_emb(xq[:1], xk[:1], table)
    torch.testing.assert_close(q_out, torch.cat([q0, q1]))
    torch.testing.assert_close(k_out, torch.cat([k0, k1]))


def test_keeps_input_dtype_and_rejects_short_table():
    table = precompute_freqs_cis(16, 8, 10000.0)
    xq = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    q_out, k_out = apply_rotary_emb(xq, xq, table)
    assert q_out.dtype == torch.bfloat16 and k_out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_seq_len"):
        apply_rotary_emb(torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), table)
