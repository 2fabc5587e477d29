"""Per-row top-k with a per-row k: the kept visual tokens of a pruning layer.

Exact and deterministic without sorting: a bisection over the order-preserving integer view
of the fp32 scores finds each row's k-th largest value; ties at that value go to the lower
slots. Kept slots come out in slot (= original) order.

    sel = select_topk(scores, candidates, k, max_k, keep_also=text, width=new_length)
    sel.kept [B, L] bool, sel.kept_idx [B, max_k] int64, sel.order [B, new_length] int64
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_shape, next_pow2
from .compact import compaction_order
from .types import Selection

MAX_BLOCK = 4096


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


@triton.jit(do_not_specialize=["L", "K"])
def _topk_kernel(scores_ptr, cand_ptr, k_ptr, kept_ptr, idx_ptr, L, K,
                 BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs0 = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        cand0, key0 = _row_keys(scores_ptr, cand_ptr, b, offs0, L)
    n_cand = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        cand, key = _row_keys(scores_ptr, cand_ptr, b, l0 + offs0, L)
        n_cand += cand.to(tl.int32)
    k = tl.minimum(tl.maximum(tl.load(k_ptr + b).to(tl.int32), 0), tl.sum(n_cand, 0))
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
