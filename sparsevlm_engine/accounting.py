"""Decoder FLOPs of a prefill, dense and sparse (SPARSEVLM.md section 6)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """hidden d, MLP width m, query heads H, key/value heads H_kv, head dim, depth."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    depth: int

    @classmethod
    def llava_1_5_7b(cls) -> "DecoderDims":
        """Vicuna-7B, the decoder of LLaVA-1.5-7B."""
        return cls(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, depth=32)

    @classmethod
    def from_text_config(cls, cfg) -> "DecoderDims":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.hidden_size, cfg.intermediate_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.num_hidden_layers)


@dataclass(frozen=True)
class FlopsReport:
    """Prefill decoder FLOPs of one sample.

    *_paper: the paper's per-layer formula 4nd^2 + 2n^2d + 3ndm (multiply-accumulates, as the
    authors count them). *_exact: floating-point operations (2 per multiply-accumulate) of the
    projections with grouped-query attention, causal attention scores and values, and the gated
    MLP. pruning: FLOPs the pruning itself spent (raters, scoring, ranks, clustering).
    """

    dense_paper: float
    sparse_paper: float
    dense_exact: float
    sparse_exact: float
    pruning: float

    @property
    def reduction_paper(self) -> float:
        return 1.0 - self.sparse_paper / self.dense_paper

    @property
    def reduction_exact(self) -> float:
        return 1.0 - (self.sparse_exact + self.pruning) / self.dense_exact


def layer_macs_paper(n: int, dims: DecoderDims) -> float:
    """The authors' per-layer count: 4nd^2 + 2n^2d + 3ndm (multiply-accumulates)."""
    d, m = dims.hidden, dims.intermediate
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def layer_flops_exact(n: int, dims: DecoderDims) -> float:
    """FLOPs of one decoder layer on n tokens of one sequence (causal prefill).

    Projections q, k, v, o with grouped-query attention, causal scores and weighted values
    (query i sees i + 1 keys, so n(n + 1) / 2 dot products of each kind per head) and the gated
    MLP (three d x m matrices). Norms, softmax and element-wise work are left out.
    """
    d, m, hd = dims.hidden, dims.intermediate, dims.head_dim
    projections = n * d * hd * (2 * dims.heads + 2 * dims.kv_heads)
    attention = dims.heads * hd * n * (n + 1)
    mlp = 3 * n * d * m
    return 2.0 * (projections + attention + mlp)


def decoder_flops(tokens_per_layer: list[int], dims: DecoderDims) -> tuple[float, float]:
    """(paper MACs, exact FLOPs) summed over the layers, tokens_per_layer[l] entering layer l."""
    paper = sum(layer_macs_paper(n, dims) for n in tokens_per_layer)
    exact = sum(layer_flops_exact(n, dims) for n in tokens_per_layer)
    return paper, exact


def prefill_flops(length: int, visual_entering, dims: DecoderDims, pruning: float):
    """FlopsReport of one sample: `length` real tokens of which visual_entering[l] visual ones
    enter layer l (dense: all visual tokens enter every layer)."""
    text = length - visual_entering[0]
    dense_paper, dense_exact = decoder_flops([length] * len(visual_entering), dims)
    sparse_paper, sparse_exact = decoder_flops([text + v for v in visual_entering], dims)
    return FlopsReport(dense_paper, sparse_paper, dense_exact, sparse_exact, pruning)


def rater_selection_flops(n_visual: int, n_text: int, hidden: int) -> float:
    """V T^T, softmax and means of rater selection."""
    return 2.0 * n_visual * n_text * hidden + 5.0 * n_visual * n_text


def scoring_flops(n_raters: int, n_keys: int, n_visual: int, dims: DecoderDims, gram: bool) -> float:
    """Rater queries, their logits over every visible key and, in rank mode (gram), the rank of the
    rater rows P [R, n_v], counted as one Gram product 2 R^2 n_v (the SVD's leading cost)."""
    queries = 2.0 * n_raters * dims.hidden * dims.heads * dims.head_dim
    logits = 2.0 * dims.heads * n_raters * n_keys * dims.head_dim + 5.0 * dims.heads * n_raters * n_keys
    grams = 2.0 * n_raters * n_raters * n_visual if gram else 0.0
    return queries + logits + grams


def clustering_flops(n_candidates: int, hidden: int) -> float:
    """Pairwise distances of the recycling candidates and the merge."""
    return 3.0 * n_candidates * n_candidates * hidden + n_candidates * hidden
