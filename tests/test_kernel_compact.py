"""The compaction kernel (kernels/compact.compact) against kernels/reference_compact.py: one launch
that gathers the new layout's hidden states, bookkeeping, RoPE rows, position ids and mask."""
import pytest
import torch

from kernel_checks import DEVICE, DTYPES, dtype_id
from op_counting import count_device_ops
from sparsevlm_engine.kernels import reference as ref
from sparsevlm_engine.kernels import reference_compact
from sparsevlm_engine.kernels.compact import compact
from sparsevlm_engine.masks import prefill_mask

FIELDS = ("hidden", "src", "pos", "valid", "visual", "rater", "cos", "sin", "position_ids", "mask")


def compact_case(dtype, batch=3, length=45, dim=37, rope_dim=24, n_merged=4, rope="1d", pid=True, seed=0,
                 width_extra=0):
    """Inputs of compact (on the CPU) in argument order: W < L, rows left padded by their dead slots."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    alive = torch.rand(batch, length, generator=gen) < 0.5
    alive[1, :] = False
    alive[1, 30:36] = True  # a short row: many padding slots on its left
    width = int(alive.sum(1).max()) + width_extra
    order = ref.compaction_order(alive, torch.arange(length).expand(batch, length), width)
    src = torch.stack([torch.randperm(length, generator=gen) for _ in range(batch)]) + 2
    pos = torch.randint(0, 99, (batch, length), generator=gen)
    visual = torch.rand(batch, length, generator=gen) < 0.5
    rater = torch.rand(batch, length, generator=gen) < 0.3
    length0 = length + 2
    cos = torch.randn(1, length0, rope_dim, generator=gen).to(dtype)
    sin = torch.randn(batch, length0, rope_dim, generator=gen).to(dtype)
    position_ids = torch.arange(length0).expand(batch, -1) if pid else None
    if rope == "3plane":
        cos = torch.stack([cos, cos + 1, cos + 2])
        sin = torch.stack([sin, sin - 1, sin - 2])
        if pid:
            position_ids = position_ids * torch.tensor([1, 10, 100])[:, None, None]
    cos = cos.expand(*cos.shape[:-3], batch, -1, -1)  # batch stride 0
    merged = torch.randn(batch, n_merged, dim, generator=gen).to(dtype)
    replace = torch.full((batch, length), -1, dtype=torch.int32)
    for b in range(batch):  # recycled tokens replace alive slots (their centres), one row left unused
        slots = torch.nonzero(alive[b]).flatten()[: n_merged - (b == 0)]
        replace[b, slots] = torch.arange(len(slots), dtype=torch.int32)
    return [order, hidden, src, pos, alive, visual, rater, cos, sin, position_ids, merged, replace]


def on_device(args):
    return [None if t is None else t.to(DEVICE) for t in args]


def assert_same(got, expected):
    for name in FIELDS:
        g, e = getattr(got, name), getattr(expected, name)
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, e.dtype, g.shape, e.shape)
        assert torch.equal(g.cpu(), e), name  # a pure gather: bit-exact in every dtype


@pytest.mark.parametrize("mask", [None, "bool", "additive"], ids=["no-mask", "bool-mask", "additive-mask"])
@pytest.mark.parametrize("rope,pid", [("1d", True), ("1d", False), ("3plane", True)],
                         ids=["rope-1d", "rope-1d-no-pid", "rope-3plane"])
@pytest.mark.parametrize("with_merged", [False, True], ids=["plain", "merged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compact_matches_reference(poisoned, dtype, with_merged, rope, pid, mask):
    args = compact_case(dtype, rope=rope, pid=pid)
    assert args[7].stride(-3) == 0  # cos: batch stride 0
    if not with_merged:
        args[10:] = [None, None]
    kwargs = dict(mask=mask, mask_dtype=dtype if mask == "additive" else None)
    got = compact(*on_device(args), **kwargs)
    expected = reference_compact.compact(*args, **kwargs)
    assert_same(got, expected)
    order, alive = args[0], args[4]
    assert torch.equal(got.valid.cpu(), alive.gather(1, order))
    assert not got.valid[1, : order.shape[1] - 6].any()  # the short row is left padded
    if with_merged:  # the slots a recycled token replaces hold it, the others their own hidden state
        row = args[11].gather(1, order).long()
        assert (row >= 0).sum() >= 6
        own = args[1].gather(1, order[..., None].expand(-1, -1, args[1].shape[2]))
        recycled = args[10].gather(1, row.clamp(min=0)[..., None].expand(-1, -1, args[1].shape[2]))
        assert torch.equal(got.hidden.cpu(), torch.where(row[..., None] >= 0, recycled, own))


@pytest.mark.parametrize("width_extra", [0, 3], ids=["tight", "wider"])
@pytest.mark.parametrize("impl,dtype", [("sdpa", torch.bool), ("eager", torch.float32), ("eager", torch.float16),
                                        ("eager", torch.bfloat16)], ids=["sdpa", "eager-fp32", "eager-fp16", "eager-bf16"])
def test_mask_is_prefill_mask_of_the_new_validity(poisoned, impl, dtype, width_extra):
    args = compact_case(torch.float16, seed=3, width_extra=width_extra)
    kind = "bool" if impl == "sdpa" else "additive"
    got = compact(*on_device(args), mask=kind, mask_dtype=None if impl == "sdpa" else dtype)
    expected = prefill_mask(got.valid.cpu(), impl, torch.float32 if impl == "sdpa" else dtype)
    assert got.mask.dtype == expected.dtype and got.mask.shape == expected.shape
    assert torch.equal(got.mask.cpu(), expected)


def strided(t):
    """The same values with another memory layout: the first two dims transposed in memory."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def test_strided_inputs_are_read_as_given(poisoned):
    """Non-contiguous inputs (what a caller's views give) match the reference, read without a copy."""
    args = compact_case(torch.bfloat16, seed=5, rope="3plane")
    order, hidden, src, pos, alive, visual, rater, cos, sin, pid, merged, replace = args
    meta = torch.stack([src, pos], -1)  # [B, L, 2]: stride 2 along L
    flags = torch.stack([alive, visual, rater], -1)
    hidden = torch.stack([hidden, -hidden], -1)[..., 0]  # last-dim stride 2
    args = [strided(order), hidden, meta[..., 0], meta[..., 1], flags[..., 0], flags[..., 1], flags[..., 2],
            cos.transpose(-1, -2).contiguous().transpose(-1, -2), strided(sin), strided(pid), strided(merged),
            strided(replace)]
    assert not any(t.is_contiguous() for t in args)
    got = compact(*on_device(args), mask="additive", mask_dtype=torch.bfloat16)
    assert_same(got, reference_compact.compact(*args, mask="additive", mask_dtype=torch.bfloat16))


@pytest.mark.parametrize("mask", [None, "bool", "additive"])
@pytest.mark.parametrize("with_merged", [False, True], ids=["plain", "merged"])
def test_one_launch_and_no_torch_op(with_merged, mask):
    args = on_device(compact_case(torch.float16, rope="3plane", seed=7))
    if not with_merged:
        args[10:] = [None, None]
    args[4] = args[4][:, :]  # a view, as a caller's layout would hand it
    with count_device_ops() as ops:
        out = compact(*args, mask=mask, mask_dtype=torch.float16)
    assert dict(ops.launches) == {"_compact_kernel": 1}, str(ops)
    assert not ops.torch_ops and ops.host_reads == 0, str(ops)
    assert_same(out, reference_compact.compact(*[None if t is None else t.cpu() for t in args], mask=mask,
                                               mask_dtype=torch.float16))


def renumber_case(args, seed=0, nvalid_view="row"):
    """renumber = (rank_slot [B, L0], n_valid [B]) for compact_case's inputs: n_valid the rows'
    alive counts (merged, left-padded rows of different lengths), rank_slot each row's real
    prompt slots ascending, -1 past its count; row 1's count is below its n_valid (positions past
    it read rank_slot's -1, clamped to slot 0), row 0's covers every prompt slot. n_valid comes as
    a strided view: a row of a [4, B] tensor ("row") or a column of a [B, 4] one ("column")."""
    gen = torch.Generator().manual_seed(100 + seed)
    alive, cos = args[4], args[7]
    batch, length0 = alive.shape[0], cos.shape[-2]
    n_valid = alive.sum(1)
    assert len(set(n_valid.tolist())) == batch  # rows of different lengths
    real = torch.rand(batch, length0, generator=gen) < 0.7
    real[0] = True
    real[1] = False
    real[1, torch.randperm(length0, generator=gen)[: int(n_valid[1]) - 2]] = True
    rank_slot = ref.packed_slots(real, length0)
    if nvalid_view == "row":
        table = torch.zeros(4, batch, dtype=torch.int64)
        table[2] = n_valid
        n_valid = table[2]  # a storage offset
    else:
        table = torch.zeros(batch, 4, dtype=torch.int32)
        table[:, 1] = n_valid
        n_valid = table[:, 1]  # stride 4
    return strided(rank_slot), n_valid


@pytest.mark.parametrize("nvalid_view", ["row", "column"])
@pytest.mark.parametrize("rope,pid", [("1d", True), ("1d", False), ("3plane", True), ("3plane", False)],
                         ids=["rope-1d", "rope-1d-no-pid", "rope-3plane", "rope-3plane-no-pid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_compact_renumber_matches_reference(poisoned, dtype, rope, pid, nvalid_view):
    args = compact_case(dtype, rope=rope, pid=pid, seed=11)
    renumber = renumber_case(args, nvalid_view=nvalid_view)
    assert not renumber[0].is_contiguous() and (renumber[1].storage_offset() or renumber[1].stride(0) > 1)
    kwargs = dict(mask="bool")
    got = compact(*on_device(args), **kwargs, renumber=on_device(renumber))
    expected = reference_compact.compact(*args, **kwargs, renumber=renumber)
    assert_same(got, expected)
    # what renumbering means: pos is the rank among the row's real slots, RoPE / ids follow rank_slot
    plain = reference_compact.compact(*args, **kwargs)
    for name in ("hidden", "src", "valid", "visual", "rater", "mask"):
        assert torch.equal(getattr(got, name).cpu(), getattr(plain, name)), name
    rank_slot, n_valid = renumber
    width = args[0].shape[1]
    for b in range(args[0].shape[0]):
        pad = width - int(n_valid[b])
        assert got.pos[b].tolist() == [max(w - pad, 0) for w in range(width)]
        index = rank_slot[b, got.pos[b].cpu()].clamp(min=0)
        cos_rows = args[7][..., b, :, :][..., index, :]
        out_cos = got.cos[..., b, :, :].cpu()
        assert torch.equal(out_cos, cos_rows)
        if pid:
            assert torch.equal(got.position_ids[..., b, :].cpu(), args[9][..., b, :][..., index])
    assert (rank_slot[1, got.pos[1].cpu()] == -1).any()  # row 1 reads past its count: clamped to slot 0


@pytest.mark.parametrize("mask", [None, "additive"])
def test_compact_renumber_is_one_launch_and_no_torch_op(mask):
    args = compact_case(torch.float16, rope="3plane", seed=11)
    renumber = renumber_case(args)
    with count_device_ops() as ops:
        out = compact(*on_device(args), mask=mask, mask_dtype=torch.float16, renumber=on_device(renumber))
    assert dict(ops.launches) == {"_compact_kernel": 1}, str(ops)
    assert not ops.torch_ops and ops.host_reads == 0, str(ops)
    assert_same(out, reference_compact.compact(*args, mask=mask, mask_dtype=torch.float16, renumber=renumber))


def test_compact_names_a_bad_renumber():
    args = on_device(compact_case(torch.float32, seed=11))
    rank_slot, n_valid = on_device(renumber_case(compact_case(torch.float32, seed=11)))
    bad = [
        ((rank_slot[:, :-1], n_valid), r"renumber rank_slot has shape \[3, 46\], expected \[3, 47\]"),
        ((rank_slot[:2], n_valid), r"renumber rank_slot has shape \[2, 47\]"),
        ((rank_slot, n_valid[:2]), r"renumber n_valid has shape \[2\], expected \[3\]"),
        ((rank_slot, n_valid[:, None]), r"renumber n_valid has shape \[3, 1\]"),
        ((rank_slot.float(), n_valid), "renumber rank_slot must be an integer tensor, got torch.float32"),
        ((rank_slot, n_valid.float()), "renumber n_valid must be an integer tensor, got torch.float32"),
        ((rank_slot, n_valid > 0), "renumber n_valid must be an integer tensor, got torch.bool"),
        ((rank_slot,), r"renumber must be a \(rank_slot, n_valid\) pair"),
        (rank_slot, r"renumber must be a \(rank_slot, n_valid\) pair"),
    ]
    for renumber, message in bad:
        with pytest.raises(ValueError, match="compact: " + message):
            compact(*args, renumber=renumber)


def test_empty_layout_launches_nothing():
    args = on_device(compact_case(torch.float32))
    args[0] = args[0][:, :0]
    with count_device_ops() as ops:
        out = compact(*args, mask="bool")
    assert ops.total == 0, str(ops)
    assert out.hidden.shape == (3, 0, 37) and out.mask.shape == (3, 1, 0, 0) and out.cos.shape == (3, 0, 24)


def test_launcher_names_bad_inputs():
    args = on_device(compact_case(torch.float32))
    bad = {
        0: (args[0].int(), "order must be"),
        2: (args[2].int(), "src must be int64"),
        3: (args[3][:, :5], r"pos has shape \[3, 5\]"),
        4: (args[4].long(), "alive must be bool"),
        8: (args[8][..., :5], "cos .* and sin .* must match"),
        9: (args[9][:, :7], "position_ids must be integer"),
        11: (args[11].float(), "replace must be int32"),
    }
    for index, (value, message) in bad.items():
        broken = list(args)
        broken[index] = value
        with pytest.raises(ValueError, match="compact: " + message):
            compact(*broken)
    with pytest.raises(ValueError, match="merged and replace must be given together"):
        compact(*args[:11])
    with pytest.raises(ValueError, match="mask must be None, 'bool' or 'additive'"):
        compact(*args, mask="float")
    with pytest.raises(ValueError, match="mask_dtype of an additive mask"):
        compact(*args, mask="additive")
    with pytest.raises(ValueError, match="merged is torch.float16 but hidden is torch.float32"):
        compact(*args[:10], args[10].half(), args[11])
