"""The rater-queries kernel (input_layernorm -> q_proj -> RoPE at the rater slots, one launch)
against kernels/reference_queries.py and against transformers' own Llama layer."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from op_counting import count_device_ops
from sparsevlm_engine.kernels import reference_queries as ref
from sparsevlm_engine.kernels.queries import rater_queries


def rope_tables(batch, length, head_dim, planes, gen):
    """cos, sin [planes, 1, L, D] fp32 from random positions per plane (halves repeated, as RoPE)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    pos = torch.randint(0, 64, (planes, 1, length), generator=gen).float()
    angles = pos[..., None] * inv_freq
    angles = torch.cat((angles, angles), -1)
    return angles.cos(), angles.sin()


def queries_case(dtype, batch=3, length=45, width=40, heads=2, head_dim=32, planes=1, bias=True, seed=0):
    """Rows: 0 plain, 1 left-padded, 2 (if any) without raters, others left-padded more. hidden is a
    strided slice; cos / sin are expanded over the batch (batch stride 0)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width + 8, generator=gen).to(dtype)[:, :, 3:3 + width]
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b in range(1, batch):
        valid[b, :5 * b] = False
    rater = torch.rand(batch, length, generator=gen) < 0.7
    if batch > 2:
        rater[2] = False
    norm_weight = (1 + 0.2 * torch.randn(width, generator=gen)).to(dtype)
    weight = (torch.randn(heads * head_dim, width, generator=gen) / width ** 0.5).to(dtype)
    b_ = (0.1 * torch.randn(heads * head_dim, generator=gen)).to(dtype) if bias else None
    cos, sin = rope_tables(batch, length, head_dim, planes, gen)
    cos, sin = (t.to(dtype).expand(planes, batch, length, head_dim) for t in (cos, sin))
    if planes == 1:
        cos, sin = cos[0], sin[0]
    n_slots = int((rater & valid).sum(1).max()) + 3
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(hidden=to(hidden), rater=to(rater), valid=to(valid), n_slots=n_slots, norm_weight=to(norm_weight),
                eps=1e-5, weight=to(weight), bias=to(b_), cos=to(cos), sin=to(sin))


def mrope_planes(head_dim, sections):
    """plane_of_dim of transformers' mRoPE mixing: pair p reads the plane of its section, i % 3."""
    pairs = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(sections)])
    return torch.cat((pairs, pairs))


def check_against_reference(case):
    q, slot, ok = rater_queries(**case)
    q_ref, slot_ref, ok_ref = ref.rater_queries(**case)
    assert q.dtype == case["hidden"].dtype and q.shape == q_ref.shape
    assert torch.equal(slot, slot_ref) and torch.equal(ok, ok_ref)
    atol, rtol = TOLERANCE[q.dtype]
    torch.testing.assert_close(q.float(), q_ref.float(), atol=atol, rtol=rtol)
    return q, slot, ok


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(poisoned, dtype, bias):
    case = queries_case(dtype, bias=bias)
    assert case["n_slots"] > 16  # several r-blocks
    q, slot, ok = check_against_reference(case)
    assert not ok[2].any() and (slot[2] == -1).all() and (q[2] == 0).all()  # the row without raters
    assert (slot[1][ok[1]] >= 5).all()  # left padding is never a rater
    assert (q[:, :, ~ok.any(0)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mrope_planes(poisoned, dtype):
    case = queries_case(dtype, batch=2, planes=3, seed=1)
    sections = [4, 6, 6]
    plane = mrope_planes(32, sections).to(torch.int32).to(DEVICE)
    q, slot, ok = check_against_reference(dict(case, plane_of_dim=plane))
    # the same as the P = 1 kernel on transformers' pre-mixed tables (Qwen2.5-VL's mixing)
    mixed = {k: torch.cat([m[i % 3] for i, m in enumerate(case[k].split(sections * 2, dim=-1))], -1)
             for k in ("cos", "sin")}
    q_mixed, slot_mixed, _ = rater_queries(**dict(case, **mixed))
    assert torch.equal(q, q_mixed) and torch.equal(slot, slot_mixed)


def test_head_dim_with_masked_half(poisoned):
    """D = 48: each half (24) fills part of a 32-wide block; int64 plane_of_dim of all zeros."""
    case = queries_case(torch.float16, batch=2, length=20, width=24, heads=3, head_dim=48, seed=2)
    check_against_reference(dict(case, plane_of_dim=torch.zeros(48, dtype=torch.int64, device=DEVICE)))


def test_more_slots_than_tokens(poisoned):
    case = queries_case(torch.float32, batch=2, length=9, width=16, heads=1, seed=3)
    q, slot, ok = check_against_reference(dict(case, n_slots=20))
    assert (slot[:, 9:] == -1).all() and not ok[:, 9:].any()


def test_no_slots():
    case = queries_case(torch.float32, batch=2, length=9, width=16, heads=1)
    q, slot, ok = rater_queries(**dict(case, n_slots=0))
    assert q.shape == (2, 1, 0, 32) and slot.shape == ok.shape == (2, 0)


def test_matches_transformers_llama_layer(poisoned):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)

    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, attention_bias=True, rms_norm_eps=1e-5, vocab_size=16)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.normal_(1.0, 0.2)
        layer.self_attn.q_proj.bias.normal_(0.0, 0.1)
    batch, length = 2, 24
    hidden = torch.randn(batch, length, 64)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :6] = False
    rater = torch.rand(batch, length) < 0.6
    position_ids = (valid.cumsum(1) - 1).clamp(min=0)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    n_slots = int((rater & valid).sum(1).max())
    with torch.no_grad():
        attn = layer.self_attn
        q_all = attn.q_proj(layer.input_layernorm(hidden)).view(batch, length, 2, 32).transpose(1, 2)
        q_all, _ = apply_rotary_pos_emb(q_all, q_all, cos, sin)
        q, slot, ok = rater_queries(hidden.to(DEVICE), rater.to(DEVICE), valid.to(DEVICE), n_slots,
                                    layer.input_layernorm.weight.to(DEVICE), layer.input_layernorm.variance_epsilon,
                                    attn.q_proj.weight.to(DEVICE), attn.q_proj.bias.to(DEVICE), cos.to(DEVICE),
                                    sin.to(DEVICE))
    q, slot, ok = q.cpu(), slot.cpu(), ok.cpu()
    atol, rtol = TOLERANCE[torch.float32]
    for b in range(batch):
        slots = torch.nonzero(rater[b] & valid[b]).flatten()
        assert torch.equal(slot[b, :len(slots)], slots) and ok[b].sum() == len(slots)
        torch.testing.assert_close(q[b, :, :len(slots)], q_all[b, :, slots], atol=atol, rtol=rtol)
        assert (q[b, :, len(slots):] == 0).all()


def test_one_launch_and_no_torch_op():
    case = queries_case(torch.float16, batch=2, planes=3)
    case["plane_of_dim"] = mrope_planes(32, [4, 6, 6]).to(DEVICE)
    with count_device_ops() as ops:
        rater_queries(**case)
    assert dict(ops.launches) == {"_rater_queries_kernel": 1}, ops
    assert not ops.torch_ops and ops.host_reads == 0, ops


@pytest.mark.parametrize("change,message", [
    (lambda c: dict(c, valid=c["valid"].int()), "valid must be bool"),
    (lambda c: dict(c, cos=c["cos"][..., :31], sin=c["sin"][..., :31]), "head dim"),
    (lambda c: dict(c, weight=c["weight"][:40]), "weight must be"),
    (lambda c: dict(c, plane_of_dim=torch.zeros(32, device=DEVICE)), "plane_of_dim must be int32"),
    (lambda c: dict(c, bias=c["bias"].float()), "bias is torch.float32"),
], ids=["valid-dtype", "head-dim", "weight-shape", "plane-dtype", "bias-dtype"])
def test_invalid_inputs(change, message):
    case = change(queries_case(torch.float16, batch=2, length=8, width=16))
    with pytest.raises(ValueError, match=message) as info:
        rater_queries(**case)
    assert "\n" not in str(info.value) and str(info.value).startswith("rater_queries:")
