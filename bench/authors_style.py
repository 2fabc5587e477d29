"""The "authors-style" baseline: SparseVLM scored the way the authors' code scores it.

The authors run the pruning layers with eager attention and ask it for its weights: the full
softmax attention [H, L, L] of every query over every key is materialised (logits in the model's
dtype, softmax in fp32 rounded back to the model's dtype, as eager attention builds them), and
the rater rows x visual columns are sliced out of it, one sample at a time. This engine instead
recomputes only the rater rows, O(R L) per head, inside one batched kernel.

Everything else is the engine's own (rater choice, selection, recycling, compaction, masks,
cache), so the baseline is the same method with the authors' scoring, and it keeps the same
tokens (bench/test_e2e_bench.py asserts that in fp32). `authors_style(model)` switches it on for
a sparsified model through the engine's public observer hook, and off on exit. The benchmarks
run it on one sample at a time (a batch is a loop over its rows), as their code runs.

    with authors_style(model):
        model(**one_sample)
"""
from __future__ import annotations

import contextlib

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.kernels import reference as ref

PROVIDER = "authors-style"


class AuthorsStyleOps:
    """The engine's ops (any backend) with the scoring replaced by slices of the full attention.

    q_all: [B, H, L, D] post-RoPE queries of every token of the pruning layer, set by
    AuthorsStyle before each scoring call.
    """

    name = PROVIDER

    def __init__(self, base):
        self.base = base
        self.q_all: torch.Tensor | None = None

    def __getattr__(self, name):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _rater_probs(self, k, rater_slot, rater_valid, key_valid, visual, scaling, gravity) -> torch.Tensor:
        """a: [B, H, R, L] fp32 as ref.rater_attention defines it, taken from [H, L, L] matrices."""
        q_all = self.q_all
        batch, heads, length, _ = q_all.shape
        groups = heads // k.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=k.device).tril()
        lowest = torch.finfo(q_all.dtype).min
        divisor = ref.gravity_divisor(gravity, rater_slot)
        out = []
        for b in range(batch):  # one sample at a time, as their code runs
            keys = k[b:b + 1].repeat_interleave(groups, dim=1)
            logits = torch.matmul(q_all[b:b + 1], keys.transpose(2, 3)) * scaling          # [1, H, L, L]
            allowed = causal & key_valid[b][None, :]
            logits = logits.masked_fill(~allowed, lowest)
            attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q_all.dtype)      # [1, H, L, L]
            rows = attn[0][:, rater_slot[b]].float()                                       # [H, R, L]
            if divisor is not None:
                rows = rows / divisor[b][None].float()
            keep = allowed[rater_slot[b]] & rater_valid[b][:, None] & visual[b][None, :]   # [R, L]
            out.append(torch.where(keep[None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)))
        return torch.stack(out)

    def head_relevance(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, lse=None, gravity=None):
        return ref.mean_over_raters(self._rater_probs(k, rater_slot, rater_valid, key_valid, visual, scaling,
                                                      gravity), rater_valid)

    def rater_rows(self, q, k, rater_slot, rater_valid, key_valid, visual, scaling, weights, lse=None, gravity=None):
        a = self._rater_probs(k, rater_slot, rater_valid, key_valid, visual, scaling, gravity)
        return ref.weighted_rows(a, rater_valid, weights)


class AuthorsStyle(sve.PruningObserver):
    """Scores every prefill through AuthorsStyleOps, with all queries of each pruning layer."""

    def wrap_ops(self, ops):
        return AuthorsStyleOps(ops)

    def before_prune(self, layer, ops, all_queries):
        ops.q_all = all_queries()


@contextlib.contextmanager
def authors_style(model):
    """Score with the full attention matrices while inside; the model must be sparsified."""
    if not sve.is_sparsified(model):
        raise RuntimeError("authors_style needs a sparsified model: call sve.sparsify(model, config) first")
    with sve.engine_of(model).observe(AuthorsStyle()):
        yield
