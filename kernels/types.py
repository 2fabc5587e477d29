"""Result types shared by the kernel launchers and the reference backend (no Triton import)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """kept: [B, L] bool; kept_idx: [B, max_k] kept slots ascending, -1 after the row's count;
    order: [B, width] gather map of the compacted layout (keep_also | kept), or None."""

    kept: torch.Tensor
    kept_idx: torch.Tensor
    order: torch.Tensor | None


class Compacted(NamedTuple):
    """The new layout's tensors: hidden [B, W, d]; src, pos [B, W] int64; valid, visual, rater
    [B, W] bool; cos / sin like the inputs with L0 replaced by W; position_ids like the input
    with L0 replaced by W (or None); mask [B, 1, W, W] (bool, or additive in the asked dtype) or None."""

    hidden: torch.Tensor
    src: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    rater: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None


class Selected(NamedTuple):
    """A pruning layer's selection (select.select_step): rel [B, L] fp32 the head-averaged
    relevance; kept [B, L] bool the surviving visual slots; alive [B, L] bool text | kept;
    cand_idx [B, N] the recycling candidates' slots ascending, -1 after the row's count (None
    without recycling); order [B, W] the gather map of alive's compacted layout (None when
    recycling, which adds its centres first)."""

    rel: torch.Tensor
    kept: torch.Tensor
    alive: torch.Tensor
    cand_idx: torch.Tensor | None
    order: torch.Tensor | None
