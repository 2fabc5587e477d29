"""Relevance kernels (row log-sum-exp, per-head relevance, Gram matrix, gravity table) against
kernels/reference.py."""
import math

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from sparsevlm_engine.backends import TorchOps
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.relevance import gravity_table, head_relevance, rater_lse, rater_rows

FP32 = TOLERANCE[torch.float32]


def scoring_case(batch, heads, kv_heads, raters, length, head_dim, dtype, seed=0):
    """Random rater queries / keys with left padding, per-row rater counts and visual spans."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, raters, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    key_valid = torch.zeros(batch, length, dtype=torch.bool)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    rater_slot = torch.zeros(batch, raters, dtype=torch.long)
    rater_valid = torch.zeros(batch, raters, dtype=torch.bool)
    for b in range(batch):
        pad = (b * 7) % max(1, length // 3)
        key_valid[b, pad:] = True
        start = pad + 1 + b
        visual[b, start:start + (length - start) // 2] = True
        n_r = max(1, raters - b)
        text_slots = torch.arange(start + (length - start) // 2, length)
        pick = text_slots[torch.randperm(len(text_slots), generator=gen)[:n_r]].sort().values
        rater_slot[b, :len(pick)] = pick
        rater_valid[b, :len(pick)] = True
    return q, k, rater_slot, rater_valid, key_valid, visual


def reference_rows(q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity=None):
    slots = torch.arange(k.shape[2])
    visible = key_valid[:, None, :] & (slots[None, None, :] <= rater_slot[:, :, None]) & rater_valid[:, :, None]
    return ref.rater_attention(q, k, visible, visual, scaling, gravity)


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


CASES = [
    pytest.param(2, 4, 2, 5, 97, 16, id="B2-H4-Hkv2-R5-L97-D16"),
    pytest.param(3, 2, 2, 1, 33, 24, id="B3-H2-R1-L33-D24"),
    pytest.param(1, 4, 1, 19, 70, 32, id="B1-H4-Hkv1-R19-L70-D32"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("batch,heads,kv_heads,raters,length,head_dim", CASES)
def test_head_relevance_matches_reference(poisoned, batch, heads, kv_heads, raters, length, head_dim, dtype):
    inputs = scoring_case(batch, heads, kv_heads, raters, length, head_dim, dtype)
    scaling = head_dim ** -0.5
    a = reference_rows(*inputs, scaling)
    expected = ref.mean_over_raters(a, inputs[3])
    got = head_relevance(*to_device(*inputs), scaling)
    torch.testing.assert_close(got.cpu(), expected, atol=FP32[0], rtol=FP32[1])
    assert (expected[~inputs[5][:, None, :].expand_as(expected)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rater_lse_matches_logsumexp_of_the_full_row(poisoned, dtype):
    q, k, slot, r_ok, k_ok, visual = scoring_case(2, 4, 2, 6, 81, 16, dtype, seed=1)
    logits = torch.einsum("bhrd,bhld->bhrl", q.float(), k.float().repeat_interleave(2, 1)) * 0.25
    slots = torch.arange(81)
    visible = k_ok[:, None, :] & (slots[None, None, :] <= slot[:, :, None]) & r_ok[:, :, None]
    expected = torch.logsumexp(logits.masked_fill(~visible[:, None], float("-inf")), -1)
    got = rater_lse(*to_device(q, k, slot, r_ok, k_ok), 0.25).cpu()
    torch.testing.assert_close(got[r_ok[:, None].expand_as(got)], expected[r_ok[:, None].expand_as(got)],
                               atol=FP32[0], rtol=FP32[1])
    assert torch.isneginf(got[~r_ok[:, None].expand_as(got)]).all()


def test_head_relevance_accepts_a_given_lse(poisoned):
    inputs = scoring_case(2, 4, 2, 5, 60, 16, torch.float32, seed=2)
    dev = to_device(*inputs)
    lse = rater_lse(*dev[:5], 0.25)
    torch.testing.assert_close(head_relevance(*dev, 0.25, lse=lse), head_relevance(*dev, 0.25), atol=0, rtol=0)
    # a wrong normaliser must change the result: the kernel really reads the given lse
    assert not torch.allclose(head_relevance(*dev, 0.25, lse=lse + 1.0), head_relevance(*dev, 0.25))
    torch.testing.assert_close(lse.cpu(), ref.rater_lse(*inputs[:5], 0.25), atol=FP32[0], rtol=FP32[1])
    for given in (lse, lse + 1.0):  # the reference takes the same argument, with the same meaning
        torch.testing.assert_close(head_relevance(*dev, 0.25, lse=given).cpu(),
                                   ref.head_relevance(*inputs, 0.25, lse=given.cpu()), atol=FP32[0], rtol=FP32[1])


def test_head_relevance_is_one_launch_with_its_lse():
    from op_counting import count_device_ops

    dev = to_device(*scoring_case(2, 4, 2, 21, 70, 16, torch.float16, seed=2))
    with count_device_ops() as ops:
        head_relevance(*dev, 0.25)
    assert dict(ops.launches) == {"_head_relevance_kernel": 1} and not ops.torch_ops, str(ops)


def test_gravity_positions_by_source_index(poisoned):
    """index [B, L] maps each slot of a compacted layout to its source in the prompt's positions
    [S, B, L0] (mRoPE ids): the same as handing over the gathered positions."""
    inputs = scoring_case(2, 4, 2, 5, 40, 16, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(11)
    prompt_pos = torch.stack([torch.randint(0, n, (2, 64), generator=gen) for n in (5, 23, 19)])
    src = torch.stack([torch.randperm(64, generator=gen)[:40].sort().values for _ in range(2)])
    inv_freq = 1.0 / (30 ** (torch.arange(0, 16, 2).float() / 16))
    table = ref.gravity_table(inv_freq, 16, 32, [2, 3, 3])
    gathered = prompt_pos.gather(2, src[None].expand(3, -1, -1))
    dev = to_device(*inputs)
    by_index = head_relevance(*dev, 0.25, gravity=tuple(to_device(table, prompt_pos, src))).cpu()
    direct = head_relevance(*dev, 0.25, gravity=(*to_device(table, gathered), None)).cpu()
    torch.testing.assert_close(by_index, direct, atol=0, rtol=0)
    torch.testing.assert_close(by_index, ref.head_relevance(*inputs, 0.25, gravity=(table, prompt_pos, src)),
                               atol=FP32[0], rtol=FP32[1])
    assert not torch.allclose(by_index, head_relevance(*dev, 0.25).cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gravity_is_applied_from_the_relative_distance(poisoned, dtype):
    q, k, slot, r_ok, k_ok, visual = inputs = scoring_case(2, 4, 2, 4, 57, 16, dtype, seed=3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = (k_ok.long().cumsum(1) - 1).clamp(min=0)
    rater_pos = pos.gather(1, slot)
    delta = rater_pos[:, :, None] - pos[:, None, :]
    a = reference_rows(*inputs, 0.25, ref.rope_gravity(delta, inv_freq, 16))
    expected = ref.mean_over_raters(a, r_ok)
    table = gravity_table(inv_freq.to(DEVICE), 16, 57)
    got = head_relevance(*to_device(*inputs), 0.25, gravity=(table, *to_device(pos), None))
    torch.testing.assert_close(got.cpu(), expected, atol=FP32[0], rtol=FP32[1])


def test_gravity_table_matches_reference(poisoned):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    got = gravity_table(inv_freq.to(DEVICE), 128, 3001).cpu()
    assert got.shape == (1, 3001)
    torch.testing.assert_close(got, ref.gravity_table(inv_freq, 128, 3001), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref.gravity_guard(got[0]), ref.rope_gravity(torch.arange(3001), inv_freq, 128),
                               atol=1e-4, rtol=1e-4)
    assert got[0, 0].item() == pytest.approx(math.sqrt(128), rel=1e-6)


def test_gravity_table_per_section_matches_reference(poisoned):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    got = gravity_table(inv_freq.to(DEVICE), 128, 1001, [16, 24, 24]).cpu()
    assert got.shape == (3, 1001)
    torch.testing.assert_close(got, ref.gravity_table(inv_freq, 128, 1001, [16, 24, 24]), atol=1e-4, rtol=1e-4)
    assert got[:, 0].tolist() == pytest.approx([2 * n / math.sqrt(128) for n in (16, 24, 24)], rel=1e-6)
    torch.testing.assert_close(got.sum(0), gravity_table(inv_freq.to(DEVICE), 128, 1001)[0].cpu(),
                               atol=1e-4, rtol=1e-4)


def mrope_gravity_case(inputs, head_dim, sections, seed):
    """Random 3-D (t, h, w) positions [3, B, L] (per-axis deltas of both signs, |delta| < 23), the
    raters' [3, B, R], a short-wavelength inv_freq (rope base 30, so g changes sign) and the
    reference divisor [B, R, L]."""
    slot = inputs[2]
    gen = torch.Generator().manual_seed(seed)
    batch, length = inputs[4].shape
    pos = torch.stack([torch.randint(0, n, (batch, length), generator=gen) for n in (5, 23, 19)])
    rater_pos = pos.gather(2, slot[None].expand(3, -1, -1))
    delta = rater_pos[..., None] - pos[:, :, None, :]
    inv_freq = 1.0 / (30 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    divisor = ref.rope_gravity(delta, inv_freq, head_dim, sections=sections)
    seen = (reference_rows(*inputs, 1.0) != 0).any(1)
    assert (delta[:, seen] > 0).any(1).all() and (delta[:, seen] < 0).any(1).all()
    return inv_freq, rater_pos, pos, divisor, seen


MROPE_CASES = [
    pytest.param(2, 4, 2, 5, 97, 24, [2, 5, 5], id="B2-H4-Hkv2-R5-L97-D24-s255"),
    pytest.param(1, 2, 1, 19, 45, 16, [4, 2, 2], id="B1-H2-Hkv1-R19-L45-D16-s422"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("batch,heads,kv_heads,raters,length,head_dim,sections", MROPE_CASES)
def test_head_relevance_with_mrope_gravity(poisoned, batch, heads, kv_heads, raters, length, head_dim, sections,
                                           dtype):
    inputs = scoring_case(batch, heads, kv_heads, raters, length, head_dim, dtype, seed=6)
    scaling = head_dim ** -0.5
    inv_freq, rater_pos, pos, divisor, _ = mrope_gravity_case(inputs, head_dim, sections, seed=6)
    expected = ref.mean_over_raters(reference_rows(*inputs, scaling, divisor), inputs[3])
    assert not torch.allclose(expected, ref.mean_over_raters(reference_rows(*inputs, scaling), inputs[3]))
    table = gravity_table(inv_freq.to(DEVICE), head_dim, 32, sections)
    got = head_relevance(*to_device(*inputs), scaling, gravity=(table, *to_device(pos), None)).cpu()
    torch.testing.assert_close(got, expected, atol=FP32[0], rtol=FP32[1])
    short = table[:, :12]
    clamped = head_relevance(*to_device(*inputs), scaling, gravity=(short, *to_device(pos), None)).cpu()
    torch_ops = TorchOps().head_relevance(*inputs, scaling, gravity=(short.cpu(), pos, None))
    torch.testing.assert_close(clamped, torch_ops, atol=FP32[0], rtol=FP32[1])
    assert not torch.allclose(clamped, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_rater_rows_with_mrope_gravity(poisoned, dtype):
    inputs = scoring_case(2, 4, 2, 21, 53, 24, dtype, seed=7)
    inv_freq, rater_pos, pos, divisor, seen = mrope_gravity_case(inputs, 24, [2, 5, 5], seed=7)
    assert (divisor[seen] < 0).any()
    a = reference_rows(*inputs, 0.2, divisor)
    weights = ref.head_weights(ref.mean_over_raters(a, inputs[3]), 2)
    expected = ref.weighted_rows(a, inputs[3], weights)
    table = gravity_table(inv_freq.to(DEVICE), 24, 32, [2, 5, 5])
    got = rater_rows(*to_device(*inputs), 0.2, weights.to(DEVICE), gravity=(table, *to_device(pos), None))
    scale = expected.abs().max()
    torch.testing.assert_close(got.cpu() / scale, expected / scale, atol=FP32[0], rtol=FP32[1])
    torch_ops = TorchOps().rater_rows(*inputs, 0.2, weights, gravity=(table.cpu(), pos, None))
    torch.testing.assert_close(got.cpu() / scale, torch_ops / scale, atol=FP32[0], rtol=FP32[1])


def test_one_section_gravity_is_1d_rope(poisoned):
    """S = 1 takes [B, R] / [B, L] or [1, B, R] / [1, B, L] positions alike, and three sections fed
    the same 1-D positions (a text token under mRoPE) give the 1-D RoPE result."""
    inputs = scoring_case(2, 4, 2, 6, 61, 16, torch.float32, seed=8)
    slot, k_ok = inputs[2], inputs[4]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = (k_ok.long().cumsum(1) - 1).clamp(min=0)
    rater_pos = pos.gather(1, slot)
    dev = to_device(*inputs)
    w = torch.full((2, 4), 0.25, device=DEVICE)
    table = gravity_table(inv_freq.to(DEVICE), 16, 61)
    flat = (table, *to_device(pos), None)
    stacked = (table, *to_device(pos[None]), None)
    assert torch.equal(head_relevance(*dev, 0.25, gravity=flat), head_relevance(*dev, 0.25, gravity=stacked))
    assert torch.equal(rater_rows(*dev, 0.25, w, gravity=flat), rater_rows(*dev, 0.25, w, gravity=stacked))
    table3 = gravity_table(inv_freq.to(DEVICE), 16, 61, [2, 3, 3])
    same = (table3, *to_device(pos.expand(3, -1, -1)), None)
    torch.testing.assert_close(head_relevance(*dev, 0.25, gravity=same), head_relevance(*dev, 0.25, gravity=flat),
                               atol=FP32[0], rtol=FP32[1])
    torch.testing.assert_close(rater_rows(*dev, 0.25, w, gravity=same), rater_rows(*dev, 0.25, w, gravity=flat),
                               atol=FP32[0], rtol=FP32[1])


def test_gravity_launchers_name_bad_sections_and_shapes():
    dev = to_device(*scoring_case(1, 4, 2, 3, 20, 16, torch.float32))
    inv_freq = (1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))).to(DEVICE)
    with pytest.raises(ValueError, match=r"sections \[2, 3, 2\].*8 frequency pairs.*\[8\]"):
        gravity_table(inv_freq, 16, 20, [2, 3, 2])
    with pytest.raises(ValueError, match=r"sections \[0, 4, 4\]"):
        gravity_table(inv_freq, 16, 20, [0, 4, 4])
    with pytest.raises(ValueError, match="sections"):
        TorchOps().gravity_table(inv_freq, 16, 20, [4, 4, 1])
    pos = torch.zeros(1, 20, dtype=torch.long, device=DEVICE)
    table3 = gravity_table(inv_freq, 16, 20, [2, 3, 3])
    with pytest.raises(ValueError, match=r"positions has shape \[1, 20\], expected \[3, 1, \*\]"):
        head_relevance(*dev, 0.25, gravity=(table3, pos, None))
    with pytest.raises(ValueError, match=r"positions has shape \[3, 1, 12\], expected \[3, 1, 20\]"):
        rater_rows(*dev, 0.25, torch.ones(1, 4, device=DEVICE), gravity=(table3, pos[:, :12].expand(3, -1, -1), None))
    with pytest.raises(ValueError, match=r"index has shape \[1, 12\], expected \[1, 20\]"):
        head_relevance(*dev, 0.25, gravity=(table3, pos.expand(3, -1, -1), pos[:, :12]))
    with pytest.raises(ValueError, match=r"\[S, T\]"):
        head_relevance(*dev, 0.25, gravity=(table3[0], pos, None))


@pytest.mark.parametrize("priority", [False, True], ids=["uniform", "priority"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rater_rows_match_reference(poisoned, dtype, priority):
    inputs = scoring_case(2, 4, 2, 21, 64, 16, dtype, seed=4)
    a = reference_rows(*inputs, 0.25)
    head_rel = ref.mean_over_raters(a, inputs[3])
    weights = ref.head_weights(head_rel, 2 if priority else None)
    expected = ref.weighted_rows(a, inputs[3], weights)
    got = rater_rows(*to_device(*inputs), 0.25, weights.to(DEVICE)).cpu()
    assert (got[~inputs[3]] == 0).all() and (got * ~inputs[5][:, None, :] == 0).all()
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, atol=FP32[0], rtol=FP32[1])


def test_relevance_is_deterministic():
    dev = to_device(*scoring_case(2, 4, 2, 7, 90, 16, torch.float16, seed=5))
    first = head_relevance(*dev, 0.25)
    for _ in range(3):
        assert torch.equal(head_relevance(*dev, 0.25), first)


def test_launcher_names_bad_shapes():
    q, k, slot, r_ok, k_ok, visual = to_device(*scoring_case(1, 4, 2, 3, 20, 16, torch.float32))
    with pytest.raises(ValueError, match="key_valid"):
        head_relevance(q, k, slot, r_ok, k_ok[:, :5], visual, 0.25)
    with pytest.raises(ValueError, match="multiple of key heads"):
        head_relevance(q[:, :3], k, slot, r_ok, k_ok, visual, 0.25)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        rater_lse(q.long(), k.long(), slot, r_ok, k_ok, 0.25)
    with pytest.raises(ValueError, match="must be bool"):
        head_relevance(q, k, slot, r_ok.int(), k_ok, visual, 0.25)


@pytest.mark.cuda
def test_head_relevance_takes_the_lse_of_torchs_varlen_flash_attention():
    """The row log-sum-exp FlashAttention returns (torch.nn.attention.varlen, torch >= 2.10) is the
    one head_relevance computes: handing it over gives the same relevance without recomputing it."""
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    heads, length, head_dim, scaling = 4, 300, 64, 64 ** -0.5
    _, k, slot, r_ok, k_ok, visual = (t.cuda() for t in scoring_case(1, heads, heads, 8, length, head_dim,
                                                                       torch.bfloat16, seed=9))
    k_ok.fill_(True)  # one unpadded sequence, as varlen_attn sees it
    q_all = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
    q = q_all.gather(2, slot[:, None, :, None].expand(-1, heads, -1, head_dim))
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen.varlen_attn).parameters \
        else {"is_causal": True}
    to_thd = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731  [B=1, H, T, D] -> [T, H, D]
    _, lse = varlen.varlen_attn(to_thd(q_all), to_thd(k), to_thd(k), cu, cu, length, length, scale=scaling,
                                return_aux=varlen.AuxRequest(lse=True), **causal)
    lse = lse if lse.shape[0] == heads else lse.transpose(0, 1)  # [H, T]
    rater_lse = lse.float().gather(1, slot.expand(heads, -1))[None]  # [1, H, R]
    torch.testing.assert_close(rater_lse, ref.rater_lse(q, k, slot, r_ok, k_ok, scaling), atol=2e-3, rtol=2e-3)
    given = head_relevance(q, k, slot, r_ok, k_ok, visual, scaling, lse=rater_lse.contiguous())
    own = head_relevance(q, k, slot, r_ok, k_ok, visual, scaling)
    torch.testing.assert_close(given, own, atol=1e-4, rtol=2e-3)



def test_no_raters_means_no_relevance():
    q, k, slot, r_ok, k_ok, visual = to_device(*scoring_case(2, 4, 2, 3, 20, 16, torch.float32))
    got = head_relevance(q[:, :, :0], k, slot[:, :0], r_ok[:, :0], k_ok, visual, 0.25)
    assert got.shape == (2, 4, 20) and not got.any()
