"""Rater-to-visual relevance without the attention matrix: row log-sum-exp, per-head relevance,
the rank-mode rater rows and the RoPE gravity table.

Shapes: q [B, H, R, D] post-RoPE rater queries; k [B, H_kv, L, D] post-RoPE keys (query head h
reads key head h // (H / H_kv)); rater_slot [B, R] the slot of each rater (it sees keys at
slots <= its own); rater_valid [B, R], key_valid [B, L], visual [B, L] bool.
Memory is O(B H R + B H L + B R L): nothing of size L x L is ever allocated.

    rel = head_relevance(q, k, rater_slot, rater_valid, key_valid, visual, scaling)  # [B, H, L], one launch
    rel = head_relevance(..., lse=lse)  # the attention kernel's own row log-sum-exp [B, H, R]

RoPE gravity: gravity_table(inv_freq, head_dim, T, sections) [S, T] holds per-section partial
sums; the relevance kernels take gravity=(table, positions [S, B, LP], index [B, L] or None):
slot l's section-s position is positions[s, b, index[b, l]] (a rater's, its slot's), and each
probability is divided by guard(sum_s table[s, |rater pos_s - key pos_s|]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, interpreting, next_pow2
from .gravity import gravity_table  # noqa: F401  (re-exported: the table the relevance kernels read)

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


@triton.jit
def _row_lse(q, k_base, slot, r_ok, kvalid_ptr, b, L, D, stride_kl, scale_log2,
             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Natural-log log-sum-exp [BR] of a block of rater rows over every key they see."""
    offs_d = tl.arange(0, BLOCK_D)
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
    return tl.where(s > 0, (m + tl.log2(s)) / 1.4426950408889634, float("-inf"))


@triton.jit
def _rater_block(q_ptr, slot_ptr, rvalid_ptr, b, h, r0, stride_qb, stride_qh, stride_qr, R, D,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(rater offsets, queries [BR, BD], slots, validity) of the raters r0 .. r0 + BR of row b, head h."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    q = _load_queries(q_ptr, b, h, offs_r, tl.arange(0, BLOCK_D), stride_qb, stride_qh, stride_qr, R, D, UPCAST)
    slot = tl.load(slot_ptr + b * R + offs_r, mask=r_in, other=-1)
    r_ok = (tl.load(rvalid_ptr + b * R + offs_r, mask=r_in, other=0) != 0) & (slot >= 0)
    return offs_r, q, slot, r_ok


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
    offs_r, q, slot, r_ok = _rater_block(q_ptr, slot_ptr, rvalid_ptr, b, h, tl.program_id(1) * BLOCK_R,
                                         stride_qb, stride_qh, stride_qr, R, D, BLOCK_R, BLOCK_D, UPCAST)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    lse = _row_lse(q, k_base, slot, r_ok, kvalid_ptr, b, L, D, stride_kl, scale_log2,
                   BLOCK_R, BLOCK_L, BLOCK_D, UPCAST, PRECISION)
    tl.store(lse_ptr + (b * H + h) * R + offs_r, lse, mask=offs_r < R)


@triton.jit
def _positions(pos_ptr, index_ptr, b, slots, ok, B, L, LP, s, HAS_INDEX: tl.constexpr):
    """Section s position ids of the slots [N] of row b: pos[s, b, index[b, slot]] (or pos[s, b, slot])."""
    src = slots
    if HAS_INDEX:
        src = tl.load(index_ptr + b * L + slots, mask=ok, other=0)
    return tl.load(pos_ptr + (s * B + b) * LP + src, mask=ok, other=0)


@triton.jit
def _gravity(table_ptr, pos_ptr, index_ptr, b, slot, r_ok, offs_l, l_in, visible, B, L, LP, T, eps,
             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, SECTIONS: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Gravity divisor [BR, BL]: guard(sum_s table[s, min(|rater pos_s - key pos_s|, T - 1)]), 1 where not visible."""
    g = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    for s in tl.static_range(SECTIONS):
        rpos = _positions(pos_ptr, index_ptr, b, slot, r_ok, B, L, LP, s, HAS_INDEX)
        kpos = _positions(pos_ptr, index_ptr, b, offs_l, l_in, B, L, LP, s, HAS_INDEX)
        delta = tl.minimum(tl.abs(rpos[:, None] - kpos[None, :]), T - 1)
        g += tl.load(table_ptr + s * T + delta, mask=visible, other=0.0)
    g = tl.where(g < 0, -tl.maximum(-g, eps), tl.maximum(g, eps))
    return tl.where(visible, g, 1.0)


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


@triton.jit(do_not_specialize=["B", "R", "L", "LP", "T"])
def _head_relevance_kernel(
    q_ptr, k_ptr, slot_ptr, rvalid_ptr, kvalid_ptr, visual_ptr, lse_ptr, table_ptr, pos_ptr, index_ptr, out_ptr,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
    B, H, R, L, D, LP, T, scale_log2, eps,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LSE: tl.constexpr,
    GRAVITY: tl.constexpr, SECTIONS: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (row, head): the raters' log-sum-exp (unless given), then the mean rater
    probability on every visual key."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    n_raters = tl.zeros([BLOCK_R], tl.int32)
    for r0 in range(0, R, BLOCK_R):
        offs_r, q, slot, r_ok = _rater_block(q_ptr, slot_ptr, rvalid_ptr, b, h, r0, stride_qb, stride_qh,
                                             stride_qr, R, D, BLOCK_R, BLOCK_D, UPCAST)
        n_raters += r_ok.to(tl.int32)
        if not HAS_LSE:
            lse = _row_lse(q, k_base, slot, r_ok, kvalid_ptr, b, L, D, stride_kl, scale_log2,
                           BLOCK_R, BLOCK_L, BLOCK_D, UPCAST, PRECISION)
            tl.store(lse_ptr + (b * H + h) * R + offs_r, lse, mask=offs_r < R)
    if not HAS_LSE:
        tl.debug_barrier()
    inv_raters = 1.0 / tl.maximum(tl.sum(n_raters, 0), 1).to(tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_in = offs_l < L
        key = (tl.load(kvalid_ptr + b * L + offs_l, mask=l_in, other=0) != 0) & (
            tl.load(visual_ptr + b * L + offs_l, mask=l_in, other=0) != 0)
        k_ptrs = k_base + offs_l[:, None] * stride_kl + offs_d[None, :]
        k_mask = l_in[:, None] & (offs_d[None, :] < D)
        acc = tl.zeros([BLOCK_L], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r, q, slot, r_ok = _rater_block(q_ptr, slot_ptr, rvalid_ptr, b, h, r0, stride_qb, stride_qh,
                                                 stride_qr, R, D, BLOCK_R, BLOCK_D, UPCAST)
            lse_log2 = tl.load(lse_ptr + (b * H + h) * R + offs_r, mask=offs_r < R, other=0.0) * 1.4426950408889634
            visible = r_ok[:, None] & key[None, :] & (offs_l[None, :] <= slot[:, None])
            divisor = 1.0
            if GRAVITY:
                divisor = _gravity(table_ptr, pos_ptr, index_ptr, b, slot, r_ok, offs_l, l_in, visible, B, L, LP,
                                   T, eps, BLOCK_R, BLOCK_L, SECTIONS, HAS_INDEX)
            acc += tl.sum(_rater_probs(q, k_ptrs, k_mask, lse_log2, visible, scale_log2, divisor, GRAVITY, UPCAST,
                                       PRECISION), 0)
        tl.store(out_ptr + (b * H + h) * L + offs_l, acc * inv_raters, mask=l_in)


@triton.jit(do_not_specialize=["B", "R", "L", "LP", "T"])
def _rater_rows_kernel(
    q_ptr, k_ptr, slot_ptr, rvalid_ptr, kvalid_ptr, visual_ptr, lse_ptr, w_ptr, table_ptr, pos_ptr, index_ptr,
    out_ptr,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl,
    B, H, R, L, D, LP, T, scale_log2, eps,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    GRAVITY: tl.constexpr, SECTIONS: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """P[r, l] = sum_h w[h] a[h, r, l] for a block of raters and keys of one row."""
    b = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_R
    offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_in = offs_l < L
    offs_r, _, slot, r_ok = _rater_block(q_ptr, slot_ptr, rvalid_ptr, b, 0, r0, stride_qb, stride_qh, stride_qr,
                                         R, D, BLOCK_R, BLOCK_D, UPCAST)
    key = (tl.load(kvalid_ptr + b * L + offs_l, mask=l_in, other=0) != 0) & (
        tl.load(visual_ptr + b * L + offs_l, mask=l_in, other=0) != 0)
    visible = r_ok[:, None] & key[None, :] & (offs_l[None, :] <= slot[:, None])
    k_mask = l_in[:, None] & (offs_d[None, :] < D)
    divisor = 1.0
    if GRAVITY:
        divisor = _gravity(table_ptr, pos_ptr, index_ptr, b, slot, r_ok, offs_l, l_in, visible, B, L, LP, T, eps,
                           BLOCK_R, BLOCK_L, SECTIONS, HAS_INDEX)
    rows = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    for h in range(0, H):
        w = tl.load(w_ptr + b * H + h)
        if w != 0.0:
            q = _load_queries(q_ptr, b, h, offs_r, offs_d, stride_qb, stride_qh, stride_qr, R, D, UPCAST)
            lse_log2 = tl.load(lse_ptr + (b * H + h) * R + offs_r, mask=offs_r < R, other=0.0) * 1.4426950408889634
            k_ptrs = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :]
            rows += w * _rater_probs(q, k_ptrs, k_mask, lse_log2, visible, scale_log2, divisor, GRAVITY, UPCAST,
                                     PRECISION)
    r_in = offs_r < R
    tl.store(out_ptr + (b * R + offs_r[:, None]) * L + offs_l[None, :], rows, mask=r_in[:, None] & l_in[None, :])


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
    """Kernel operands without a copy: int8 views of the bools, slots loaded as given."""
    if rater_slot.is_floating_point() or rater_slot.dtype == torch.bool:
        raise ValueError(f"rater_slot must be an integer tensor, got {rater_slot.dtype}")
    q, k = _contiguous_last(q), _contiguous_last(k)
    upcast, precision = _dot_settings(q.dtype)
    args = dict(GROUP=q.shape[1] // k.shape[1], BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L,
                BLOCK_D=max(16, next_pow2(q.shape[3])), UPCAST=upcast, PRECISION=precision)
    return q, k, rater_slot.contiguous(), rater_valid.contiguous().view(torch.int8), \
        key_valid.contiguous().view(torch.int8), scaling * LOG2E, args


def _gravity_args(gravity, batch, length, dummy):
    """(table, positions, index, LP, T, kernel flags); the dummy stands in for every pointer when
    gravity is off (the kernels then never read them)."""
    if gravity is None:
        return dummy, dummy, dummy, 1, 1, dict(GRAVITY=False, SECTIONS=1, HAS_INDEX=False)
    table, positions, index = gravity
    if table.dim() != 2 or table.dtype != torch.float32 or table.numel() == 0:
        raise ValueError(f"gravity table must be a non-empty fp32 [S, T] tensor, got {table.dtype} {list(table.shape)}")
    sections = table.shape[0]
    if positions.dim() == 2 and sections == 1:
        positions = positions[None]
    check_shape("gravity", "positions", positions, (sections, batch, None))
    if positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(f"gravity: positions must be integer, got {positions.dtype}")
    if index is None:
        check_shape("gravity", "positions", positions, (sections, batch, length))
        index = dummy
    else:
        check_shape("gravity", "index", index, (batch, length))
        check_device("gravity", table=table, positions=positions, index=index)
    check_device("gravity", table=table, positions=positions)
    return (table.contiguous(), positions.contiguous(), index.contiguous(), positions.shape[2], table.shape[1],
            dict(GRAVITY=True, SECTIONS=sections, HAS_INDEX=index is not dummy))


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


def _given_lse(op, lse, batch, heads, raters):
    check_shape(op, "lse", lse, (batch, heads, raters))
    if lse.dtype != torch.float32:
        raise ValueError(f"{op}: lse must be fp32, got {lse.dtype}")
    return lse.contiguous()


def head_relevance(q: torch.Tensor, k: torch.Tensor, rater_slot: torch.Tensor, rater_valid: torch.Tensor,
                   key_valid: torch.Tensor, visual: torch.Tensor, scaling: float, lse: torch.Tensor | None = None,
                   gravity: tuple | None = None) -> torch.Tensor:
    """rel[b, h, l]: mean over valid raters of the attention probability on visual key l, in one
    launch (a program per row and head).

    Each row is normalised over all keys the rater sees: by its log-sum-exp, computed in the same
    launch, or lse [B, H, R] fp32 (natural log) as the attention kernel returned it
    (FlashAttention's softmax_lse, varlen_attn's). gravity: optional (table [S, T] from
    gravity_table, positions [S, B, LP] int, index [B, L] int or None): slot l of row b has the
    section-s position positions[s, b, index[b, l]] (positions[s, b, l] without index; [B, L]
    positions when S = 1), a rater the position of its slot, and each probability is divided by
    guard(sum_s table[s, |rater pos_s - key pos_s|]). Returns [B, H, L] fp32, zero off visible
    visual keys.
    """
    batch, heads, raters, head_dim, _, length = _check_scoring_inputs(
        "head_relevance", q, k, rater_slot, rater_valid, key_valid, visual)
    q, k, slot, r_ok, k_ok, scale_log2, args = _common(q, k, rater_slot, rater_valid, key_valid, scaling)
    table, positions, index, n_pos, n_gravity, flags = _gravity_args(gravity, batch, length, slot)
    if lse is None:
        lse_buf = torch.empty(batch, heads, raters, dtype=torch.float32, device=q.device)
    else:
        lse_buf = _given_lse("head_relevance", lse, batch, heads, raters)
    if raters == 0:  # nobody rates: no relevance (and no zero-size pointer handed to a launch)
        return torch.zeros(batch, heads, length, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel():
        _head_relevance_kernel[(batch * heads,)](
            q, k, slot, r_ok, k_ok, visual.contiguous().view(torch.int8), lse_buf, table, positions, index, out,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            batch, heads, raters, length, head_dim, n_pos, n_gravity, scale_log2, GRAVITY_EPS,
            HAS_LSE=lse is not None, **flags, **args)
    return out


def rater_rows(q: torch.Tensor, k: torch.Tensor, rater_slot: torch.Tensor, rater_valid: torch.Tensor,
               key_valid: torch.Tensor, visual: torch.Tensor, scaling: float, weights: torch.Tensor,
               lse: torch.Tensor | None = None, gravity: tuple | None = None) -> torch.Tensor:
    """The head-averaged rater rows P[b, r, l] = sum_h weights[b, h] a[b, h, r, l] (rank mode):
    [B, R, L] fp32, zero off visible visual keys and for invalid raters. weights: [B, H] fp32;
    lse and gravity as in head_relevance (lse computed by rater_lse when None)."""
    batch, heads, raters, head_dim, _, length = _check_scoring_inputs(
        "rater_rows", q, k, rater_slot, rater_valid, key_valid, visual)
    check_shape("rater_rows", "weights", weights, (batch, heads))
    if weights.dtype != torch.float32:
        raise ValueError(f"rater_rows: weights must be fp32, got {weights.dtype}")
    lse = rater_lse(q, k, rater_slot, rater_valid, key_valid, scaling) if lse is None else \
        _given_lse("rater_rows", lse, batch, heads, raters)
    q, k, slot, r_ok, k_ok, scale_log2, args = _common(q, k, rater_slot, rater_valid, key_valid, scaling)
    table, positions, index, n_pos, n_gravity, flags = _gravity_args(gravity, batch, length, slot)
    out = torch.empty(batch, raters, length, dtype=torch.float32, device=q.device)
    if out.numel():
        grid = (batch, triton.cdiv(raters, BLOCK_R), triton.cdiv(length, BLOCK_L))
        _rater_rows_kernel[grid](
            q, k, slot, r_ok, k_ok, visual.contiguous().view(torch.int8), lse, weights.contiguous(), table,
            positions, index, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            batch, heads, raters, length, head_dim, n_pos, n_gravity, scale_log2, GRAVITY_EPS, **flags, **args)
    return out
