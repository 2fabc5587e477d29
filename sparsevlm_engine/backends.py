"""The two implementations of the pruning ops, with one interface: the Triton kernels (CUDA, or
CPU under TRITON_INTERPRET=1) and the plain-PyTorch reference (any device).

Both take and return the same shapes; see kernels/relevance.py, select.py, recycle.py and
compact.py for the shapes and meanings.
"""
from __future__ import annotations

import importlib

import torch

from .kernels import reference as ref
from .kernels.types import Compacted, Selection


class TorchOps:
    """The reference ops, batched where the reference is batched (recycling loops over rows)."""

    name = "torch"

    def select_raters(self, visual, text, visual_valid, text_valid):
        return ref.select_raters(visual, text, visual_valid, text_valid)

    def gravity_table(self, inv_freq, head_dim, size, sections=None):
        return ref.gravity_table(inv_freq, head_dim, size, sections)

    def _rows(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity):
        slots = torch.arange(k.shape[2], device=k.device)
        visible = key_valid[:, None, :] & (slots[None, None, :] <= rater_slot[:, :, None]) & rater_valid[:, :, None]
        divisor = None if gravity is None else ref.gravity_lookup(*gravity)
        return ref.rater_attention(q, k, visible, visual, scaling, divisor)

    def head_relevance(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity=None):
        return ref.head_relevance(self._rows(q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity),
                                  rater_valid)

    def rater_rows(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, weights, gravity=None):
        a = self._rows(q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity)
        return ref.rater_rows(a, rater_valid, weights)

    def select_topk(self, scores, candidates, k, max_k, keep_also=None, width=None) -> Selection:
        kept = ref.topk_mask(scores, candidates, k)
        order = None
        if keep_also is not None:
            order = self.compaction_order(keep_also | kept, width)
        return Selection(kept, ref.packed_slots(kept, max_k), order)

    def recycle(self, hidden, cand_idx, n_cand, n_clusters, max_clusters):
        batch, width = cand_idx.shape
        merged = hidden.new_zeros(batch, max_clusters, hidden.shape[2])
        centres = torch.full((batch, max_clusters), -1, dtype=torch.int64, device=hidden.device)
        assign = torch.full((batch, width), -1, dtype=torch.int64, device=hidden.device)
        for b, (n, c) in enumerate(zip(n_cand.tolist(), n_clusters.tolist())):
            if n == 0:
                continue
            x = hidden[b, cand_idx[b, :n]]
            row_centres, row_assign = ref.dpc_knn(x, c)
            merged[b, :c] = ref.merge_clusters(x, row_assign, c)
            centres[b, :c] = row_centres
            assign[b, :n] = row_assign
        return merged, centres, assign

    def compaction_order(self, alive, width):
        position = torch.arange(alive.shape[1], device=alive.device).expand_as(alive)
        return ref.compaction_order(alive, position, width)

    def compact(self, order, hidden, meta, cos, sin, position_ids=None, merged=None, merged_slot=None) -> Compacted:
        batch, length = hidden.shape[:2]
        pool = hidden
        if merged is not None:
            pool = torch.cat([hidden, hidden.new_zeros(batch, 1, hidden.shape[2])], 1)
            slot = torch.where(merged_slot >= 0, merged_slot, length)
            pool = pool.scatter(1, slot[..., None].expand_as(merged), merged)[:, :length]
        new_meta = meta.gather(2, order.expand(meta.shape[0], -1, -1))
        src = new_meta[0]

        def rows(t):  # [B, L0, Dr] or [P, B, L0, Dr]
            index = src[..., None].expand(-1, -1, t.shape[-1])
            return t.gather(-2, index.expand(t.shape[0], -1, -1, -1) if t.dim() == 4 else index)

        pid = None
        if position_ids is not None:
            pid = position_ids.gather(-1, src.expand(position_ids.shape[0], -1, -1) if position_ids.dim() == 3 else src)
        return Compacted(pool.gather(1, order[..., None].expand(-1, -1, hidden.shape[2])), new_meta,
                         rows(cos), rows(sin), pid)


class TritonOps:
    """The Triton kernels."""

    name = "triton"

    def __init__(self):
        module = importlib.import_module
        self._relevance = module(f"{__package__}.kernels.relevance")
        self._select = module(f"{__package__}.kernels.select")
        self._compact = module(f"{__package__}.kernels.compact")
        self._raters = module(f"{__package__}.kernels.raters")
        self._recycle = module(f"{__package__}.kernels.recycle")

    def select_raters(self, visual, text, visual_valid, text_valid):
        return self._raters.select_raters(visual, text, visual_valid, text_valid)

    def gravity_table(self, inv_freq, head_dim, size, sections=None):
        return self._relevance.gravity_table(inv_freq, head_dim, size, sections)

    def head_relevance(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity=None):
        return self._relevance.head_relevance(q, k, rater_slot, rater_valid, key_valid, visual, scaling,
                                              gravity=gravity)

    def rater_rows(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, weights, gravity=None):
        return self._relevance.rater_rows(q, k, rater_slot, rater_valid, key_valid, visual, scaling, weights,
                                          gravity=gravity)

    def select_topk(self, scores, candidates, k, max_k, keep_also=None, width=None) -> Selection:
        return self._select.select_topk(scores, candidates, k, max_k, keep_also=keep_also, width=width)

    def recycle(self, hidden, cand_idx, n_cand, n_clusters, max_clusters):
        return self._recycle.recycle(hidden, cand_idx, n_cand, n_clusters, max_clusters)

    def compaction_order(self, alive, width):
        return self._compact.compaction_order(alive, width)

    def compact(self, order, hidden, meta, cos, sin, position_ids=None, merged=None, merged_slot=None) -> Compacted:
        return self._compact.compact(order, hidden, meta, cos, sin, position_ids, merged, merged_slot)


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def ops_for(backend: str, device: torch.device):
    """The ops a config's backend means for tensors on `device`."""
    from .kernels._launch import interpreting

    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not triton_available())):
        return TorchOps()
    if not triton_available():
        raise ImportError("backend='triton' needs the triton package (Linux x86-64: pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend='triton' needs the model on a CUDA GPU (tensors are on {device}); "
                         "use backend='torch' or 'auto', or set TRITON_INTERPRET=1 to interpret the kernels on CPU")
    return TritonOps()
