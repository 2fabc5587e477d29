"""Plain-PyTorch reference of every SparseVLM op: ground truth for the kernels and the CPU backend.

Notation: B batch rows, L sequence slots (left padded), d hidden size, H query heads, H_kv key
heads, D head dim, R rater slots (padded), NV / NT visual / text slots (padded), N candidates.
All maths runs in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math
import numbers

import torch

from .types import Selected


def select_raters(visual: torch.Tensor, text: torch.Tensor, visual_valid: torch.Tensor,
                  text_valid: torch.Tensor) -> torch.Tensor:
    """Raters among the instruction tokens (SPARSEVLM.md section 1).

    visual: [B, NV, d], text: [B, NT, d] hidden states; visual_valid: [B, NV], text_valid:
    [B, NT] bool. M = softmax(V T^T) over the text axis (no 1/sqrt(d)), s = mean of M over the
    visual axis, raters = text tokens with s > mean(s). A row whose set comes out empty takes
    every valid text token. Returns [B, NT] bool.
    """
    v = visual.float()
    t = text.float()
    logits = torch.einsum("bvd,btd->bvt", v, t)
    logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    probs = probs * visual_valid[:, :, None]
    n_visual = visual_valid.sum(-1, keepdim=True).clamp(min=1)
    score = probs.sum(1) / n_visual
    n_text = text_valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (score * text_valid).sum(-1, keepdim=True) / n_text
    raters = (score > mean) & text_valid
    empty = ~raters.any(-1, keepdim=True)
    return torch.where(empty, text_valid, raters)


def rope_sections(inv_freq: torch.Tensor, sections=None, op: str = "rope_gravity") -> list[int]:
    """Frequency pairs per RoPE section: [D/2] for None (1-D RoPE), else `sections` checked to be
    positive ints summing to inv_freq's D/2 pairs (mRoPE, e.g. [16, 24, 24] for t, h, w)."""
    if inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise ValueError(f"{op}: inv_freq must be [D/2], got {list(inv_freq.shape)}")
    if sections is None:
        return [inv_freq.numel()]
    parts = list(sections)
    if (not parts or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in parts)
            or sum(parts) != inv_freq.numel()):
        raise ValueError(f"{op}: sections {parts} must be positive ints summing to the "
                         f"{inv_freq.numel()} frequency pairs of inv_freq {list(inv_freq.shape)}")
    return [int(n) for n in parts]


def _section_gravity(delta: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, parts: list[int]) -> torch.Tensor:
    """Unguarded per-section sums of 2 cos(|delta_s| theta_p) / sqrt(head_dim): delta [S, ...] -> [S, ...]."""
    if delta.dim() < 1 or delta.shape[0] != len(parts):
        raise ValueError(f"rope_gravity: delta has shape {list(delta.shape)}, expected [{len(parts)}, ...] "
                         f"for sections {parts}")
    return torch.stack([2.0 * torch.cos(d.abs().float()[..., None] * f).sum(-1) / math.sqrt(head_dim)
                        for d, f in zip(delta, inv_freq.float().split(parts))])


def gravity_guard(g: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sign(g) * max(|g|, eps), sign(0) = +1."""
    sign = torch.where(g < 0, -1.0, 1.0)
    return sign * g.abs().clamp(min=eps)


def rope_gravity(delta: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, eps: float = 1e-6,
                 sections=None) -> torch.Tensor:
    """g = sum over sections s, pairs p of s of 2 cos(delta_s * theta_p) / sqrt(head_dim), |g| kept >= eps.

    delta: [...] relative distances (query position - key position), or [S, ...] one per section
    when sections (pairs per section, summing to D/2) is given; inv_freq: [D/2]. The logit that
    all-ones query and key vectors get at that displacement after RoPE (mRoPE). Returns [...].
    """
    parts = rope_sections(inv_freq, sections)
    if sections is None:
        delta = delta[None]
    return gravity_guard(_section_gravity(delta, inv_freq, head_dim, parts).sum(0), eps)


def gravity_table(inv_freq: torch.Tensor, head_dim: int, size: int, sections=None) -> torch.Tensor:
    """Unguarded per-section gravity table [S, size] fp32: table[s, d] = sum over pairs p of
    section s of 2 cos(d * theta_p) / sqrt(head_dim); sections None means one section."""
    parts = rope_sections(inv_freq, sections, "gravity_table")
    delta = torch.arange(size, device=inv_freq.device).expand(len(parts), size)
    return _section_gravity(delta, inv_freq, head_dim, parts)


def gravity_lookup(table: torch.Tensor, rater_pos: torch.Tensor, key_pos: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Gravity divisor [B, R, L] = guard(sum_s table[s, clamp(|rater_pos_s - key_pos_s|, 0, T - 1)]).

    table: [S, T] from gravity_table; rater_pos: [S, B, R] and key_pos: [S, B, L] position ids
    per section, or [B, R] / [B, L] when S = 1.
    """
    n_sections = table.shape[0]
    if n_sections == 1:
        rater_pos = rater_pos[None] if rater_pos.dim() == 2 else rater_pos
        key_pos = key_pos[None] if key_pos.dim() == 2 else key_pos
    if rater_pos.dim() != 3 or key_pos.dim() != 3 or rater_pos.shape[0] != n_sections or key_pos.shape[0] != n_sections:
        raise ValueError(f"gravity: table {list(table.shape)} needs rater_pos [S, B, R] and key_pos [S, B, L] "
                         f"with S = {n_sections}, got {list(rater_pos.shape)} and {list(key_pos.shape)}")
    delta = (rater_pos[:, :, :, None] - key_pos[:, :, None, :]).abs().clamp(max=table.shape[1] - 1)
    sections = torch.arange(table.shape[0], device=table.device)[:, None, None, None]
    return gravity_guard(table[sections, delta].sum(0), eps)


def _rater_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 logits [B, H, R, L] of rater queries q [B, H, R, D] on keys k [B, H_kv, L, D] (GQA)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of key heads {kv_heads}")
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("bhrd,bhld->bhrl", q.float(), k) * scaling


def rater_attention(q: torch.Tensor, k: torch.Tensor, key_visible: torch.Tensor, visual_keys: torch.Tensor,
                    scaling: float, gravity: torch.Tensor | None = None,
                    lse: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of the rater rows on the visual keys.

    q: [B, H, R, D] post-RoPE rater queries; k: [B, H_kv, L, D] post-RoPE keys (query head h
    reads key head h // (H / H_kv)); key_visible: [B, R, L] bool (causal and not padding);
    visual_keys: [B, L] bool. Each row is normalised over every visible key (the full row), by
    its own log-sum-exp or the given lse [B, H, R], then kept only on visual keys. gravity:
    optional [B, R, L] divisor (RoPE gravity).
    Returns a: [B, H, R, L] fp32, zero outside visible visual keys. Memory O(B H R L).
    """
    visible = key_visible[:, None]
    logits = _rater_logits(q, k, scaling).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True) if lse is None else lse[..., None].float()
    probs = torch.exp(logits - lse).nan_to_num(0.0)
    if gravity is not None:
        probs = probs / gravity[:, None].float()
    keep = visible & visual_keys[:, None, None, :]
    return torch.where(keep, probs, torch.zeros((), dtype=probs.dtype))


def mean_over_raters(a: torch.Tensor, rater_valid: torch.Tensor) -> torch.Tensor:
    """rel[b, h, l] = mean over valid raters of a[b, h, r, l].

    a: [B, H, R, L] from rater_attention; rater_valid: [B, R] bool. Returns [B, H, L] fp32.
    """
    n_raters = rater_valid.sum(-1).clamp(min=1).float()
    return (a * rater_valid[:, None, :, None]).sum(2) / n_raters[:, None, None]


def head_weights(head_rel: torch.Tensor, n_priority: int | None) -> torch.Tensor:
    """Weights [B, H] that average heads: uniform, or uniform over the n_priority heads with
    the largest summed rater-to-visual attention (ties to the lower head index).

    head_rel: [B, H, L] from mean_over_raters (its sum over l ranks the heads as the summed
    attention does: the two differ by the rater count, one factor per row).
    """
    batch, heads = head_rel.shape[:2]
    if n_priority is None or n_priority >= heads:
        return torch.full((batch, heads), 1.0 / heads, device=head_rel.device)
    score = head_rel.sum(-1)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :n_priority]
    weights = torch.zeros(batch, heads, device=head_rel.device)
    return weights.scatter(1, order, 1.0 / n_priority)


def relevance(head_rel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rel[b, l] = sum_h weights[b, h] * head_rel[b, h, l]. Returns [B, L] fp32."""
    return torch.einsum("bhl,bh->bl", head_rel, weights)


def weighted_rows(a: torch.Tensor, rater_valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The head-averaged rater rows P[b, r, l] = sum_h weights[b, h] a[b, h, r, l] [B, R, L]
    (a is zero off visual keys); padded rater rows are zero."""
    return torch.einsum("bhrl,bh->brl", a, weights) * rater_valid[:, :, None]


def numerical_rank(rows: torch.Tensor, n_rows: torch.Tensor, n_cols: torch.Tensor) -> torch.Tensor:
    """fp32 numerical rank of each P [B, R, L] as torch.linalg.matrix_rank gives it: singular
    values above sigma_max * max(rows, cols) * eps(fp32). Zero rows and columns (padding, text
    keys) change no singular value; n_rows, n_cols: [B] the true sizes. Returns [B] int64."""
    sigma = torch.linalg.svdvals(rows.float())
    sigma_max = sigma.max(-1, keepdim=True).values
    tol = sigma_max * torch.maximum(n_rows, n_cols)[:, None].to(sigma.dtype) * torch.finfo(torch.float32).eps
    return ((sigma > tol) & (sigma_max > 0)).sum(-1)


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] highest-scoring candidates of each row, ties to the lower slot.

    scores: [B, L]; candidates: [B, L] bool; k: [B] int. Returns [B, L] bool.
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & candidates


def packed_slots(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Slots where mask is true, ascending, packed to the left: [B, width] int64, -1 past the
    row's count. mask: [B, L] bool; width >= every row's count."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    if width > order.shape[1]:
        order = torch.cat([order, order.new_zeros(order.shape[0], width - order.shape[1])], 1)
    ok = torch.arange(width, device=mask.device)[None, :] < mask.sum(1, keepdim=True)
    return torch.where(ok, order[:, :width], -1)


def dpc_knn(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, assign) of `ranked_dpc_knn`."""
    return ranked_dpc_knn(x, n_clusters)[:2]


def ranked_dpc_knn(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours of one sample's candidates.

    x: [N, d]. dist = ||x_i - x_j|| / sqrt(d); rho_i = exp(-mean squared distance to its
    n_clusters nearest, itself included); delta_i = distance to the nearest point of higher
    density (density ties: the lower index counts as higher), or the largest distance if none;
    centres = the n_clusters points with the largest rho * delta (ties to the lower index);
    every point joins its nearest centre (ties to the earlier centre), a centre joins itself.
    Returns (centres [C] ascending indices into x, assign [N] in [0, C), rank [C] of each centre
    by score, 0 the highest).
    """
    n, d = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / math.sqrt(d)
    dist = torch.triu(dist, 1) + torch.triu(dist, 1).T  # exactly symmetric, as the kernel's mirrored tiles:
    # mutual nearest neighbours then tie exactly in density, and the tie goes to the lower index
    nearest = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    spread = (nearest ** 2).mean(-1)  # density = exp(-spread), compared by spread: exp rounds near 1
    idx = torch.arange(n, device=x.device)
    higher = (spread[None, :] < spread[:, None]) | (
        (spread[None, :] == spread[:, None]) & (idx[None, :] < idx[:, None]))
    delta = torch.where(higher, dist, dist.max()).min(-1).values
    score = torch.exp(-spread) * delta
    by_score = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    centres, rank = by_score.sort()
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign, rank


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Mean of each cluster's members. x: [N, d]; assign: [N]. Returns [C, d] in x.dtype."""
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=n_clusters).clamp(min=1)
    return (sums / counts[:, None]).to(x.dtype)


def compaction_order(alive: torch.Tensor, position: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Gather map of the compacted, left-padded layout.

    alive: [B, P] bool slots of a pool (tokens kept plus recycled tokens); position: [B, P]
    their sequence positions (distinct among alive slots of a row). Returns [B, L'] indices
    into the pool, L' = width (default: the max alive count): each row holds its alive slots
    in position order, right-aligned, preceded by dead slots (padding) in slot order.
    """
    key = torch.where(alive, position, torch.full_like(position, -1))
    order = torch.sort(key, dim=-1, stable=True).indices
    if width is None:
        width = int(alive.sum(-1).max().item()) if alive.numel() else 0
    return order[:, order.shape[1] - width:]


# ----------------------------------------------------------------------------- the kernels' ops
# Each takes exactly its kernel launcher's arguments (kernels/relevance.py, select.py) and
# returns the same outputs; TorchOps (sparsevlm_engine/backends.py) is a table of them.

def gravity_divisor(gravity, rater_slot: torch.Tensor) -> torch.Tensor | None:
    """The gravity divisor [B, R, L] from the kernels' gravity argument (table, positions [S, B, LP]
    or [B, LP], index [B, L] or None) and the rater slots [B, R]; None without gravity."""
    if gravity is None:
        return None
    table, positions, index = gravity
    if positions.dim() == 2:
        positions = positions[None]
    if index is not None:
        positions = positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
    key_pos = positions
    rater_pos = key_pos.gather(2, rater_slot.clamp(min=0)[None].expand(key_pos.shape[0], -1, -1))
    return gravity_lookup(table, rater_pos, key_pos)


def _rater_visible(k, rater_slot, rater_valid, key_valid) -> torch.Tensor:
    """[B, R, L] bool: the keys each valid rater sees (causal, not padding)."""
    slots = torch.arange(k.shape[2], device=k.device)
    return key_valid[:, None, :] & (slots[None, None, :] <= rater_slot[:, :, None]) & rater_valid[:, :, None]


def rater_probs(q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse=None, gravity=None) -> torch.Tensor:
    """a [B, H, R, L] (rater_attention) from the kernels' arguments; lse [B, H, R] replaces the
    rows' own log-sum-exp when given."""
    visible = _rater_visible(k, rater_slot, rater_valid, key_valid) & (rater_slot[:, :, None] >= 0)
    return rater_attention(q, k, visible, visual, scaling, gravity_divisor(gravity, rater_slot), lse)


def rater_lse(q, k, rater_slot, rater_valid, key_valid, scaling) -> torch.Tensor:
    """Natural-log log-sum-exp [B, H, R] of each rater's attention row over the keys it sees."""
    visible = _rater_visible(k, rater_slot, rater_valid, key_valid)
    return torch.logsumexp(_rater_logits(q, k, scaling).masked_fill(~visible[:, None], float("-inf")), dim=-1)


def head_relevance(q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse=None, gravity=None):
    """Per-head relevance [B, H, L] fp32 (relevance.head_relevance)."""
    valid_raters = rater_valid & (rater_slot >= 0)
    return mean_over_raters(rater_probs(q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse, gravity),
                            valid_raters)


def rater_rows(q, k, rater_slot, rater_valid, key_valid, visual, scaling, weights, lse=None, gravity=None):
    """The head-averaged rater rows P [B, R, L] fp32 (relevance.rater_rows)."""
    a = rater_probs(q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse, gravity)
    return weighted_rows(a, rater_valid & (rater_slot >= 0), weights)


def select_step(head_rel, valid, visual, rater, keep, n_cand, n_priority, max_cand, width):
    """A pruning layer's selection (select.select_step): Selected(rel, kept, alive, cand_idx, order)."""
    rel = relevance(head_rel, head_weights(head_rel, n_priority))
    visual_keys = visual & valid
    kept = topk_mask(rel.masked_fill(rater & visual_keys, float("inf")), visual_keys, keep)
    alive = (valid & ~visual) | kept
    cand_idx = order = None
    if max_cand > 0:
        cand_idx = packed_slots(topk_mask(rel, visual_keys & ~kept, n_cand), max_cand)
    if width is not None:
        order = compaction_order(alive, torch.arange(alive.shape[1], device=alive.device).expand_as(alive), width)
    return Selected(rel, kept, alive, cand_idx, order)
