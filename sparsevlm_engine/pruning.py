"""The pruning pass of one prefill: raters before layer 0, then scoring, selection, recycling
and compaction at the output of each pruning layer. Batched; each row is pruned on its own.
With positions="renumber" the recycling places the merged tokens after the kept visual ones and
the compaction renumbers the 1-D position ids (mRoPE models keep their 3-D ids).

A pruning layer issues at most six device operations in schedule mode: the rater queries
(gather, input_layernorm, q_proj, RoPE), the per-head relevance (row log-sum-exp included),
the selection (head weights, relevance, kept tokens, recycling candidates), the pairwise
distances and the clustering + merge (recycling only), and the compaction that writes the next
layers' hidden states, bookkeeping, RoPE rows and attention mask. Every count they need is
decided on the host at the prefill's start and uploaded once; rank mode reads the rater rows P
back once per layer. Models whose layers the fused rater queries do not cover (another norm, a
q_norm) and prefills without a cache (no keys to read) take a few more torch ops. Under tensor
parallelism each pruning layer also all-gathers the per-head relevance of every rank (and rank
mode all-reduces its rater rows): distributed.py. Layers on other devices: placement.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .accounting import DecoderDims
from .backends import ops_for
from .config import SparseVLMConfig
from .distributed import local_tensor
from .families import rope_rows
from .placement import to_device
from .kernels import reference as ref
from .layout import (HostCounts, Layout, Plan, Prefill, Rope, ScoringInputs, Stage, gather_rows, initial_layout,
                     upload)
from .schedule import scale_count, schedule_counts
from .trace import StepRecord

MASK_KIND = {"eager": "additive", "sdpa": "bool"}  # flash_attention_2 takes the 2-D validity


def rms_norm_eps(norm) -> float | None:
    """eps of a transformers RMSNorm (weight * x / rms(x), as LlamaRMSNorm / Qwen2RMSNorm compute it),
    which the fused rater queries reproduce; None for any other norm."""
    name = type(norm).__name__
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if not name.endswith("RMSNorm") or name.startswith("Gemma") or eps is None or weight is None:
        return None
    return float(eps)


def plane_of_dim(sections: tuple[int, ...], head_dim: int) -> list[int]:
    """The mRoPE plane (t, h, w) each head dim takes its cos / sin from, as families.rope_rows mixes them."""
    planes = [i % 3 for i, n in enumerate(list(sections) * 2) for _ in range(n)]
    if len(planes) != head_dim:
        raise ValueError(f"mRoPE sections {sections} cover {len(planes)} dims, not the head dim {head_dim}")
    return planes


@dataclass
class PruneResult:
    """A pruning layer's output: the compacted hidden states [B, L', d], their stage (layout,
    mask, RoPE rows) and host counts, and what the layer did."""

    hidden: torch.Tensor
    stage: Stage
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
        self.after_visual = config.positions == "renumber"  # the recycled tokens' placement
        self.renumbers_ids = self.after_visual and sections is None  # mRoPE keeps its 3-D ids

    def start(self, hidden: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, rope: Rope,
              mrope_ids: torch.Tensor | None = None, wrap_ops=None, shards=None) -> Prefill:
        """A prefill's start: the backend for its device, the raters, the gravity table and, in
        schedule mode, every pruning layer's counts (uploaded once). hidden: [B, L, d] the layer-0
        input; valid, visual: [B, L] bool; mrope_ids: [3, B, L] the prompt's 3-D position ids
        (mRoPE models); wrap_ops: ops -> ops, or None; shards: this rank's heads under tensor
        parallelism (distributed.HeadShards), or None."""
        ops = ops_for(self.config.backend, hidden.device)
        if wrap_ops is not None:
            ops = wrap_ops(ops)
        table = None
        if self.config.rope_gravity:
            size = hidden.shape[1]
            if self.sections is not None:
                if mrope_ids is None:
                    raise ValueError("RoPE gravity on an mRoPE model needs the prompt's 3-D position ids")
                mrope_ids = mrope_ids.to(hidden.device).expand(3, hidden.shape[0], -1).contiguous()
                size = max(size, int(mrope_ids.max()) + 1)  # video time ids can exceed the length
            table = ops.gravity_table(self.inv_freq.to(hidden.device), self.head_dim, size, self.sections)
        if table is None or self.sections is None:
            mrope_ids = None
        layout, counts = initial_layout(ops, hidden, valid, visual)
        padded = bool((counts.valid < valid.shape[1]).any())
        prefill = Prefill(ops=ops, gravity_table=table, mrope_ids=mrope_ids, valid=layout.valid,
                          visual=layout.visual, rope=rope, counts=counts,
                          stages=[Stage(first_layer=0, layout=layout, padded=padded)], steps=[], shards=shards)
        if self.config.mode == "schedule":
            for stage in range(len(self.counts)):
                prefill.plans.append(self.plan(stage, counts))
                counts = prefill.plans[-1].after
            prefill.device_plans = upload(torch.stack([p.host() for p in prefill.plans]), hidden.device)
        if self.renumbers_ids:
            prefill.rank_slot = ref.packed_slots(layout.valid, valid.shape[1])
        if rope.cos.dim() == 4 and self.sections is not None:
            prefill.plane_of_dim = torch.tensor(plane_of_dim(self.sections, self.head_dim), device=hidden.device)
        return prefill

    def _gravity(self, prefill: Prefill, layout: Layout):
        """(table [S, T], positions, index) of the current layout: 1-D RoPE reads each slot's pos,
        mRoPE the prompt's 3-D ids at each slot's source index."""
        if prefill.mrope_ids is None:
            return prefill.gravity_table, layout.pos, None
        return prefill.gravity_table, prefill.mrope_ids, layout.src

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

    def _attention_input(self, scoring: ScoringInputs, layer, sections) -> tuple:
        """(x [B, L, d], cos, sin [B, L, D]) of every token, computed once per layer when needed."""
        if scoring.x is None:  # where the layer's weights are (placement.py)
            norm = layer.input_layernorm
            weight = getattr(norm, "weight", None)
            device = weight.device if isinstance(weight, torch.Tensor) else scoring.hidden.device
            scoring.x = norm(to_device(scoring.hidden, device))
        batch, device = scoring.x.shape[0], scoring.x.device
        cos, sin = (to_device(rope_rows(t, sections), device).expand(batch, -1, -1) for t in (scoring.cos, scoring.sin))
        return scoring.x, cos, sin

    def queries(self, scoring: ScoringInputs, layer, rotary, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Post-RoPE queries [B, H, R, D] of the tokens in slots [B, R] (every token when None)."""
        x, cos, sin = self._attention_input(scoring, layer, self.sections)
        if slots is not None:
            slots = to_device(slots, x.device)
            x, cos, sin = gather_rows(x, slots), gather_rows(cos, slots), gather_rows(sin, slots)
        attn = layer.self_attn
        return self.projected(x, cos, sin, attn.q_proj, getattr(attn, "q_norm", None), rotary)

    def _keys(self, scoring: ScoringInputs, layer, rotary) -> torch.Tensor:
        if scoring.keys is not None:
            return scoring.keys
        x, cos, sin = self._attention_input(scoring, layer, self.sections)
        attn = layer.self_attn
        return self.projected(x, cos, sin, attn.k_proj, getattr(attn, "k_norm", None), rotary)

    def rater_queries(self, prefill: Prefill, layout: Layout, scoring: ScoringInputs, layer, rotary):
        """(q [B, H, R, D], rater_slot [B, R], rater_valid [B, R]) on the layout's device: one fused
        launch where the layer is a standard RMSNorm + q_proj (nn.Linear) one in a single dtype on
        that device, else through the layer's own modules (another norm, a q_norm, a quantised
        projection, mixed dtypes, the layer on another device)."""
        attn, raters, norm = layer.self_attn, prefill.counts.raters, layer.input_layernorm
        eps = rms_norm_eps(norm)
        weight, bias = getattr(attn.q_proj, "weight", None), getattr(attn.q_proj, "bias", None)
        if prefill.shards is not None:  # this rank's heads: the rows of its q_proj shard
            weight, bias = local_tensor(weight), local_tensor(bias)
        same_dtype = all(t is None or t.dtype == scoring.hidden.dtype for t in (weight, bias, scoring.cos))
        device = layout.valid.device
        if (eps is not None and getattr(attn, "q_norm", None) is None and isinstance(attn.q_proj, torch.nn.Linear)
                and same_dtype and norm.weight.dtype == scoring.hidden.dtype and weight.device == device):
            hidden, cos, sin = (to_device(t, device) for t in (scoring.hidden, scoring.cos, scoring.sin))
            return prefill.ops.rater_queries(hidden, layout.rater, layout.valid, raters, norm.weight, eps,
                                             weight, bias, cos, sin, prefill.plane_of_dim)
        r_slot = ref.packed_slots(layout.rater & layout.valid, raters)
        r_ok = r_slot >= 0
        return to_device(self.queries(scoring, layer, rotary, r_slot.clamp(min=0)), device), r_slot, r_ok

    def _rank(self, rows: torch.Tensor, rater_valid: torch.Tensor, counts: HostCounts) -> torch.Tensor:
        """rank(P) per row [B] on the host, by fp32 SVD as matrix_rank: the pass's one read-back
        (P [B, R, L] and the rater counts). A Gram matrix P P^T in fp32 cannot resolve singular
        values below sqrt(eps) * sigma_max, far above matrix_rank's tolerance."""
        raters = rater_valid.sum(1, keepdim=True).to(rows.dtype)
        host = torch.cat([rows.flatten(1), raters], 1).cpu()
        return ref.numerical_rank(host[:, :-1].view(rows.shape), host[:, -1].long(), counts.visual)

    def prune(self, prefill: Prefill, stage: int, layer_index: int, hidden: torch.Tensor, scoring: ScoringInputs,
              layer, rotary, impl: str) -> PruneResult:
        """Prune the output hidden: [B, L, d] of a pruning layer (module `layer`, attention
        implementation impl); returns the compacted stage."""
        ops, layout, counts, rope = prefill.ops, prefill.stages[stage].layout, prefill.counts, prefill.rope
        q, r_slot, r_ok = self.rater_queries(prefill, layout, scoring, layer, rotary)
        device = layout.valid.device  # the prefill's: the layer's keys and output come to it (placement.py)
        keys, hidden = to_device(self._keys(scoring, layer, rotary), device), to_device(hidden, device)
        gravity = self._gravity(prefill, layout) if prefill.gravity_table is not None else None
        args = (q, keys, r_slot, r_ok, layout.valid, layout.visual, self.scaling)
        shards = prefill.shards
        if self.config.mode == "schedule":
            plan, counts_dev = prefill.plans[stage], prefill.device_plans[stage]
            head_rel = ops.head_relevance(*args, gravity=gravity)
            if shards is not None:
                head_rel = shards.gather_heads(head_rel)
        else:
            lse = ops.rater_lse(*args[:5], self.scaling)
            head_rel = ops.head_relevance(*args, lse=lse, gravity=gravity)
            if shards is None:
                rows = ops.rater_rows(*args, ref.head_weights(head_rel, self.n_priority), lse=lse, gravity=gravity)
            else:  # this rank's heads weighted by the weights of all heads, summed over the ranks
                head_rel = shards.gather_heads(head_rel)
                weights = shards.local_weights(ref.head_weights(head_rel, self.n_priority))
                rows = shards.sum_rows(ops.rater_rows(*args, weights, lse=lse, gravity=gravity))
            rank = self._rank(rows, r_ok, counts)
            plan = self.plan(stage, counts, rank)
            counts_dev = upload(plan.host(), hidden.device)
        keep, n_cand, n_clusters, valid_after = counts_dev.unbind(0)
        recycles = plan.max_cand > 0
        selected = ops.select_step(head_rel, layout.valid, layout.visual, layout.rater, keep, n_cand, self.n_priority,
                                   plan.max_cand, None if recycles else plan.width)
        record = StepRecord(layer=layer_index, src=layout.src, kept=selected.kept, rater_valid=r_ok,
                            valid_before=counts.valid, visual_before=counts.visual, keep=plan.keep,
                            n_cand=plan.n_cand)
        alive, order, merged, replace = selected.alive, selected.order, None, None
        if recycles:
            recycled = ops.recycle(hidden, selected.cand_idx, n_cand, n_clusters, plan.max_clusters, alive,
                                   plan.width, visual=layout.visual if self.after_visual else None)
            alive, order, merged, replace = recycled.alive, recycled.order, recycled.merged, recycled.replace
            record.cand_idx, record.centres, record.assign = selected.cand_idx, recycled.centres, recycled.assign
        needs_mask = plan.padded or impl == "eager"  # else causality alone is the mask (sdpa's is_causal, flash)
        out = ops.compact(order, hidden, layout.src, layout.pos, alive, layout.visual, layout.rater, rope.cos,
                          rope.sin, rope.position_ids, merged, replace,
                          mask=MASK_KIND.get(impl) if needs_mask else None, mask_dtype=hidden.dtype,
                          renumber=(prefill.rank_slot, valid_after) if self.renumbers_ids else None)
        new = Layout(src=out.src, pos=out.pos, valid=out.valid, visual=out.visual, rater=out.rater)
        mask = (out.valid if out.mask is None else out.mask) if needs_mask else None
        next_stage = Stage(first_layer=layer_index + 1, layout=new, padded=plan.padded, mask=mask, cos=out.cos,
                           sin=out.sin, position_ids=out.position_ids)
        return PruneResult(hidden=out.hidden, stage=next_stage, counts=plan.after, record=record)
