"""A pruning layer's rater queries in one launch: find the rater slots, RMS-normalise their rows
(input_layernorm), project onto q_proj and apply RoPE, with transformers' roundings
(reference_queries.rater_queries).

    q, rater_slot, rater_valid = rater_queries(hidden, rater, valid, R, norm.weight, norm.eps,
                                               q_proj.weight, q_proj.bias, cos, sin)

Shapes: hidden [B, L, d]; rater, valid [B, L] bool; q [B, H, R, D]; rater_slot [B, R] int64
(-1 past a row's count), rater_valid [B, R] bool; cos, sin [P, B, L, D] or [B, L, D].
Grid (B, H, cdiv(R, BLOCK_R)): every program rescans row b's flags to place its raters (a
cumsum gives each rater its rank), so nothing but the outputs is allocated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, interpreting, next_pow2

BLOCK_R = 16
MAX_BLOCK_L = 128


@triton.jit
def _round(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest even), returned as fp32. The interpreter casts
    fp32 -> bf16 by truncation, so there bf16 rounding is done on the bits."""
    if EMULATE_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rater_slots(rater_ptr, valid_ptr, b, offs_r, stride_rb, stride_rl, stride_vb, stride_vl, L,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """(slot [BR] int32, count): the slots of the raters ranked offs_r in row b (0 past the
    count) and the row's rater count, by a cumsum rank and a compare-and-reduce per block."""
    slot = tl.zeros([BLOCK_R], tl.int32)
    count = tl.full([], 0, tl.int32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        inside = offs_l < L
        flag = (tl.load(rater_ptr + b * stride_rb + offs_l * stride_rl, mask=inside, other=0) != 0) & (
            tl.load(valid_ptr + b * stride_vb + offs_l * stride_vl, mask=inside, other=0) != 0) & inside
        rank = count + tl.cumsum(flag.to(tl.int32), 0) - 1
        hit = flag[None, :] & (rank[None, :] == offs_r[:, None])
        slot += tl.sum(tl.where(hit, offs_l[None, :], 0), 1)
        count += tl.sum(flag.to(tl.int32), 0)
    return slot, count


@triton.jit
def _rope_table(ptr, stride_p, stride_d, row_base, dims, planes, mask):
    """cos or sin [BR, BH] fp32 at dims (head dims of one half), reading plane planes[j]."""
    return tl.load(ptr + row_base[:, None] + planes[None, :] * stride_p + dims[None, :] * stride_d,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["R", "L"])
def _rater_queries_kernel(
    hidden_ptr, rater_ptr, valid_ptr, nw_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, plane_ptr,
    q_ptr, slot_ptr, rvalid_ptr,
    stride_hb, stride_hl, stride_rb, stride_rl, stride_vb, stride_vl, stride_nw, stride_w0, stride_w1,
    stride_bias, stride_cp, stride_cb, stride_cl, stride_cd, stride_sp, stride_sb, stride_sl, stride_sd,
    stride_plane, H, R, L, d, HALF, P, eps,
    HAS_BIAS: tl.constexpr, PLANES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty

    slot, count = _rater_slots(rater_ptr, valid_ptr, b, offs_r, stride_rb, stride_rl, stride_vb, stride_vl, L,
                               BLOCK_R, BLOCK_L)
    r_ok = r_in & (offs_r < count)
    slot64 = slot.to(tl.int64)
    if h == 0:
        tl.store(slot_ptr + b * R + offs_r, tl.where(r_ok, slot64, -1), mask=r_in)
        tl.store(rvalid_ptr + b * R + offs_r, r_ok.to(tl.int8), mask=r_in)

    # input_layernorm: rstd of each gathered row, in fp32
    row_ptr = hidden_ptr + b * stride_hb + slot64 * stride_hl
    sumsq = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(row_ptr[:, None] + offs_k[None, :], mask=r_ok[:, None] & (offs_k < d)[None, :],
                    other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, 1)
    rstd = tl.rsqrt(sumsq / d + eps)

    # q_proj onto head h, one accumulator per half of the head
    offs_j = tl.arange(0, BLOCK_H)
    j_in = offs_j < HALF
    col1 = h.to(tl.int64) * (2 * HALF) + offs_j
    col2 = col1 + HALF
    acc1 = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < d
        x = tl.load(row_ptr[:, None] + offs_k[None, :], mask=r_ok[:, None] & k_in[None, :],
                    other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + offs_k * stride_nw, mask=k_in, other=0.0).to(tl.float32)
        x = _round(_round(x * rstd[:, None], DTYPE, EMULATE_BF16) * nw[None, :], DTYPE, EMULATE_BF16)
        if not UPCAST:
            x = x.to(DTYPE)
        w_mask = k_in[:, None] & j_in[None, :]
        w1 = tl.load(w_ptr + col1[None, :] * stride_w0 + offs_k[:, None] * stride_w1, mask=w_mask, other=0.0)
        w2 = tl.load(w_ptr + col2[None, :] * stride_w0 + offs_k[:, None] * stride_w1, mask=w_mask, other=0.0)
        if UPCAST:
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc1 += tl.dot(x, w1, input_precision=PRECISION)
        acc2 += tl.dot(x, w2, input_precision=PRECISION)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + col1 * stride_bias, mask=j_in, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + col2 * stride_bias, mask=j_in, other=0.0).to(tl.float32)[None, :]
    q1 = _round(acc1, DTYPE, EMULATE_BF16)
    q2 = _round(acc2, DTYPE, EMULATE_BF16)

    # RoPE in DTYPE: out1 = q1 c1 - q2 s1, out2 = q2 c2 + q1 s2, each product and sum rounded
    if PLANES:
        p1 = tl.load(plane_ptr + offs_j * stride_plane, mask=j_in, other=0).to(tl.int64)
        p2 = tl.load(plane_ptr + (offs_j + HALF) * stride_plane, mask=j_in, other=0).to(tl.int64)
        p1 = tl.minimum(tl.maximum(p1, 0), P - 1)
        p2 = tl.minimum(tl.maximum(p2, 0), P - 1)
    else:
        p1 = tl.zeros([BLOCK_H], tl.int64)
        p2 = p1
    mask = r_ok[:, None] & j_in[None, :]
    c_row = b * stride_cb + slot64 * stride_cl
    s_row = b * stride_sb + slot64 * stride_sl
    c1 = _rope_table(cos_ptr, stride_cp, stride_cd, c_row, offs_j, p1, mask)
    c2 = _rope_table(cos_ptr, stride_cp, stride_cd, c_row, offs_j + HALF, p2, mask)
    s1 = _rope_table(sin_ptr, stride_sp, stride_sd, s_row, offs_j, p1, mask)
    s2 = _rope_table(sin_ptr, stride_sp, stride_sd, s_row, offs_j + HALF, p2, mask)
    out1 = _round(_round(q1 * c1, DTYPE, EMULATE_BF16) - _round(q2 * s1, DTYPE, EMULATE_BF16), DTYPE, EMULATE_BF16)
    out2 = _round(_round(q2 * c2, DTYPE, EMULATE_BF16) + _round(q1 * s2, DTYPE, EMULATE_BF16), DTYPE, EMULATE_BF16)
    out1 = tl.where(r_ok[:, None], out1, 0.0)
    out2 = tl.where(r_ok[:, None], out2, 0.0)
    q_rows = q_ptr + ((b * H + h) * R + offs_r[:, None]) * (2 * HALF)
    store_mask = r_in[:, None] & j_in[None, :]
    tl.store(q_rows + offs_j[None, :], out1.to(DTYPE), mask=store_mask)
    tl.store(q_rows + HALF + offs_j[None, :], out2.to(DTYPE), mask=store_mask)


# ----------------------------------------------------------------------------- launcher
def _dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION): fp32 operands use exact fp32 products ('ieee', not tf32); fp16/bf16 go
    to the tensor cores with fp32 accumulation. Under the interpreter everything is upcast."""
    upcast = interpreting() or dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


def _check_inputs(hidden, rater, valid, n_slots, norm_weight, weight, bias, cos, sin, plane_of_dim):
    op = "rater_queries"
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be [B, L, d], got {list(hidden.shape)}")
    check_float(op, hidden=hidden)
    if hidden.stride(-1) != 1:
        raise ValueError(f"{op}: hidden must have stride(-1) == 1, got {hidden.stride(-1)}")
    batch, length, width = hidden.shape
    for name, t in (("rater", rater), ("valid", valid)):
        check_shape(op, name, t, (batch, length))
        if t.dtype != torch.bool:
            raise ValueError(f"{op}: {name} must be bool, got {t.dtype}")
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 0:
        raise ValueError(f"{op}: n_slots must be a host int >= 0, got {n_slots!r}")
    if cos.dim() not in (3, 4):
        raise ValueError(f"{op}: cos must be [P, B, L, D] or [B, L, D], got {list(cos.shape)}")
    head_dim = cos.shape[-1]
    if head_dim % 2 or not 2 <= head_dim <= 256:
        raise ValueError(f"{op}: head dim (cos.shape[-1]) must be even and in [2, 256], got {head_dim}")
    planes = cos.shape[0] if cos.dim() == 4 else 1
    rope_shape = (planes, batch, length, head_dim)[4 - cos.dim():]
    check_shape(op, "cos", cos, rope_shape)
    check_shape(op, "sin", sin, rope_shape)
    if weight.dim() != 2 or weight.shape[1] != width or weight.shape[0] == 0 or weight.shape[0] % head_dim:
        raise ValueError(f"{op}: weight must be [H*{head_dim}, {width}], got {list(weight.shape)}")
    check_shape(op, "norm_weight", norm_weight, (width,))
    tensors = dict(norm_weight=norm_weight, weight=weight, cos=cos, sin=sin)
    if bias is not None:
        check_shape(op, "bias", bias, (weight.shape[0],))
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.dtype != hidden.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but hidden is {hidden.dtype}")
    if plane_of_dim is not None:
        check_shape(op, "plane_of_dim", plane_of_dim, (head_dim,))
        if plane_of_dim.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: plane_of_dim must be int32 or int64, got {plane_of_dim.dtype}")
        tensors["plane_of_dim"] = plane_of_dim
    device = check_device(op, hidden=hidden, rater=rater, valid=valid, **tensors)
    return batch, length, width, weight.shape[0] // head_dim, head_dim, planes, device


def rater_queries(hidden: torch.Tensor, rater: torch.Tensor, valid: torch.Tensor, n_slots: int,
                  norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, plane_of_dim: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries of the raters (rater & valid), packed in slot order, in one launch.

    hidden [B, L, d] before input_layernorm (stride(-1) == 1); n_slots = R, a host bound on every
    row's rater count (raters ranked past it are dropped); norm_weight [d], eps: the RMSNorm;
    weight [H*D, d], bias [H*D] or None: q_proj; cos, sin [P, B, L, D] or [B, L, D] (any strides,
    batch stride 0 allowed), all in hidden's dtype; plane_of_dim [D] int32/int64, the plane head
    dim j reads (mRoPE; clamped to [0, P)), None for plane 0. Returns (q [B, H, R, D] in
    hidden.dtype, zero past a row's count; rater_slot [B, R] int64, -1 past it; rater_valid
    [B, R] bool).
    """
    batch, length, width, heads, head_dim, planes, device = _check_inputs(
        hidden, rater, valid, n_slots, norm_weight, weight, bias, cos, sin, plane_of_dim)
    q = torch.empty(batch, heads, n_slots, head_dim, dtype=hidden.dtype, device=device)
    rater_slot = torch.empty(batch, n_slots, dtype=torch.int64, device=device)
    rater_valid = torch.empty(batch, n_slots, dtype=torch.bool, device=device)
    if q.numel() == 0:
        return q, rater_slot, rater_valid
    upcast, precision = _dot_settings(hidden.dtype)
    half = head_dim // 2
    block_h = max(16, next_pow2(half))  # a GPU's tl.dot needs >= 16 columns; the rest are masked
    block_k = min(64 if block_h <= 64 else 32, max(16, next_pow2(width)))
    cos_p, sin_p = (cos.stride(0), sin.stride(0)) if cos.dim() == 4 else (0, 0)
    rater8, valid8 = rater.view(torch.int8), valid.view(torch.int8)
    grid = (batch, heads, triton.cdiv(n_slots, BLOCK_R))
    _rater_queries_kernel[grid](
        hidden, rater8, valid8, norm_weight, weight, hidden if bias is None else bias, cos, sin,
        rater8 if plane_of_dim is None else plane_of_dim, q, rater_slot, rater_valid.view(torch.int8),
        hidden.stride(0), hidden.stride(1), rater.stride(0), rater.stride(1), valid.stride(0), valid.stride(1),
        norm_weight.stride(0), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        cos_p, cos.stride(-3), cos.stride(-2), cos.stride(-1), sin_p, sin.stride(-3), sin.stride(-2), sin.stride(-1),
        0 if plane_of_dim is None else plane_of_dim.stride(0), heads, n_slots, length, width, half, planes,
        float(eps), HAS_BIAS=bias is not None, PLANES=plane_of_dim is not None, BLOCK_R=BLOCK_R,
        BLOCK_L=min(MAX_BLOCK_L, max(16, next_pow2(length))), BLOCK_K=block_k, BLOCK_H=block_h,
        UPCAST=upcast, PRECISION=precision, EMULATE_BF16=hidden.dtype == torch.bfloat16 and interpreting())
    return q, rater_slot, rater_valid
