"""The pruning pass of one prefill: raters before layer 0, then scoring, selection, recycling
and compaction at the output of each pruning layer. Batched; each row is pruned on its own.

A layout is the current left-padded arrangement of a batch: for every slot [B, L] its source
index in the prompt as given (src, for gathering RoPE rows), its position among the sample's
real tokens (pos), and whether it is real, visual or a rater.

The host keeps every row's token counts itself (HostCounts), so a pruning layer reads nothing
back from the GPU in schedule mode; rank mode reads the rater rows P once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import reference as ref
from .accounting import DecoderDims
from .backends import ops_for
from .config import SparseVLMConfig
from .schedule import scale_count, schedule_counts
from .trace import StepRecord

LAYOUT_FIELDS = ("src", "pos", "valid", "visual", "rater")


@dataclass
class Layout:
    """Per-slot bookkeeping of one stage; every tensor is [B, L]."""

    src: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    rater: torch.Tensor

    def meta(self, valid: torch.Tensor) -> torch.Tensor:
        """[5, B, L] int64 with `valid` as the validity, src first (the row compaction gathers
        RoPE rows by)."""
        return torch.stack([(valid if f == "valid" else getattr(self, f)).long() for f in LAYOUT_FIELDS])

    @classmethod
    def from_meta(cls, meta: torch.Tensor) -> "Layout":
        src, pos, valid, visual, rater = meta.unbind(0)
        return cls(src, pos, valid.bool(), visual.bool(), rater.bool())


@dataclass
class ScoringInputs:
    """What a pruning layer's attention saw. x: [B, L, d] the attention input (after its norm);
    cos, sin: the RoPE rows the layer used; keys: [B, H_kv, L, D] post-RoPE keys or None."""

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor | None


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
    """A pruning layer's counts, decided on the host: keep / candidates / clusters per row [B]."""

    keep: torch.Tensor
    n_cand: torch.Tensor
    n_clusters: torch.Tensor
    after: HostCounts

    @property
    def width(self) -> int:
        return int(self.after.valid.max()) if self.after.valid.numel() else 0

    def on(self, device: torch.device) -> torch.Tensor:
        """[3, B] (keep, n_cand, n_clusters) on device, copied without waiting for the GPU."""
        host = torch.stack([self.keep, self.n_cand, self.n_clusters])
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)


@dataclass
class Stage:
    """A run of layers sharing one layout, from first_layer on: its prefill mask, RoPE rows and
    position ids (None for the prompt's own layout, stage 0)."""

    first_layer: int
    layout: Layout
    mask: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


@dataclass
class Prefill:
    """Everything one sparse prefill builds; it lives as long as its call.

    ops: the backend's ops for the prompt's device; gravity_table: [S, T] or None; mrope_ids:
    [3, B, L0] the prompt's 3-D position ids (mRoPE gravity) or None; valid, visual: [B, L0]
    bool of the prompt; rope: its RoPE rows; counts: host counts of the current stage; stages:
    one per run of layers sharing a layout; steps: what each pruning layer did; scoring: the
    attention inputs of the pruning layer now running.
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
    scoring: ScoringInputs | None = None


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


@dataclass
class PruneResult:
    """A pruning layer's output: the compacted hidden states [B, L', d], their layout, RoPE rows
    and host counts, and what the layer did."""

    hidden: torch.Tensor
    layout: Layout
    rope: Rope
    counts: HostCounts
    record: StepRecord


class Pruner:
    """The configured method at each pruning layer. Holds only what is fixed per model; what a
    prefill builds is in its Prefill."""

    def __init__(self, config: SparseVLMConfig, pruning_layers: tuple[int, ...], dims: DecoderDims,
                 scaling: float, inv_freq: torch.Tensor | None, sections: tuple[int, ...] | None = None):
        self.config = config
        self.dims = dims
        self.head_dim = dims.head_dim
        self.scaling = scaling
        self.inv_freq = inv_freq
        if config.rope_gravity and inv_freq is None:
            raise ValueError("rope_gravity needs the model's rotary inv_freq")
        if config.mode == "schedule":
            counts = config.keep_counts or schedule_counts(config.schedule_budget, config.schedule, len(pruning_layers))
            if len(counts) != len(pruning_layers):
                raise ValueError(f"{len(counts)} keep counts for {len(pruning_layers)} pruning layers")
            self.counts = counts
        n_priority = math.floor(config.priority_head_fraction * dims.heads + 0.5)
        self.n_priority = max(1, n_priority) if config.priority_heads else None
        self.sections = sections

    def start(self, hidden: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, rope: Rope,
              mrope_ids: torch.Tensor | None = None, wrap_ops=None) -> Prefill:
        """A prefill's start: the backend for its device, the raters and the gravity table.
        hidden: [B, L, d] the layer-0 input; valid, visual: [B, L] bool; mrope_ids: [3, B, L]
        the prompt's 3-D position ids (mRoPE models); wrap_ops: ops -> ops, or None."""
        ops = ops_for(self.config.backend, hidden.device)
        if wrap_ops is not None:
            ops = wrap_ops(ops)
        table = None
        if self.config.rope_gravity:
            size = hidden.shape[1]
            if self.sections is not None:
                if mrope_ids is None:
                    raise ValueError("RoPE gravity on an mRoPE model needs the prompt's 3-D position ids")
                mrope_ids = mrope_ids.to(hidden.device).expand(3, hidden.shape[0], -1)
                size = max(size, int(mrope_ids.max()) + 1)  # video time ids can exceed the length
            table = ops.gravity_table(self.inv_freq.to(hidden.device), self.head_dim, size, self.sections)
        if table is None or self.sections is None:
            mrope_ids = None
        layout, counts = initial_layout(ops, hidden, valid, visual)
        return Prefill(ops=ops, gravity_table=table, mrope_ids=mrope_ids, valid=layout.valid,
                       visual=layout.visual, rope=rope, counts=counts, stages=[Stage(first_layer=0, layout=layout)],
                       steps=[])

    def _gravity(self, prefill: Prefill, layout: Layout, r_slot: torch.Tensor):
        """(table [S, T], rater positions [S, B, R], key positions [S, B, L]) of the current layout."""
        if prefill.mrope_ids is None:
            key_pos = layout.pos[None]
        else:
            key_pos = prefill.mrope_ids.gather(2, layout.src[None].expand(3, -1, -1))
        rater_pos = key_pos.gather(2, r_slot[None].expand(key_pos.shape[0], -1, -1))
        return prefill.gravity_table, rater_pos, key_pos

    # ------------------------------------------------------------------ host-side counts
    def plan(self, stage: int, counts: HostCounts, rank: torch.Tensor | None = None) -> Plan:
        """Visual tokens to keep, recycling candidates and clusters per row, and the counts after."""
        present = counts.visual
        if self.config.mode == "schedule":
            target = scale_count(self.counts[stage], counts.n_visual, self.config.reference_visual_tokens)
            full = torch.zeros_like(present, dtype=torch.bool)
        else:
            scale, bias = self.config.rank_coefficients
            target = (rank.double() * scale + bias).floor().long()
            full = rank >= present
        keep = torch.minimum(target, present - 1).clamp(min=1)
        keep = torch.where(full | (present <= 1), present, keep)
        pruned = present - keep
        if self.config.recycling:
            n_cand = torch.where(pruned > 0, (pruned.double() * self.config.recycle_ratio).floor().long() + 1, 0)
            n_cand = torch.minimum(n_cand, pruned)
            n_clusters = torch.where(n_cand > 0, n_cand // self.config.cluster_divisor + 1, 0)
        else:
            n_cand = n_clusters = torch.zeros_like(keep)
        after = HostCounts(valid=counts.valid - pruned + n_clusters, visual=keep + n_clusters,
                           n_visual=counts.n_visual, raters=counts.raters)
        return Plan(keep=keep, n_cand=n_cand, n_clusters=n_clusters, after=after)

    # ------------------------------------------------------------------ device work
    def projected(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, proj, norm, rotary) -> torch.Tensor:
        """Post-RoPE heads [B, H, L, D] of x [B, L, d] through the attention's q or k projection
        (and its q_norm / k_norm when it has one), as the layer's attention computes them."""
        batch, length = x.shape[:2]
        heads = proj(x).view(batch, length, -1, self.head_dim)
        if norm is not None:
            heads = norm(heads)
        heads = heads.transpose(1, 2)
        return rotary(heads, heads, cos, sin)[0]

    def queries(self, scoring: ScoringInputs, attn_module, rotary, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Post-RoPE queries [B, H, R, D] of the tokens in slots [B, R] (every token when None)."""
        x, cos, sin = scoring.x, scoring.cos, scoring.sin
        if slots is not None:
            x, cos, sin = gather_rows(x, slots), gather_rows(cos, slots), gather_rows(sin, slots)
        return self.projected(x, cos, sin, attn_module.q_proj, getattr(attn_module, "q_norm", None), rotary)

    def _keys(self, scoring: ScoringInputs, attn_module, rotary) -> torch.Tensor:
        if scoring.keys is not None:
            return scoring.keys
        return self.projected(scoring.x, scoring.cos, scoring.sin, attn_module.k_proj,
                              getattr(attn_module, "k_norm", None), rotary)

    def _rank(self, rows: torch.Tensor, rater_valid: torch.Tensor, counts: HostCounts) -> torch.Tensor:
        """rank(P) per row [B] on the host, by fp32 SVD as matrix_rank: the pass's one read-back
        (P [B, R, L] and the rater counts). A Gram matrix P P^T in fp32 cannot resolve singular
        values below sqrt(eps) * sigma_max, far above matrix_rank's tolerance."""
        raters = rater_valid.sum(1, keepdim=True).to(rows.dtype)
        host = torch.cat([rows.flatten(1), raters], 1).cpu()
        return ref.numerical_rank(host[:, :-1].view(rows.shape), host[:, -1].long(), counts.visual)

    def prune(self, prefill: Prefill, stage: int, layer: int, hidden: torch.Tensor, scoring: ScoringInputs,
              attn_module, rotary) -> PruneResult:
        """Prune the output hidden: [B, L, d] of a pruning layer; returns the compacted stage."""
        ops, layout, counts, rope = prefill.ops, prefill.stages[stage].layout, prefill.counts, prefill.rope
        r_slot = ref.packed_slots(layout.rater & layout.valid, counts.raters)
        r_ok = r_slot >= 0
        r_slot = r_slot.clamp(min=0)
        q = self.queries(scoring, attn_module, rotary, r_slot)
        keys = self._keys(scoring, attn_module, rotary)
        visual_keys = layout.visual & layout.valid
        gravity = self._gravity(prefill, layout, r_slot) if prefill.gravity_table is not None else None
        args = (q, keys, r_slot, r_ok, layout.valid, visual_keys, self.scaling)
        head_rel = ops.head_relevance(*args, gravity=gravity)
        weights = ref.head_weights(head_rel, self.n_priority)
        rel = ref.relevance(head_rel, weights)
        rank = None
        if self.config.mode == "rank":
            rank = self._rank(ops.rater_rows(*args, weights, gravity=gravity), r_ok, counts)
        plan = self.plan(stage, counts, rank)
        keep, n_cand, n_clusters = plan.on(hidden.device)

        scores = rel.masked_fill(layout.rater & visual_keys, float("inf"))  # a visual rater is never pruned
        text = layout.valid & ~layout.visual
        record = StepRecord(layer=layer, pos=layout.pos, kept=None, rater_valid=r_ok, valid_before=counts.valid,
                            visual_before=counts.visual, keep=plan.keep, n_cand=plan.n_cand)
        merged = merged_slot = None
        max_cand = int(plan.n_cand.max()) if plan.n_cand.numel() else 0
        if max_cand == 0:
            selection = ops.select_topk(scores, visual_keys, keep, int(plan.keep.max()), keep_also=text,
                                        width=plan.width)
            order, alive = selection.order, text | selection.kept
        else:
            selection = ops.select_topk(scores, visual_keys, keep, int(plan.keep.max()))
            pruned = visual_keys & ~selection.kept
            candidates = ops.select_topk(rel, pruned, n_cand, max_cand).kept_idx
            merged, centres, assign = ops.recycle(hidden, candidates, n_cand, n_clusters, int(plan.n_clusters.max()))
            merged_slot = torch.where(centres >= 0, candidates.gather(1, centres.clamp(min=0)), -1)
            length = layout.valid.shape[1]
            is_centre = torch.zeros(hidden.shape[0], length + 1, dtype=torch.bool, device=hidden.device)
            is_centre = is_centre.scatter_(1, torch.where(merged_slot >= 0, merged_slot, length), True)[:, :length]
            alive = text | selection.kept | is_centre
            order = ops.compaction_order(alive, plan.width)
            record.cand_idx, record.centres, record.assign = candidates, centres, assign
        record.kept = selection.kept
        out = ops.compact(order, hidden, layout.meta(alive), rope.cos, rope.sin, rope.position_ids, merged, merged_slot)
        return PruneResult(hidden=out.hidden, layout=Layout.from_meta(out.meta),
                           rope=Rope(out.cos, out.sin, out.position_ids), counts=plan.after, record=record)
