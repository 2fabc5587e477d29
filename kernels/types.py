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
    """The new layout's tensors: hidden [B, W, d], meta [M, B, W], cos / sin like the inputs
    with L0 replaced by W, position_ids like the input with L0 replaced by W (or None)."""

    hidden: torch.Tensor
    meta: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
