"""What one sparse prefill did, per sample: raters, kept and recycled tokens, counts, FLOPs;
and how it is built from what the prefill recorded on the device (read back on first access).

Positions are indices into the sample's own tokens with padding removed (0 = its first real
token): the RoPE position id the model gives them for 1-D RoPE (LLaVA). Under mRoPE (Qwen2-VL)
a token's 3-D id is the model's own for that index, kept through pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .accounting import (DecoderDims, FlopsReport, clustering_flops, prefill_flops, rater_selection_flops,
                         scoring_flops)


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
    """The trace of the last finished prefill of a sparsified model (one entry per batch row)."""

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


@dataclass
class StepRecord:
    """What one pruning layer did, kept as device tensors until the trace is read.

    pos, kept: [B, L] positions of the slots before pruning, and which visual slots survive;
    rater_valid: [B, R]; valid_before, visual_before, keep, n_cand: host int64 [B] counts;
    cand_idx: [B, N] slots of the recycling candidates; centres: [B, C] indices into cand_idx;
    assign: [B, N] cluster of each candidate (all None without recycling).
    """

    layer: int
    pos: torch.Tensor
    kept: torch.Tensor
    rater_valid: torch.Tensor
    valid_before: torch.Tensor
    visual_before: torch.Tensor
    keep: torch.Tensor
    n_cand: torch.Tensor
    cand_idx: torch.Tensor | None = None
    centres: torch.Tensor | None = None
    assign: torch.Tensor | None = None

    def records(self) -> list[PruningRecord]:
        kept_pos = self.pos.masked_fill(~self.kept, -1).tolist()
        recycled = [[] for _ in kept_pos]
        if self.cand_idx is not None:
            cand_pos = self.pos.gather(1, self.cand_idx.clamp(min=0)).tolist()
            for b, (centres, assign) in enumerate(zip(self.centres.tolist(), self.assign.tolist())):
                members = {c: [] for c in range(len(centres)) if centres[c] >= 0}
                for i, cluster in enumerate(assign):
                    if cluster >= 0:
                        members[cluster].append(cand_pos[b][i])
                recycled[b] = [RecycledToken(centre=cand_pos[b][centres[c]], members=tuple(m))
                               for c, m in members.items()]
        return [PruningRecord(layer=self.layer, visual_before=int(self.visual_before[b]),
                              keep_count=int(self.keep[b]), kept=tuple(p for p in row if p >= 0),
                              recycled=tuple(recycled[b]))
                for b, row in enumerate(kept_pos)]

    def flops(self, dims: DecoderDims, gram: bool) -> list[float]:
        raters = self.rater_valid.sum(1).tolist()
        return [scoring_flops(int(r), int(n), int(v), dims, gram) + clustering_flops(int(c), dims.hidden)
                for r, n, v, c in zip(raters, self.valid_before, self.visual_before, self.n_cand)]


@dataclass(frozen=True)
class TraceShape:
    """What a trace needs to know of the model: its dimensions, depth and pruning layers, and
    whether scoring took ranks (rank mode)."""

    dims: DecoderDims
    depth: int
    pruning_layers: tuple[int, ...]
    rank_mode: bool


@dataclass
class PrefillRecord:
    """What a finished sparse prefill leaves for its trace (no cache, mask or RoPE row).

    valid, visual: [B, L0] bool of the prompt; first_pos: [B, L0] positions; raters: [B, L0]
    bool; final_pos, final_valid: [B, Lf] of the compacted output; steps: one per pruning layer.
    """

    valid: torch.Tensor
    visual: torch.Tensor
    first_pos: torch.Tensor
    raters: torch.Tensor
    final_pos: torch.Tensor
    final_valid: torch.Tensor
    steps: list[StepRecord]

    def build(self, shape: TraceShape) -> Trace:
        per_step = [step.records() for step in self.steps]
        step_flops = [step.flops(shape.dims, shape.rank_mode) for step in self.steps]
        valid, visual = self.valid.tolist(), self.visual.tolist()
        positions, raters = self.first_pos.tolist(), self.raters.tolist()
        final_pos, final_valid = self.final_pos.tolist(), self.final_valid.tolist()
        samples = []
        for b in range(len(valid)):
            length = sum(valid[b])
            visual_positions = tuple(p for p, v in zip(positions[b], visual[b]) if v)
            records = [step[b] for step in per_step]
            after = {r.layer: r.visual_after for r in records}
            entering, current = [], len(visual_positions)
            for layer in range(shape.depth):
                entering.append(current)
                current = after.get(layer, current)
            pruning = rater_selection_flops(len(visual_positions), length - len(visual_positions), shape.dims.hidden)
            pruning += sum(flops[b] for flops in step_flops)
            samples.append(SampleTrace(
                length=length, visual_positions=visual_positions,
                rater_positions=tuple(p for p, r in zip(positions[b], raters[b]) if r),
                pruning=tuple(records), visual_entering=tuple(entering),
                final_positions=tuple(p for p, ok in zip(final_pos[b], final_valid[b]) if ok),
                flops=prefill_flops(length, entering, shape.dims, pruning)))
        return Trace(samples=samples, pruning_layers=shape.pruning_layers, depth=shape.depth)


@dataclass
class DenseRecord:
    """A prefill that pruned nothing. valid, visual: [B, L] bool."""

    valid: torch.Tensor
    visual: torch.Tensor

    def build(self, shape: TraceShape) -> Trace:
        samples = []
        for b in range(self.valid.shape[0]):
            valid = self.valid[b]
            length = int(valid.sum())
            pos = (valid.long().cumsum(0) - 1).tolist()
            visual_positions = tuple(p for p, v, ok in zip(pos, self.visual[b].tolist(), valid.tolist()) if v and ok)
            entering = (len(visual_positions),) * shape.depth
            samples.append(SampleTrace(
                length=length, visual_positions=visual_positions, rater_positions=(), pruning=(),
                visual_entering=entering, final_positions=tuple(range(length)),
                flops=prefill_flops(length, entering, shape.dims, 0.0)))
        return Trace(samples=samples, pruning_layers=shape.pruning_layers, depth=shape.depth)


class LastTrace:
    """The trace of one finished prefill, built from its record on first read (thread-safe to
    read: building twice gives the same trace). error: why there is none (the prefill raised)."""

    def __init__(self, record: PrefillRecord | DenseRecord | None, shape: TraceShape, error: str | None = None):
        self._record, self._shape, self.error = record, shape, error
        self._trace: Trace | None = None

    def get(self) -> Trace | None:
        if self._trace is None and self._record is not None:
            self._trace = self._record.build(self._shape)
            self._record = None
        return self._trace
