"""What one sparse prefill builds, by lifetime: the layout of each stage (per-slot bookkeeping of
a left-padded batch), the RoPE rows, the host-side counts and plans, and the Prefill that holds
them for the length of its call.

A layout is the current left-padded arrangement of a batch: for every slot [B, L] its source
index in the prompt as given (src: which token it is, or for a recycled token its cluster
centre), its 1-D position id (pos: its index among the sample's real tokens in the prompt, or
in this layout where positions are renumbered), and whether it is real, visual or a rater.

The host keeps every row's token counts itself (HostCounts), so a pruning layer reads nothing
back from the GPU in schedule mode; rank mode reads the rater rows P once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels import reference as ref
from .trace import StepRecord


@dataclass
class Layout:
    """Per-slot bookkeeping of one stage; every tensor is [B, L]."""

    src: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    rater: torch.Tensor


@dataclass
class ScoringInputs:
    """What a pruning layer's attention saw. hidden: [B, L, d] the layer input (before its
    input_layernorm); cos, sin: the RoPE rows the layer was given ([B, L, D], or [3, B, L, D]
    mRoPE planes); keys: [B, H_kv, L, D] post-RoPE keys from the cache, or None; x: the attention
    input [B, L, d], computed only where a path needs every token's."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor | None = None
    x: torch.Tensor | None = None


@dataclass
class Rope:
    """RoPE inputs of the prompt as given: cos, sin [B, L0, Dr] and position_ids [B, L0] or None."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None


@dataclass
class HostCounts:
    """Per-row counts on the host (CPU int64 [B]): real tokens and visual tokens in the current
    layout, and visual tokens of the prompt; raters: rater slots (>= every row's rater count)."""

    valid: torch.Tensor
    visual: torch.Tensor
    n_visual: torch.Tensor
    raters: int


@dataclass
class Plan:
    """A pruning layer's counts, decided on the host: keep / candidates / clusters per row [B],
    the counts after, and their maxima (host ints, computed once when the plan is made)."""

    keep: torch.Tensor
    n_cand: torch.Tensor
    n_clusters: torch.Tensor
    after: HostCounts
    width: int = 0
    max_cand: int = 0
    max_clusters: int = 0
    padded: bool = False

    def __post_init__(self):
        if self.keep.numel():
            self.width = int(self.after.valid.max())
            self.max_cand = int(self.n_cand.max())
            self.max_clusters = int(self.n_clusters.max())
            self.padded = bool((self.after.valid < self.width).any())

    def host(self) -> torch.Tensor:
        """[4, B] int64 (keep, n_cand, n_clusters, real tokens after)."""
        return torch.stack([self.keep, self.n_cand, self.n_clusters, self.after.valid])


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on device, copied without waiting for the GPU."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class Stage:
    """A run of layers sharing one layout, from first_layer on: whether some row of it is padded
    (decided on the host), its prefill mask (4-D for eager and a padded sdpa layout, the 2-D
    validity for a padded flash one; None where causality alone is the mask), RoPE rows and
    position ids (None for the prompt's own layout, stage 0); copies: those four on the other
    devices its layers run on (placement.stage_tensors)."""

    first_layer: int
    layout: Layout
    padded: bool = False
    mask: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    copies: dict = field(default_factory=dict)


@dataclass
class Prefill:
    """Everything one sparse prefill builds; it lives as long as its call.

    ops: the backend's ops for the prompt's device; gravity_table: [S, T] or None; mrope_ids:
    [3, B, L0] the prompt's 3-D position ids (mRoPE gravity) or None; valid, visual: [B, L0]
    bool of the prompt; rope: its RoPE rows; counts: host counts of the current stage; stages:
    one per run of layers sharing a layout; steps: what each pruning layer did; plans: every
    pruning layer's counts when they are known at the start (schedule mode), with device_plans
    [S, 4, B] their one upload; plane_of_dim: [D] the mRoPE plane of each head dim when the
    layers get RoPE planes; rank_slot: [B, L0] the prompt slot of each row's p-th real token
    (-1 past its count), where positions are renumbered; scoring: the attention inputs of the
    pruning layer now running; shards: this rank's share of the heads under tensor parallelism
    (distributed.HeadShards), None in one process.
    """

    ops: object
    gravity_table: torch.Tensor | None
    mrope_ids: torch.Tensor | None
    valid: torch.Tensor
    visual: torch.Tensor
    rope: Rope
    counts: HostCounts
    stages: list[Stage]
    steps: list[StepRecord]
    plans: list[Plan] = field(default_factory=list)
    device_plans: torch.Tensor | None = None
    plane_of_dim: torch.Tensor | None = None
    rank_slot: torch.Tensor | None = None
    scoring: ScoringInputs | None = None
    shards: object = None


def initial_layout(ops, hidden: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> tuple[Layout, HostCounts]:
    """The layout of the prompt as given, with raters chosen (SPARSEVLM.md section 1), and its
    host counts. hidden: [B, L, d] the layer-0 input; valid, visual: [B, L] bool.
    Reads three counts per row back to the host (once per prefill)."""
    batch, length = valid.shape
    slots = torch.arange(length, device=valid.device).expand(batch, length)
    visual = visual & valid
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    first_visual = torch.where(visual, slots, length).min(1, keepdim=True).values
    instruction = valid & ~visual & (slots > first_visual)
    n_valid, n_visual, n_instruction = torch.stack([valid.sum(1), visual.sum(1), instruction.sum(1)]).cpu()
    v_idx = ref.packed_slots(visual, int(n_visual.max()))
    t_idx = ref.packed_slots(instruction, int(n_instruction.max()))
    rater = torch.zeros_like(valid)
    if t_idx.shape[1]:
        chosen = ops.select_raters(gather_rows(hidden, v_idx.clamp(min=0)), gather_rows(hidden, t_idx.clamp(min=0)),
                                   v_idx >= 0, t_idx >= 0)
        rater.scatter_(1, t_idx.clamp(min=0), chosen & (t_idx >= 0))
    last_real = torch.where(valid, slots, -1).max(1).values
    fallback = ~instruction.any(1) & visual.any(1) & (last_real >= 0)
    fallback_rater = torch.zeros_like(valid).scatter_(1, last_real.clamp(min=0)[:, None], True)
    rater = torch.where(fallback[:, None], fallback_rater, rater)
    counts = HostCounts(valid=n_valid, visual=n_visual, n_visual=n_visual.clone(),
                        raters=max(1, int(n_instruction.max())))
    return Layout(src=slots.clone(), pos=pos, valid=valid, visual=visual, rater=rater), counts


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, L, ...], idx: [B, W] -> [B, W, ...]."""
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, flat)
