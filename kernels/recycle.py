"""Token recycling plus the new layout's bookkeeping, batched and padded, in two Triton launches
with no host round trip.

`_pairwise_dist_kernel` (grid B x row tiles x column tiles; the upper-triangle programs compute
and also store the mirror tile) gathers the candidates and writes dist = ||x_i - x_j|| / sqrt(d)
to an fp32 scratch [B, N, N]. `_recycle_kernel` (grid B, one program per row) then runs the
phases of kernels/cluster.py in turn, a barrier between each: the density (the k = n_clusters
smallest distances of each row by bisection on the order-preserving int32 view of the floats,
their mean square the spread), the score density * delta, the top n_clusters scores as ascending
centres, the nearest centre of every candidate, the cluster means (a one-hot matmul per cluster
block x d block), the new alive / replace rows (each L block compared with the centre slots) and
the compaction gather map: compact.write_order (recycled tokens at their centre's slot) or, given
visual, compact.write_recycled_order (recycled tokens right after the row's last alive visual
slot, highest centre score first).
Semantics: `reference_recycle.recycle` (`reference.ranked_dpc_knn`, `reference.merge_clusters`,
`reference.compaction_order`); all maths in fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, interpreting, next_pow2
from .cluster import (assign_phase, candidate_count, candidate_slots, density_phase, layout_phase, load_rows,
                      merge_phase, sample_counts, score_phase, select_phase)
from .compact import write_order, write_recycled_order
from .reference_recycle import Recycled

__all__ = ["Recycled", "recycle"]


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
    n = candidate_count(ncand_ptr, pid_b, stride_nc, N)
    hidden_base = hidden_ptr + pid_b * stride_hb
    idx_i, ok_i = candidate_slots(cand_ptr + pid_b * stride_cb, stride_cn, offs_i, n, L)
    idx_j, ok_j = candidate_slots(cand_ptr + pid_b * stride_cb, stride_cn, offs_j, n, L)

    # fp16/bf16 products are exact in fp32, so the native dot with fp32 accumulation loses nothing.
    dot = tl.zeros([BLOCK_N, BLOCK_N], tl.float32)
    sq_i = tl.zeros([BLOCK_N], tl.float32)
    sq_j = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        xi = load_rows(hidden_base, idx_i, ok_i, offs_d, stride_hl, stride_hd, D, False, NATIVE)
        xj = load_rows(hidden_base, idx_j, ok_j, offs_d, stride_hl, stride_hd, D, True, NATIVE)
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


@triton.jit(do_not_specialize=["stride_hb", "stride_cb", "stride_nc", "stride_ncl", "stride_ab", "stride_al",
                               "stride_vb", "stride_vl", "N", "L", "C", "W"])
def _recycle_kernel(
    hidden_ptr, cand_ptr, ncand_ptr, ncl_ptr, alive_in_ptr, visual_ptr, dist_ptr, aux_ptr,
    merged_ptr, centres_ptr, assign_ptr, alive_ptr, replace_ptr, order_ptr,
    stride_hb, stride_hl, stride_hd,
    stride_cb, stride_cn,
    stride_nc, stride_ncl,
    stride_ab, stride_al,
    stride_vb, stride_vl,
    N, L, D, C, W,
    BLOCK_ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_RE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_Q: tl.constexpr, NATIVE: tl.constexpr, VISUAL: tl.constexpr,
):
    """Row b of every output. Scratch: dist [B, N, N] (from _pairwise_dist_kernel) and aux
    [B, 2, N] (spread, score); every output is contiguous. VISUAL: visual_ptr [B, L] int8 is
    given and the recycled tokens follow the row's last alive visual slot in order_ptr."""
    b = tl.program_id(0).to(tl.int64)
    n, k = sample_counts(ncand_ptr, ncl_ptr, b, stride_nc, stride_ncl, N, C)
    dist_base = dist_ptr + b * N * N
    spread_base = aux_ptr + b * 2 * N
    score_base = spread_base + N
    centres_base = centres_ptr + b * C
    assign_base = assign_ptr + b * N
    cand_base = cand_ptr + b * stride_cb

    dist_max = density_phase(dist_base, spread_base, n, k, N, BLOCK_R, BLOCK_ROW)
    tl.debug_barrier()
    score_phase(dist_base, spread_base, score_base, n, N, dist_max, BLOCK_R, BLOCK_ROW)
    tl.debug_barrier()
    select_phase(score_base, centres_base, n, k, C, BLOCK_ROW, BLOCK_E)
    tl.debug_barrier()
    assign_phase(dist_base, centres_base, assign_base, n, k, N, BLOCK_RE, BLOCK_E)
    tl.debug_barrier()
    merge_phase(hidden_ptr + b * stride_hb, cand_base, assign_base, merged_ptr + b * C * D, n, k, L, D, C,
                stride_hl, stride_hd, stride_cn, D, 1, BLOCK_C, BLOCK_J, BLOCK_D, NATIVE)
    layout_phase(alive_in_ptr + b * stride_ab, stride_al, cand_base, stride_cn, centres_base,
                 alive_ptr + b * L, replace_ptr + b * L, k, L, BLOCK_L, BLOCK_E)
    tl.debug_barrier()
    if VISUAL:
        write_recycled_order(alive_in_ptr + b * stride_ab, stride_al, visual_ptr + b * stride_vb, stride_vl,
                             alive_ptr + b * L, replace_ptr + b * L, cand_base, stride_cn, centres_base,
                             score_base, order_ptr + b * W, k, L, W, BLOCK_O, BLOCK_E, BLOCK_Q)
    else:
        write_order(alive_ptr, order_ptr, b, L, W, BLOCK_O)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _is_host_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _check(hidden, cand_idx, n_cand, n_clusters, max_clusters, alive, width, visual) -> None:
    op = "recycle"
    extra = {} if visual is None else {"visual": visual}
    check_device(op, hidden=hidden, cand_idx=cand_idx, n_cand=n_cand, n_clusters=n_clusters, alive=alive, **extra)
    check_float(op, hidden=hidden)
    check_shape(op, "hidden", hidden, (None, None, None))
    batch, length, dim = hidden.shape
    check_shape(op, "cand_idx", cand_idx, (batch, None))
    check_shape(op, "n_cand", n_cand, (batch,))
    check_shape(op, "n_clusters", n_clusters, (batch,))
    check_shape(op, "alive", alive, (batch, length))
    for name, t in (("cand_idx", cand_idx), ("n_cand", n_cand), ("n_clusters", n_clusters)):
        if not _is_int(t):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype} with shape {list(t.shape)}")
    if alive.dtype != torch.bool:
        raise ValueError(f"{op}: alive must be a bool tensor, got {alive.dtype}")
    if visual is not None:
        check_shape(op, "visual", visual, (batch, length))
        if visual.dtype != torch.bool:
            raise ValueError(f"{op}: visual must be a bool tensor, got {visual.dtype}")
    if cand_idx.shape[1] < 1:
        raise ValueError(f"{op}: cand_idx has shape {list(cand_idx.shape)}, expected at least one candidate column")
    if dim < 1:
        raise ValueError(f"{op}: hidden has shape {list(hidden.shape)}, expected a hidden size d >= 1")
    if not _is_host_int(max_clusters, 1):
        raise ValueError(f"{op}: max_clusters must be a host int >= 1, got {max_clusters!r}")
    if not _is_host_int(width, 0) or width > length:
        raise ValueError(f"{op}: width must be a host int in [0, L={length}], got {width!r}")


def _pointer(t: torch.Tensor) -> torch.Tensor:
    """t, or a one-element stand-in if t is empty (L = 0 or W = 0: the kernel touches none of it,
    but the interpreter crashes on an empty tensor argument)."""
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def recycle(hidden: torch.Tensor, cand_idx: torch.Tensor, n_cand: torch.Tensor, n_clusters: torch.Tensor,
            max_clusters: int, alive: torch.Tensor, width: int, visual: torch.Tensor | None = None) -> Recycled:
    """DPC-kNN clustering of each row's candidates, the mean of each cluster, and the bookkeeping
    of the new layout in which each cluster mean takes its centre's slot, for a whole batch.

    hidden: [B, L, d] fp32/fp16/bf16 (any strides); cand_idx: [B, N] int slot indices into L of
    each row's candidates (ascending; entries at j >= n_cand[b] are ignored); n_cand: [B] int
    device tensor (0 allowed); n_clusters: [B] int device tensor, 1 <= n_clusters[b] <= n_cand[b]
    (ignored when n_cand[b] = 0); both may be strided views. max_clusters: host int C >=
    max(n_clusters). alive: [B, L] bool, the slots that stay whatever the clustering; width: host
    int W, the new layout's length, >= every row's alive count after recycling (not checked: that
    would need a host read). visual: optional [B, L] bool (any strides); given, only order
    changes: the recycled tokens follow the row's last slot alive (in the input alive) and
    visual, highest centre score first (ties to the lower candidate), every other alive slot in
    slot order, the row right-aligned after its last dead slots.
    Returns Recycled(merged [B, C, d] hidden.dtype, centres [B, C] int64, assign [B, N] int64,
    alive [B, L] bool, replace [B, L] int32, order [B, W] int64), equal to
    `reference_recycle.recycle`. Two launches, no other device op, no host synchronisation.

    >>> out = recycle(h, idx, n, k, 32, alive, 300)   # h: [2, 700, 4096], idx: [2, 576]
    """
    _check(hidden, cand_idx, n_cand, n_clusters, max_clusters, alive, width, visual)
    batch, length, dim = hidden.shape
    n_slots = cand_idx.shape[1]
    n_centres = max_clusters
    device = hidden.device

    merged = torch.empty((batch, n_centres, dim), dtype=hidden.dtype, device=device)
    centres = torch.empty((batch, n_centres), dtype=torch.int64, device=device)
    assign = torch.empty((batch, n_slots), dtype=torch.int64, device=device)
    alive_out = torch.empty((batch, length), dtype=torch.bool, device=device)
    replace = torch.empty((batch, length), dtype=torch.int32, device=device)
    order = torch.empty((batch, width), dtype=torch.int64, device=device)
    out = Recycled(merged, centres, assign, alive_out, replace, order)
    if batch == 0:
        return out

    # Scratch: pairwise distances, and per candidate spread and score.
    dist = torch.empty((batch, n_slots, n_slots), dtype=torch.float32, device=device)
    aux = torch.empty((batch, 2, n_slots), dtype=torch.float32, device=device)

    # fp16/bf16 go into the dots as they are on a GPU; the interpreter needs fp32 (see load_rows).
    native = hidden.dtype != torch.float32 and not interpreting()
    block_pair = min(64, max(16, next_pow2(n_slots)))
    n_pair = triton.cdiv(n_slots, block_pair)
    _pairwise_dist_kernel[(batch, n_pair, n_pair)](
        _pointer(hidden), cand_idx, n_cand, dist,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        cand_idx.stride(0), cand_idx.stride(1),
        n_cand.stride(0),
        n_slots, length, dim, math.sqrt(dim),
        BLOCK_N=block_pair, BLOCK_D=min(32, max(16, next_pow2(dim))), NATIVE=native,
        num_warps=8 if block_pair == 64 else 4,
    )

    # The whole-row phases hold blocks of rows x every candidate (about 4096 distances); the
    # centre-wise phases blocks of up to 128 centres; the merge a [C block, d block] accumulator.
    block_row = max(16, next_pow2(n_slots))
    block_e = min(128, max(2, next_pow2(min(n_centres, n_slots))))
    _recycle_kernel[(batch,)](
        _pointer(hidden), cand_idx, n_cand, n_clusters, _pointer(alive.view(torch.int8)),
        _pointer((alive if visual is None else visual).view(torch.int8)), dist, aux,
        merged, centres, assign, _pointer(alive_out.view(torch.int8)), _pointer(replace), _pointer(order),
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        cand_idx.stride(0), cand_idx.stride(1),
        n_cand.stride(0), n_clusters.stride(0),
        alive.stride(0), alive.stride(1),
        *(visual.stride() if visual is not None else (0, 0)),
        n_slots, length, dim, n_centres, width,
        BLOCK_ROW=block_row, BLOCK_R=min(block_row, max(2, 4096 // block_row)),
        BLOCK_E=block_e, BLOCK_RE=min(block_row, max(2, 4096 // block_e)),
        BLOCK_C=min(128, max(16, next_pow2(n_centres))), BLOCK_J=32, BLOCK_D=min(64, max(16, next_pow2(dim))),
        BLOCK_L=min(64, max(16, next_pow2(length))), BLOCK_O=min(1024, max(16, next_pow2(length))),
        BLOCK_Q=min(block_e, max(2, 4096 // block_e)), NATIVE=native, VISUAL=visual is not None, num_warps=8,
    )
    return out
