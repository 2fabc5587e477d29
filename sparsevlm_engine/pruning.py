"""The pruning pass of one prefill: raters before layer 0, then scoring, selection, recycling
and compaction at the output of each pruning layer. Batched; each row is pruned on its own.

A layout is the current left-padded arrangement of a batch: for every slot [B, L] its source
index in the prompt as given (src, for gathering RoPE rows), its position among the sample's
real tokens (pos), and whether it is real, visual or a rater.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .kernels import reference as ref
from .config import SparseVLMConfig
from .accounting import DecoderDims, clustering_flops, scoring_flops
from .schedule import scale_count, schedule_counts
from .trace import PruningRecord, RecycledToken


@dataclass
class Layout:
    """Per-slot bookkeeping of one stage; every tensor is [B, L]."""

    src: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    rater: torch.Tensor

    def gather(self, order: torch.Tensor) -> "Layout":
        return Layout(*(t.gather(1, order) for t in (self.src, self.pos, self.valid, self.visual, self.rater)))


@dataclass
class ScoringInputs:
    """What a pruning layer's attention saw. x: [B, L, d] the attention input (after its norm);
    cos, sin: the RoPE rows the layer used; keys: [B, H_kv, L, D] post-RoPE keys or None."""

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor | None


@dataclass
class PruneResult:
    hidden: torch.Tensor
    layout: Layout
    records: list[PruningRecord]
    pruning_flops: list[float] = field(default_factory=list)


def packed_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots where mask is true, packed to the left in slot order.

    mask: [B, L] bool. Returns (idx [B, W], ok [B, W]), W = max count; idx is 0 where not ok.
    """
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    width = int(mask.sum(1).max().item()) if mask.numel() else 0
    idx = order[:, :width]
    ok = torch.arange(width, device=mask.device)[None, :] < mask.sum(1, keepdim=True)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, L, ...], idx: [B, W] -> [B, W, ...]."""
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, flat)


def initial_layout(hidden: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> Layout:
    """The layout of the prompt as given, with raters chosen (SPARSEVLM.md section 1).

    hidden: [B, L, d] the layer-0 input; valid, visual: [B, L] bool.
    """
    batch, length = valid.shape
    slots = torch.arange(length, device=valid.device).expand(batch, length)
    visual = visual & valid
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    first_visual = torch.where(visual, slots, length).min(1, keepdim=True).values
    instruction = valid & ~visual & (slots > first_visual)
    v_idx, v_ok = packed_indices(visual)
    t_idx, t_ok = packed_indices(instruction)
    rater = torch.zeros_like(valid)
    if t_idx.shape[1]:
        chosen = ref.select_raters(gather_rows(hidden, v_idx), gather_rows(hidden, t_idx), v_ok, t_ok)
        rater.scatter_(1, t_idx, chosen & t_ok)
    last_real = torch.where(valid, slots, -1).max(1).values
    fallback = ~instruction.any(1) & visual.any(1) & (last_real >= 0)
    fallback_rater = torch.zeros_like(valid).scatter_(1, last_real.clamp(min=0)[:, None], True)
    rater = torch.where(fallback[:, None], fallback_rater, rater)
    return Layout(src=slots.clone(), pos=pos, valid=valid, visual=visual, rater=rater)


class Pruner:
    """Applies the configured method at each pruning layer (torch reference backend)."""

    def __init__(self, config: SparseVLMConfig, pruning_layers: tuple[int, ...], dims: DecoderDims,
                 scaling: float, inv_freq: torch.Tensor | None):
        self.config = config
        self.dims = dims
        heads = dims.heads
        self.head_dim = dims.head_dim
        self.scaling = scaling
        self.inv_freq = inv_freq
        if config.mode == "schedule":
            counts = config.keep_counts or schedule_counts(config.budget, config.schedule, len(pruning_layers))
            if len(counts) != len(pruning_layers):
                raise ValueError(f"{len(counts)} keep counts for {len(pruning_layers)} pruning layers")
            self.counts = counts
        n_priority = math.floor(config.priority_head_fraction * heads + 0.5)
        self.n_priority = max(1, n_priority) if config.priority_heads else None

    def keep_counts(self, stage: int, present: torch.Tensor, n_visual: torch.Tensor,
                    attention: torch.Tensor, rater_valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Visual tokens to keep per row [B] (before any recycling)."""
        if self.config.mode == "schedule":
            target = scale_count(self.counts[stage], n_visual, self.config.reference_visual_tokens)
            full = torch.zeros_like(present, dtype=torch.bool)
        else:
            scale, bias = self.config.rank_coefficients
            gram = ref.rater_gram(attention, rater_valid, weights)
            rank = ref.numerical_rank(gram, rater_valid.sum(1), present)
            target = (rank.double() * scale + bias).floor().long()
            full = rank >= present
        keep = torch.minimum(target, present - 1).clamp(min=1)
        keep = torch.where(full | (present <= 1), present, keep)
        return keep

    def relevance(self, scoring: ScoringInputs, layout: Layout, attn_module, rotary):
        """rel [B, L], the rater attention a [B, H, R, L], rater_valid [B, R], head weights [B, H]."""
        r_idx, r_ok = packed_indices(layout.rater & layout.valid)
        batch, n_raters = r_idx.shape
        x_r = gather_rows(scoring.x, r_idx)
        q = attn_module.q_proj(x_r).view(batch, n_raters, -1, self.head_dim)
        if hasattr(attn_module, "q_norm"):
            q = attn_module.q_norm(q)
        q = q.transpose(1, 2)
        cos_r, sin_r = gather_rows(scoring.cos, r_idx), gather_rows(scoring.sin, r_idx)
        q = rotary(q, q, cos_r, sin_r)[0]
        keys = scoring.keys
        if keys is None:
            k = attn_module.k_proj(scoring.x).view(batch, scoring.x.shape[1], -1, self.head_dim)
            if hasattr(attn_module, "k_norm"):
                k = attn_module.k_norm(k)
            k = k.transpose(1, 2)
            keys = rotary(k, k, scoring.cos, scoring.sin)[0]
        length = layout.valid.shape[1]
        slots = torch.arange(length, device=r_idx.device)
        visible = layout.valid[:, None, :] & (slots[None, None, :] <= r_idx[:, :, None]) & r_ok[:, :, None]
        gravity = None
        if self.config.rope_gravity:
            if self.inv_freq is None:
                raise ValueError("rope_gravity needs the model's rotary inv_freq")
            delta = gather_rows(layout.pos, r_idx)[:, :, None] - layout.pos[:, None, :]
            gravity = ref.rope_gravity(delta, self.inv_freq, self.head_dim)
        visual_keys = layout.visual & layout.valid
        a = ref.rater_attention(q, keys, visible, visual_keys, self.scaling, gravity)
        weights = ref.head_weights(a, r_ok, self.n_priority)
        return ref.relevance(a, r_ok, weights), a, r_ok, weights

    def prune(self, stage: int, layer: int, hidden: torch.Tensor, layout: Layout, scoring: ScoringInputs,
              n_visual: torch.Tensor, attn_module, rotary) -> PruneResult:
        """Prune the output hidden: [B, L, d] of a pruning layer; returns the compacted stage."""
        rel, a, r_ok, weights = self.relevance(scoring, layout, attn_module, rotary)
        present_mask = layout.visual & layout.valid
        present = present_mask.sum(1)
        keep = self.keep_counts(stage, present, n_visual, a, r_ok, weights)
        forced = layout.rater & present_mask
        kept = ref.topk_mask(rel.masked_fill(forced, float("inf")), present_mask, keep)
        pruned = present_mask & ~kept

        merged_h, merged_layout, recycled = self.recycle(hidden, layout, rel, pruned)
        alive = layout.valid & (~layout.visual | kept)
        pool_h = torch.cat([hidden, merged_h], 1)
        pool = Layout(*(torch.cat([getattr(layout, f), getattr(merged_layout, f)], 1)
                        for f in ("src", "pos", "valid", "visual", "rater")))
        pool_alive = torch.cat([alive, merged_layout.valid], 1)
        order = ref.compaction_order(pool_alive, pool.pos)
        new_layout = pool.gather(order)
        new_layout.valid = pool_alive.gather(1, order)
        new_hidden = gather_rows(pool_h, order)

        records = []
        kept_pos = layout.pos.masked_fill(~kept, -1)
        for b, (row, rec) in enumerate(zip(kept_pos.tolist(), recycled)):
            records.append(PruningRecord(layer=layer, visual_before=int(present[b]), keep_count=int(keep[b]),
                                         kept=tuple(p for p in row if p >= 0), recycled=tuple(rec)))
        flops = [self._flops(int(r_ok[b].sum()), int(layout.valid[b].sum()), int(present[b]), recycled[b])
                 for b in range(hidden.shape[0])]
        return PruneResult(new_hidden, new_layout, records, flops)

    def recycle(self, hidden: torch.Tensor, layout: Layout, rel: torch.Tensor, pruned: torch.Tensor):
        """Merge the best pruned tokens (SPARSEVLM.md section 4).

        Returns merged hidden [B, E, d], their layout [B, E] (valid marks real ones) and, per row,
        the RecycledToken list for the trace.
        """
        batch = hidden.shape[0]
        n_pruned = pruned.sum(1)
        empty_layout = Layout(*(torch.zeros(batch, 0, dtype=t.dtype, device=t.device)
                                for t in (layout.src, layout.pos, layout.valid, layout.visual, layout.rater)))
        if not self.config.recycling or not bool(n_pruned.any()):
            return hidden[:, :0], empty_layout, [[] for _ in range(batch)]
        n_cand = torch.where(n_pruned > 0, (n_pruned.double() * self.config.recycle_ratio).floor().long() + 1, 0)
        candidates = ref.topk_mask(rel, pruned, n_cand)
        c_idx, c_ok = packed_indices(candidates)
        rows_h, rows_src, rows_pos, rows_tokens = [], [], [], []
        for b in range(batch):
            n = int(c_ok[b].sum())
            if n == 0:
                rows_h.append(hidden.new_zeros(0, hidden.shape[2]))
                rows_src.append([]), rows_pos.append([]), rows_tokens.append([])
                continue
            slots = c_idx[b, :n]
            n_clusters = n // self.config.cluster_divisor + 1
            centres, assign = ref.dpc_knn(hidden[b, slots], n_clusters)
            rows_h.append(ref.merge_clusters(hidden[b, slots], assign, n_clusters))
            positions = layout.pos[b, slots].tolist()
            centre_slots = slots[centres]
            rows_src.append(layout.src[b, centre_slots].tolist())
            rows_pos.append(layout.pos[b, centre_slots].tolist())
            members = [[] for _ in range(n_clusters)]
            for i, cluster in enumerate(assign.tolist()):
                members[cluster].append(positions[i])
            rows_tokens.append([RecycledToken(centre=positions[int(c)], members=tuple(m))
                                for c, m in zip(centres.tolist(), members)])
        width = max(len(s) for s in rows_src)
        merged = hidden.new_zeros(batch, width, hidden.shape[2])
        src = torch.zeros(batch, width, dtype=layout.src.dtype, device=hidden.device)
        pos = torch.zeros_like(src)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=hidden.device)
        for b in range(batch):
            n = len(rows_src[b])
            merged[b, :n] = rows_h[b]
            src[b, :n] = torch.tensor(rows_src[b], dtype=src.dtype)
            pos[b, :n] = torch.tensor(rows_pos[b], dtype=pos.dtype)
            valid[b, :n] = True
        merged_layout = Layout(src=src, pos=pos, valid=valid, visual=valid.clone(), rater=torch.zeros_like(valid))
        return merged, merged_layout, rows_tokens

    def _flops(self, n_raters: int, n_keys: int, n_present: int, recycled: list) -> float:
        n_cand = sum(len(t.members) for t in recycled)
        return (scoring_flops(n_raters, n_keys, n_present, self.dims, gram=self.config.mode == "rank")
                + clustering_flops(n_cand, self.dims.hidden))
