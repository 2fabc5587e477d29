"""Plain-PyTorch reference of kernels/compact.compact: the same arguments, the same Compacted.

Everything is a gather along the slots into the layout `order` [B, W] describes, so the kernel
must match it exactly; the mask is masks.prefill_mask's rule written out (no sparsevlm_engine
import here).
"""
from __future__ import annotations

import torch

from .types import Compacted


def _rows(t: torch.Tensor, index: torch.Tensor, trailing: int) -> torch.Tensor:
    """t: [B, L0, *trailing] or [P, B, L0, *trailing]; index: [B, W] rows in L0 -> L0 replaced by W."""
    batch = torch.arange(index.shape[0], device=index.device)[:, None]
    return t[batch, index] if t.dim() == 2 + trailing else t[:, batch, index]


def compact(order: torch.Tensor, hidden: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, alive: torch.Tensor,
            visual: torch.Tensor, rater: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            position_ids: torch.Tensor | None = None, merged: torch.Tensor | None = None,
            replace: torch.Tensor | None = None, mask: str | None = None,
            mask_dtype: torch.dtype | None = None, renumber=None) -> Compacted:
    """See kernels/compact.compact. replace[b, l] = c >= 0: slot l's hidden state is merged[b, c].
    renumber = (rank_slot [B, L0], n_valid [B]): slot w's pos is its rank among the row's real
    slots, max(w - (W - n_valid[b]), 0), and its RoPE rows and position ids are those of prompt
    slot rank_slot[b, pos]."""
    if mask not in (None, "bool", "additive"):
        raise ValueError(f"compact: mask must be None, 'bool' or 'additive', got {mask!r}")
    pool = hidden
    if merged is not None and merged.shape[1]:
        row = replace.long()
        from_merged = merged.gather(1, row.clamp(0, merged.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[2]))
        pool = torch.where(((row >= 0) & (row < merged.shape[1]))[..., None], from_merged, hidden)
    new_hidden = pool.gather(1, order[..., None].expand(-1, -1, hidden.shape[2]))
    new_src = src.gather(1, order)
    valid = alive.gather(1, order)
    new_pos, rope_index = pos.gather(1, order), new_src
    if renumber is not None:
        rank_slot, n_valid = renumber
        slots = torch.arange(order.shape[1], device=order.device)[None, :]
        new_pos = (slots - (order.shape[1] - n_valid.long()[:, None])).clamp(min=0)
        rope_index = rank_slot.gather(1, new_pos.clamp(max=rank_slot.shape[1] - 1)).clamp(min=0)
    pid = None if position_ids is None else _rows(position_ids, rope_index, 0)
    new_mask = None
    if mask is not None:
        width = order.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=order.device).tril()  # key j <= query i
        eye = torch.eye(width, dtype=torch.bool, device=order.device)
        allowed = (valid[:, None, None, :] & causal) | eye
        if mask == "bool":
            new_mask = allowed
        else:
            zero = torch.zeros((), dtype=mask_dtype, device=order.device)
            new_mask = torch.where(allowed, zero, torch.finfo(mask_dtype).min)
    return Compacted(hidden=new_hidden, src=new_src, pos=new_pos, valid=valid,
                     visual=visual.gather(1, order), rater=rater.gather(1, order),
                     cos=_rows(cos, rope_index, 1), sin=_rows(sin, rope_index, 1), position_ids=pid, mask=new_mask)
