"""Triton rater selection (`kernels/raters.py`) against `reference.select_raters`.

The raters are a strict threshold (s > mean s), so the kernel and the reference can only be compared
exactly where no score sits on the mean. Every random case first asserts that its reference scores
keep a relative margin |s - mean| > 1e-4 * mean on valid text (rows with a valid visual token and at
least two valid text tokens; the other rows are exact ties in both, handled by the fallback), then
asserts the bool outputs are equal. The scores themselves are compared to the tolerance table.
"""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOLERANCE, dtype_id
from sparsevlm_engine.kernels import reference
from sparsevlm_engine.kernels.raters import _rater_scores, select_raters

MARGIN = 1e-4


def _masks(n_visual, n_text, rows):
    """rows: per sample ((v_start, v_stop), (t_start, t_stop)), the valid slices; None = all valid."""
    visual_valid = torch.zeros(len(rows), n_visual, dtype=torch.bool)
    text_valid = torch.zeros(len(rows), n_text, dtype=torch.bool)
    for b, row in enumerate(rows):
        (v0, v1), (t0, t1) = row if row is not None else ((0, n_visual), (0, n_text))
        visual_valid[b, v0:v1] = True
        text_valid[b, t0:t1] = True
    return visual_valid.to(DEVICE), text_valid.to(DEVICE)


def _inputs(n_visual, n_text, dim, rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(len(rows), n_visual, dim, generator=gen).to(DEVICE, dtype)
    text = torch.randn(len(rows), n_text, dim, generator=gen).to(DEVICE, dtype)
    return (visual, text, *_masks(n_visual, n_text, rows))


def _reference_scores(visual, text, visual_valid, text_valid):
    """s and its mean over valid text, by the formula of `reference.select_raters`."""
    logits = torch.einsum("bvd,btd->bvt", visual.float(), text.float())
    logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0) * visual_valid[:, :, None]
    score = probs.sum(1) / visual_valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (score * text_valid).sum(-1, keepdim=True) / text_valid.sum(-1, keepdim=True).clamp(min=1)
    return score, mean


def _assert_tie_free(visual, text, visual_valid, text_valid):
    score, mean = _reference_scores(visual, text, visual_valid, text_valid)
    rated = (visual_valid.sum(-1) >= 1) & (text_valid.sum(-1) >= 2)
    gap = ((score - mean).abs() / mean.clamp(min=1e-30))[rated]
    gap = gap.masked_fill(~text_valid[rated], float("inf"))
    assert gap.numel() == 0 or gap.min() > MARGIN, f"input has a score within {MARGIN} of its mean: pick another seed"


# (n_visual, n_text, dim, rows, seed); rows as in _masks.
CASES = [
    pytest.param(16, 8, 16, [None], 0, id="B1-NV16-NT8-d16"),
    pytest.param(577, 13, 40, [((0, 577), (0, 13)), ((0, 400), (3, 13))], 1, id="B2-NV577-NT13-d40"),
    pytest.param(33, 1, 24, [None, ((5, 33), (0, 1))], 2, id="B2-NV33-NT1-d24"),
    pytest.param(70, 13, 40, [None, ((0, 50), (0, 9)), ((0, 0), (0, 13)), ((10, 70), (0, 0)), ((3, 61), (4, 11))],
                 3, id="B5-NV70-NT13-d40-emptyrows"),
    pytest.param(40, 100, 72, [((0, 40), (0, 100)), ((7, 31), (20, 85)), ((0, 40), (70, 97))], 4,
                 id="B3-NV40-NT100-d72"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_visual, n_text, dim, rows, seed", CASES)
def test_select_raters_matches_reference(n_visual, n_text, dim, rows, seed, dtype, poisoned):
    args = _inputs(n_visual, n_text, dim, rows, dtype, seed)
    _assert_tie_free(*args)
    out = select_raters(*args)
    expected = reference.select_raters(*args)
    assert out.dtype == torch.bool and out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_visual, n_text, dim, rows, seed", CASES)
def test_rater_scores_match_reference(n_visual, n_text, dim, rows, seed, dtype, poisoned):
    args = _inputs(n_visual, n_text, dim, rows, dtype, seed)
    scores = _rater_scores(*args)
    expected, _ = _reference_scores(*args)
    atol, rtol = TOLERANCE[dtype]
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=atol, rtol=rtol)
    assert torch.all(scores[~args[3]] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fallback_rows_take_every_valid_text_token(dtype, poisoned):
    """Rows with no strict rater: identical text tokens (all scores equal up to rounding), one valid
    text token, no valid visual token, no valid text (empty result)."""
    n_visual, n_text, dim = 37, 13, 40
    rows = [((0, 30), (2, 12)), ((0, 37), (5, 6)), ((0, 0), (0, 13)), ((0, 37), (0, 0))]
    visual, text, visual_valid, text_valid = _inputs(n_visual, n_text, dim, rows, dtype, seed=5)
    text[0] = text[0, :1].expand(n_text, dim)
    out = select_raters(visual, text, visual_valid, text_valid)
    assert torch.equal(out, text_valid)
    assert torch.equal(out, reference.select_raters(visual, text, visual_valid, text_valid))


def test_strided_inputs():
    """A hidden-state layout with stride(-1) != 1 and sliced (non-contiguous) masks."""
    n_visual, n_text, dim = 45, 13, 40
    gen = torch.Generator().manual_seed(6)
    visual = torch.randn(2, dim, n_visual, generator=gen).to(DEVICE).transpose(1, 2)
    text = torch.randn(2, n_text, 2 * dim, generator=gen).to(DEVICE)[:, :, ::2]
    wide_v, wide_t = _masks(2 * n_visual, 2 * n_text, [((0, 70), (1, 25)), ((10, 90), (0, 20))])
    args = (visual, text, wide_v[:, ::2], wide_t[:, ::2])
    _assert_tie_free(*args)
    assert torch.equal(select_raters(*args), reference.select_raters(*args))


def test_deterministic():
    args = _inputs(577, 13, 40, [((0, 577), (0, 13)), ((0, 400), (3, 13))], torch.float32, seed=1)
    first, first_scores = select_raters(*args), _rater_scores(*args)
    for _ in range(2):
        assert torch.equal(select_raters(*args), first)
        assert torch.equal(_rater_scores(*args), first_scores)


def _valid(batch=2, n_visual=20, n_text=7, dim=16, dtype=torch.float32):
    return _inputs(n_visual, n_text, dim, [None] * batch, dtype, seed=7)


def _bad(name):
    visual, text, visual_valid, text_valid = _valid()
    if name == "batch":
        text = text[:1]
    elif name == "dim":
        text = text[..., :8]
    elif name == "visual_valid-shape":
        visual_valid = visual_valid[:, :5]
    elif name == "text_valid-shape":
        text_valid = text_valid[:1]
    elif name == "dtype-mismatch":
        text = text.half()
    elif name == "int-dtype":
        visual, text = visual.long(), text.long()
    elif name == "mask-not-bool":
        text_valid = text_valid.int()
    elif name == "visual-2d":
        visual = visual[0]
    elif name == "device":
        visual = visual.to("meta")
    return visual, text, visual_valid, text_valid


@pytest.mark.parametrize("name, match", [
    ("batch", r"text has shape \[1, 7, 16\], expected \[2, \*, 16\]"),
    ("dim", r"text has shape \[2, 7, 8\], expected \[2, \*, 16\]"),
    ("visual_valid-shape", r"visual_valid has shape \[2, 5\], expected \[2, 20\]"),
    ("text_valid-shape", r"text_valid has shape \[1, 7\], expected \[2, 7\]"),
    ("dtype-mismatch", r"visual is torch.float32 but text is torch.float16"),
    ("int-dtype", r"visual must be fp32, fp16 or bf16"),
    ("mask-not-bool", r"text_valid must be bool, got torch.int32 with shape \[2, 7\]"),
    ("visual-2d", r"visual has shape \[20, 16\], expected \[\*, \*, \*\]"),
    ("device", r"different devices"),
])
def test_launcher_errors(name, match):
    with pytest.raises(ValueError, match=match):
        select_raters(*_bad(name))
