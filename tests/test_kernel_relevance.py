"""Relevance kernels (row log-sum-exp, per-head relevance, Gram matrix, gravity table) against
kernels/reference.py."""
import math

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.relevance import gravity_table, head_relevance, rater_gram, rater_lse

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
    expected = ref.head_relevance(a, inputs[3])
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


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gravity_is_applied_from_the_relative_distance(poisoned, dtype):
    q, k, slot, r_ok, k_ok, visual = inputs = scoring_case(2, 4, 2, 4, 57, 16, dtype, seed=3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = (k_ok.long().cumsum(1) - 1).clamp(min=0)
    rater_pos = pos.gather(1, slot)
    delta = rater_pos[:, :, None] - pos[:, None, :]
    a = reference_rows(*inputs, 0.25, ref.rope_gravity(delta, inv_freq, 16))
    expected = ref.head_relevance(a, r_ok)
    table = gravity_table(inv_freq.to(DEVICE), 16, 57)
    got = head_relevance(*to_device(*inputs), 0.25, gravity=tuple(to_device(table, rater_pos, pos)))
    torch.testing.assert_close(got.cpu(), expected, atol=FP32[0], rtol=FP32[1])


def test_gravity_table_matches_reference(poisoned):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    got = gravity_table(inv_freq.to(DEVICE), 128, 3001).cpu()
    expected = ref.rope_gravity(torch.arange(3001), inv_freq, 128)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got[0].item() == pytest.approx(math.sqrt(128), rel=1e-6)


@pytest.mark.parametrize("priority", [False, True], ids=["uniform", "priority"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rater_gram_matches_reference(poisoned, dtype, priority):
    inputs = scoring_case(2, 4, 2, 21, 64, 16, dtype, seed=4)
    a = reference_rows(*inputs, 0.25)
    head_rel = ref.head_relevance(a, inputs[3])
    weights = ref.head_weights(head_rel, 2 if priority else None)
    expected = ref.rater_gram(a, inputs[3], weights)
    got = rater_gram(*to_device(*inputs), 0.25, weights.to(DEVICE)).cpu()
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
