"""The reference ops on small hand-checked inputs."""
import math

import pytest
import torch

from sparsevlm_engine.kernels import reference as ref
from transcription import dpc_knn as dpc_knn_loops


def test_select_raters_thresholds_at_the_mean():
    visual = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[[3.0, 0.0], [0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    text_valid = torch.tensor([[True, True, True, False]])
    raters = ref.select_raters(visual, text, torch.tensor([[True, True]]), text_valid)
    # softmax over (3, 0, 2) = (0.705, 0.035, 0.259); mean 1/3 -> only the first
    assert raters.tolist() == [[True, False, False, False]]


def test_select_raters_falls_back_to_all_text_when_scores_tie():
    visual = torch.randn(1, 3, 4)
    text = torch.zeros(1, 2, 4)
    raters = ref.select_raters(visual, text, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    assert raters.tolist() == [[True, True]]


def test_rope_gravity_at_zero_distance_is_sqrt_head_dim():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    g = ref.rope_gravity(torch.tensor([0, 3]), inv_freq, 8)
    assert g[0].item() == pytest.approx(math.sqrt(8), rel=1e-6)
    expected = sum(2 * math.cos(3 * t) for t in inv_freq.tolist()) / math.sqrt(8)
    assert g[1].item() == pytest.approx(expected, rel=1e-5)


def test_mrope_gravity_is_a_double_loop_over_sections_and_pairs():
    head_dim, sections = 128, [16, 24, 24]
    theta = (1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))).tolist()
    deltas = [(0, 0, 0), (1, -4, 7), (-3, 12, -25), (5, 0, -1), (0, 40, 33)]
    g = ref.rope_gravity(torch.tensor(deltas).T, torch.tensor(theta), head_dim, sections=sections)
    for i, delta in enumerate(deltas):
        expected, p = 0.0, 0
        for s, n_pairs in enumerate(sections):
            for _ in range(n_pairs):
                expected += 2 * math.cos(delta[s] * theta[p]) / math.sqrt(head_dim)
                p += 1
        assert g[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert g[0].item() == pytest.approx(math.sqrt(head_dim), rel=1e-6)
    assert not torch.allclose(g, ref.rope_gravity(torch.tensor(deltas)[:, 1], torch.tensor(theta), head_dim))


def test_gravity_guard_acts_on_the_total_over_sections():
    inv_freq = torch.tensor([math.pi, math.pi])
    g = ref.rope_gravity(torch.tensor([[0, 1, 1], [1, 1, 0]]), inv_freq, 4, sections=[1, 1])
    assert g.tolist() == pytest.approx([1e-6, -2.0, 1e-6], rel=1e-6)
    guarded = ref.gravity_guard(torch.tensor([0.0, -0.0, 3e-9, -3e-9, -2.5]))
    assert guarded.tolist() == pytest.approx([1e-6, 1e-6, 1e-6, -1e-6, -2.5], rel=1e-6)


def test_gravity_table_sections_split_the_1d_table():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    table = ref.gravity_table(inv_freq, 16, 50, [2, 3, 3])
    assert table.shape == (3, 50)
    torch.testing.assert_close(table.sum(0), ref.gravity_table(inv_freq, 16, 50)[0])
    torch.testing.assert_close(table[1], 2 * torch.cos(torch.arange(50.0)[:, None] * inv_freq[2:5]).sum(-1) / 4)
    with pytest.raises(ValueError, match=r"sections \[2, 3, 2\].*8 frequency pairs"):
        ref.gravity_table(inv_freq, 16, 50, [2, 3, 2])
    with pytest.raises(ValueError, match=r"delta has shape \[2, 5\], expected \[3, ...\]"):
        ref.rope_gravity(torch.zeros(2, 5, dtype=torch.long), inv_freq, 16, sections=[2, 3, 3])


def test_gravity_lookup_uses_the_absolute_per_section_distance_clamped_to_the_table():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    table = ref.gravity_table(inv_freq, 16, 6, [2, 3, 3])
    rater_pos = torch.tensor([[[3]], [[0]], [[9]]])
    key_pos = torch.tensor([[[1, 5]], [[2, 0]], [[0, 9]]])
    got = ref.gravity_lookup(table, rater_pos, key_pos)
    delta = torch.tensor([[[[2, 2]]], [[[2, 0]]], [[[5, 0]]]])
    torch.testing.assert_close(got, ref.rope_gravity(delta, inv_freq, 16, sections=[2, 3, 3]))
    one = ref.gravity_table(inv_freq, 16, 6)
    torch.testing.assert_close(ref.gravity_lookup(one, rater_pos[0], key_pos[0]),
                               ref.rope_gravity(torch.tensor([[[2, 2]]]), inv_freq, 16))
    with pytest.raises(ValueError, match=r"S = 3, got \[1, 1\] and \[1, 2\]"):
        ref.gravity_lookup(table, rater_pos[0], key_pos[0])


def test_rater_attention_normalises_over_the_full_row():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 6, 8)
    visible = torch.ones(1, 2, 6, dtype=torch.bool)
    visible[0, 0, 5] = False
    visual = torch.tensor([[False, True, True, True, False, False]])
    a = ref.rater_attention(q, k, visible, visual, 0.5)
    full = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5 + torch.where(visible[:, None], 0.0, -1e9), -1)
    torch.testing.assert_close(a[..., 1:4], full[..., 1:4])
    assert (a[..., [0, 4, 5]] == 0).all()
    assert (a.sum(-1) < 1).all()


def test_priority_heads_pick_the_heads_with_most_visual_attention():
    a = torch.zeros(1, 4, 1, 3)
    a[0, 2] = 0.9
    a[0, 0] = 0.5
    a[0, 1] = 0.5
    head_rel = ref.mean_over_raters(a, torch.tensor([[True]]))
    weights = ref.head_weights(head_rel, 2)
    assert weights.tolist() == [[0.5, 0.0, 0.5, 0.0]]  # head 2, then the tie 0/1 goes to head 0
    assert ref.head_weights(head_rel, None).tolist() == [[0.25] * 4]


def test_head_relevance_averages_valid_raters_only():
    a = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    rel = ref.mean_over_raters(a, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(rel, (a[:, :, 0] + a[:, :, 2]) / 2)
    weights = torch.tensor([[0.25, 0.75]])
    torch.testing.assert_close(ref.relevance(rel, weights), 0.25 * rel[:, 0] + 0.75 * rel[:, 1])


def test_packed_slots_pads_with_minus_one():
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert ref.packed_slots(mask, 3).tolist() == [[1, 3, -1], [0, -1, -1]]


def test_topk_ties_go_to_the_lower_slot():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    cand = torch.tensor([[True, True, True, True, False]])
    assert ref.topk_mask(scores, cand, torch.tensor([2])).tolist() == [[False, True, True, False, False]]
    assert ref.topk_mask(scores, cand, torch.tensor([1])).tolist() == [[False, True, False, False, False]]


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_numerical_rank_matches_matrix_rank(rows):
    torch.manual_seed(rows)
    base = torch.rand(2, 20)
    P = torch.cat([base, base[:1].repeat(rows, 1) * 2], 0)[:rows] if rows > 2 else torch.rand(rows, 20)
    padded = torch.zeros(1, rows + 2, 26)  # zero rows and columns, as padding raters and text keys give
    padded[0, :rows, 3:23] = P
    got = ref.numerical_rank(padded, torch.tensor([rows]), torch.tensor([20]))
    assert got.item() == torch.linalg.matrix_rank(P).item()


def test_numerical_rank_resolves_what_an_fp32_gram_matrix_cannot():
    """Singular values 1, 0.3 and 1e-5: the last is well above matrix_rank's tolerance (~2.4e-6),
    but its square 1e-10 is below the rounding of an fp32 Gram matrix P P^T, which misplaces it."""
    u, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    P = (u @ torch.diag(torch.tensor([1.0, 0.3, 1e-5], dtype=torch.float64)) @ v.T).float()
    assert torch.linalg.matrix_rank(P).item() == 3
    assert ref.numerical_rank(P[None], torch.tensor([3]), torch.tensor([20])).item() == 3
    sigma_from_gram = torch.linalg.eigvalsh((P @ P.T).double()).clamp(min=0).sqrt()
    assert not 0.5e-5 < sigma_from_gram.min() < 2e-5


@pytest.mark.parametrize("n,c", [(7, 1), (23, 3), (40, 4)])
def test_dpc_knn_matches_the_loop_transcription(n, c):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
    centres, assign = ref.dpc_knn(x, c)
    want_centres, want_assign = dpc_knn_loops(x, c)
    assert centres.tolist() == want_centres
    assert assign.tolist() == want_assign
    assert all(assign[centres[k]].item() == k for k in range(c))


def test_merge_is_the_member_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    merged = ref.merge_clusters(x, torch.tensor([0, 0, 1]), 2)
    assert merged.tolist() == [[2.0, 3.0], [10.0, 0.0]]


def test_compaction_is_left_padded_in_position_order():
    alive = torch.tensor([[True, False, True, True], [False, True, False, False]])
    pos = torch.tensor([[5, 1, 2, 9], [0, 4, 0, 0]])
    order = ref.compaction_order(alive, pos)
    assert order.shape == (2, 3)
    assert pos.gather(1, order)[0].tolist() == [2, 5, 9]
    assert alive.gather(1, order)[1].tolist() == [False, False, True]
    assert order[1, -1].item() == 1
