"""The token-recycling kernel (DPC-kNN clustering + cluster means) against the reference, row by row."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels.recycle import recycle


def make_batch(n_cand, n_clusters, n_slots, length, dim, dtype, index_dtype=torch.int64, seed=0):
    """Tie-free random hidden states; each row's candidates are a random ascending subset of L,
    and candidate slots past n_cand[b] hold -1 or out-of-range garbage."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(n_cand), length, dim, generator=gen).to(dtype)
    cand_idx = torch.full((len(n_cand), n_slots), -1, dtype=torch.int64)
    for b, n in enumerate(n_cand):
        cand_idx[b, :n] = torch.randperm(length, generator=gen)[:n].sort().values
        cand_idx[b, n:n + 1] = 10 * length  # garbage the kernel must ignore
    return (hidden.to(DEVICE), cand_idx.to(index_dtype).to(DEVICE),
            torch.tensor(n_cand, dtype=torch.int32, device=DEVICE),
            torch.tensor(n_clusters, dtype=torch.int64, device=DEVICE))


def check_against_reference(hidden, cand_idx, n_cand, n_clusters, width, merged, centres, assign):
    batch, n_slots = cand_idx.shape
    assert merged.shape == (batch, width, hidden.shape[2]) and merged.dtype == hidden.dtype
    assert centres.shape == (batch, width) and centres.dtype == torch.int64
    assert assign.shape == (batch, n_slots) and assign.dtype == torch.int64
    # The kernel accumulates in fp32 and rounds once to the output dtype: the fp32 tolerance of the
    # table plus half an ulp of that dtype (bf16's is above the table's rtol).
    atol, rtol = TOLERANCE[hidden.dtype]
    rtol += torch.finfo(hidden.dtype).eps / 2
    for b in range(batch):
        n, k = int(n_cand[b]), int(n_clusters[b])
        if n == 0:
            assert (centres[b] == -1).all()
            assert (assign[b] == -1).all()
            assert (merged[b] == 0).all()
            continue
        x = hidden[b, cand_idx[b, :n]]
        want_centres, want_assign = ref.dpc_knn(x, k)
        want_merged = ref.merge_clusters(x.float(), want_assign, k)  # fp32 means of the same values
        assert torch.equal(centres[b, :k], want_centres), f"row {b}"
        assert torch.equal(assign[b, :n], want_assign), f"row {b}"
        torch.testing.assert_close(merged[b, :k].float(), want_merged, atol=atol, rtol=rtol)
        assert (centres[b, k:] == -1).all()
        assert (assign[b, n:] == -1).all()
        assert (merged[b, k:] == 0).all()


CASES = [
    # (n_cand per row, n_clusters per row, N, L, d, C)
    pytest.param([29, 0, 1, 17], [5, 3, 1, 4], 29, 40, 37, 6, id="B4-N29-d37"),
    pytest.param([13, 7, 13], [13, 2, 1], 13, 20, 96, 13, id="B3-N13-d96"),
    pytest.param([61, 40], [9, 16], 61, 70, 37, 16, id="B2-N61-d37"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_cand, n_clusters, n_slots, length, dim, width", CASES)
def test_recycle_matches_reference(poisoned, n_cand, n_clusters, n_slots, length, dim, width, dtype):
    hidden, cand_idx, nc, ncl = make_batch(n_cand, n_clusters, n_slots, length, dim, dtype)
    merged, centres, assign = recycle(hidden, cand_idx, nc, ncl, width)
    check_against_reference(hidden, cand_idx, nc, ncl, width, merged, centres, assign)


def test_recycle_int32_indices_strided_hidden_one_row(poisoned):
    hidden, cand_idx, nc, ncl = make_batch([24], [6], 30, 33, 40, torch.float32, index_dtype=torch.int32, seed=3)
    padded = torch.zeros(1, 66, 40, device=DEVICE)
    padded[:, ::2] = hidden
    hidden = padded[:, ::2]  # strides (66 d, 2 d, 1)
    merged, centres, assign = recycle(hidden, cand_idx, nc, ncl, 8)
    check_against_reference(hidden, cand_idx, nc, ncl, 8, merged, centres, assign)


def test_recycle_centres_are_their_own_cluster_and_merge_single_members_exactly(poisoned):
    # n_clusters = n_cand: every candidate is a centre, so each cluster is one candidate.
    hidden, cand_idx, nc, ncl = make_batch([9, 5], [9, 5], 9, 12, 21, torch.float16, seed=5)
    merged, centres, assign = recycle(hidden, cand_idx, nc, ncl, 9)
    assert centres[0].tolist() == list(range(9))
    assert assign[0].tolist() == list(range(9))
    assert torch.equal(merged[0], hidden[0, cand_idx[0]])
    assert centres[1].tolist() == list(range(5)) + [-1] * 4
    assert torch.equal(merged[1, :5], hidden[1, cand_idx[1, :5]])


def test_recycle_is_deterministic():
    hidden, cand_idx, nc, ncl = make_batch([29, 0, 1, 17], [5, 3, 1, 4], 29, 40, 37, torch.bfloat16, seed=7)
    first = recycle(hidden, cand_idx, nc, ncl, 6)
    for _ in range(3):
        again = recycle(hidden, cand_idx, nc, ncl, 6)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_recycle_rejects_bad_inputs():
    hidden, cand_idx, nc, ncl = make_batch([5, 3], [2, 1], 6, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"cand_idx has shape \[3, 6\]"):
        recycle(hidden, cand_idx.repeat(2, 1)[:3], nc, ncl, 2)
    with pytest.raises(ValueError, match=r"n_cand has shape \[3\]"):
        recycle(hidden, cand_idx, torch.tensor([5, 3, 1], device=DEVICE), ncl, 2)
    with pytest.raises(ValueError, match="hidden must be fp32, fp16 or bf16"):
        recycle(hidden.to(torch.int32), cand_idx, nc, ncl, 2)
    with pytest.raises(ValueError, match="cand_idx must be an integer tensor"):
        recycle(hidden, cand_idx.float(), nc, ncl, 2)
    with pytest.raises(ValueError, match="max_clusters"):
        recycle(hidden, cand_idx, nc, ncl, 0)
    with pytest.raises(ValueError, match="at least one candidate"):
        recycle(hidden, cand_idx[:, :0], nc, ncl, 2)
