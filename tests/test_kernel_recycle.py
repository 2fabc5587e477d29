"""The token-recycling kernels (DPC-kNN clustering, cluster means and the new layout's alive /
replace / order bookkeeping) against kernels/reference_recycle.py, row by row."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from op_counting import count_device_ops
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels import reference_recycle
from sparsevlm_engine.kernels.recycle import Recycled, recycle


def make_batch(n_cand, n_clusters, n_slots, length, dim, dtype, index_dtype=torch.int64, seed=0,
               hidden=None, slack=1):
    """Tie-free random hidden states (unless given); each row's candidates are a random
    ascending subset of L, and candidate slots past n_cand[b] hold -1 or out-of-range garbage;
    alive is a random share of the other slots. Returns the inputs of `recycle` with the
    width of the new layout (the largest alive count after recycling, plus slack, at most L)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(n_cand)
    if hidden is None:
        hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    cand_idx = torch.full((batch, n_slots), -1, dtype=torch.int64)
    alive = torch.rand(batch, length, generator=gen) < 0.4
    for b, n in enumerate(n_cand):
        cand_idx[b, :n] = torch.randperm(length, generator=gen)[:n].sort().values
        cand_idx[b, n:n + 1] = 10 * length  # garbage the kernel must ignore
        alive[b, cand_idx[b, :n]] = False
    counts = alive.sum(1) + torch.tensor([min(n, k) if n else 0 for n, k in zip(n_cand, n_clusters)])
    width = min(length, int(counts.max()) + slack)
    return (hidden.to(DEVICE), cand_idx.to(index_dtype).to(DEVICE),
            torch.tensor(n_cand, dtype=torch.int32, device=DEVICE),
            torch.tensor(n_clusters, dtype=torch.int64, device=DEVICE),
            alive.to(DEVICE), width)


def check(got, want, dtype):
    assert isinstance(got, Recycled)
    for name, a, b in zip(Recycled._fields, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
    assert got.merged.dtype == dtype and got.replace.dtype == torch.int32 and got.alive.dtype == torch.bool
    for name in ("centres", "assign", "alive", "replace", "order"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.merged.float(), want.merged.float(), atol=atol, rtol=rtol)


def run_both(*args):
    got = recycle(*args)
    return got, reference_recycle.recycle(*args)


def check_semantics(hidden, cand_idx, n_cand, n_clusters, got):
    """What the rows mean, independently of the reference module: `reference.dpc_knn` /
    `merge_clusters` on each row's candidates, padding past the counts, and the layout."""
    for b in range(hidden.shape[0]):
        n, k = int(n_cand[b]), int(n_clusters[b])
        if n == 0:
            assert (got.centres[b] == -1).all() and (got.assign[b] == -1).all() and (got.merged[b] == 0).all()
            assert (got.replace[b] == -1).all()
            continue
        x = hidden[b, cand_idx[b, :n].long()]
        want_centres, want_assign = ref.dpc_knn(x, k)
        assert torch.equal(got.centres[b, :k], want_centres), f"row {b}"
        assert torch.equal(got.assign[b, :n], want_assign), f"row {b}"
        atol, rtol = TOLERANCE[hidden.dtype]
        rtol += torch.finfo(hidden.dtype).eps / 2  # fp32 means, rounded once to the output dtype
        torch.testing.assert_close(got.merged[b, :k].float(), ref.merge_clusters(x.float(), want_assign, k),
                                   atol=atol, rtol=rtol)
        assert (got.centres[b, k:] == -1).all() and (got.assign[b, n:] == -1).all() and (got.merged[b, k:] == 0).all()
        slots = cand_idx[b, want_centres].long()
        assert got.alive[b, slots].all()
        assert torch.equal(got.replace[b, slots], torch.arange(k, dtype=torch.int32, device=hidden.device))
        assert int((got.replace[b] >= 0).sum()) == k
    # order holds each row's alive slots in slot order, right-aligned
    n_alive = got.alive.sum(1)
    width = got.order.shape[1]
    for b in range(hidden.shape[0]):
        tail = got.order[b, width - int(n_alive[b]):]
        assert torch.equal(tail, got.alive[b].nonzero()[:, 0])


CASES = [
    # (n_cand per row, n_clusters per row, N, L, d, C); rows with n_cand = 0 and 1 in the first
    pytest.param([29, 0, 1, 17], [5, 3, 1, 4], 29, 40, 37, 6, id="B4-N29-d37"),
    pytest.param([13, 7, 13], [13, 2, 1], 13, 20, 96, 13, id="B3-N13-d96"),
    pytest.param([61, 40], [9, 16], 61, 70, 37, 16, id="B2-N61-d37"),
    # more than one block of everything: pairwise tiles (64), row blocks, centre blocks (128),
    # merge cluster blocks (128), d blocks (64), L blocks (64)
    pytest.param([150, 90], [130, 20], 150, 200, 70, 130, id="B2-N150-C130-d70"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_cand, n_clusters, n_slots, length, dim, width", CASES)
def test_recycle_matches_reference(poisoned, n_cand, n_clusters, n_slots, length, dim, width, dtype):
    hidden, cand_idx, nc, ncl, alive, new_width = make_batch(n_cand, n_clusters, n_slots, length, dim, dtype)
    got, want = run_both(hidden, cand_idx, nc, ncl, width, alive, new_width)
    check(got, want, dtype)
    check_semantics(hidden, cand_idx, nc, ncl, got)


def test_recycle_empty_and_single_candidate_rows(poisoned):
    hidden, cand_idx, nc, ncl, alive, width = make_batch([0, 1, 0], [1, 1, 2], 5, 9, 20, torch.float16, seed=2)
    got, want = run_both(hidden, cand_idx, nc, ncl, 3, alive, width)
    check(got, want, torch.float16)
    assert torch.equal(got.alive[[0, 2]], alive[[0, 2]])
    assert (got.replace[[0, 2]] == -1).all()
    assert got.centres[1].tolist() == [0, -1, -1] and got.assign[1].tolist() == [0] + [-1] * 4
    assert torch.equal(got.merged[1, 0], hidden[1, cand_idx[1, 0]])
    assert int(got.replace[1, cand_idx[1, 0]]) == 0 and bool(got.alive[1, cand_idx[1, 0]])


def test_recycle_nothing_alive_width_zero(poisoned):
    hidden, cand_idx, nc, ncl, alive, _ = make_batch([0, 0], [1, 1], 4, 6, 16, torch.float32, seed=4)
    got, want = run_both(hidden, cand_idx, nc, ncl, 2, torch.zeros_like(alive), 0)
    check(got, want, torch.float32)
    assert got.order.shape == (2, 0) and not got.alive.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_recycle_exact_duplicates_tie_in_density_to_the_lower_index(poisoned, dtype):
    # Small integers: every distance is exact, so duplicates have identical distance rows and
    # exactly equal densities, and the lower index counts as the denser one.
    gen = torch.Generator().manual_seed(11)
    batch, length, dim, n = 2, 48, 24, 40
    hidden = torch.randint(-6, 7, (batch, length, dim), generator=gen).float()
    base = make_batch([n, 31], [6, 5], n, length, dim, dtype, seed=11, hidden=hidden)
    hidden, cand_idx = base[0].clone(), base[1]
    pairs = [(b, i, j) for b in range(batch) for i, j in ((2, 3), (10, 25), (17, 18), (4, 30))]
    for b, i, j in pairs:  # candidate j a copy of candidate i
        hidden[b, cand_idx[b, j]] = hidden[b, cand_idx[b, i]]
    hidden = hidden.to(dtype)
    got, want = run_both(hidden, cand_idx, *base[2:4], 6, *base[4:])
    check(got, want, dtype)
    check_semantics(hidden, cand_idx, base[2], base[3], got)
    for b, i, j in pairs:
        if j < int(base[2][b]):
            assert j not in got.centres[b].tolist(), (b, i, j)  # delta_j = dist to i = 0
            assert int(got.assign[b, i]) == int(got.assign[b, j]), (b, i, j)
    assert any(i in got.centres[b].tolist() for b, i, _ in pairs)  # a duplicate does win a centre


def test_recycle_strided_views_int32_indices(poisoned):
    hidden, cand_idx, nc, ncl, alive, width = make_batch([24, 0, 11], [6, 2, 3], 30, 33, 40, torch.float32,
                                                         index_dtype=torch.int32, seed=3)
    padded = torch.zeros(3, 66, 40, device=DEVICE)
    padded[:, ::2] = hidden
    hidden = padded[:, ::2]  # strides (66 d, 2 d, 1)
    wide_idx = torch.full((3, 60), -5, dtype=torch.int32, device=DEVICE)
    wide_idx[:, ::2] = cand_idx
    cand_idx = wide_idx[:, ::2]  # column stride 2
    counts = torch.zeros(2, 3, 3, dtype=torch.int64, device=DEVICE)  # [S, 3, B]
    counts[1, 0] = nc.long()
    counts[1, 2] = ncl
    rows_nc, rows_ncl = counts[1, 0], counts[1, 2]  # rows of [S, 3, B]: storage offsets
    cols = torch.zeros(3, 3, dtype=torch.int64, device=DEVICE)  # [B, 3]
    cols[:, 1] = nc.long()
    cols[:, 2] = ncl
    col_nc, col_ncl = cols[:, 1], cols[:, 2]  # stride 3
    wide_alive = torch.zeros(3, 33, 2, dtype=torch.bool, device=DEVICE)
    wide_alive[..., 1] = alive
    alive = wide_alive[..., 1]  # strides (66, 2)
    for n_cand, n_clusters in ((rows_nc, rows_ncl), (col_nc, col_ncl)):
        got, want = run_both(hidden, cand_idx, n_cand, n_clusters, 8, alive, width)
        check(got, want, torch.float32)
        check_semantics(hidden, cand_idx, n_cand, n_clusters, got)


def test_recycle_centres_are_their_own_cluster_and_merge_single_members_exactly(poisoned):
    # n_clusters = n_cand: every candidate is a centre, so each cluster is one candidate.
    hidden, cand_idx, nc, ncl, alive, width = make_batch([9, 5], [9, 5], 9, 12, 21, torch.float16, seed=5)
    got = recycle(hidden, cand_idx, nc, ncl, 9, alive, width)
    assert got.centres[0].tolist() == list(range(9))
    assert got.assign[0].tolist() == list(range(9))
    assert torch.equal(got.merged[0], hidden[0, cand_idx[0]])
    assert got.centres[1].tolist() == list(range(5)) + [-1] * 4
    assert torch.equal(got.merged[1, :5], hidden[1, cand_idx[1, :5]])
    for b, n in ((0, 9), (1, 5)):
        slots = cand_idx[b, :n]
        assert got.alive[b, slots].all()
        assert got.replace[b, slots].tolist() == list(range(n))
        assert torch.equal(got.order[b, width - int(got.alive[b].sum()):], got.alive[b].nonzero()[:, 0])


def test_recycle_is_two_launches_and_no_torch_op():
    args = make_batch([29, 0, 1, 17], [5, 3, 1, 4], 29, 40, 37, torch.bfloat16, seed=7)
    hidden, cand_idx, nc, ncl, alive, width = args
    with count_device_ops() as ops:
        recycle(hidden, cand_idx, nc, ncl, 6, alive, width)
    assert dict(ops.launches) == {"_pairwise_dist_kernel": 1, "_recycle_kernel": 1}, str(ops)
    assert not ops.torch_ops and ops.host_reads == 0, str(ops)


def visual_batch(n_cand, n_clusters, n_slots, length, dim, dtype, spans, seed=0, slack=1, keep=0.3):
    """Prompt-like rows: spans[b] = (pad, v0, v1): slots < pad are left padding (dead, not
    visual), [v0, v1) the image (visual), the rest text (alive; text after the image where
    v1 < L). The candidates are a random ascending subset of the image, a share `keep` of its
    other slots stays alive, at least one (keep = 0 for a row: no alive visual slot). Returns the inputs of
    `recycle` (width = the largest alive count after recycling + slack, at most L) and visual."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(n_cand)
    hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    cand_idx = torch.full((batch, n_slots), -1, dtype=torch.int64)
    alive = torch.zeros(batch, length, dtype=torch.bool)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    keeps = keep if isinstance(keep, (list, tuple)) else [keep] * batch
    for b, ((pad, v0, v1), n) in enumerate(zip(spans, n_cand)):
        assert pad <= v0 <= v1 <= length and n <= v1 - v0
        alive[b, pad:] = True
        visual[b, v0:v1] = True
        image = v0 + torch.randperm(v1 - v0, generator=gen)
        cand_idx[b, :n] = image[:n].sort().values
        cand_idx[b, n:n + 1] = 10 * length  # garbage the kernel must ignore
        alive[b, v0:v1] = False
        rest = image[n:]
        alive[b, rest[torch.rand(len(rest), generator=gen) < keeps[b]]] = True
        alive[b, rest[:1 if keeps[b] else 0]] = True  # at least one kept visual slot
    counts = alive.sum(1) + torch.tensor([min(n, k) if n else 0 for n, k in zip(n_cand, n_clusters)])
    width = min(length, int(counts.max()) + slack)
    visual = visual.t().contiguous().t()  # strides (1, B): read as given
    return (hidden.to(DEVICE), cand_idx.to(DEVICE), torch.tensor(n_cand, dtype=torch.int32, device=DEVICE),
            torch.tensor(n_clusters, dtype=torch.int64, device=DEVICE), alive.to(DEVICE), width, visual.to(DEVICE))


def check_visual_order(hidden, cand_idx, n_cand, n_clusters, alive, visual, got):
    """What order means with visual, independently of the reference module: each row's alive
    slots right-aligned after its last dead slots, the non-centre ones in slot order, the
    centres (by `reference.ranked_dpc_knn` score rank) right after the last input-alive visual slot."""
    width = got.order.shape[1]
    for b in range(hidden.shape[0]):
        n, k = int(n_cand[b]), int(n_clusters[b])
        centre_slots = []
        if n:
            x = hidden[b, cand_idx[b, :n].long()]
            centres, _, rank = ref.ranked_dpc_knn(x, k)
            centre_slots = cand_idx[b, centres[rank.argsort()]].tolist()  # highest score first
        base = (alive[b] & got.alive[b]).nonzero()[:, 0].tolist()
        kept_visual = (alive[b] & visual[b]).nonzero()[:, 0]
        assert len(kept_visual) or not n, f"row {b}: recycles without an alive visual slot"
        last = int(kept_visual[-1]) if len(kept_visual) else -1
        before = [slot for slot in base if slot <= last]
        want = before + centre_slots + [slot for slot in base if slot > last]
        row = got.order[b].tolist()
        assert row[width - len(want):] == want, f"row {b}"
        dead = (~got.alive[b]).nonzero()[:, 0].tolist()
        assert row[:width - len(want)] == dead[len(dead) - (width - len(want)):], f"row {b}"


VISUAL_CASES = [
    # (n_cand, n_clusters, N, L, d, C, spans (pad, v0, v1) per row, slack): text after the image,
    # left padding, rows with n_cand = 0 and 1, an image at the very end / start, a wider layout
    pytest.param([20, 0, 1, 12], [5, 3, 1, 4], 20, 48, 37, 6,
                 [(0, 4, 30), (10, 14, 40), (5, 8, 20), (3, 20, 48)], 0, id="B4-N20-d37-tight"),
    pytest.param([13, 7, 9], [13, 2, 1], 13, 40, 96, 13, [(2, 3, 25), (0, 0, 20), (6, 10, 30)], 4,
                 id="B3-N13-d96-wider"),
    pytest.param([61, 40], [9, 16], 61, 100, 37, 16, [(0, 10, 90), (15, 20, 75)], 1, id="B2-N61-d37"),
    # more than one block of centres (128), merge blocks, L blocks; centre ranks in several blocks
    pytest.param([150, 90], [130, 20], 150, 220, 70, 130, [(0, 5, 200), (20, 30, 210)], 2, id="B2-N150-C130-d70"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_cand, n_clusters, n_slots, length, dim, width, spans, slack", VISUAL_CASES)
def test_recycle_with_visual_matches_reference(poisoned, n_cand, n_clusters, n_slots, length, dim, width, spans,
                                               slack, dtype):
    hidden, cand_idx, nc, ncl, alive, new_width, visual = visual_batch(n_cand, n_clusters, n_slots, length, dim,
                                                                       dtype, spans, slack=slack)
    assert not visual.is_contiguous()
    got = recycle(hidden, cand_idx, nc, ncl, width, alive, new_width, visual)
    check(got, reference_recycle.recycle(hidden, cand_idx, nc, ncl, width, alive, new_width, visual), dtype)
    check_visual_order(hidden, cand_idx, nc, ncl, alive, visual, got)
    plain = recycle(hidden, cand_idx, nc, ncl, width, alive, new_width)
    for name in Recycled._fields[:-1]:  # visual changes the order only
        assert torch.equal(getattr(got, name), getattr(plain, name)), name
    assert not torch.equal(got.order, plain.order)


def test_recycle_with_visual_row_without_alive_visual_slot(poisoned):
    """A recycling row with no alive visual slot (callers never make one): the kernel still matches
    the reference, which sorts the centres by rank among the slot keys, and stays inside order."""
    hidden, cand_idx, nc, ncl, alive, width, visual = visual_batch(
        [9, 6, 5], [3, 2, 2], 9, 30, 24, torch.float32, [(2, 4, 20), (0, 0, 12), (0, 3, 20)], keep=[0.3, 0.0, 0.0])
    assert not (alive & visual)[1:].any() and bool(alive[1, 20])
    assert bool(alive[2, 0]) and not visual[2, 0]  # row 2: text at slot 0 (its key ties the first centre's)
    got = recycle(hidden, cand_idx, nc, ncl, 3, alive, width, visual)
    check(got, reference_recycle.recycle(hidden, cand_idx, nc, ncl, 3, alive, width, visual), torch.float32)
    for b, first in ((1, 0), (2, 1)):  # row 1: the centres come first; row 2: slot 0, then the centres
        start = width - int(got.alive[b].sum())
        centres = set((got.replace[b] >= 0).nonzero()[:, 0].tolist())
        assert len(centres) == 2 and set(got.order[b, start + first:start + first + 2].tolist()) == centres, b
    assert int(got.order[2, start]) == 0


def test_recycle_with_visual_hand_checked_order(poisoned):
    """L = 12, slots 0-1 padding, 2-8 the image, 9-11 text. Candidates hold 1-D points
    [0.0, 0.3, 5.0, 5.1, 5.2]: with 2 clusters the centres are candidates 0 and 2, candidate 2
    (the densest, delta = the largest distance) scoring highest. Row 0: candidates at slots
    3, 4, 6, 7, 8 and kept visual slots 2, 5: the recycled tokens (slots 6 then 3) follow slot 5.
    Row 1: candidates at 2-6, kept visual 7, 8: the recycled tokens (slots 4 then 2) follow slot 8,
    before the text. Row 2 recycles nothing: slot order."""
    length, dim = 12, 4
    points = torch.tensor([0.0, 0.3, 5.0, 5.1, 5.2])
    cand = torch.tensor([[3, 4, 6, 7, 8], [2, 3, 4, 5, 6], [-1] * 5])
    hidden = torch.zeros(3, length, dim)
    alive = torch.zeros(3, length, dtype=torch.bool)
    visual = torch.zeros(3, length, dtype=torch.bool)
    visual[:, 2:9] = True
    alive[:, 9:] = True
    for b in range(2):
        hidden[b, cand[b], 0] = points
    alive[0, [2, 5]] = True
    alive[1, [7, 8]] = True
    alive[2, [5, 6]] = True
    args = (hidden.to(DEVICE), cand.to(DEVICE), torch.tensor([5, 5, 0], device=DEVICE),
            torch.tensor([2, 2, 1], device=DEVICE), 2, alive.to(DEVICE), 8)
    got = recycle(*args, visual.to(DEVICE))
    assert got.centres.tolist() == [[0, 2], [0, 2], [-1, -1]]
    assert got.order.tolist() == [[8, 2, 5, 6, 3, 9, 10, 11],
                                  [6, 7, 8, 4, 2, 9, 10, 11],
                                  [4, 7, 8, 5, 6, 9, 10, 11]]
    assert recycle(*args).order.tolist() == [[8, 2, 3, 5, 6, 9, 10, 11],  # without visual: slot order
                                             [6, 2, 4, 7, 8, 9, 10, 11],
                                             [4, 7, 8, 5, 6, 9, 10, 11]]
    assert torch.equal(got.order, reference_recycle.recycle(*args, visual.to(DEVICE)).order)


def test_recycle_with_visual_score_ties_go_to_the_lower_candidate(poisoned):
    """Candidates at slots 1-3, 5-7 hold the points [0, 0, 0, 5, 5, 5] (exact distances): every
    density ties, candidates 0 and 3 get delta 2.5 and the duplicates delta 0, so the 4 centres
    are 0, 3 and the zero scores 1, 2 (ties to the lower index), placed in that order after the
    kept visual slot 4."""
    hidden = torch.zeros(1, 10, 4)
    cand = torch.tensor([[1, 2, 3, 5, 6, 7]])
    hidden[0, cand[0], 0] = torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])
    alive = torch.zeros(1, 10, dtype=torch.bool)
    alive[0, [4, 8, 9]] = True
    visual = torch.zeros(1, 10, dtype=torch.bool)
    visual[0, 1:8] = True
    args = (hidden.to(DEVICE), cand.to(DEVICE), torch.tensor([6], device=DEVICE), torch.tensor([4], device=DEVICE),
            4, alive.to(DEVICE), 7, visual.to(DEVICE))
    got = recycle(*args)
    assert got.centres.tolist() == [[0, 1, 2, 3]]
    assert got.order.tolist() == [[4, 1, 5, 2, 3, 8, 9]]
    assert torch.equal(got.order, reference_recycle.recycle(*args).order)


def test_recycle_with_visual_is_two_launches_and_no_torch_op():
    hidden, cand_idx, nc, ncl, alive, width, visual = visual_batch(
        [20, 0, 1, 12], [5, 3, 1, 4], 20, 48, 37, torch.bfloat16, [(0, 4, 30), (10, 14, 40), (5, 8, 20), (3, 20, 48)])
    with count_device_ops() as ops:
        got = recycle(hidden, cand_idx, nc, ncl, 6, alive, width, visual)
    assert dict(ops.launches) == {"_pairwise_dist_kernel": 1, "_recycle_kernel": 1}, str(ops)
    assert not ops.torch_ops and ops.host_reads == 0, str(ops)
    assert torch.equal(got.order, reference_recycle.recycle(hidden, cand_idx, nc, ncl, 6, alive, width, visual).order)


def test_recycle_rejects_bad_visual():
    hidden, cand_idx, nc, ncl, alive, width = make_batch([5, 3], [2, 1], 6, 8, 16, torch.float32)
    visual = torch.ones_like(alive)
    with pytest.raises(ValueError, match=r"recycle: visual has shape \[2, 7\], expected \[2, 8\]"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive, width, visual[:, :7])
    with pytest.raises(ValueError, match=r"recycle: visual has shape \[8\]"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive, width, visual[0])
    for dtype in (torch.int8, torch.float32):
        with pytest.raises(ValueError, match=f"recycle: visual must be a bool tensor, got {dtype}"):
            recycle(hidden, cand_idx, nc, ncl, 2, alive, width, visual.to(dtype))


def test_recycle_is_deterministic():
    hidden, cand_idx, nc, ncl, alive, width = make_batch([29, 0, 1, 17], [5, 3, 1, 4], 29, 40, 37,
                                                         torch.bfloat16, seed=7)
    first = recycle(hidden, cand_idx, nc, ncl, 6, alive, width)
    for _ in range(2):
        again = recycle(hidden, cand_idx, nc, ncl, 6, alive, width)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_recycle_rejects_bad_inputs():
    hidden, cand_idx, nc, ncl, alive, width = make_batch([5, 3], [2, 1], 6, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"cand_idx has shape \[3, 6\]"):
        recycle(hidden, cand_idx.repeat(2, 1)[:3], nc, ncl, 2, alive, width)
    with pytest.raises(ValueError, match=r"n_cand has shape \[3\]"):
        recycle(hidden, cand_idx, torch.tensor([5, 3, 1], device=DEVICE), ncl, 2, alive, width)
    with pytest.raises(ValueError, match="hidden must be fp32, fp16 or bf16"):
        recycle(hidden.to(torch.int32), cand_idx, nc, ncl, 2, alive, width)
    with pytest.raises(ValueError, match="cand_idx must be an integer tensor"):
        recycle(hidden, cand_idx.float(), nc, ncl, 2, alive, width)
    with pytest.raises(ValueError, match="max_clusters"):
        recycle(hidden, cand_idx, nc, ncl, 0, alive, width)
    with pytest.raises(ValueError, match="at least one candidate"):
        recycle(hidden, cand_idx[:, :0], nc, ncl, 2, alive, width)
    with pytest.raises(ValueError, match=r"alive has shape \[2, 7\]"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive[:, :7], width)
    with pytest.raises(ValueError, match="alive must be a bool tensor"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive.to(torch.int8), width)
    with pytest.raises(ValueError, match="width must be a host int"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive, 9)
    with pytest.raises(ValueError, match="width must be a host int"):
        recycle(hidden, cand_idx, nc, ncl, 2, alive, torch.tensor(4))
