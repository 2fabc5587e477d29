"""Compaction: the gather map of a new left-padded layout, and one gather that writes the new
hidden states (recycled tokens in their centre's slot), the per-slot bookkeeping, the RoPE
cos/sin rows and the position ids (1-D or 3-D).

    order = compaction_order(alive, width)                      # [B, W]
    out = compact(order, hidden, meta, cos, sin, position_ids)  # all gathered along the slots
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_shape, next_pow2
from .types import Compacted

BLOCK_SLOTS = 1024
BLOCK_W = 8


@triton.jit(do_not_specialize=["L", "W"])
def _order_kernel(alive_ptr, order_ptr, L, W, BLOCK: tl.constexpr):
    """Row b: alive slots in slot order, right-aligned in W, after the last W - n_alive dead slots."""
    b = tl.program_id(0).to(tl.int64)
    n_alive = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        n_alive += (tl.load(alive_ptr + b * L + offs, mask=offs < L, other=0) != 0).to(tl.int32)
    n_alive_total = tl.sum(n_alive, 0)
    pad = W - n_alive_total
    skip_dead = (L - n_alive_total) - pad
    alive_before = tl.zeros([BLOCK], tl.int32)
    dead_before = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        seen_alive = tl.sum(alive_before, 0)
        seen_dead = tl.sum(dead_before, 0)
        offs = l0 + tl.arange(0, BLOCK)
        inside = offs < L
        alive = (tl.load(alive_ptr + b * L + offs, mask=inside, other=0) != 0) & inside
        dead = ~alive & inside
        rank_alive = seen_alive + tl.cumsum(alive.to(tl.int32), 0) - 1
        rank_dead = seen_dead + tl.cumsum(dead.to(tl.int32), 0) - 1 - skip_dead
        target = tl.where(alive, pad + rank_alive, rank_dead)
        write = (alive | (dead & (rank_dead >= 0))) & (target < W)
        tl.store(order_ptr + b * W + target, offs.to(tl.int64), mask=write)
        alive_before += alive.to(tl.int32)
        dead_before += dead.to(tl.int32)


@triton.jit(do_not_specialize=["L", "W", "L0"])
def _compact_kernel(
    order_ptr, hidden_ptr, replace_ptr, merged_ptr, meta_ptr, cos_ptr, sin_ptr, pid_ptr,
    out_hidden_ptr, out_meta_ptr, out_cos_ptr, out_sin_ptr, out_pid_ptr,
    stride_hb, stride_hl, stride_mb, stride_mc, stride_cp, stride_cb, stride_cl, stride_sp, stride_sb, stride_sl, stride_pp, stride_pb, stride_pl,
    B, L, W, D, L0, DR,
    N_META: tl.constexpr, N_ROPE: tl.constexpr, N_PID: tl.constexpr, HAS_MERGED: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    src_slot = tl.load(order_ptr + b * W + offs_w, mask=w_in, other=0)
    for m in tl.static_range(N_META):
        value = tl.load(meta_ptr + (m * B + b) * L + src_slot, mask=w_in, other=0)
        tl.store(out_meta_ptr + (m * B + b) * W + offs_w, value, mask=w_in)
    # meta row 0 is the source index in the prompt as given: it picks RoPE rows and position ids
    prompt_index = tl.load(meta_ptr + b * L + src_slot, mask=w_in, other=0)
    for p in tl.static_range(N_PID):
        value = tl.load(pid_ptr + p * stride_pp + b * stride_pb + prompt_index * stride_pl, mask=w_in, other=0)
        tl.store(out_pid_ptr + (p * B + b) * W + offs_w, value, mask=w_in)
    offs_r = tl.arange(0, BLOCK_DR)
    for p in tl.static_range(N_ROPE):
        for r0 in range(0, DR, BLOCK_DR):
            cols = r0 + offs_r
            mask = w_in[:, None] & (cols[None, :] < DR)
            out_at = ((p * B + b) * W + offs_w[:, None]) * DR + cols[None, :]
            cos_at = p * stride_cp + b * stride_cb + prompt_index[:, None] * stride_cl + cols[None, :]
            sin_at = p * stride_sp + b * stride_sb + prompt_index[:, None] * stride_sl + cols[None, :]
            tl.store(out_cos_ptr + out_at, tl.load(cos_ptr + cos_at, mask=mask), mask=mask)
            tl.store(out_sin_ptr + out_at, tl.load(sin_ptr + sin_at, mask=mask), mask=mask)
    if HAS_MERGED:
        merged_row = tl.load(replace_ptr + b * L + src_slot, mask=w_in, other=-1)
    else:
        merged_row = tl.full([BLOCK_W], -1, tl.int32)
    from_merged = merged_row >= 0
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask = w_in[:, None] & (cols[None, :] < D)
        x = tl.load(hidden_ptr + b * stride_hb + src_slot[:, None] * stride_hl + cols[None, :],
                    mask=mask & ~from_merged[:, None])
        if HAS_MERGED:
            y = tl.load(merged_ptr + b * stride_mb + merged_row[:, None].to(tl.int64) * stride_mc + cols[None, :],
                        mask=mask & from_merged[:, None])
            x = tl.where(from_merged[:, None], y, x)
        tl.store(out_hidden_ptr + (b * W + offs_w[:, None]) * D + cols[None, :], x, mask=mask)


def compaction_order(alive: torch.Tensor, width: int) -> torch.Tensor:
    """Gather map [B, width] int64 of a compacted, left-padded layout (reference.compaction_order
    with positions increasing along the slots): each row holds its alive slots in slot order,
    right-aligned, preceded by its last dead slots. alive: [B, L] bool; width >= max alive count.
    """
    if alive.dim() != 2 or alive.dtype != torch.bool:
        raise ValueError(f"compaction_order: alive must be a [B, L] bool tensor, got {alive.dtype} {list(alive.shape)}")
    batch, length = alive.shape
    if not 0 <= width <= length:
        raise ValueError(f"compaction_order: width {width} must be in [0, L={length}]")
    check_device("compaction_order", alive=alive)
    order = torch.empty(batch, width, dtype=torch.int64, device=alive.device)
    if order.numel():
        _order_kernel[(batch,)](alive.contiguous().view(torch.int8), order, length, width,
                                BLOCK=min(BLOCK_SLOTS, max(16, next_pow2(length))))
    return order


def _as_planes(t: torch.Tensor, batch: int, name: str, trailing: int) -> torch.Tensor:
    """[B, L0, ...] or [P, B, L0, ...] -> [P, B, L0, ...] (a view)."""
    if t.dim() == 2 + trailing:
        t = t.unsqueeze(0)
    if t.dim() != 3 + trailing or t.shape[1] != batch:
        raise ValueError(f"compact: {name} has shape {list(t.shape)}, expected [B={batch}, L0{', Dr' * trailing}] "
                         f"or [P, B={batch}, L0{', Dr' * trailing}]")
    return t


def compact(order: torch.Tensor, hidden: torch.Tensor, meta: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            position_ids: torch.Tensor | None = None, merged: torch.Tensor | None = None,
            merged_slot: torch.Tensor | None = None) -> Compacted:
    """One gather along the slots into the layout `order` [B, W] describes.

    hidden: [B, L, d]; meta: [M, B, L] int64 per-slot bookkeeping whose row 0 is each slot's
    index in the prompt as given, which picks the rows of cos / sin ([B, L0, Dr] or
    [P, B, L0, Dr], batch stride 0 allowed) and position_ids ([B, L0] or [P, B, L0]).
    merged: [B, C, d] recycled tokens and merged_slot: [B, C] the slot each replaces (-1: none).
    """
    if order.dim() != 2 or order.dtype != torch.int64:
        raise ValueError(f"compact: order must be [B, W] int64, got {order.dtype} {list(order.shape)}")
    batch, width = order.shape
    if hidden.dim() != 3 or hidden.shape[0] != batch:
        raise ValueError(f"compact: hidden has shape {list(hidden.shape)}, expected [B={batch}, L, d]")
    length, dim = hidden.shape[1], hidden.shape[2]
    check_shape("compact", "meta", meta, (None, batch, length))
    if meta.dtype != torch.int64:
        raise ValueError(f"compact: meta must be int64, got {meta.dtype}")
    cos4, sin4 = _as_planes(cos, batch, "cos", 1), _as_planes(sin, batch, "sin", 1)
    if cos4.shape != sin4.shape or cos4.dtype != sin4.dtype:
        raise ValueError(f"compact: cos {cos.dtype} {list(cos.shape)} and sin {sin.dtype} {list(sin.shape)} must match")
    tensors = dict(order=order, hidden=hidden, meta=meta, cos=cos)
    pid3 = None
    if position_ids is not None:
        pid3 = _as_planes(position_ids, batch, "position_ids", 0)
        tensors["position_ids"] = position_ids
    has_merged = merged is not None
    if has_merged:
        check_shape("compact", "merged", merged, (batch, None, dim))
        check_shape("compact", "merged_slot", merged_slot, (batch, merged.shape[1]))
        if merged.dtype != hidden.dtype:
            raise ValueError(f"compact: merged is {merged.dtype} but hidden is {hidden.dtype}")
        tensors.update(merged=merged, merged_slot=merged_slot)
    device = check_device("compact", **tensors)

    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    cos4 = cos4 if cos4.stride(-1) == 1 else cos4.contiguous()
    sin4 = sin4 if sin4.stride(-1) == 1 else sin4.contiguous()
    n_rope, _, length0, rope_dim = cos4.shape
    out_hidden = torch.empty(batch, width, dim, dtype=hidden.dtype, device=device)
    out_meta = torch.empty(meta.shape[0], batch, width, dtype=torch.int64, device=device)
    out_cos = torch.empty(n_rope, batch, width, rope_dim, dtype=cos4.dtype, device=device)
    out_sin = torch.empty_like(out_cos)
    if pid3 is not None:
        out_pid = torch.empty(pid3.shape[0], batch, width, dtype=pid3.dtype, device=device)
        pid_strides = pid3.stride()
    else:
        pid3 = out_pid = torch.empty(1, dtype=torch.int64, device=device)
        pid_strides = (0, 0, 0)
    if has_merged:
        merged = merged.contiguous()
        replace = torch.full((batch, length + 1), -1, dtype=torch.int32, device=device)
        rows = torch.arange(merged.shape[1], dtype=torch.int32, device=device).expand(batch, -1)
        replace.scatter_(1, torch.where(merged_slot >= 0, merged_slot, length).long(), rows)
        replace = replace[:, :length].contiguous()
    else:
        merged = replace = hidden
    if out_hidden.numel() or out_meta.numel():
        grid = (batch, triton.cdiv(width, BLOCK_W))
        _compact_kernel[grid](
            order.contiguous(), hidden, replace, merged, meta.contiguous(), cos4, sin4, pid3,
            out_hidden, out_meta, out_cos, out_sin, out_pid,
            hidden.stride(0), hidden.stride(1), merged.stride(0), merged.stride(1) if has_merged else 0,
            *cos4.stride()[:3], *sin4.stride()[:3], *pid_strides,
            batch, length, width, dim, length0, rope_dim,
            N_META=meta.shape[0], N_ROPE=n_rope, N_PID=0 if position_ids is None else pid3.shape[0],
            HAS_MERGED=has_merged, BLOCK_W=BLOCK_W, BLOCK_D=min(512, max(16, next_pow2(dim))),
            BLOCK_DR=min(256, max(16, next_pow2(rope_dim))))
    squeeze_rope = cos.dim() == 3
    squeeze_pid = position_ids is not None and position_ids.dim() == 2
    return Compacted(
        hidden=out_hidden, meta=out_meta,
        cos=out_cos[0] if squeeze_rope else out_cos, sin=out_sin[0] if squeeze_rope else out_sin,
        position_ids=None if position_ids is None else (out_pid[0] if squeeze_pid else out_pid))
