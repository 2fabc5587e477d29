"""Token recycling plus the new layout's bookkeeping in plain PyTorch: ground truth for
kernels/recycle.py, and the `Recycled` result both return (this module imports no Triton)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference as ref


class Recycled(NamedTuple):
    """merged [B, C, d] hidden.dtype cluster means (0 past the row's cluster count); centres
    [B, C] int64 ascending indices into the row's candidate list (-1 past the count); assign
    [B, N] int64 cluster of each candidate (-1 past n_cand); alive [B, L] bool (input alive |
    the centres' slots); replace [B, L] int32 (merged row c at the slot of centre c, else -1);
    order [B, W] int64 gather map of the compacted layout of alive."""

    merged: torch.Tensor
    centres: torch.Tensor
    assign: torch.Tensor
    alive: torch.Tensor
    replace: torch.Tensor
    order: torch.Tensor


def recycle(hidden: torch.Tensor, cand_idx: torch.Tensor, n_cand: torch.Tensor, n_clusters: torch.Tensor,
            max_clusters: int, alive: torch.Tensor, width: int, visual: torch.Tensor | None = None) -> Recycled:
    """Row by row: `reference.dpc_knn` and `reference.merge_clusters` on hidden[b, cand_idx[b, :n]],
    the centres' slots made alive and marked in replace, and `reference.compaction_order` of the
    new alive with the given width. Without visual the recycled tokens sit at their centre's slot
    (positions = slot index); with visual [B, L] bool they follow the row's last slot that is
    alive and visual, highest centre score first. The cluster count is clamped to
    [1, min(n_cand, max_clusters)] as the kernel does (a no-op for valid inputs)."""
    batch, length, dim = hidden.shape
    n_slots = cand_idx.shape[1]
    device = hidden.device
    merged = torch.zeros(batch, max_clusters, dim, dtype=hidden.dtype, device=device)
    centres = torch.full((batch, max_clusters), -1, dtype=torch.int64, device=device)
    assign = torch.full((batch, n_slots), -1, dtype=torch.int64, device=device)
    alive_out = alive.clone()
    replace = torch.full((batch, length), -1, dtype=torch.int32, device=device)
    position = (torch.arange(length, device=device) * (max_clusters + 1)).repeat(batch, 1)
    last_visual = torch.where(alive & visual, position, -1).max(1).values if visual is not None else None
    for b, (n, k) in enumerate(zip(n_cand.tolist(), n_clusters.tolist())):
        n = max(0, min(int(n), n_slots))
        if n == 0:
            continue
        k = max(1, min(int(k), n, max_clusters))
        slots = cand_idx[b, :n].long()
        x = hidden[b, slots]
        row_centres, row_assign, row_rank = ref.ranked_dpc_knn(x, k)
        merged[b, :k] = ref.merge_clusters(x, row_assign, k)
        centres[b, :k] = row_centres
        assign[b, :n] = row_assign
        centre_slots = slots[row_centres]
        alive_out[b, centre_slots] = True
        replace[b, centre_slots] = torch.arange(k, dtype=torch.int32, device=device)
        if last_visual is not None:  # slot keys are multiples of C + 1: room for C ranks after the last
            position[b, centre_slots] = last_visual[b] + 1 + row_rank
    order = ref.compaction_order(alive_out, position, width)
    return Recycled(merged, centres, assign, alive_out, replace, order)
