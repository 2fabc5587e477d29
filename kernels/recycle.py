"""Token recycling: DPC-kNN clustering of each row's candidates and the mean of every cluster,
batched and padded, in five Triton kernels with no host round trip.

`_pairwise_dist_kernel` (grid B x row blocks x column blocks; the upper-triangle programs compute
and also store the mirror tile) gathers the candidates and writes dist = ||x_i - x_j|| / sqrt(d)
to an fp32 scratch [B, N, N]. `_density_kernel` (grid B x row blocks) finds the k = n_clusters
smallest distances of each row by bisection on the order-preserving int32 view of the floats and
writes their mean square (the spread; density = exp(-spread)) and the row maximum. `_score_kernel`
(grid B x row blocks) writes score = density * delta, ranking densities by spread: exp(-spread)
rounds near 1 in fp32 and would make distinct densities tie. `_select_kernel` (grid B) picks the top n_clusters scores (ties to the
lower index), writes the centres in ascending order and assigns every candidate to its nearest
centre. `_merge_kernel` (grid B x cluster blocks x d blocks) sums the members of each cluster with
a one-hot matmul and divides by the counts.
Semantics: `reference.dpc_knn` and `reference.merge_clusters`; all maths in fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, interpreting, next_pow2

_INT32_MIN = tl.constexpr(-2147483648)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _ordered_key(x):
    """int32 key whose signed order is the order of the fp32 values."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _candidate_slots(cand_base, stride_cn, offs_n, n, L):
    """(slot index into L as int64, whether it may be read) for candidate positions offs_n.
    Positions past n, or holding an out-of-range index, read as nothing."""
    in_n = offs_n < n
    idx = tl.load(cand_base + offs_n * stride_cn, mask=in_n, other=0).to(tl.int64)
    return idx, in_n & (idx >= 0) & (idx < L)


@triton.jit
def _load_rows(hidden_base, idx, ok, offs_d, stride_hl, stride_hd, D, TRANSPOSE: tl.constexpr,
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
def _candidate_count(ncand_ptr, pid_b, stride_nc, N):
    """The row's candidate count, clamped to [0, N]."""
    return tl.minimum(tl.maximum(tl.load(ncand_ptr + pid_b * stride_nc).to(tl.int32), 0), N)


@triton.jit
def _sample_counts(ncand_ptr, ncl_ptr, pid_b, stride_nc, stride_ncl, N, C):
    """(n, k): the candidate count and the cluster count clamped to [1, min(n, C)], or 0 for an
    empty row."""
    n = _candidate_count(ncand_ptr, pid_b, stride_nc, N)
    k = tl.load(ncl_ptr + pid_b * stride_ncl).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 1), tl.minimum(n, C))
    return n, tl.where(n > 0, k, 0)


@triton.jit(do_not_specialize=["stride_hb", "stride_cb", "stride_nc", "N", "L"])
def _pairwise_dist_kernel(
    hidden_ptr, cand_ptr, ncand_ptr, dist_ptr,
    stride_hb, stride_hl, stride_hd,
    stride_cb, stride_cn,
    stride_nc,
    N, L, D, sqrt_d,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
):
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_j < pid_i:  # the mirror of an upper-triangle tile
        return
    pid_b = tl.program_id(0).to(tl.int64)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D)
    n = _candidate_count(ncand_ptr, pid_b, stride_nc, N)
    hidden_base = hidden_ptr + pid_b * stride_hb
    idx_i, ok_i = _candidate_slots(cand_ptr + pid_b * stride_cb, stride_cn, offs_i, n, L)
    idx_j, ok_j = _candidate_slots(cand_ptr + pid_b * stride_cb, stride_cn, offs_j, n, L)

    # fp16/bf16 products are exact in fp32, so the native dot with fp32 accumulation loses nothing.
    dot = tl.zeros([BLOCK_N, BLOCK_N], tl.float32)
    sq_i = tl.zeros([BLOCK_N], tl.float32)
    sq_j = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        xi = _load_rows(hidden_base, idx_i, ok_i, offs_d, stride_hl, stride_hd, D, False, NATIVE)
        xj = _load_rows(hidden_base, idx_j, ok_j, offs_d, stride_hl, stride_hd, D, True, NATIVE)
        dot = tl.dot(xi, xj, dot, input_precision="ieee")
        xi = xi.to(tl.float32)
        xj = xj.to(tl.float32)
        sq_i += tl.sum(xi * xi, 1)
        sq_j += tl.sum(xj * xj, 0)
    sq = tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * dot, 0.0)
    dist = tl.sqrt(sq) / sqrt_d
    dist = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, dist)
    if pid_i == pid_j:  # the upper half of a diagonal tile mirrored: dist is exactly symmetric
        dist = tl.where(offs_i[:, None] < offs_j[None, :], dist, tl.trans(dist))

    dist_base = dist_ptr + pid_b * N * N
    in_i = offs_i < N
    in_j = offs_j < N
    tl.store(dist_base + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], dist,
             mask=in_i[:, None] & in_j[None, :])
    if pid_j > pid_i:
        tl.store(dist_base + offs_j.to(tl.int64)[None, :] * N + offs_i[:, None], dist,
                 mask=in_i[:, None] & in_j[None, :])


@triton.jit(do_not_specialize=["stride_nc", "stride_ncl", "N", "C"])
def _density_kernel(
    dist_ptr, ncand_ptr, ncl_ptr, aux_ptr,
    stride_nc, stride_ncl,
    N, C,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_N)
    n, k = _sample_counts(ncand_ptr, ncl_ptr, pid_b, stride_nc, stride_ncl, N, C)
    valid = (offs_r < n)[:, None] & (offs_c < n)[None, :]
    dist = tl.load(dist_ptr + pid_b * N * N + offs_r.to(tl.int64)[:, None] * N + offs_c[None, :],
                   mask=valid, other=0.0)
    key = tl.where(valid, _ordered_key(dist), _INT32_MAX)

    # Per row, the k-th smallest key: the least t with count(key <= t) >= k. 32 halvings of the
    # int32 range pin it exactly.
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
    spread = sq_sum / tl.maximum(k, 1).to(tl.float32)
    row_max = tl.max(tl.where(valid, dist, 0.0), 1)

    in_row = offs_r < n
    aux_base = aux_ptr + pid_b * 3 * N
    tl.store(aux_base + offs_r, spread, mask=in_row)
    tl.store(aux_base + N + offs_r, row_max, mask=in_row)


@triton.jit(do_not_specialize=["stride_nc", "N"])
def _score_kernel(
    dist_ptr, ncand_ptr, aux_ptr,
    stride_nc,
    N,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_N)
    n = _candidate_count(ncand_ptr, pid_b, stride_nc, N)
    in_r = offs_r < n
    in_c = offs_c < n
    aux_base = aux_ptr + pid_b * 3 * N

    spread_col = tl.load(aux_base + offs_c, mask=in_c, other=0.0)
    spread_row = tl.load(aux_base + offs_r, mask=in_r, other=0.0)
    dist_max = tl.max(tl.load(aux_base + N + offs_c, mask=in_c, other=0.0), 0)
    valid = in_r[:, None] & in_c[None, :]
    dist = tl.load(dist_ptr + pid_b * N * N + offs_r.to(tl.int64)[:, None] * N + offs_c[None, :],
                   mask=valid, other=0.0)
    higher = (spread_col[None, :] < spread_row[:, None]) | (
        (spread_col[None, :] == spread_row[:, None]) & (offs_c[None, :] < offs_r[:, None]))
    delta = tl.min(tl.where(valid & higher, dist, dist_max), 1)
    tl.store(aux_base + 2 * N + offs_r, tl.exp(-spread_row) * delta, mask=in_r)


@triton.jit(do_not_specialize=["stride_nc", "stride_ncl", "stride_eb", "stride_ab", "N", "C"])
def _select_kernel(
    dist_ptr, ncand_ptr, ncl_ptr, aux_ptr, centres_ptr, assign_ptr,
    stride_nc, stride_ncl,
    stride_eb, stride_ab,
    N, C,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    n, k = _sample_counts(ncand_ptr, ncl_ptr, pid_b, stride_nc, stride_ncl, N, C)
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    centres_base = centres_ptr + pid_b * stride_eb

    # Top k scores, ties to the lower index: the k-th largest key T by bisection, everything above
    # T, then the first (k - count above) candidates equal to T.
    score = tl.load(aux_ptr + pid_b * 3 * N + 2 * N + offs_n, mask=in_n, other=0.0)
    key = tl.where(in_n, _ordered_key(score), _INT32_MIN)
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
    for c0 in range(0, C, BLOCK_C):
        offs_e = c0 + tl.arange(0, BLOCK_C)
        tl.store(centres_base + offs_e, tl.full([BLOCK_C], -1, tl.int64), mask=(offs_e >= k) & (offs_e < C))
    tl.debug_barrier()

    # Nearest centre per candidate; argmin breaks ties to the earlier (lower-index) centre, and a
    # centre is pinned to itself (-1 beats any distance) even if another centre sits at distance 0.
    offs_e = tl.arange(0, BLOCK_C)
    in_e = offs_e < k
    centre = tl.load(centres_base + offs_e, mask=in_e, other=0)
    dist_base = dist_ptr + pid_b * N * N
    for r0 in range(0, N, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n
        valid = in_r[:, None] & in_e[None, :]
        dist = tl.load(dist_base + offs_r.to(tl.int64)[:, None] * N + centre[None, :], mask=valid,
                       other=float("inf"))
        dist = tl.where(valid & (offs_r[:, None] == centre[None, :]), -1.0, dist)
        nearest = tl.argmin(dist, 1, tie_break_left=True).to(tl.int64)
        tl.store(assign_ptr + pid_b * stride_ab + offs_r, tl.where(in_r, nearest, -1), mask=offs_r < N)


@triton.jit(do_not_specialize=["stride_hb", "stride_cb", "stride_nc", "stride_ab", "stride_mb", "N", "L", "C"])
def _merge_kernel(
    hidden_ptr, cand_ptr, ncand_ptr, assign_ptr, merged_ptr,
    stride_hb, stride_hl, stride_hd,
    stride_cb, stride_cn,
    stride_nc,
    stride_ab,
    stride_mb, stride_mc, stride_md,
    N, L, D, C,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = _candidate_count(ncand_ptr, pid_b, stride_nc, N)
    hidden_base = hidden_ptr + pid_b * stride_hb

    # Clusters c >= n_clusters have no members (assign < n_clusters), so their rows come out 0.
    sums = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    counts = tl.zeros([BLOCK_C], tl.float32)
    for j0 in range(0, n, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        cluster = tl.load(assign_ptr + pid_b * stride_ab + offs_j, mask=offs_j < n, other=-1)
        member = cluster[None, :] == offs_c[:, None]
        idx, ok = _candidate_slots(cand_ptr + pid_b * stride_cb, stride_cn, offs_j, n, L)
        x = _load_rows(hidden_base, idx, ok, offs_d, stride_hl, stride_hd, D, False, NATIVE)
        sums = tl.dot(member.to(x.dtype), x, sums, input_precision="ieee")
        counts += tl.sum(member.to(tl.float32), 1)
    mean = sums / tl.maximum(counts, 1.0)[:, None]
    ptrs = merged_ptr + pid_b * stride_mb + offs_c.to(tl.int64)[:, None] * stride_mc + offs_d[None, :] * stride_md
    tl.store(ptrs, mean.to(merged_ptr.dtype.element_ty), mask=(offs_c < C)[:, None] & (offs_d < D)[None, :])


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check(hidden: torch.Tensor, cand_idx: torch.Tensor, n_cand: torch.Tensor, n_clusters: torch.Tensor,
           max_clusters: int) -> None:
    op = "recycle"
    check_device(op, hidden=hidden, cand_idx=cand_idx, n_cand=n_cand, n_clusters=n_clusters)
    check_float(op, hidden=hidden)
    check_shape(op, "hidden", hidden, (None, None, None))
    batch, _, dim = hidden.shape
    check_shape(op, "cand_idx", cand_idx, (batch, None))
    check_shape(op, "n_cand", n_cand, (batch,))
    check_shape(op, "n_clusters", n_clusters, (batch,))
    for name, t in (("cand_idx", cand_idx), ("n_cand", n_cand), ("n_clusters", n_clusters)):
        if not _is_int(t):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype} with shape {list(t.shape)}")
    if cand_idx.shape[1] < 1:
        raise ValueError(f"{op}: cand_idx has shape {list(cand_idx.shape)}, expected at least one candidate column")
    if dim < 1:
        raise ValueError(f"{op}: hidden has shape {list(hidden.shape)}, expected a hidden size d >= 1")
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 1:
        raise ValueError(f"{op}: max_clusters must be a host int >= 1, got {max_clusters!r}")


def recycle(hidden: torch.Tensor, cand_idx: torch.Tensor, n_cand: torch.Tensor, n_clusters: torch.Tensor,
            max_clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of each row's candidates and the mean of each cluster, for a whole batch.

    hidden: [B, L, d] fp32/fp16/bf16; cand_idx: [B, N] int slot indices into L of each row's
    candidates (ascending; entries at j >= n_cand[b] are ignored); n_cand: [B] int device tensor
    (0 allowed); n_clusters: [B] int device tensor, 1 <= n_clusters[b] <= n_cand[b] (ignored when
    n_cand[b] = 0); max_clusters: host int >= max(n_clusters), the output width C.
    Returns merged [B, C, d] in hidden.dtype (cluster means, zero rows for c >= n_clusters[b]),
    centres [B, C] int64 (ascending indices into the row's candidate list, -1 past n_clusters[b])
    and assign [B, N] int64 (cluster of each candidate, -1 past n_cand[b]). Row b equals
    `reference.dpc_knn` / `reference.merge_clusters` on hidden[b, cand_idx[b, :n_cand[b]]].
    No host synchronisation.

    >>> merged, centres, assign = recycle(h, idx, n, k, 32)   # h: [2, 700, 4096], idx: [2, 576]
    """
    _check(hidden, cand_idx, n_cand, n_clusters, max_clusters)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    batch, length, dim = hidden.shape
    n_slots = cand_idx.shape[1]
    width = max_clusters
    device = hidden.device

    merged = torch.empty((batch, width, dim), dtype=hidden.dtype, device=device)
    centres = torch.empty((batch, width), dtype=torch.int64, device=device)
    assign = torch.empty((batch, n_slots), dtype=torch.int64, device=device)
    if batch == 0:
        return merged, centres, assign

    # Scratch: pairwise distances, and per candidate spread / row maximum / score.
    dist = torch.empty((batch, n_slots, n_slots), dtype=torch.float32, device=device)
    aux = torch.empty((batch, 3, n_slots), dtype=torch.float32, device=device)

    # fp16/bf16 go into the dots as they are on a GPU; the interpreter needs fp32 (see _load_rows).
    native = hidden.dtype != torch.float32 and not interpreting()
    # Tiles keep the H100 build under 255 registers with no spills; the whole-row kernels take
    # blocks of rows holding about 4096 distances.
    block_row = max(16, next_pow2(n_slots))
    block_pair = min(64, block_row)
    block_r = min(block_row, max(2, 4096 // block_row))
    block_e = max(2, next_pow2(min(width, n_slots)))  # every centre a row can have
    block_c = min(32, max(16, next_pow2(width)))
    block_d = min(64, max(16, next_pow2(dim)))
    row_warps = 8 if block_row >= 2048 else 4

    n_pair = triton.cdiv(n_slots, block_pair)
    _pairwise_dist_kernel[(batch, n_pair, n_pair)](
        hidden, cand_idx, n_cand, dist,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        cand_idx.stride(0), cand_idx.stride(1),
        n_cand.stride(0),
        n_slots, length, dim, math.sqrt(dim),
        BLOCK_N=block_pair, BLOCK_D=min(32, max(16, next_pow2(dim))), NATIVE=native,
        num_warps=8 if block_pair == 64 else 4,
    )
    row_grid = (batch, triton.cdiv(n_slots, block_r))
    _density_kernel[row_grid](
        dist, n_cand, n_clusters, aux,
        n_cand.stride(0), n_clusters.stride(0),
        n_slots, width,
        BLOCK_R=block_r, BLOCK_N=block_row, num_warps=row_warps,
    )
    _score_kernel[row_grid](
        dist, n_cand, aux,
        n_cand.stride(0),
        n_slots,
        BLOCK_R=block_r, BLOCK_N=block_row, num_warps=row_warps,
    )
    _select_kernel[(batch,)](
        dist, n_cand, n_clusters, aux, centres, assign,
        n_cand.stride(0), n_clusters.stride(0),
        centres.stride(0), assign.stride(0),
        n_slots, width,
        BLOCK_N=block_row, BLOCK_C=block_e, BLOCK_R=min(block_row, max(2, 4096 // block_e)),
        num_warps=row_warps,
    )
    _merge_kernel[(batch, triton.cdiv(width, block_c), triton.cdiv(dim, block_d))](
        hidden, cand_idx, n_cand, assign, merged,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        cand_idx.stride(0), cand_idx.stride(1),
        n_cand.stride(0),
        assign.stride(0),
        merged.stride(0), merged.stride(1), merged.stride(2),
        n_slots, length, dim, width,
        BLOCK_C=block_c, BLOCK_N=min(32, block_row), BLOCK_D=block_d, NATIVE=native,
    )
    return merged, centres, assign
