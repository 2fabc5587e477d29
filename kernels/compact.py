"""Compaction: the gather map of a new left-padded layout, and one launch that writes the whole new
layout: hidden states (recycled tokens in their centre's slot), the per-slot bookkeeping, the RoPE
cos/sin rows, the position ids (1-D or 3-D) and, optionally, the next layers' 4-D attention mask.
With renumber = (rank_slot, n_valid) the positions are renumbered instead: slot w of a row with
n_valid real slots gets pos max(w - (W - n_valid), 0) and the RoPE rows / position ids of prompt
slot rank_slot[b, pos].

    order = compaction_order(alive, width)                                       # [B, W]
    out = compact(order, hidden, src, pos, alive, visual, rater, cos, sin, ...)  # one launch
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, check_device, check_shape, next_pow2
from .cluster import ordered_key
from .types import Compacted

BLOCK_SLOTS = 1024
BLOCK_W = 8


@triton.jit
def write_order(alive_ptr, order_ptr, b, L, W, BLOCK: tl.constexpr):
    """Row b of the gather map: alive slots (alive_ptr [B, L] int8) in slot order, right-aligned in
    W, after the last W - n_alive dead slots; written to order_ptr [B, W] int64. A kernel that
    writes alive_ptr itself must tl.debug_barrier() before calling this."""
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
        write = (alive | (dead & (rank_dead >= 0))) & (target >= 0) & (target < W)  # W too small: no stray write
        tl.store(order_ptr + b * W + target, offs.to(tl.int64), mask=write)
        alive_before += alive.to(tl.int32)
        dead_before += dead.to(tl.int32)


@triton.jit
def write_recycled_order(alive_in_base, stride_al, visual_base, stride_vl, alive_base, replace_base,
                         cand_base, stride_cn, centres_base, score_base, order_base, k, L, W,
                         BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    """One row of the gather map with the recycled tokens after the row's last visual slot
    (reference_recycle.recycle with visual): alive_base / replace_base the row's new alive (int8)
    and replace (int32) as layout_phase stored them, alive_in_base / visual_base the input alive
    and visual (int8, strided). With l* the last slot alive in the input and visual, m the
    non-centre alive slots <= max(l*, 0), pad = W - n_alive: the r-th non-centre alive slot goes
    to pad + r (+ k past l*), the centre of score rank q (score desc, ties to the lower candidate:
    select_phase's order) to pad + m + q, and the last pad dead slots to 0..pad-1 in slot order;
    written to order_base [W] int64, never outside it. centres_base: the k centres as ascending
    candidate indices; score_base: each candidate's score. A kernel that writes alive / replace /
    centres itself must tl.debug_barrier() before calling this."""
    # pass 1: the alive count, the non-centre alive count and l*
    n_alive = tl.zeros([BLOCK], tl.int32)
    n_base = tl.zeros([BLOCK], tl.int32)
    last = tl.full([BLOCK], -1, tl.int32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        inside = offs < L
        alive = (tl.load(alive_base + offs, mask=inside, other=0) != 0) & inside
        centre = tl.load(replace_base + offs, mask=inside, other=-1) >= 0
        was_alive = tl.load(alive_in_base + offs * stride_al, mask=inside, other=0) != 0
        visual = tl.load(visual_base + offs * stride_vl, mask=inside, other=0) != 0
        n_alive += alive.to(tl.int32)
        n_base += (alive & ~centre).to(tl.int32)
        last = tl.maximum(last, tl.where(was_alive & visual & inside, offs, -1))
    n_alive_total = tl.sum(n_alive, 0)
    n_centres = n_alive_total - tl.sum(n_base, 0)
    split = tl.maximum(tl.max(last, 0), 0)  # l* = -1 orders like l* = 0: slot 0's key ties the first centre's
    pad = W - n_alive_total
    skip_dead = (L - n_alive_total) - pad
    # pass 2: the non-centre alive slots and the padding, in slot order
    base_before = tl.zeros([BLOCK], tl.int32)
    dead_before = tl.zeros([BLOCK], tl.int32)
    for l0 in range(0, L, BLOCK):
        seen_base = tl.sum(base_before, 0)
        seen_dead = tl.sum(dead_before, 0)
        offs = l0 + tl.arange(0, BLOCK)
        inside = offs < L
        alive = (tl.load(alive_base + offs, mask=inside, other=0) != 0) & inside
        centre = tl.load(replace_base + offs, mask=inside, other=-1) >= 0
        base = alive & ~centre
        dead = ~alive & inside
        rank_base = seen_base + tl.cumsum(base.to(tl.int32), 0) - 1
        rank_dead = seen_dead + tl.cumsum(dead.to(tl.int32), 0) - 1 - skip_dead
        target = tl.where(base, pad + rank_base + tl.where(offs > split, n_centres, 0), rank_dead)
        write = (base | (dead & (rank_dead >= 0))) & (target >= 0) & (target < W)  # W too small: no stray write
        tl.store(order_base + target, offs.to(tl.int64), mask=write)
        base_before += (base & (offs <= split)).to(tl.int32)
        dead_before += dead.to(tl.int32)
    n_before = tl.sum(base_before, 0)  # m
    # pass 3: the centres by score rank, after the m slots up to l*
    for e0 in range(0, k, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        in_e = offs_e < k
        cand_e = tl.load(centres_base + offs_e, mask=in_e, other=0)
        key_e = ordered_key(tl.load(score_base + cand_e, mask=in_e, other=0.0))
        rank = tl.zeros([BLOCK_E], tl.int32)
        for f0 in range(0, k, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            in_f = offs_f < k
            cand_f = tl.load(centres_base + offs_f, mask=in_f, other=0)
            key_f = ordered_key(tl.load(score_base + cand_f, mask=in_f, other=0.0))
            ahead = (key_f[None, :] > key_e[:, None]) | ((key_f[None, :] == key_e[:, None]) &
                                                         (cand_f[None, :] < cand_e[:, None]))
            rank += tl.sum((ahead & in_f[None, :]).to(tl.int32), 1)
        slot = tl.load(cand_base + cand_e * stride_cn, mask=in_e, other=0).to(tl.int64)
        target = pad + n_before + rank
        tl.store(order_base + target, slot, mask=in_e & (target >= 0) & (target < W))


@triton.jit(do_not_specialize=["L", "W"])
def _order_kernel(alive_ptr, order_ptr, L, W, BLOCK: tl.constexpr):
    write_order(alive_ptr, order_ptr, tl.program_id(0).to(tl.int64), L, W, BLOCK)


@triton.jit(do_not_specialize=["L", "W", "L0", "C"])
def _compact_kernel(
    order_ptr, hidden_ptr, src_ptr, pos_ptr, alive_ptr, visual_ptr, rater_ptr, cos_ptr, sin_ptr, pid_ptr,
    merged_ptr, replace_ptr, rank_ptr, nvalid_ptr,
    out_hidden_ptr, out_src_ptr, out_pos_ptr, out_valid_ptr, out_visual_ptr, out_rater_ptr,
    out_cos_ptr, out_sin_ptr, out_pid_ptr, out_mask_ptr,
    s_ob, s_ow, s_hb, s_hl, s_hd, s_sb, s_sl, s_pb, s_pl, s_ab, s_al, s_vb, s_vl, s_rb, s_rl,
    s_cp, s_cb, s_cl, s_cr, s_sp, s_sb2, s_sl2, s_sr, s_qp, s_qb, s_ql, s_mb, s_mc, s_md, s_xb, s_xl,
    s_kb, s_kl, s_nb,
    B, L, W, D, L0, DR, C, mask_fill,
    N_ROPE: tl.constexpr, N_PID: tl.constexpr, HAS_MERGED: tl.constexpr, MASK_KIND: tl.constexpr,
    RENUMBER: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (b, w-block): slots offs_w of the new layout gather slot order[b, w] of every input;
    with MASK_KIND 1 (bool) / 2 (additive) it also writes mask rows offs_w, all W keys. With
    RENUMBER, pos is the slot's rank among the row's n_valid[b] real (right-aligned) slots and the
    RoPE rows / position ids come from prompt slot rank_slot[b, pos] instead of src."""
    b = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    slot = tl.load(order_ptr + b * s_ob + offs_w * s_ow, mask=w_in, other=0)
    out_at = b * W + offs_w
    prompt_index = tl.load(src_ptr + b * s_sb + slot * s_sl, mask=w_in, other=0)
    tl.store(out_src_ptr + out_at, prompt_index, mask=w_in)
    if RENUMBER:
        n_valid = tl.load(nvalid_ptr + b * s_nb).to(tl.int64)
        new_pos = tl.maximum(offs_w.to(tl.int64) - (W - n_valid), 0)
        rank_at = tl.minimum(new_pos, L0 - 1)
        rank = tl.load(rank_ptr + b * s_kb + rank_at * s_kl, mask=w_in & (rank_at >= 0), other=0)
        rope_index = tl.maximum(rank.to(tl.int64), 0)
    else:
        new_pos = tl.load(pos_ptr + b * s_pb + slot * s_pl, mask=w_in, other=0)
        rope_index = prompt_index
    tl.store(out_pos_ptr + out_at, new_pos, mask=w_in)
    tl.store(out_valid_ptr + out_at, tl.load(alive_ptr + b * s_ab + slot * s_al, mask=w_in, other=0), mask=w_in)
    tl.store(out_visual_ptr + out_at, tl.load(visual_ptr + b * s_vb + slot * s_vl, mask=w_in, other=0), mask=w_in)
    tl.store(out_rater_ptr + out_at, tl.load(rater_ptr + b * s_rb + slot * s_rl, mask=w_in, other=0), mask=w_in)
    # the source index in the prompt as given (or rank_slot's) picks the RoPE rows and the position ids
    for p in tl.static_range(N_PID):
        value = tl.load(pid_ptr + p * s_qp + b * s_qb + rope_index * s_ql, mask=w_in, other=0)
        tl.store(out_pid_ptr + (p * B + b) * W + offs_w, value, mask=w_in)
    offs_r = tl.arange(0, BLOCK_DR)
    for p in tl.static_range(N_ROPE):
        for r0 in range(0, DR, BLOCK_DR):
            cols = r0 + offs_r
            mask = w_in[:, None] & (cols[None, :] < DR)
            at = ((p * B + b) * W + offs_w[:, None]) * DR + cols[None, :]
            cos_at = p * s_cp + b * s_cb + rope_index[:, None] * s_cl + cols[None, :] * s_cr
            sin_at = p * s_sp + b * s_sb2 + rope_index[:, None] * s_sl2 + cols[None, :] * s_sr
            tl.store(out_cos_ptr + at, tl.load(cos_ptr + cos_at, mask=mask), mask=mask)
            tl.store(out_sin_ptr + at, tl.load(sin_ptr + sin_at, mask=mask), mask=mask)
    if HAS_MERGED:
        merged_row = tl.load(replace_ptr + b * s_xb + slot * s_xl, mask=w_in, other=-1).to(tl.int64)
    else:
        merged_row = tl.full([BLOCK_W], -1, tl.int64)
    from_merged = (merged_row >= 0) & (merged_row < C)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask = w_in[:, None] & (cols[None, :] < D)
        x = tl.load(hidden_ptr + b * s_hb + slot[:, None] * s_hl + cols[None, :] * s_hd,
                    mask=mask & ~from_merged[:, None])
        if HAS_MERGED:
            y = tl.load(merged_ptr + b * s_mb + merged_row[:, None] * s_mc + cols[None, :] * s_md,
                        mask=mask & from_merged[:, None])
            x = tl.where(from_merged[:, None], y, x)
        tl.store(out_hidden_ptr + out_at[:, None] * D + cols[None, :], x, mask=mask)
    if MASK_KIND != 0:
        # allowed[i, j] = (valid[j] and j <= i) or i == j, valid[j] = alive[b, order[b, j]]
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, W, BLOCK_K):
            keys = k0 + offs_k
            k_in = keys < W
            key_slot = tl.load(order_ptr + b * s_ob + keys * s_ow, mask=k_in, other=0)
            key_valid = tl.load(alive_ptr + b * s_ab + key_slot * s_al, mask=k_in, other=0) != 0
            allowed = (key_valid[None, :] & (keys[None, :] <= offs_w[:, None])) | (keys[None, :] == offs_w[:, None])
            at = out_at[:, None] * W + keys[None, :]
            mask = w_in[:, None] & k_in[None, :]
            if MASK_KIND == 1:
                tl.store(out_mask_ptr + at, allowed.to(tl.int8), mask=mask)
            else:
                fill = tl.where(allowed, 0.0, mask_fill)
                tl.store(out_mask_ptr + at, fill.to(out_mask_ptr.dtype.element_ty), mask=mask)




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


def _check_slots(batch: int, length: int, dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check_shape("compact", name, t, (batch, length))
        if t.dtype != dtype:
            raise ValueError(f"compact: {name} must be {str(dtype).replace('torch.', '')}, got {t.dtype}")


MASK_KINDS = {None: 0, "bool": 1, "additive": 2}


def compact(order: torch.Tensor, hidden: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, alive: torch.Tensor,
            visual: torch.Tensor, rater: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            position_ids: torch.Tensor | None = None, merged: torch.Tensor | None = None,
            replace: torch.Tensor | None = None, mask: str | None = None,
            mask_dtype: torch.dtype | None = None,
            renumber: tuple[torch.Tensor, torch.Tensor] | None = None) -> Compacted:
    """One launch that gathers every input along the slots into the layout `order` [B, W] describes.

    hidden: [B, L, d]; src, pos: [B, L] int64 (index in the prompt as given, position); alive,
    visual, rater: [B, L] bool. src picks the rows of cos / sin ([B, L0, Dr] or [P, B, L0, Dr],
    batch stride 0 allowed) and of position_ids ([B, L0] or [P, B, L0]). merged: [B, C, d]
    recycled tokens; replace: [B, L] int32 (or int64) the merged row that replaces each slot's
    hidden state, -1 for none. mask "bool" / "additive" (in mask_dtype) also writes the causal
    mask [B, 1, W, W] of the new validity (masks.prefill_mask's rule). renumber = (rank_slot
    [B, L0] int: the prompt slot of each row's p-th real token, -1 past its count; n_valid [B]
    int device tensor: the real slots of each new row) renumbers the positions: pos[b, w] =
    max(w - (W - n_valid[b]), 0), and the RoPE rows and position ids of slot w are those of
    prompt slot rank_slot[b, min(pos, L0 - 1)] (clamped to >= 0) instead of src's. Any strides;
    no copies.
    """
    if order.dim() != 2 or order.dtype != torch.int64:
        raise ValueError(f"compact: order must be [B, W] int64, got {order.dtype} {list(order.shape)}")
    batch, width = order.shape
    if hidden.dim() != 3 or hidden.shape[0] != batch:
        raise ValueError(f"compact: hidden has shape {list(hidden.shape)}, expected [B={batch}, L, d]")
    length, dim = hidden.shape[1], hidden.shape[2]
    _check_slots(batch, length, torch.int64, src=src, pos=pos)
    _check_slots(batch, length, torch.bool, alive=alive, visual=visual, rater=rater)
    cos4, sin4 = _as_planes(cos, batch, "cos", 1), _as_planes(sin, batch, "sin", 1)
    if cos4.shape != sin4.shape or cos4.dtype != sin4.dtype:
        raise ValueError(f"compact: cos {cos.dtype} {list(cos.shape)} and sin {sin.dtype} {list(sin.shape)} must match")
    n_rope, _, length0, rope_dim = cos4.shape
    tensors = dict(order=order, hidden=hidden, src=src, pos=pos, alive=alive, visual=visual, rater=rater, cos=cos,
                   sin=sin)
    if position_ids is not None:
        pid3 = _as_planes(position_ids, batch, "position_ids", 0)
        if pid3.shape[2] != length0 or pid3.is_floating_point() or pid3.dtype == torch.bool:
            raise ValueError(f"compact: position_ids must be integer [.., B={batch}, L0={length0}] like cos, "
                             f"got {position_ids.dtype} {list(position_ids.shape)}")
        tensors["position_ids"] = position_ids
    if (merged is None) != (replace is None):
        raise ValueError("compact: merged and replace must be given together")
    has_merged = merged is not None
    if has_merged:
        check_shape("compact", "merged", merged, (batch, None, dim))
        check_shape("compact", "replace", replace, (batch, length))
        if merged.dtype != hidden.dtype:
            raise ValueError(f"compact: merged is {merged.dtype} but hidden is {hidden.dtype}")
        if replace.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"compact: replace must be int32 (or int64), got {replace.dtype}")
        tensors.update(merged=merged, replace=replace)
    has_renumber = renumber is not None
    if has_renumber:
        if not isinstance(renumber, (tuple, list)) or len(renumber) != 2 or \
                not all(isinstance(t, torch.Tensor) for t in renumber):
            raise ValueError("compact: renumber must be a (rank_slot, n_valid) pair of tensors")
        rank_slot, n_valid = renumber
        check_shape("compact", "renumber rank_slot", rank_slot, (batch, length0))
        check_shape("compact", "renumber n_valid", n_valid, (batch,))
        for name, t in (("rank_slot", rank_slot), ("n_valid", n_valid)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"compact: renumber {name} must be an integer tensor, got {t.dtype}")
        tensors.update(rank_slot=rank_slot, n_valid=n_valid)
    if mask not in MASK_KINDS:
        raise ValueError(f"compact: mask must be None, 'bool' or 'additive', got {mask!r}")
    if mask == "additive" and mask_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compact: mask_dtype of an additive mask must be fp32, fp16 or bf16, got {mask_dtype}")
    device = check_device("compact", **tensors)

    def new(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=device)

    out_hidden = new(batch, width, dim, dtype=hidden.dtype)
    out_src, out_pos = new(batch, width, dtype=torch.int64), new(batch, width, dtype=torch.int64)
    out_valid, out_visual, out_rater = (new(batch, width, dtype=torch.bool) for _ in range(3))
    out_cos = new(n_rope, batch, width, rope_dim, dtype=cos4.dtype)
    out_sin = new(n_rope, batch, width, rope_dim, dtype=cos4.dtype)
    if position_ids is not None:
        out_pid, pid_strides, n_pid = new(pid3.shape[0], batch, width, dtype=pid3.dtype), pid3.stride(), pid3.shape[0]
    else:
        pid3, out_pid, pid_strides, n_pid = src, out_src, (0, 0, 0), 0
    out_mask = mask_arg = None
    if mask is not None:
        out_mask = new(batch, 1, width, width, dtype=torch.bool if mask == "bool" else mask_dtype)
        mask_arg = out_mask.view(torch.int8) if mask == "bool" else out_mask
    if not has_merged:
        merged, replace = hidden, src
    if not has_renumber:
        rank_slot, n_valid = src, src
    if batch * width:
        int8 = torch.int8
        _compact_kernel[(batch, triton.cdiv(width, BLOCK_W))](
            order, hidden, src, pos, alive.view(int8), visual.view(int8), rater.view(int8), cos4, sin4, pid3,
            merged, replace, rank_slot, n_valid,
            out_hidden, out_src, out_pos, out_valid.view(int8), out_visual.view(int8), out_rater.view(int8),
            out_cos, out_sin, out_pid, out_src if mask_arg is None else mask_arg,
            *order.stride(), *hidden.stride(), *src.stride(), *pos.stride(), *alive.stride(), *visual.stride(),
            *rater.stride(), *cos4.stride(), *sin4.stride(), *pid_strides,
            *(merged.stride() if has_merged else (0, 0, 0)), *(replace.stride() if has_merged else (0, 0)),
            *(rank_slot.stride() if has_renumber else (0, 0)), n_valid.stride(0) if has_renumber else 0,
            batch, length, width, dim, length0, rope_dim, merged.shape[1] if has_merged else 0,
            torch.finfo(mask_dtype).min if mask == "additive" else 0.0,
            N_ROPE=n_rope, N_PID=n_pid, HAS_MERGED=has_merged, MASK_KIND=MASK_KINDS[mask],
            RENUMBER=has_renumber,
            BLOCK_W=BLOCK_W, BLOCK_D=min(512, max(16, next_pow2(dim))),
            BLOCK_DR=min(256, max(16, next_pow2(rope_dim))), BLOCK_K=min(256, max(16, next_pow2(width))))
    squeeze_rope = cos.dim() == 3
    squeeze_pid = position_ids is not None and position_ids.dim() == 2
    return Compacted(
        hidden=out_hidden, src=out_src, pos=out_pos, valid=out_valid, visual=out_visual, rater=out_rater,
        cos=out_cos[0] if squeeze_rope else out_cos, sin=out_sin[0] if squeeze_rope else out_sin,
        position_ids=None if position_ids is None else (out_pid[0] if squeeze_pid else out_pid), mask=out_mask)
