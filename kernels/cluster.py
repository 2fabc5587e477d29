"""The @triton.jit pieces of token recycling (kernels/recycle.py): candidate gathers and the
phases the fused per-row kernel runs one after the other. Each phase reads what the previous one
stored to global memory, so the kernel puts a tl.debug_barrier() between them.

All maths in fp32. Semantics: `reference.dpc_knn`, `reference.merge_clusters`.
"""
from __future__ import annotations

import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-2147483648)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def ordered_key(x):
    """int32 key whose signed order is the order of the fp32 values."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def candidate_slots(cand_base, stride_cn, offs_n, n, L):
    """(slot index into L as int64, whether it may be read) for candidate positions offs_n.
    Positions past n, or holding an out-of-range index, read as nothing."""
    in_n = offs_n < n
    idx = tl.load(cand_base + offs_n * stride_cn, mask=in_n, other=0).to(tl.int64)
    return idx, in_n & (idx >= 0) & (idx < L)


@triton.jit
def load_rows(hidden_base, idx, ok, offs_d, stride_hl, stride_hd, D, TRANSPOSE: tl.constexpr,
              NATIVE: tl.constexpr):
    """Gathered tile [rows, d] (or [d, rows] if TRANSPOSE), zero where not ok, in the input dtype
    if NATIVE else fp32 (the interpreter gets bf16 arithmetic wrong, so it always upcasts)."""
    in_d = offs_d < D
    if TRANSPOSE:
        ptrs = hidden_base + idx[None, :] * stride_hl + offs_d.to(tl.int64)[:, None] * stride_hd
        x = tl.load(ptrs, mask=in_d[:, None] & ok[None, :], other=0.0)
    else:
        ptrs = hidden_base + idx[:, None] * stride_hl + offs_d.to(tl.int64)[None, :] * stride_hd
        x = tl.load(ptrs, mask=ok[:, None] & in_d[None, :], other=0.0)
    if not NATIVE:
        x = x.to(tl.float32)
    return x


@triton.jit
def candidate_count(ncand_ptr, pid_b, stride_nc, N):
    """The row's candidate count, clamped to [0, N]."""
    return tl.minimum(tl.maximum(tl.load(ncand_ptr + pid_b * stride_nc).to(tl.int32), 0), N)


@triton.jit
def sample_counts(ncand_ptr, ncl_ptr, pid_b, stride_nc, stride_ncl, N, C):
    """(n, k): the candidate count and the cluster count clamped to [1, min(n, C)], or 0 for an
    empty row."""
    n = candidate_count(ncand_ptr, pid_b, stride_nc, N)
    k = tl.load(ncl_ptr + pid_b * stride_ncl).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 1), tl.minimum(n, C))
    return n, tl.where(n > 0, k, 0)


@triton.jit
def density_phase(dist_base, spread_base, n, k, N, BLOCK_R: tl.constexpr, BLOCK_ROW: tl.constexpr):
    """spread[i] = mean square of the k smallest distances of row i (density = exp(-spread)),
    stored for i < n; returns the largest distance of the row's n x n block."""
    offs_c = tl.arange(0, BLOCK_ROW)
    in_c = offs_c < n
    row_max = tl.zeros([BLOCK_R], tl.float32)
    for r0 in range(0, n, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n
        valid = in_r[:, None] & in_c[None, :]
        dist = tl.load(dist_base + offs_r.to(tl.int64)[:, None] * N + offs_c[None, :], mask=valid, other=0.0)
        key = tl.where(valid, ordered_key(dist), _INT32_MAX)
        # Per row, the k-th smallest key: the least t with count(key <= t) >= k. 32 halvings of
        # the int32 range pin it exactly.
        lo = tl.full([BLOCK_R], _INT32_MIN, tl.int64)
        hi = tl.full([BLOCK_R], _INT32_MAX, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            enough = tl.sum((key <= mid[:, None]).to(tl.int32), 1) >= k
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        below = key < lo[:, None]
        n_below = tl.sum(below.to(tl.int32), 1)
        kth = tl.max(tl.where(valid & (key <= lo[:, None]), dist, 0.0), 1)
        sq_sum = tl.sum(tl.where(below, dist * dist, 0.0), 1) + (k - n_below).to(tl.float32) * (kth * kth)
        tl.store(spread_base + offs_r, sq_sum / tl.maximum(k, 1).to(tl.float32), mask=in_r)
        row_max = tl.maximum(row_max, tl.max(tl.where(valid, dist, 0.0), 1))
    return tl.max(row_max, 0)


@triton.jit
def score_phase(dist_base, spread_base, score_base, n, N, dist_max, BLOCK_R: tl.constexpr,
                BLOCK_ROW: tl.constexpr):
    """score[i] = density * delta for i < n, densities ranked by spread (exp(-spread) rounds near
    1 in fp32 and would make distinct densities tie); density ties: the lower index is higher."""
    offs_c = tl.arange(0, BLOCK_ROW)
    in_c = offs_c < n
    spread_col = tl.load(spread_base + offs_c, mask=in_c, other=0.0)
    for r0 in range(0, n, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n
        valid = in_r[:, None] & in_c[None, :]
        spread_row = tl.load(spread_base + offs_r, mask=in_r, other=0.0)
        dist = tl.load(dist_base + offs_r.to(tl.int64)[:, None] * N + offs_c[None, :], mask=valid, other=0.0)
        higher = (spread_col[None, :] < spread_row[:, None]) | (
            (spread_col[None, :] == spread_row[:, None]) & (offs_c[None, :] < offs_r[:, None]))
        delta = tl.min(tl.where(valid & higher, dist, dist_max), 1)
        tl.store(score_base + offs_r, tl.exp(-spread_row) * delta, mask=in_r)


@triton.jit
def select_phase(score_base, centres_base, n, k, C, BLOCK_ROW: tl.constexpr, BLOCK_E: tl.constexpr):
    """The k top scores (ties to the lower index) as ascending centres[:k]; centres[k:C] = -1."""
    offs_n = tl.arange(0, BLOCK_ROW)
    in_n = offs_n < n
    # The k-th largest key T by bisection, everything above T, then the first (k - count above)
    # candidates equal to T.
    score = tl.load(score_base + offs_n, mask=in_n, other=0.0)
    key = tl.where(in_n, ordered_key(score), _INT32_MIN)
    lo = tl.full([], _INT32_MIN, tl.int64)
    hi = tl.full([], _INT32_MAX, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = (key > lo) & in_n
    tie = (key == lo) & in_n
    need = k - tl.sum(above.to(tl.int32), 0)
    chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
    rank = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(centres_base + rank, offs_n.to(tl.int64), mask=chosen)
    for c0 in range(0, C, BLOCK_E):
        offs_e = c0 + tl.arange(0, BLOCK_E)
        tl.store(centres_base + offs_e, tl.full([BLOCK_E], -1, tl.int64), mask=(offs_e >= k) & (offs_e < C))


@triton.jit
def assign_phase(dist_base, centres_base, assign_base, n, k, N, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """assign[i] = the nearest centre of candidate i < n (ties to the earlier centre; a centre is
    pinned to itself, -1 beating any distance, even with another centre at distance 0); -1 for
    n <= i < N."""
    for r0 in range(0, N, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n
        best = tl.full([BLOCK_R], float("inf"), tl.float32)
        nearest = tl.zeros([BLOCK_R], tl.int64)
        for e0 in range(0, k, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            in_e = offs_e < k
            centre = tl.load(centres_base + offs_e, mask=in_e, other=0)
            valid = in_r[:, None] & in_e[None, :]
            dist = tl.load(dist_base + offs_r.to(tl.int64)[:, None] * N + centre[None, :], mask=valid,
                           other=float("inf"))
            dist = tl.where(valid & (offs_r[:, None] == centre[None, :]), -1.0, dist)
            block_best = tl.min(dist, 1)
            block_nearest = e0 + tl.argmin(dist, 1, tie_break_left=True).to(tl.int64)
            better = block_best < best  # strict: an earlier block wins ties
            nearest = tl.where(better, block_nearest, nearest)
            best = tl.where(better, block_best, best)
        tl.store(assign_base + offs_r, tl.where(in_r, nearest, -1), mask=offs_r < N)


@triton.jit
def merge_phase(hidden_base, cand_base, assign_base, merged_base, n, k, L, D, C,
                stride_hl, stride_hd, stride_cn, stride_mc, stride_md,
                BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr):
    """merged[c] = mean of cluster c's members (a one-hot matmul per cluster block x d block);
    clusters c >= k have no members and come out 0."""
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        n_read = tl.where(c0 < k, n, 0)  # a block past the row's clusters reads nothing
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            sums = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
            counts = tl.zeros([BLOCK_C], tl.float32)
            for j0 in range(0, n_read, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                cluster = tl.load(assign_base + offs_j, mask=offs_j < n, other=-1)
                member = cluster[None, :] == offs_c[:, None]
                idx, ok = candidate_slots(cand_base, stride_cn, offs_j, n, L)
                x = load_rows(hidden_base, idx, ok, offs_d, stride_hl, stride_hd, D, False, NATIVE)
                sums = tl.dot(member.to(x.dtype), x, sums, input_precision="ieee")
                counts += tl.sum(member.to(tl.float32), 1)
            mean = sums / tl.maximum(counts, 1.0)[:, None]
            ptrs = merged_base + offs_c.to(tl.int64)[:, None] * stride_mc + offs_d[None, :] * stride_md
            tl.store(ptrs, mean.to(merged_base.dtype.element_ty), mask=(offs_c < C)[:, None] & (offs_d < D)[None, :])


@triton.jit
def layout_phase(alive_in_base, stride_al, cand_base, stride_cn, centres_base, alive_base, replace_base,
                 k, L, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per slot l: replace[l] = c if l is the slot of centre c, else -1; alive[l] = input alive
    or a centre's slot. Each L block is compared with the row's centre slots (no scatter)."""
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        rep = tl.full([BLOCK_L], -1, tl.int32)
        for e0 in range(0, k, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            in_e = offs_e < k
            centre = tl.load(centres_base + offs_e, mask=in_e, other=0)
            slot = tl.load(cand_base + centre * stride_cn, mask=in_e, other=-1).to(tl.int64)
            hit = (offs_l.to(tl.int64)[:, None] == slot[None, :]) & in_e[None, :]
            rep = tl.maximum(rep, tl.max(tl.where(hit, offs_e[None, :], -1), 1))
        was_alive = tl.load(alive_in_base + offs_l * stride_al, mask=in_l, other=0) != 0
        tl.store(replace_base + offs_l, rep, mask=in_l)
        tl.store(alive_base + offs_l, (was_alive | (rep >= 0)).to(tl.int8), mask=in_l)
