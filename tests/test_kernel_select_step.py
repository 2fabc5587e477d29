"""A pruning layer's selection in one launch (select.select_step) against reference.select_step:
head weights, relevance, kept visual tokens (visual raters always kept), alive, recycling
candidates and the compacted layout's gather map."""
import pytest
import torch

from kernel_checks import DEVICE
from op_counting import count_device_ops
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.select import select_step


def step_case(batch, heads, length, seed, keep_share=0.4):
    """Left-padded rows with a visual span and raters after it (row 0 also has a visual rater).
    head_rel holds small multiples of 1/64 and there are 4 heads, so every relevance and head
    mass is exact in fp32 whatever the summation order, and ties (which are frequent) are broken
    by the rules alone."""
    gen = torch.Generator().manual_seed(seed)
    head_rel = torch.randint(0, 12, (batch, heads, length), generator=gen).float() / 64
    valid = torch.zeros(batch, length, dtype=torch.bool)
    visual = torch.zeros_like(valid)
    rater = torch.zeros_like(valid)
    keep, n_cand = [], []
    for b in range(batch):
        pad = (5 * b) % (length // 4)
        valid[b, pad:] = True
        start, n_visual = pad + 3, (length - pad) // 2 + b
        visual[b, start:start + n_visual] = True
        rater[b, start + n_visual + 1::2] = True
        if b == 0:
            rater[b, start + 2] = True
        keep.append(max(1, int(n_visual * keep_share)))
        n_cand.append((n_visual - keep[-1]) * 3 // 10 + 1)
    return head_rel, valid, visual, rater, torch.tensor(keep), torch.tensor(n_cand)


def _run_both(case, n_priority, recycling):
    head_rel, valid, visual, rater, keep, n_cand = case
    max_cand = int(n_cand.max()) if recycling else 0
    width = None if recycling else int(((valid & ~visual).sum(1) + torch.minimum(keep, (visual & valid).sum(1))).max())
    expected = ref.select_step(head_rel, valid, visual, rater, keep, n_cand, n_priority, max_cand, width)
    counts = torch.stack([keep, n_cand]).to(DEVICE)  # rows of one tensor: strided views, as the engine passes
    got = select_step(*(t.to(DEVICE) for t in (head_rel, valid, visual, rater)), counts[0], counts[1], n_priority,
                      max_cand, width)
    return got, expected


@pytest.mark.parametrize("recycling", [True, False], ids=["recycling", "no-recycling"])
@pytest.mark.parametrize("n_priority", [None, 2], ids=["all-heads", "priority-2"])
@pytest.mark.parametrize("batch,length", [(3, 97), (2, 300)])
def test_select_step_matches_reference(poisoned, batch, length, n_priority, recycling):
    got, expected = _run_both(step_case(batch, 4, length, seed=length), n_priority, recycling)
    torch.testing.assert_close(got.rel.cpu(), expected.rel, atol=0, rtol=0)
    for name in ("kept", "alive", "cand_idx", "order"):
        want = getattr(expected, name)
        assert (getattr(got, name) is None) == (want is None), name
        if want is not None:
            assert torch.equal(getattr(got, name).cpu(), want), name


def test_a_visual_rater_is_always_kept(poisoned):
    case = step_case(1, 4, 60, seed=3, keep_share=0.05)
    head_rel, _, visual, rater = case[:4]
    slot = int((rater & visual)[0].nonzero()[0])
    head_rel[0, :, slot] = 0.0  # the least relevant visual token, and still kept
    got, expected = _run_both(case, None, True)
    assert bool(got.kept[0, slot]) and torch.equal(got.kept.cpu(), expected.kept)


def test_priority_heads_change_the_selection(poisoned):
    case = step_case(2, 4, 97, seed=5)
    uniform, _ = _run_both(case, None, False)
    priority, _ = _run_both(case, 1, False)
    assert not torch.equal(uniform.kept, priority.kept)


def test_a_long_row_takes_the_multi_block_path(poisoned):
    got, expected = _run_both(step_case(1, 4, 4500, seed=7), None, False)
    assert torch.equal(got.kept.cpu(), expected.kept) and torch.equal(got.order.cpu(), expected.order)


def test_select_step_is_one_launch():
    head_rel, valid, visual, rater, keep, n_cand = (t.to(DEVICE) for t in step_case(2, 4, 97, seed=2))
    counts = torch.stack([keep, n_cand])
    width = int(((valid & ~visual).sum(1) + keep).max())
    for max_cand, width in ((int(n_cand.max()), None), (0, width)):
        with count_device_ops() as ops:
            select_step(head_rel, valid, visual, rater, counts[0], counts[1], 2, max_cand, width)
        assert dict(ops.launches) == {"_select_step_kernel": 1} and not ops.torch_ops, str(ops)


def test_select_step_names_bad_inputs():
    head_rel, valid, visual, rater, keep, n_cand = (t.to(DEVICE) for t in step_case(1, 4, 30, seed=1))
    with pytest.raises(ValueError, match="head_rel must be"):
        select_step(head_rel.half(), valid, visual, rater, keep, n_cand, None, 0, 10)
    with pytest.raises(ValueError, match="visual must be bool"):
        select_step(head_rel, valid, visual.int(), rater, keep, n_cand, None, 0, 10)
    with pytest.raises(ValueError, match="keep must be an integer"):
        select_step(head_rel, valid, visual, rater, keep.float(), n_cand, None, 0, 10)
    with pytest.raises(ValueError, match="give width without recycling"):
        select_step(head_rel, valid, visual, rater, keep, n_cand, None, 3, 10)
    with pytest.raises(ValueError, match="n_priority"):
        select_step(head_rel, valid, visual, rater, keep, n_cand, 0, 0, 10)
