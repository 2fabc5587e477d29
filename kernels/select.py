"""Per-row top-k with a per-row k: the kept visual tokens of a pruning layer.

Exact and deterministic without sorting: a bisection over the order-preserving integer view
of the fp32 scores finds each row's k-th largest value; ties at that value go to the lower
slots. Kept slots come out in slot (= original) order.

    sel = select_topk(scores, candidates, k, max_k, keep_also=text, width=new_length)
    sel.kept [B, L] bool, sel.kept_idx [B, max_k] int64, sel.order [B, new_length] int64
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_shape, next_pow2
from .compact import compaction_order, write_order
from .types import Selected, Selection

MAX_BLOCK = 4096
BLOCK_TILE = 64


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (-0.0 counts as +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _row_keys(scores_ptr, cand_ptr, b, offs, L):
    inside = offs < L
    cand = (tl.load(cand_ptr + b * L + offs, mask=inside, other=0) != 0) & inside
    key = _order_key(tl.load(scores_ptr + b * L + offs, mask=inside, other=0.0).to(tl.float32))
    return cand, key


@triton.jit
def _topk_row(scores_ptr, cand_ptr, k, kept_ptr, idx_ptr, b, L, K, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Row b: kept_ptr[b] = the min(k, #candidates) highest scores among the candidates (ties to
    the lower slot), idx_ptr[b, :K] their slots ascending then -1 (nothing written when K = 0)."""
    offs0 = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        cand0, key0 = _row_keys(scores_ptr, cand_ptr, b, offs0, L)
    n_cand = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        cand, key = _row_keys(scores_ptr, cand_ptr, b, l0 + offs0, L)
        n_cand += cand.to(tl.int32)
    k = tl.minimum(tl.maximum(k.to(tl.int32), 0), tl.sum(n_cand, 0))
    # largest t with #{key >= t} >= k; invariant: count(lo) >= k > count(hi)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        count = tl.zeros([BLOCK], tl.int32)
        if ONE_BLOCK:
            count += (cand0 & (key0.to(tl.int64) >= mid)).to(tl.int32)
        else:
            for l0 in range(0, L, BLOCK):
                cand, key = _row_keys(scores_ptr, cand_ptr, b, l0 + offs0, L)
                count += (cand & (key.to(tl.int64) >= mid)).to(tl.int32)
        enough = tl.sum(count, 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        cand, key = _row_keys(scores_ptr, cand_ptr, b, l0 + offs0, L)
        above += (cand & (key.to(tl.int64) > lo)).to(tl.int32)
    ties_kept = k - tl.sum(above, 0)
    ties_before = tl.zeros([BLOCK], tl.int32)
    kept_before = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + offs0
        cand, key = _row_keys(scores_ptr, cand_ptr, b, offs, L)
        tie = cand & (key.to(tl.int64) == lo)
        tie_rank = tl.sum(ties_before, 0) + tl.cumsum(tie.to(tl.int32), 0) - 1
        kept = (cand & (key.to(tl.int64) > lo)) | (tie & (tie_rank < ties_kept))
        tl.store(kept_ptr + b * L + offs, kept.to(tl.int8), mask=offs < L)
        rank = tl.sum(kept_before, 0) + tl.cumsum(kept.to(tl.int32), 0) - 1
        tl.store(idx_ptr + b * K + rank, offs.to(tl.int64), mask=kept & (rank < K))
        ties_before += tie.to(tl.int32)
        kept_before += kept.to(tl.int32)
    n_kept = tl.sum(kept_before, 0)
    for j0 in range(0, K, BLOCK):
        offs = j0 + offs0
        tl.store(idx_ptr + b * K + offs, tl.full([BLOCK], -1, tl.int64), mask=(offs < K) & (offs >= n_kept))


@triton.jit(do_not_specialize=["L", "K"])
def _topk_kernel(scores_ptr, cand_ptr, k_ptr, kept_ptr, idx_ptr, L, K,
                 BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    _topk_row(scores_ptr, cand_ptr, tl.load(k_ptr + b), kept_ptr, idx_ptr, b, L, K, BLOCK, ONE_BLOCK)


def select_topk(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, max_k: int,
                keep_also: torch.Tensor | None = None, width: int | None = None) -> Selection:
    """The min(k[b], #candidates) highest-scoring candidates of each row, ties to the lower slot
    (reference.topk_mask).

    scores: [B, L] float (compared in fp32); candidates: [B, L] bool; k: [B] int on the
    device (no host round trip); max_k: host bound on k, the width of kept_idx. With keep_also
    [B, L] bool (slots that stay whatever the scores) and width, also returns the gather map
    of the compacted layout of keep_also | kept (compact.compaction_order).
    """
    if scores.dim() != 2:
        raise ValueError(f"select_topk: scores must be [B, L], got {list(scores.shape)}")
    batch, length = scores.shape
    check_shape("select_topk", "candidates", candidates, (batch, length))
    check_shape("select_topk", "k", k, (batch,))
    if candidates.dtype != torch.bool:
        raise ValueError(f"select_topk: candidates must be bool, got {candidates.dtype}")
    if not scores.is_floating_point() or k.is_floating_point() or k.dtype == torch.bool:
        raise ValueError(f"select_topk: scores must be float and k integer, got {scores.dtype} and {k.dtype}")
    if max_k < 0:
        raise ValueError(f"select_topk: max_k must be >= 0, got {max_k}")
    if (keep_also is None) != (width is None):
        raise ValueError("select_topk: keep_also and width go together")
    device = check_device("select_topk", scores=scores, candidates=candidates, k=k)
    kept = torch.empty(batch, length, dtype=torch.int8, device=device)
    kept_idx = torch.empty(batch, max_k, dtype=torch.int64, device=device)
    if batch and length:
        block = min(MAX_BLOCK, max(16, next_pow2(length)))
        _topk_kernel[(batch,)](scores.contiguous(), candidates.contiguous().view(torch.int8), k.contiguous(),
                               kept, kept_idx, length, max_k, BLOCK=block, ONE_BLOCK=length <= block)
    elif kept_idx.numel():
        kept_idx.fill_(-1)
    kept = kept.view(torch.bool)
    order = None
    if keep_also is not None:
        check_shape("select_topk", "keep_also", keep_also, (batch, length))
        order = compaction_order(keep_also | kept, width)
    return Selection(kept, kept_idx, order)


@triton.jit(do_not_specialize=["H", "L", "K", "W", "n_priority", "stride_keep", "stride_cand"])
def _select_step_kernel(head_rel_ptr, valid_ptr, visual_ptr, rater_ptr, keep_ptr, ncand_ptr,
                        rel_ptr, score_ptr, flag_ptr, kept_ptr, alive_ptr, picked_ptr, cand_idx_ptr, order_ptr,
                        stride_keep, stride_cand, H, L, K, W, n_priority,
                        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
                        ONE_BLOCK: tl.constexpr, PRIORITY: tl.constexpr, CANDIDATES: tl.constexpr,
                        ORDER: tl.constexpr):
    """One program per row: head weights, relevance, the kept visual slots, alive, the recycling
    candidates and (without recycling) the compacted layout's gather map."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    mass = tl.zeros([BLOCK_H], tl.float32)
    for l0 in range(0, L, BLOCK_T):
        offs = l0 + tl.arange(0, BLOCK_T)
        tile = tl.load(head_rel_ptr + (b * H + offs_h[:, None]) * L + offs[None, :],
                       mask=h_in[:, None] & (offs[None, :] < L), other=0.0)
        mass += tl.sum(tile, 1)
    if PRIORITY:  # the n_priority heads of largest mass, ties to the lower head
        other = offs_h[None, :]
        ahead = (mass[None, :] > mass[:, None]) | ((mass[None, :] == mass[:, None]) & (other < offs_h[:, None]))
        rank = tl.sum((ahead & (other < H)).to(tl.int32), 1)
        weight = tl.where(h_in & (rank < n_priority), 1.0 / n_priority, 0.0)
    else:
        weight = tl.where(h_in, 1.0 / H, 0.0)
    for l0 in range(0, L, BLOCK_T):
        offs = l0 + tl.arange(0, BLOCK_T)
        inside = offs < L
        tile = tl.load(head_rel_ptr + (b * H + offs_h[:, None]) * L + offs[None, :],
                       mask=h_in[:, None] & inside[None, :], other=0.0)
        rel = tl.sum(weight[:, None] * tile, 0)
        valid = tl.load(valid_ptr + b * L + offs, mask=inside, other=0) != 0
        visual_key = valid & (tl.load(visual_ptr + b * L + offs, mask=inside, other=0) != 0)
        rater = tl.load(rater_ptr + b * L + offs, mask=inside, other=0) != 0
        tl.store(rel_ptr + b * L + offs, rel, mask=inside)
        tl.store(score_ptr + b * L + offs, tl.where(rater & visual_key, float("inf"), rel), mask=inside)
        tl.store(flag_ptr + b * L + offs, visual_key.to(tl.int8), mask=inside)
    tl.debug_barrier()
    _topk_row(score_ptr, flag_ptr, tl.load(keep_ptr + b * stride_keep), kept_ptr, cand_idx_ptr, b, L, 0,
              BLOCK, ONE_BLOCK)
    tl.debug_barrier()
    for l0 in range(0, L, BLOCK_T):
        offs = l0 + tl.arange(0, BLOCK_T)
        inside = offs < L
        valid = tl.load(valid_ptr + b * L + offs, mask=inside, other=0) != 0
        visual = tl.load(visual_ptr + b * L + offs, mask=inside, other=0) != 0
        kept = tl.load(kept_ptr + b * L + offs, mask=inside, other=0) != 0
        tl.store(alive_ptr + b * L + offs, ((valid & ~visual) | kept).to(tl.int8), mask=inside)
        if CANDIDATES:
            tl.store(flag_ptr + b * L + offs, (valid & visual & ~kept).to(tl.int8), mask=inside)
    tl.debug_barrier()
    if CANDIDATES:
        _topk_row(rel_ptr, flag_ptr, tl.load(ncand_ptr + b * stride_cand), picked_ptr, cand_idx_ptr, b, L, K,
                  BLOCK, ONE_BLOCK)
    if ORDER:
        write_order(alive_ptr, order_ptr, b, L, W, BLOCK)


def _check_count(name: str, t: torch.Tensor, batch: int) -> None:
    check_shape("select_step", name, t, (batch,))
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"select_step: {name} must be an integer tensor, got {t.dtype}")


def select_step(head_rel: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, rater: torch.Tensor,
                keep: torch.Tensor, n_cand: torch.Tensor, n_priority: int | None, max_cand: int,
                width: int | None) -> Selected:
    """A pruning layer's whole selection in one launch (reference.select_step).

    head_rel: [B, H, L] fp32 per-head relevance; valid, visual, rater: [B, L] bool of the layout;
    keep, n_cand: [B] int device counts (strided views allowed); n_priority: average the heads of
    largest relevance mass only (None: all heads); max_cand: host bound on n_cand (0: no
    recycling); width: the compacted length when not recycling (None when recycling).
    """
    if head_rel.dim() != 3 or head_rel.dtype != torch.float32:
        raise ValueError(f"select_step: head_rel must be [B, H, L] fp32, got {head_rel.dtype} {list(head_rel.shape)}")
    batch, heads, length = head_rel.shape
    for name, t in (("valid", valid), ("visual", visual), ("rater", rater)):
        check_shape("select_step", name, t, (batch, length))
        if t.dtype != torch.bool:
            raise ValueError(f"select_step: {name} must be bool, got {t.dtype}")
    _check_count("keep", keep, batch)
    _check_count("n_cand", n_cand, batch)
    if (max_cand > 0) == (width is not None):
        raise ValueError("select_step: give width without recycling (max_cand = 0), and only then")
    if width is not None and not 0 <= width <= length:
        raise ValueError(f"select_step: width {width} must be in [0, L={length}]")
    if n_priority is not None and n_priority < 1:
        raise ValueError(f"select_step: n_priority must be >= 1 or None, got {n_priority}")
    device = check_device("select_step", head_rel=head_rel, valid=valid, keep=keep, n_cand=n_cand)
    empty = functools.partial(torch.empty, device=device)
    rel, score = empty(batch, length, dtype=torch.float32), empty(batch, length, dtype=torch.float32)
    flag, picked = empty(batch, length, dtype=torch.int8), empty(batch, length, dtype=torch.int8)
    kept, alive = empty(batch, length, dtype=torch.bool), empty(batch, length, dtype=torch.bool)
    # at least one column: a GPU launch cannot take a zero-size tensor's (null) pointer
    cand_idx = empty(batch, max(max_cand, 1), dtype=torch.int64)
    order = empty(batch, max(width or 0, 1), dtype=torch.int64)
    if batch and length:
        block = min(MAX_BLOCK, max(16, next_pow2(length)))
        _select_step_kernel[(batch,)](
            head_rel.contiguous(), valid.contiguous().view(torch.int8), visual.contiguous().view(torch.int8),
            rater.contiguous().view(torch.int8), keep, n_cand, rel, score, flag, kept.view(torch.int8),
            alive.view(torch.int8), picked, cand_idx, order, keep.stride(0), n_cand.stride(0), heads, length,
            max_cand, width or 0, n_priority or heads, BLOCK_H=max(2, next_pow2(heads)), BLOCK_T=BLOCK_TILE,
            BLOCK=block, ONE_BLOCK=length <= block, PRIORITY=n_priority is not None and n_priority < heads,
            CANDIDATES=max_cand > 0, ORDER=width is not None)
    return Selected(rel, kept, alive, cand_idx if max_cand > 0 else None,
                    order[:, :width] if width is not None else None)
