"""The RoPE gravity table: per-section partial sums of 2 cos(d theta_p) / sqrt(head_dim), one
Triton launch per prefill (reference.gravity_table)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, next_pow2
from .reference import rope_sections


@triton.jit
def _gravity_table_kernel(inv_freq_ptr, bounds_ptr, out_ptr, n, norm, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[s, d] = norm * sum of cos(d * inv_freq[p]) over the pairs bounds[s] <= p < bounds[s + 1]."""
    s = tl.program_id(1)
    start = tl.load(bounds_ptr + s)
    n_freq = tl.load(bounds_ptr + s + 1) - start
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_f = tl.arange(0, BLOCK_F)
    inv_freq = tl.load(inv_freq_ptr + start + offs_f, mask=offs_f < n_freq, other=0.0)
    angles = offs.to(tl.float32)[:, None] * inv_freq[None, :]
    g = tl.sum(tl.where(offs_f[None, :] < n_freq, tl.cos(angles), 0.0), 1) * norm
    tl.store(out_ptr + s * n + offs, g, mask=offs < n)


def gravity_table(inv_freq: torch.Tensor, head_dim: int, size: int, sections=None) -> torch.Tensor:
    """Unguarded per-section RoPE gravity table [S, size] fp32 (reference.gravity_table):
    table[s, d] = sum over pairs p of section s of 2 cos(d * theta_p) / sqrt(head_dim).
    inv_freq: [D/2]; sections: pairs per section summing to D/2 (mRoPE, e.g. [16, 24, 24]),
    None for one section of all pairs (S = 1)."""
    parts = rope_sections(inv_freq, sections, "gravity_table")
    if size < 1:
        raise ValueError(f"gravity_table: size must be >= 1, got {size}")
    check_device("gravity_table", inv_freq=inv_freq)
    inv_freq = inv_freq.float().contiguous()
    bounds = torch.tensor([sum(parts[:s]) for s in range(len(parts) + 1)], dtype=torch.int32, device=inv_freq.device)
    out = torch.empty(len(parts), size, dtype=torch.float32, device=inv_freq.device)
    block = 128
    _gravity_table_kernel[(triton.cdiv(size, block), len(parts))](
        inv_freq, bounds, out, size, 2.0 / math.sqrt(head_dim), BLOCK=block, BLOCK_F=next_pow2(max(parts)))
    return out
