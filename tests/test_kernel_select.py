"""Top-k selection and the compaction order against kernels/reference.py (compact: test_kernel_compact.py)."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, dtype_id
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.compact import compaction_order
from sparsevlm_engine.kernels.select import select_topk


def tie_free_scores(batch, length, seed):
    """A shuffled arange per row: distinct scores, so the selected set is unique."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=gen).float() - length / 2 for _ in range(batch)])


def random_mask(batch, length, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=gen) < p


def expected_kept_idx(kept, max_k):
    return ref.packed_slots(kept, max_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("batch,length", [(3, 97), (2, 577), (1, 5000)], ids=["B3-L97", "B2-L577", "B1-L5000"])
def test_topk_matches_reference_on_tie_free_scores(poisoned, batch, length, dtype):
    scores = tie_free_scores(batch, length, seed=length).to(dtype)
    candidates = random_mask(batch, length, 0.6, seed=1)
    k = torch.tensor([5, 0, 40][:batch]) if length < 1000 else torch.tensor([1500])
    got = select_topk(scores.to(DEVICE), candidates.to(DEVICE), k.to(DEVICE), int(k.max()) + 3)
    expected = ref.topk_mask(scores, candidates, k)
    assert torch.equal(got.kept.cpu(), expected)
    assert torch.equal(got.kept_idx.cpu(), expected_kept_idx(expected, int(k.max()) + 3))
    assert got.order is None


def test_topk_ties_go_to_the_lower_slot_and_k_is_capped(poisoned):
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -0.0, 0.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    candidates = torch.tensor([[True, True, True, True, False, True, True],
                               [False, True, False, True, False, False, False]])
    k = torch.tensor([2, 9])
    got = select_topk(scores.to(DEVICE), candidates.to(DEVICE), k.to(DEVICE), 4)
    expected = ref.topk_mask(scores, candidates, k)
    assert got.kept.cpu().tolist() == expected.tolist() == [
        [False, True, True, False, False, False, False], [False, True, False, True, False, False, False]]
    assert got.kept_idx.cpu().tolist() == [[1, 2, -1, -1], [1, 3, -1, -1]]
    signed_zero = select_topk(scores.to(DEVICE), candidates.to(DEVICE), torch.tensor([5, 0], device=DEVICE), 5)
    assert signed_zero.kept.cpu().tolist() == ref.topk_mask(scores, candidates, torch.tensor([5, 0])).tolist()


def test_infinite_scores_are_kept_first(poisoned):
    scores = torch.tensor([[0.5, float("inf"), -1.0, 0.7, float("-inf")]])
    candidates = torch.ones(1, 5, dtype=torch.bool)
    got = select_topk(scores.to(DEVICE), candidates.to(DEVICE), torch.tensor([2], device=DEVICE), 2)
    assert got.kept_idx.cpu().tolist() == [[1, 3]]


@pytest.mark.parametrize("length,width_extra", [(61, 0), (61, 4), (1100, 0)], ids=["L61", "L61-wider", "L1100"])
def test_compaction_order_matches_reference(poisoned, length, width_extra):
    alive = random_mask(4, length, 0.4, seed=length)
    alive[2] = False
    alive[3] = True
    alive[3, :5] = False
    width = int(alive.sum(1).max()) + width_extra
    got = compaction_order(alive.to(DEVICE), width).cpu()
    expected = ref.compaction_order(alive, torch.arange(length).expand(4, length), width)
    assert torch.equal(got, expected)


def test_select_returns_the_gather_map_of_the_kept_layout(poisoned):
    scores = tie_free_scores(2, 40, seed=3)
    visual = torch.zeros(2, 40, dtype=torch.bool)
    visual[:, 5:30] = True
    text = ~visual
    text[1, :3] = False  # padding
    k = torch.tensor([7, 4])
    width = int((text.sum(1) + k).max())
    got = select_topk(scores.to(DEVICE), visual.to(DEVICE), k.to(DEVICE), 7, keep_also=text.to(DEVICE), width=width)
    alive = text | ref.topk_mask(scores, visual, k)
    assert torch.equal(got.order.cpu(), ref.compaction_order(alive, torch.arange(40).expand(2, 40), width))


def test_selection_is_deterministic():
    scores = torch.randn(3, 300, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    candidates = torch.ones(3, 300, dtype=torch.bool, device=DEVICE)
    k = torch.tensor([10, 100, 299], device=DEVICE)
    first = select_topk(scores, candidates, k, 299)
    for _ in range(3):
        again = select_topk(scores, candidates, k, 299)
        assert torch.equal(again.kept, first.kept) and torch.equal(again.kept_idx, first.kept_idx)


def test_launchers_name_bad_inputs():
    scores = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"candidates has shape \[2, 9\]"):
        select_topk(scores, torch.ones(2, 9, dtype=torch.bool, device=DEVICE), torch.ones(2, dtype=torch.long,
                                                                                             device=DEVICE), 1)
    with pytest.raises(ValueError, match="width"):
        compaction_order(torch.ones(2, 10, dtype=torch.bool, device=DEVICE), 11)


def test_a_width_below_the_alive_count_writes_no_other_row(poisoned):
    """The gather map keeps a row's last `width` alive slots, as the reference does, and writes
    nothing outside the row (it once wrote the first ones before the row: into the previous one)."""
    alive = torch.zeros(3, 12, dtype=torch.bool)
    alive[:, 2:] = True
    width = 6
    got = compaction_order(alive.to(DEVICE), width).cpu()
    expected = ref.compaction_order(alive, torch.arange(12).expand(3, -1), width)
    assert torch.equal(got, expected)
