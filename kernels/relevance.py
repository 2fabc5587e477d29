"""Rater-to-visual relevance without the attention matrix: row log-sum-exp, per-head relevance,
the rank-mode rater rows and the RoPE gravity table.

Shapes: q [B, H, R, D] post-RoPE rater queries; k [B, H_kv, L, D] post-RoPE keys (query head h
reads key head h // (H / H_kv)); rater_slot [B, R] the slot of each rater (it sees keys at
slots <= its own); rater_valid [B, R], key_valid [B, L], visual [B, L] bool.
Memory is O(B H R + B H L + B R L): nothing of size L x L is ever allocated.

    lse = rater_lse(q, k, rater_slot, rater_valid, key_valid, scaling)
    rel = head_relevance(q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse)  # [B, H, L]

RoPE gravity: gravity_table(inv_freq, head_dim, T, sections) [S, T] holds per-section partial
sums; the relevance kernels take gravity=(table, rater_pos [S, B, R], key_pos [S, B, L]) and
divide each probability by guard(sum_s table[s, |rater_pos_s - key_pos_s|]) (S = 1: 1-D RoPE,
positions may then be [B, R] / [B, L]).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, interpreting, next_pow2
from .reference import rope_sections

LOG2E = 1.4426950408889634
BLOCK_R = 16
BLOCK_L = 64
GRAVITY_EPS = 1e-6


@triton.jit
def _logits(q, k_ptrs, k_mask, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """q [BR, BD] times a key block loaded from k_ptrs [BL, BD] -> [BR, BL] fp32."""
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION)


@triton.jit
def _load_queries(q_ptr, b, h, offs_r, offs_d, stride_qb, stride_qh, stride_qr, R, D,
                  UPCAST: tl.constexpr):
    ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_r[:, None] * stride_qr + offs_d[None, :]
    q = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit(do_not_specialize=["R", "L"])
def _rater_lse_kernel(
    q_ptr, k_ptr, slot_ptr, rvalid_ptr, kvalid_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
    H, R, L, D, scale_log2,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_in = offs_r < R
    q = _load_queries(q_ptr, b, h, offs_r, offs_d, stride_qb, stride_qh, stride_qr, R, D, UPCAST)
    slot = tl.load(slot_ptr + b * R + offs_r, mask=r_in, other=-1)
    r_ok = tl.load(rvalid_ptr + b * R + offs_r, mask=r_in, other=0) != 0
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_in = offs_l < L
        k_ptrs = k_base + offs_l[:, None] * stride_kl + offs_d[None, :]
        logits = _logits(q, k_ptrs, l_in[:, None] & (offs_d[None, :] < D), UPCAST, PRECISION) * scale_log2
        k_ok = tl.load(kvalid_ptr + b * L + offs_l, mask=l_in, other=0) != 0
        visible = r_ok[:, None] & k_ok[None, :] & (offs_l[None, :] <= slot[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(s > 0, (m + tl.log2(s)) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + (b * H + h) * R + offs_r, lse, mask=r_in)


@triton.jit
def _gravity(gravity_ptr, rpos_ptr, kpos_ptr, rpos, kpos, b, offs_r, offs_l, visible, B, R, L, n_gravity, eps,
             SECTIONS: tl.constexpr):
    """Gravity divisor [BR, BL]: guard(sum_s table[s, min(|rpos_s - kpos_s|, T - 1)]), 1 where not visible.
    rpos [BR] / kpos [BL] are section 0's positions; later sections are read from rpos_ptr / kpos_ptr."""
    g = tl.load(gravity_ptr + tl.minimum(tl.abs(rpos[:, None] - kpos[None, :]), n_gravity - 1),
                mask=visible, other=1.0)
    for s in tl.static_range(1, SECTIONS):
        rpos_s = tl.load(rpos_ptr + (s * B + b) * R + offs_r, mask=offs_r < R, other=0)
        kpos_s = tl.load(kpos_ptr + (s * B + b) * L + offs_l, mask=offs_l < L, other=0)
        delta = tl.minimum(tl.abs(rpos_s[:, None] - kpos_s[None, :]), n_gravity - 1)
        g += tl.load(gravity_ptr + s * n_gravity + delta, mask=visible, other=0.0)
    return tl.where(g < 0, -tl.maximum(-g, eps), tl.maximum(g, eps))


@triton.jit
def _rater_probs(q, k_ptrs, k_mask, lse_log2, visible, scale_log2, divisor,
                 GRAVITY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Attention probabilities [BR, BL] of rater rows on a key block, zero where not visible,
    divided by the gravity divisor [BR, BL] when GRAVITY."""
    logits = _logits(q, k_ptrs, k_mask, UPCAST, PRECISION) * scale_log2
    p = tl.exp2(logits - tl.where(visible, lse_log2[:, None], 0.0))
    if GRAVITY:
        p = p / divisor
    return tl.where(visible, p, 0.0)


@triton.jit(do_not_specialize=["B", "R", "L", "n_gravity"])
def _head_relevance_kernel(
    q_ptr, k_ptr, slot_ptr, rvalid_ptr, kvalid_ptr, visual_ptr, lse_ptr, gravity_ptr, rpos_ptr, kpos_ptr, out_ptr,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
    B, H, R, L, D, n_gravity, scale_log2, eps,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    GRAVITY: tl.constexpr, SECTIONS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_in = offs_l < L
    key = (tl.load(kvalid_ptr + b * L + offs_l, mask=l_in, other=0) != 0) & (
        tl.load(visual_ptr + b * L + offs_l, mask=l_in, other=0) != 0)
    kpos = tl.load(kpos_ptr + b * L + offs_l, mask=l_in, other=0) if GRAVITY else offs_l
    k_ptrs = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :]
    k_mask = l_in[:, None] & (offs_d[None, :] < D)
    acc = tl.zeros([BLOCK_L], tl.float32)
    n_raters = tl.zeros([BLOCK_R], tl.int32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_in = offs_r < R
        r_ok = tl.load(rvalid_ptr + b * R + offs_r, mask=r_in, other=0) != 0
        slot = tl.load(slot_ptr + b * R + offs_r, mask=r_in, other=-1)
        lse_log2 = tl.load(lse_ptr + (b * H + h) * R + offs_r, mask=r_in, other=0.0) * 1.4426950408889634
        rpos = tl.load(rpos_ptr + b * R + offs_r, mask=r_in, other=0) if GRAVITY else offs_r
        q = _load_queries(q_ptr, b, h, offs_r, offs_d, stride_qb, stride_qh, stride_qr, R, D, UPCAST)
        visible = r_ok[:, None] & key[None, :] & (offs_l[None, :] <= slot[:, None])
        divisor = _gravity(gravity_ptr, rpos_ptr, kpos_ptr, rpos, kpos, b, offs_r, offs_l, visible, B, R, L,
                           n_gravity, eps, SECTIONS) if GRAVITY else 1.0
        p = _rater_probs(q, k_ptrs, k_mask, lse_log2, visible, scale_log2, divisor, GRAVITY, UPCAST, PRECISION)
        acc += tl.sum(p, 0)
        n_raters += r_ok.to(tl.int32)
    rel = acc / tl.maximum(tl.sum(n_raters, 0), 1).to(tl.float32)
    tl.store(out_ptr + (b * H + h) * L + offs_l, rel, mask=l_in)


@triton.jit
def _weighted_rows(q_ptr, k_ptr, lse_ptr, w_ptr, gravity_ptr, rpos_ptr, kpos_ptr, b, offs_r, r_ok, slot, rpos,
                   offs_l, l_in, key, kpos, stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
                   B, H, R, L, D, n_gravity, scale_log2, eps,
                   GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                   GRAVITY: tl.constexpr, SECTIONS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """P[r, l] = sum_h w[h] a[h, r, l] for a block of raters and keys -> [BR, BL] fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    visible = r_ok[:, None] & key[None, :] & (offs_l[None, :] <= slot[:, None])
    k_mask = l_in[:, None] & (offs_d[None, :] < D)
    divisor = _gravity(gravity_ptr, rpos_ptr, kpos_ptr, rpos, kpos, b, offs_r, offs_l, visible, B, R, L,
                       n_gravity, eps, SECTIONS) if GRAVITY else 1.0
    rows = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    for h in range(0, H):
        w = tl.load(w_ptr + b * H + h)
        if w != 0.0:
            q = _load_queries(q_ptr, b, h, offs_r, offs_d, stride_qb, stride_qh, stride_qr, R, D, UPCAST)
            lse_log2 = tl.load(lse_ptr + (b * H + h) * R + offs_r, mask=offs_r < R, other=0.0) * 1.4426950408889634
            k_ptrs = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :]
            rows += w * _rater_probs(q, k_ptrs, k_mask, lse_log2, visible, scale_log2, divisor, GRAVITY, UPCAST,
                                     PRECISION)
    return rows


@triton.jit(do_not_specialize=["B", "R", "L", "n_gravity"])
def _rater_rows_kernel(
    q_ptr, k_ptr, slot_ptr, rvalid_ptr, kvalid_ptr, visual_ptr, lse_ptr, w_ptr, gravity_ptr, rpos_ptr, kpos_ptr,
    out_ptr,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
    B, H, R, L, D, n_gravity, scale_log2, eps,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    GRAVITY: tl.constexpr, SECTIONS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_in, l_in = offs_r < R, offs_l < L
    r_ok = tl.load(rvalid_ptr + b * R + offs_r, mask=r_in, other=0) != 0
    slot = tl.load(slot_ptr + b * R + offs_r, mask=r_in, other=-1)
    rpos = tl.load(rpos_ptr + b * R + offs_r, mask=r_in, other=0) if GRAVITY else offs_r
    key = (tl.load(kvalid_ptr + b * L + offs_l, mask=l_in, other=0) != 0) & (
        tl.load(visual_ptr + b * L + offs_l, mask=l_in, other=0) != 0)
    kpos = tl.load(kpos_ptr + b * L + offs_l, mask=l_in, other=0) if GRAVITY else offs_l
    rows = _weighted_rows(q_ptr, k_ptr, lse_ptr, w_ptr, gravity_ptr, rpos_ptr, kpos_ptr, b, offs_r, r_ok, slot,
                          rpos, offs_l, l_in, key, kpos, stride_qb, stride_qh, stride_qr, stride_kb, stride_kh,
                          stride_kl, B, H, R, L, D, n_gravity, scale_log2, eps, GROUP, BLOCK_R, BLOCK_L, BLOCK_D,
                          GRAVITY, SECTIONS, UPCAST, PRECISION)
    tl.store(out_ptr + (b * R + offs_r[:, None]) * L + offs_l[None, :], rows, mask=r_in[:, None] & l_in[None, :])


@triton.jit
def _gravity_table_kernel(inv_freq_ptr, bounds_ptr, out_ptr, n, norm, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[s, d] = norm * sum of cos(d * inv_freq[p]) over the pairs bounds[s] <= p < bounds[s + 1]."""
    s = tl.program_id(1)
    start = tl.load(bounds_ptr + s)
    n_freq = tl.load(bounds_ptr + s + 1) - start
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_f = tl.arange(0, BLOCK_F)
    inv_freq = tl.load(inv_freq_ptr + start + offs_f, mask=offs_f < n_freq, other=0.0)
    angles = offs.to(tl.float32)[:, None] * inv_freq[None, :]
    g = tl.sum(tl.where(offs_f[None, :] < n_freq, tl.cos(angles), 0.0), 1) * norm
    tl.store(out_ptr + s * n + offs, g, mask=offs < n)


# ----------------------------------------------------------------------------- launchers
def _dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION): fp32 operands use exact fp32 products ('ieee', not tf32); fp16/bf16 go
    to the tensor cores with fp32 accumulation (their products are exact in fp32). Under the
    interpreter everything is upcast, since its bf16 arithmetic is wrong."""
    upcast = interpreting() or dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


def _check_scoring_inputs(op, q, k, rater_slot, rater_valid, key_valid, visual=None):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q must be [B, H, R, D] and k [B, H_kv, L, D], got {list(q.shape)} and {list(k.shape)}")
    batch, heads, raters, head_dim = q.shape
    _, kv_heads, length, _ = k.shape
    check_shape(op, "k", k, (batch, None, None, head_dim))
    if heads % kv_heads:
        raise ValueError(f"{op}: query heads {heads} are not a multiple of key heads {kv_heads}")
    if q.dtype != k.dtype:
        raise ValueError(f"{op}: q is {q.dtype} but k is {k.dtype}")
    check_float(op, q=q)
    check_shape(op, "rater_slot", rater_slot, (batch, raters))
    check_shape(op, "rater_valid", rater_valid, (batch, raters))
    check_shape(op, "key_valid", key_valid, (batch, length))
    tensors = dict(q=q, k=k, rater_slot=rater_slot, rater_valid=rater_valid, key_valid=key_valid)
    if visual is not None:
        check_shape(op, "visual", visual, (batch, length))
        tensors["visual"] = visual
    for name in ("rater_valid", "key_valid", "visual"):
        if name in tensors and tensors[name].dtype != torch.bool:
            raise ValueError(f"{op}: {name} must be bool, got {tensors[name].dtype}")
    if head_dim > 256:
        raise ValueError(f"{op}: head dim {head_dim} > 256 is not supported")
    check_device(op, **tensors)
    return batch, heads, raters, head_dim, kv_heads, length


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, k, rater_slot, rater_valid, key_valid, scaling):
    q, k = _contiguous_last(q), _contiguous_last(k)
    slot = rater_slot.to(torch.int32).contiguous()
    upcast, precision = _dot_settings(q.dtype)
    args = dict(GROUP=q.shape[1] // k.shape[1], BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L,
                BLOCK_D=max(16, next_pow2(q.shape[3])), UPCAST=upcast, PRECISION=precision)
    return q, k, slot, rater_valid.contiguous().view(torch.int8), key_valid.contiguous().view(torch.int8), \
        scaling * LOG2E, args


def _gravity_args(gravity, batch, raters, length, device):
    """(table, rater_pos, key_pos, T, kernel flags) for the kernels; dummies when gravity is off."""
    if gravity is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return torch.ones(1, dtype=torch.float32, device=device), dummy, dummy, 1, dict(GRAVITY=False, SECTIONS=1)
    table, rater_pos, key_pos = gravity
    if table.dim() != 2 or table.dtype != torch.float32 or table.numel() == 0:
        raise ValueError(f"gravity table must be a non-empty fp32 [S, T] tensor, got {table.dtype} {list(table.shape)}")
    sections = table.shape[0]
    pos = []
    for name, t, n in (("rater_pos", rater_pos, raters), ("key_pos", key_pos, length)):
        t = t[None] if t.dim() == 2 and sections == 1 else t
        check_shape("gravity", name, t, (sections, batch, n))
        pos.append(t.to(torch.int32).contiguous())
    check_device("gravity", table=table, rater_pos=rater_pos, key_pos=key_pos)
    return table.contiguous(), *pos, table.shape[1], dict(GRAVITY=True, SECTIONS=sections)


def rater_lse(q: torch.Tensor, k: torch.Tensor, rater_slot: torch.Tensor, rater_valid: torch.Tensor,
              key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Log-sum-exp of each rater's full attention row over every key it sees (causal, padding
    excluded), in natural log. Returns lse [B, H, R] fp32; -inf for an invalid rater."""
    batch, heads, raters, head_dim, _, length = _check_scoring_inputs(
        "rater_lse", q, k, rater_slot, rater_valid, key_valid)
    q, k, slot, r_ok, k_ok, scale_log2, args = _common(q, k, rater_slot, rater_valid, key_valid, scaling)
    lse = torch.empty(batch, heads, raters, dtype=torch.float32, device=q.device)
    if lse.numel():
        grid = (batch * heads, triton.cdiv(raters, BLOCK_R))
        _rater_lse_kernel[grid](q, k, slot, r_ok, k_ok, lse, q.stride(0), q.stride(1), q.stride(2),
                                k.stride(0), k.stride(1), k.stride(2), heads, raters, length, head_dim,
                                scale_log2, **args)
    return lse


def head_relevance(q: torch.Tensor, k: torch.Tensor, rater_slot: torch.Tensor, rater_valid: torch.Tensor,
                   key_valid: torch.Tensor, visual: torch.Tensor, scaling: float, lse: torch.Tensor | None = None,
                   gravity: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """rel[b, h, l]: mean over valid raters of the attention probability on visual key l.

    Each row is normalised over all keys the rater sees: lse [B, H, R] (natural log) from
    rater_lse, or from the attention kernel itself (flash-attn returns it), computed here when
    None. gravity: optional (table [S, T] from gravity_table, rater_pos [S, B, R], key_pos
    [S, B, L]; [B, R] / [B, L] when S = 1): probabilities are divided by
    guard(sum_s table[s, |rater_pos_s - key_pos_s|]). Returns [B, H, L] fp32, zero off visible
    visual keys.
    """
    batch, heads, raters, head_dim, _, length = _check_scoring_inputs(
        "head_relevance", q, k, rater_slot, rater_valid, key_valid, visual)
    if lse is None:
        lse = rater_lse(q, k, rater_slot, rater_valid, key_valid, scaling)
    check_shape("head_relevance", "lse", lse, (batch, heads, raters))
    table, rpos, kpos, n_gravity, flags = _gravity_args(gravity, batch, raters, length, q.device)
    q, k, slot, r_ok, k_ok, scale_log2, args = _common(q, k, rater_slot, rater_valid, key_valid, scaling)
    out = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel():
        grid = (batch * heads, triton.cdiv(length, BLOCK_L))
        _head_relevance_kernel[grid](
            q, k, slot, r_ok, k_ok, visual.contiguous().view(torch.int8), lse.float().contiguous(), table, rpos,
            kpos, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            batch, heads, raters, length, head_dim, n_gravity, scale_log2, GRAVITY_EPS, **flags, **args)
    return out


def rater_rows(q: torch.Tensor, k: torch.Tensor, rater_slot: torch.Tensor, rater_valid: torch.Tensor,
               key_valid: torch.Tensor, visual: torch.Tensor, scaling: float, weights: torch.Tensor,
               lse: torch.Tensor | None = None,
               gravity: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The head-averaged rater rows P[b, r, l] = sum_h weights[b, h] a[b, h, r, l] (rank mode):
    [B, R, L] fp32, zero off visible visual keys and for invalid raters. weights: [B, H];
    gravity as in head_relevance. O(B R L), the size of P itself."""
    batch, heads, raters, head_dim, _, length = _check_scoring_inputs(
        "rater_rows", q, k, rater_slot, rater_valid, key_valid, visual)
    check_shape("rater_rows", "weights", weights, (batch, heads))
    if lse is None:
        lse = rater_lse(q, k, rater_slot, rater_valid, key_valid, scaling)
    table, rpos, kpos, n_gravity, flags = _gravity_args(gravity, batch, raters, length, q.device)
    q, k, slot, r_ok, k_ok, scale_log2, args = _common(q, k, rater_slot, rater_valid, key_valid, scaling)
    out = torch.empty(batch, raters, length, dtype=torch.float32, device=q.device)
    if out.numel():
        grid = (batch, triton.cdiv(raters, BLOCK_R), triton.cdiv(length, BLOCK_L))
        _rater_rows_kernel[grid](
            q, k, slot, r_ok, k_ok, visual.contiguous().view(torch.int8), lse.float().contiguous(),
            weights.float().contiguous(), table, rpos, kpos, out, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), batch, heads, raters, length, head_dim, n_gravity, scale_log2,
            GRAVITY_EPS, **flags, **args)
    return out


def gravity_table(inv_freq: torch.Tensor, head_dim: int, size: int, sections=None) -> torch.Tensor:
    """Unguarded per-section RoPE gravity table [S, size] fp32 (reference.gravity_table):
    table[s, d] = sum over pairs p of section s of 2 cos(d * theta_p) / sqrt(head_dim).
    inv_freq: [D/2]; sections: pairs per section summing to D/2 (mRoPE, e.g. [16, 24, 24]),
    None for one section of all pairs (S = 1)."""
    parts = rope_sections(inv_freq, sections, "gravity_table")
    if size < 1:
        raise ValueError(f"gravity_table: size must be >= 1, got {size}")
    check_device("gravity_table", inv_freq=inv_freq)
    inv_freq = inv_freq.float().contiguous()
    bounds = torch.tensor([sum(parts[:s]) for s in range(len(parts) + 1)], dtype=torch.int32, device=inv_freq.device)
    out = torch.empty(len(parts), size, dtype=torch.float32, device=inv_freq.device)
    block = 128
    _gravity_table_kernel[(triton.cdiv(size, block), len(parts))](
        inv_freq, bounds, out, size, 2.0 / math.sqrt(head_dim), BLOCK=block, BLOCK_F=next_pow2(max(parts)))
    return out
