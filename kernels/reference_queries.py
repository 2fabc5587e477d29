"""Plain-PyTorch reference of kernels/queries.py: a pruning layer's rater queries, i.e.
input_layernorm -> q_proj -> RoPE (transformers' LlamaRMSNorm and apply_rotary_pos_emb, with
their roundings) at the rater slots only."""
from __future__ import annotations

import torch

from .reference import packed_slots


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rater_queries(hidden: torch.Tensor, rater: torch.Tensor, valid: torch.Tensor, n_slots: int,
                  norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, plane_of_dim: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries of the raters (rater & valid) of each row, packed in slot order.

    hidden [B, L, d] (before input_layernorm); rater, valid [B, L] bool; n_slots = R >= every
    row's rater count; norm_weight [d]; weight [H*D, d], bias [H*D] or None (q_proj); cos, sin
    [P, B, L, D] or [B, L, D]; plane_of_dim [D] int: the plane each head dim reads (None: 0).
    Returns (q [B, H, R, D] in hidden.dtype, zero past a row's count; rater_slot [B, R] int64,
    -1 past the count; rater_valid [B, R] bool).
    """
    batch = hidden.shape[0]
    head_dim = cos.shape[-1]
    heads = weight.shape[0] // head_dim
    rater_slot = packed_slots(rater & valid, n_slots)
    rater_valid = rater_slot >= 0
    slot = rater_slot.clamp(min=0)
    rows = torch.arange(batch, device=hidden.device)[:, None]
    x = hidden[rows, slot]  # [B, R, d]
    xf = x.float()
    x = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    q = torch.nn.functional.linear(x, weight, bias).view(batch, n_slots, heads, head_dim).transpose(1, 2)
    cos4, sin4 = (cos, sin) if cos.dim() == 4 else (cos[None], sin[None])
    if plane_of_dim is None:
        plane_of_dim = torch.zeros(head_dim, dtype=torch.long, device=hidden.device)
    plane = plane_of_dim.long()[None, None, :]
    dims = torch.arange(head_dim, device=hidden.device)[None, None, :]
    cos_r = cos4[plane, rows[:, :, None], slot[:, :, None], dims].unsqueeze(1)  # [B, 1, R, D]
    sin_r = sin4[plane, rows[:, :, None], slot[:, :, None], dims].unsqueeze(1)
    q = q * cos_r + _rotate_half(q) * sin_r
    q = torch.where(rater_valid[:, None, :, None], q, 0)
    return q, rater_slot, rater_valid
