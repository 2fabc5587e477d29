"""What one sparse prefill did, per sample: raters, kept and recycled tokens, counts, FLOPs.

Positions are indices into the sample's own tokens with padding removed (0 = its first real
token): the RoPE position id the model gives them for 1-D RoPE (LLaVA). Under mRoPE (Qwen2-VL)
a token's 3-D id is the model's own for that index, kept through pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecycledToken:
    """One merged token: it takes the position of its cluster centre."""

    centre: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class PruningRecord:
    """What one pruning layer did to one sample.

    kept: positions of the visual tokens that survive this layer without merging (ascending;
        a token recycled at an earlier layer appears by its centre position).
    recycled: tokens merged at this layer from the pruned ones.
    """

    layer: int
    visual_before: int
    keep_count: int
    kept: tuple[int, ...]
    recycled: tuple[RecycledToken, ...]

    @property
    def visual_after(self) -> int:
        return len(self.kept) + len(self.recycled)


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


@dataclass(frozen=True)
class SampleTrace:
    """One sample of a sparse prefill.

    visual_entering: visual tokens entering each decoder layer (length = depth).
    equivalent_tokens_entering: mean over layers of visual_entering (this project's convention).
    equivalent_tokens_after: mean over layers of the visual tokens leaving each layer (the
        authors' log).
    final_positions: the position of every real token in the decoder's final (compacted)
        output, left to right; logits[b, -len(final_positions):] belong to them.
    """

    length: int
    visual_positions: tuple[int, ...]
    rater_positions: tuple[int, ...]
    pruning: tuple[PruningRecord, ...]
    visual_entering: tuple[int, ...]
    final_positions: tuple[int, ...]
    flops: FlopsReport

    @property
    def n_visual(self) -> int:
        return len(self.visual_positions)

    @property
    def equivalent_tokens_entering(self) -> float:
        return sum(self.visual_entering) / len(self.visual_entering)

    @property
    def equivalent_tokens_after(self) -> float:
        after = self.visual_entering[1:] + self.visual_entering[-1:]
        return sum(after) / len(after)


@dataclass
class Trace:
    """The trace of the last prefill of a sparsified model (one entry per batch row)."""

    samples: list[SampleTrace] = field(default_factory=list)
    pruning_layers: tuple[int, ...] = ()
    depth: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> SampleTrace:
        return self.samples[i]

    def summary(self) -> str:
        """A few human-readable lines per sample."""
        lines = []
        for b, s in enumerate(self.samples):
            counts = " -> ".join(
                [str(s.n_visual)] + [f"{p.visual_after} (after layer {p.layer})" for p in s.pruning]
            )
            lines.append(f"sample {b}: visual tokens {counts}")
            lines.append(
                f"  equivalent visual tokens: {s.equivalent_tokens_entering:.1f} entering layers, "
                f"{s.equivalent_tokens_after:.1f} after layers; raters: {len(s.rater_positions)}"
            )
            lines.append(
                f"  decoder FLOPs reduction: {100 * s.flops.reduction_paper:.1f}% (paper formula), "
                f"{100 * s.flops.reduction_exact:.1f}% (exact, pruning cost included)"
            )
        return "\n".join(lines)
