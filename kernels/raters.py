"""Rater selection (SparseVLM's text raters), batched and padded, in two Triton kernels.

`_rater_colsum_kernel` (grid B x visual blocks) takes the softmax of V T^T over the text axis for its
block of visual rows, in two passes over the text (online max and sum, then the probabilities), and
writes the block's column sums to an fp32 partial buffer. `_rater_select_kernel` (grid B) adds the
partials in a fixed order, so the result is deterministic, and thresholds the column means.
Semantics: `reference.select_raters`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_float, check_shape, next_pow2, upcast_bf16


@triton.jit
def _block_logits(v_base, t_base, tvalid_base, offs_t, in_t, in_v, offs_d0, stride_vd, stride_tn, stride_td,
                  stride_tvn, D, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """V T^T for a block of visual rows and text columns: [BLOCK_V, BLOCK_T] fp32, -inf at invalid text."""
    logits = tl.zeros([BLOCK_V, BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        in_d = offs_d < D
        v = tl.load(v_base + offs_d[None, :] * stride_vd, mask=in_v[:, None] & in_d[None, :], other=0.0)
        t = tl.load(t_base + offs_t.to(tl.int64)[None, :] * stride_tn + offs_d[:, None] * stride_td,
                    mask=in_d[:, None] & in_t[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            t = t.to(tl.float32)
        logits = tl.dot(v, t, logits, input_precision=DOT_PRECISION)
    col_valid = tl.load(tvalid_base + offs_t * stride_tvn, mask=in_t, other=0) != 0
    logits = tl.where(col_valid[None, :], logits, float("-inf"))
    return logits


@triton.jit(do_not_specialize=["stride_vb", "stride_tb", "stride_vvb", "stride_tvb", "stride_pb", "stride_pk",
                               "NV", "NT"])
def _rater_colsum_kernel(
    v_ptr, t_ptr, vvalid_ptr, tvalid_ptr, partial_ptr,
    stride_vb, stride_vn, stride_vd,
    stride_tb, stride_tn, stride_td,
    stride_vvb, stride_vvn,
    stride_tvb, stride_tvn,
    stride_pb, stride_pk,
    NV, NT, D,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t0 = tl.arange(0, BLOCK_T)
    offs_d0 = tl.arange(0, BLOCK_D)
    in_v = offs_v < NV

    v_base = v_ptr + pid_b * stride_vb + offs_v.to(tl.int64)[:, None] * stride_vn
    t_base = t_ptr + pid_b * stride_tb
    tvalid_base = tvalid_ptr + pid_b * stride_tvb

    row_valid = tl.load(vvalid_ptr + pid_b * stride_vvb + offs_v * stride_vvn, mask=in_v, other=0) != 0

    # Pass 1: running max and sum of exp per visual row.
    m_i = tl.full([BLOCK_V], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_V], tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        offs_t = t0 + offs_t0
        in_t = offs_t < NT
        logits = _block_logits(v_base, t_base, tvalid_base, offs_t, in_t, in_v, offs_d0, stride_vd, stride_tn,
                               stride_td, stride_tvn, D, BLOCK_V, BLOCK_T, BLOCK_D, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        # A row that has seen no valid text yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_shift) + tl.sum(tl.exp(logits - m_shift[:, None]), 1)
        m_i = m_new

    # Rows with no valid text have l = 0 and give zeros (reference: nan_to_num); invalid visual rows too.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(row_valid & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)

    # Pass 2: recompute the logits, normalise, and sum the block's rows per text column.
    partial_base = partial_ptr + pid_b * stride_pb + pid_v.to(tl.int64) * stride_pk
    for t0 in range(0, NT, BLOCK_T):
        offs_t = t0 + offs_t0
        in_t = offs_t < NT
        logits = _block_logits(v_base, t_base, tvalid_base, offs_t, in_t, in_v, offs_d0, stride_vd, stride_tn,
                               stride_td, stride_tvn, D, BLOCK_V, BLOCK_T, BLOCK_D, UPCAST, DOT_PRECISION)
        probs = tl.exp(logits - m_shift[:, None]) * inv_l[:, None]
        tl.store(partial_base + offs_t, tl.sum(probs, 0), mask=in_t)


@triton.jit
def _column_scores(partial_base, stride_pk, offs_t, in_t, N_VBLOCKS, inv_nv, BLOCK_T: tl.constexpr):
    """s for one block of text columns: the partials summed in block order, over the visual count."""
    acc = tl.zeros([BLOCK_T], tl.float32)
    for k in range(0, N_VBLOCKS):
        acc += tl.load(partial_base + k * stride_pk + offs_t, mask=in_t, other=0.0)
    return acc * inv_nv


@triton.jit(do_not_specialize=["stride_vvb", "stride_tvb", "stride_pb", "stride_pk", "stride_ob", "stride_sb",
                               "stride_sn", "NV", "NT", "N_VBLOCKS"])
def _rater_select_kernel(
    partial_ptr, vvalid_ptr, tvalid_ptr, out_ptr, score_ptr,
    stride_pb, stride_pk,
    stride_vvb, stride_vvn,
    stride_tvb, stride_tvn,
    stride_ob, stride_on,
    stride_sb, stride_sn,
    NV, NT, N_VBLOCKS,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, WRITE_SCORES: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    partial_base = partial_ptr + pid_b * stride_pb
    tvalid_base = tvalid_ptr + pid_b * stride_tvb
    offs_t0 = tl.arange(0, BLOCK_T)

    n_visual = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, NV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = tl.load(vvalid_ptr + pid_b * stride_vvb + offs_v * stride_vvn, mask=offs_v < NV, other=0) != 0
        n_visual += valid.to(tl.int32)
    inv_nv = 1.0 / tl.maximum(tl.sum(n_visual, 0), 1).to(tl.float32)

    # The three passes re-add the partials (cheap: N_VBLOCKS x NT floats) rather than keep s around.
    total = tl.zeros([BLOCK_T], tl.float32)
    n_text = tl.zeros([BLOCK_T], tl.int32)
    for t0 in range(0, NT, BLOCK_T):
        offs_t = t0 + offs_t0
        in_t = offs_t < NT
        s = _column_scores(partial_base, stride_pk, offs_t, in_t, N_VBLOCKS, inv_nv, BLOCK_T)
        valid = tl.load(tvalid_base + offs_t * stride_tvn, mask=in_t, other=0) != 0
        total += tl.where(valid, s, 0.0)
        n_text += valid.to(tl.int32)
    mean = tl.sum(total, 0) / tl.maximum(tl.sum(n_text, 0), 1).to(tl.float32)

    n_raters = tl.zeros([BLOCK_T], tl.int32)
    for t0 in range(0, NT, BLOCK_T):
        offs_t = t0 + offs_t0
        in_t = offs_t < NT
        s = _column_scores(partial_base, stride_pk, offs_t, in_t, N_VBLOCKS, inv_nv, BLOCK_T)
        valid = tl.load(tvalid_base + offs_t * stride_tvn, mask=in_t, other=0) != 0
        n_raters += ((s > mean) & valid).to(tl.int32)
    empty = tl.sum(n_raters, 0) == 0

    for t0 in range(0, NT, BLOCK_T):
        offs_t = t0 + offs_t0
        in_t = offs_t < NT
        s = _column_scores(partial_base, stride_pk, offs_t, in_t, N_VBLOCKS, inv_nv, BLOCK_T)
        valid = tl.load(tvalid_base + offs_t * stride_tvn, mask=in_t, other=0) != 0
        raters = tl.where(empty, valid, (s > mean) & valid)
        tl.store(out_ptr + pid_b * stride_ob + offs_t * stride_on, raters.to(tl.int8), mask=in_t)
        if WRITE_SCORES:
            tl.store(score_ptr + pid_b * stride_sb + offs_t * stride_sn, s, mask=in_t)


def _check(visual: torch.Tensor, text: torch.Tensor, visual_valid: torch.Tensor, text_valid: torch.Tensor) -> None:
    op = "select_raters"
    check_device(op, visual=visual, text=text, visual_valid=visual_valid, text_valid=text_valid)
    check_float(op, visual=visual, text=text)
    if visual.dtype != text.dtype:
        raise ValueError(f"{op}: visual is {visual.dtype} but text is {text.dtype}")
    check_shape(op, "visual", visual, (None, None, None))
    batch, n_visual, dim = visual.shape
    check_shape(op, "text", text, (batch, None, dim))
    check_shape(op, "visual_valid", visual_valid, (batch, n_visual))
    check_shape(op, "text_valid", text_valid, (batch, text.shape[1]))
    for name, mask in (("visual_valid", visual_valid), ("text_valid", text_valid)):
        if mask.dtype != torch.bool:
            raise ValueError(f"{op}: {name} must be bool, got {mask.dtype} with shape {list(mask.shape)}")


def _launch(visual: torch.Tensor, text: torch.Tensor, visual_valid: torch.Tensor, text_valid: torch.Tensor,
            want_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(visual, text, visual_valid, text_valid)
    if visual.stride(-1) != 1:
        visual = visual.contiguous()
    if text.stride(-1) != 1:
        text = text.contiguous()
    batch, n_visual, dim = visual.shape
    n_text = text.shape[1]

    out = torch.empty((batch, n_text), dtype=torch.bool, device=visual.device)
    scores = torch.empty((batch, n_text), dtype=torch.float32, device=visual.device) if want_scores else None
    if batch == 0 or n_text == 0:
        return out, scores

    # Each program runs the whole d loop twice, so its length sets the time: small visual blocks
    # give more programs (32/64/64 with 4 warps beat 64/64/64 by ~2x on an H100 at NV=576, d=4096).
    block_v = min(32, max(16, next_pow2(n_visual)))
    block_t = min(64, max(16, next_pow2(n_text)))
    block_d = min(64, max(16, next_pow2(dim)))
    n_vblocks = max(1, triton.cdiv(n_visual, block_v))
    upcast = visual.dtype == torch.bfloat16 and upcast_bf16()
    # fp32 operands: "ieee" (tf32 is too coarse for scores that get thresholded). fp16/bf16 operands
    # multiply exactly on the tensor cores, so the tf32 tag (the GPU default) changes nothing for them.
    precision = "ieee" if visual.dtype == torch.float32 or upcast else "tf32"

    # Masks go in as int8 views: same bytes, and loads of i1 pointers are avoided.
    vvalid = visual_valid.view(torch.int8)
    tvalid = text_valid.view(torch.int8)
    partial = torch.empty((batch, n_vblocks, n_text), dtype=torch.float32, device=visual.device)
    _rater_colsum_kernel[(batch, n_vblocks)](
        visual, text, vvalid, tvalid, partial,
        visual.stride(0), visual.stride(1), visual.stride(2),
        text.stride(0), text.stride(1), text.stride(2),
        vvalid.stride(0), vvalid.stride(1),
        tvalid.stride(0), tvalid.stride(1),
        partial.stride(0), partial.stride(1),
        n_visual, n_text, dim,
        BLOCK_V=block_v, BLOCK_T=block_t, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PRECISION=precision, num_warps=4,
    )
    out8 = out.view(torch.int8)
    score_arg = scores if want_scores else partial
    _rater_select_kernel[(batch,)](
        partial, vvalid, tvalid, out8, score_arg,
        partial.stride(0), partial.stride(1),
        vvalid.stride(0), vvalid.stride(1),
        tvalid.stride(0), tvalid.stride(1),
        out8.stride(0), out8.stride(1),
        score_arg.stride(0), score_arg.stride(1),
        n_visual, n_text, n_vblocks,
        BLOCK_V=block_v, BLOCK_T=min(256, max(16, next_pow2(n_text))), WRITE_SCORES=want_scores,
    )
    return out, scores


def select_raters(visual: torch.Tensor, text: torch.Tensor, visual_valid: torch.Tensor,
                  text_valid: torch.Tensor) -> torch.Tensor:
    """Raters among the instruction tokens; same result as `reference.select_raters`.

    visual: [B, NV, d], text: [B, NT, d] hidden states (fp32, fp16 or bf16, one dtype); visual_valid:
    [B, NV], text_valid: [B, NT] bool. M = softmax(V T^T) over the text axis (no 1/sqrt(d), invalid
    text masked), s = mean of M over the valid visual rows, raters = valid text tokens with
    s > mean of s over valid text; a row whose set comes out empty takes every valid text token.
    Returns [B, NT] bool.

    >>> raters = select_raters(v, t, v_valid, t_valid)   # v: [2, 576, 4096], t: [2, 37, 4096]
    """
    return _launch(visual, text, visual_valid, text_valid, want_scores=False)[0]


def _rater_scores(visual: torch.Tensor, text: torch.Tensor, visual_valid: torch.Tensor,
                  text_valid: torch.Tensor) -> torch.Tensor:
    """s: [B, NT] fp32, the column means the threshold is taken on (zero at invalid text). For tests."""
    return _launch(visual, text, visual_valid, text_valid, want_scores=True)[1]
