"""Top-k selection and compaction kernels against kernels/reference.py."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, dtype_id
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.compact import compact, compaction_order
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


def compact_case(dtype, batch=3, length=45, dim=37, rope_dim=24, n_merged=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    alive = random_mask(batch, length, 0.5, seed=seed)
    width = int(alive.sum(1).max())
    order = ref.compaction_order(alive, torch.arange(length).expand(batch, length), width)
    src = torch.stack([torch.randperm(length, generator=gen) for _ in range(batch)]) + 2
    meta = torch.stack([src, torch.randint(0, 99, (batch, length), generator=gen), alive.long()])
    cos = torch.randn(1, length + 2, rope_dim, generator=gen).expand(batch, -1, -1)
    sin = torch.randn(batch, length + 2, rope_dim, generator=gen)
    merged = torch.randn(batch, n_merged, dim, generator=gen).to(dtype)
    dead = [torch.nonzero(~alive[b]).flatten() for b in range(batch)]
    merged_slot = torch.stack([d[:n_merged] if len(d) >= n_merged else torch.full((n_merged,), -1) for d in dead])
    merged_slot[0, -1] = -1
    return hidden, order, meta, cos, sin, merged, merged_slot


def gather_reference(hidden, order, meta, cos, sin, position_ids, merged, merged_slot):
    pool = hidden.clone()
    for b in range(hidden.shape[0]):
        for c, slot in enumerate(merged_slot[b].tolist()):
            if slot >= 0:
                pool[b, slot] = merged[b, c]
    src = meta[0].gather(1, order)
    rows = src[..., None].expand(-1, -1, cos.shape[-1])
    pid = None
    if position_ids is not None:
        pid = position_ids.gather(-1, src.expand_as(position_ids[..., :src.shape[1]]))
    return (pool.gather(1, order[..., None].expand(-1, -1, hidden.shape[2])), meta.gather(2, order.expand_as(
        meta[..., :order.shape[1]])), cos.gather(1, rows), sin.gather(1, rows), pid)


@pytest.mark.parametrize("pid_planes", [0, 1, 3], ids=["no-pid", "pid-1d", "pid-3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compact_gathers_everything_in_one_pass(poisoned, dtype, pid_planes):
    hidden, order, meta, cos, sin, merged, merged_slot = compact_case(dtype)
    length0 = cos.shape[1]
    position_ids = None
    if pid_planes:
        position_ids = torch.arange(length0).expand(pid_planes, 3, length0) * torch.tensor([1, 10, 100][:pid_planes])[:, None, None]
        position_ids = position_ids[0] if pid_planes == 1 else position_ids
    got = compact(*[None if t is None else t.to(DEVICE) for t in (order, hidden, meta, cos, sin, position_ids, merged,
                                                                    merged_slot)])
    expected = gather_reference(hidden, order, meta, cos, sin, position_ids, merged, merged_slot)
    assert torch.equal(got.hidden.cpu(), expected[0])  # a pure gather: bit-exact in every dtype
    assert torch.equal(got.meta.cpu(), expected[1])
    assert torch.equal(got.cos.cpu(), expected[2]) and torch.equal(got.sin.cpu(), expected[3])
    if pid_planes:
        assert torch.equal(got.position_ids.cpu(), expected[4])
    else:
        assert got.position_ids is None


def test_compact_with_3d_rope_planes(poisoned):
    hidden, order, meta, cos, sin, _, _ = compact_case(torch.float32, seed=4)
    cos3 = torch.stack([cos, cos + 1, cos + 2])
    sin3 = torch.stack([sin, sin - 1, sin - 2])
    got = compact(order.to(DEVICE), hidden.to(DEVICE), meta.to(DEVICE), cos3.to(DEVICE), sin3.to(DEVICE))
    for p in range(3):
        expected = gather_reference(hidden, order, meta, cos3[p], sin3[p], None, hidden[:, :0], order[:, :0])
        assert torch.equal(got.cos[p].cpu(), expected[2]) and torch.equal(got.sin[p].cpu(), expected[3])


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
    with pytest.raises(ValueError, match="order must be"):
        compact(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), torch.zeros(2, 10, 4, device=DEVICE),
                torch.zeros(1, 2, 10, dtype=torch.long, device=DEVICE), torch.zeros(2, 10, 4, device=DEVICE),
                torch.zeros(2, 10, 4, device=DEVICE))
