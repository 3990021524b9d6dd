"""Rotary position embeddings (RoPE) with Llama 3.1 or YaRN frequency scaling.

The rotary table is a complex64 tensor ``[positions, head_dim // 2]``: entry ``(p, i)`` is
``exp(1j * p * freq_i)``. Queries and keys are rotated by viewing adjacent pairs of their last
dimension as complex numbers (the interleaved layout of Meta's checkpoints) and multiplying.

The table is computed in float64 and only then rounded to complex64, so that angles at large
positions (``p * freq`` reaches ~1e5 radians for 128K contexts) keep their precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RoPEScalingArgs",
    "YaRNScalingArgs",
    "apply_rope_scaling",
    "apply_rotary_emb",
    "apply_yarn_scaling",
    "precompute_freqs_cis",
    "yarn_mscale",
]


@dataclass
class RoPEScalingArgs:
    """Llama 3.1 "llama3" rope scaling: stretch low frequencies for a longer context."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def apply_rope_scaling(freqs: torch.Tensor, scaling: RoPEScalingArgs) -> torch.Tensor:
    """Scale rotary frequencies: high ones kept, low ones divided by ``factor``, smooth between.

    A frequency's wavelength ``2π / freq`` is compared with the original context length
    divided by ``high_freq_factor`` (shorter wavelengths are kept) and by ``low_freq_factor``
    (longer ones are divided by ``factor``); in between the two results are blended linearly
    in ``original_context / wavelength``.
    """
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError(
            f"rope scaling high_freq_factor ({scaling.high_freq_factor}) must exceed "
            f"low_freq_factor ({scaling.low_freq_factor})"
        )
    orig_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = orig_ctx / scaling.low_freq_factor
    high_freq_wavelen = orig_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (orig_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


@dataclass
class YaRNScalingArgs:
    """YaRN rope scaling (DeepSeek-V2/V3; Hugging Face's ``rope_type = "yarn"``).

    Frequencies whose wavelength fits ``beta_fast`` times into the original context are
    kept, those fitting fewer than ``beta_slow`` times are divided by ``factor``, with a
    linear ramp over the dimensions in between. The rotary table is multiplied by
    ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`` and the softmax
    scale by ``yarn_mscale(factor, mscale_all_dim) ** 2`` (the model's business).
    """

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``0.1 * mscale * ln(factor) + 1`` (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_yarn_scaling(freqs: torch.Tensor, dim: int, theta: float, scaling: YaRNScalingArgs) -> torch.Tensor:
    """YaRN's frequencies for a rotary head dimension ``dim`` (``freqs`` = ``theta ** -(2i/dim)``)."""

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits ``rotations`` times into the original context
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of one step
    ramp = ((torch.arange(dim // 2, dtype=freqs.dtype, device=freqs.device) - low) / (high - low)).clamp(0, 1)
    # ramp 0: keep the frequency (extrapolate); ramp 1: divide it by factor (interpolate)
    return freqs / scaling.factor * ramp + freqs * (1 - ramp)


def precompute_freqs_cis(
    dim: int,
    end: int,
    theta: float = 10000.0,
    scaling: RoPEScalingArgs | YaRNScalingArgs | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotary table ``[end, dim // 2]`` (complex64) for a head dimension ``dim``.

    ``device=None`` uses the current default device, so building under
    ``torch.device("meta")`` allocates nothing.
    """
    if dim % 2 != 0:
        raise ValueError(f"rotary head dimension must be even, got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    freqs = 1.0 / (theta**exponents)
    magnitude = 1.0
    if isinstance(scaling, YaRNScalingArgs):
        freqs = apply_yarn_scaling(freqs, dim, theta, scaling)
        magnitude = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    elif scaling is not None:
        freqs = apply_rope_scaling(freqs, scaling)
    positions = torch.arange(end, dtype=torch.float64, device=device)
    angles = torch.outer(positions, freqs)
    return torch.polar(torch.full_like(angles, magnitude), angles).to(torch.complex64)


def _broadcast_freqs(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape the table for ``x`` ``[bs, seq, heads, head_dim // 2]`` (complex).

    A 2-D table ``[max_seq_len, head_dim // 2]`` is shared by the batch and its first ``seq``
    rows are used; a 3-D one ``[bs, seq, head_dim // 2]`` gives each sample its own
    positions (e.g. gathered by position ids).
    """
    seqlen, half = x.shape[1], x.shape[-1]
    if freqs_cis.dim() == 2:
        freqs_cis = freqs_cis[:seqlen]
    if freqs_cis.shape[-2:] != (seqlen, half):
        raise ValueError(
            f"rotary table of shape {tuple(freqs_cis.shape)} does not fit sequence length "
            f"{seqlen} and head_dim/2 {half}: is max_seq_len (training.seq_len) too small?"
        )
    if freqs_cis.dim() == 2:
        return freqs_cis.view(1, seqlen, 1, half)
    return freqs_cis.view(freqs_cis.shape[0], seqlen, 1, half)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys ``[bs, seq, heads, head_dim]`` by the table's angles.

    Pairs ``(x[2i], x[2i+1])`` are rotated by angle ``p * freq_i``; the rotation runs in
    float32 and the result is returned in the input dtype. ``freqs_cis`` is
    ``[>= seq, head_dim // 2]`` (positions 0.. are used) or ``[bs, seq, head_dim // 2]``.
    """
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = _broadcast_freqs(freqs_cis, xq_c)
    xq_out = torch.view_as_real(xq_c * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_c * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)
