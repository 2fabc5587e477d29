"""What one sparse prefill did, per sample: raters, kept and recycled tokens, counts, FLOPs;
and how it is built from what the prefill recorded on the device (read back on first access).

Tokens are named by their position in the prompt: the index into the sample's own tokens with
padding removed (0 = its first real token), the RoPE position id the model gives them for 1-D
RoPE (LLaVA); a recycled token by its cluster centre's. The position ids the layers of each
stage actually gave the tokens are in SampleTrace.stages: the same as the prompt's with
positions="original", renumbered 0 .. L'-1 with "renumber" (1-D RoPE); under mRoPE (Qwen2-VL)
the model's own 3-D ids, kept through pruning in both modes.
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
class StagePositions:
    """The tokens of one stage (layers first_layer.. until the next pruning) in sequence order,
    named by prompt position (tokens), and the position id each had in those layers: an int
    (1-D RoPE) or a (t, h, w) tuple (mRoPE)."""

    first_layer: int
    tokens: tuple[int, ...]
    position_ids: tuple


@dataclass(frozen=True)
class SampleTrace:
    """One sample of a sparse prefill.

    visual_entering: visual tokens entering each decoder layer (length = depth).
    equivalent_tokens_entering: mean over layers of visual_entering (this project's convention).
    equivalent_tokens_after: mean over layers of the visual tokens leaving each layer (the
        authors' log).
    final_positions: the prompt position of every real token in the decoder's final
        (compacted) output, left to right; logits[b, -len(final_positions):] belong to them.
    stages: per stage (the prompt's first), its tokens and the position ids they had.
    """

    length: int
    visual_positions: tuple[int, ...]
    rater_positions: tuple[int, ...]
    pruning: tuple[PruningRecord, ...]
    visual_entering: tuple[int, ...]
    final_positions: tuple[int, ...]
    flops: FlopsReport
    stages: tuple[StagePositions, ...] = ()

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

    src, kept: [B, L] prompt slots of the slots before pruning, and which visual slots survive;
    rater_valid: [B, R]; valid_before, visual_before, keep, n_cand: host int64 [B] counts;
    cand_idx: [B, N] slots of the recycling candidates; centres: [B, C] indices into cand_idx;
    assign: [B, N] cluster of each candidate (all None without recycling).
    """

    layer: int
    src: torch.Tensor
    kept: torch.Tensor
    rater_valid: torch.Tensor
    valid_before: torch.Tensor
    visual_before: torch.Tensor
    keep: torch.Tensor
    n_cand: torch.Tensor
    cand_idx: torch.Tensor | None = None
    centres: torch.Tensor | None = None
    assign: torch.Tensor | None = None

    def records(self, prompt_pos: torch.Tensor) -> list[PruningRecord]:
        """One PruningRecord per row; prompt_pos: [B, L0] the prompt's positions."""
        pos = prompt_pos.gather(1, self.src)
        kept_pos = pos.masked_fill(~self.kept, -1).tolist()
        recycled = [[] for _ in kept_pos]
        if self.cand_idx is not None:
            cand_pos = pos.gather(1, self.cand_idx.clamp(min=0)).tolist()
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
class StageRecord:
    """One stage's layout as the trace needs it: its first layer, and src, valid, pos [B, Ls]."""

    first_layer: int
    src: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor


def _stage_positions(stage: StageRecord, prompt_pos: torch.Tensor, mrope_ids: torch.Tensor | None) -> list:
    """Per row, the StagePositions of a stage; mrope_ids: [3, B, L0] the prompt's 3-D ids or None."""
    tokens = prompt_pos.gather(1, stage.src).tolist()
    if mrope_ids is None:
        ids = stage.pos.tolist()
    else:
        planes = mrope_ids.gather(2, stage.src.expand(3, -1, -1)).tolist()
        ids = [list(zip(*(plane[b] for plane in planes))) for b in range(len(tokens))]
    valid = stage.valid.tolist()
    return [StagePositions(first_layer=stage.first_layer,
                           tokens=tuple(t for t, ok in zip(tokens[b], valid[b]) if ok),
                           position_ids=tuple(p for p, ok in zip(ids[b], valid[b]) if ok))
            for b in range(len(tokens))]


@dataclass
class PrefillRecord:
    """What a finished sparse prefill leaves for its trace (no cache, mask or RoPE row).

    valid, visual: [B, L0] bool of the prompt; raters: [B, L0] bool; stages: every stage's
    layout, the prompt's first (its pos are the prompt positions); steps: one per pruning layer;
    mrope_ids: [3, B, L0] the prompt's 3-D position ids (mRoPE models) or None.
    """

    valid: torch.Tensor
    visual: torch.Tensor
    raters: torch.Tensor
    stages: list[StageRecord]
    steps: list[StepRecord]
    mrope_ids: torch.Tensor | None = None

    def build(self, shape: TraceShape) -> Trace:
        prompt_pos = self.stages[0].pos
        per_step = [step.records(prompt_pos) for step in self.steps]
        step_flops = [step.flops(shape.dims, shape.rank_mode) for step in self.steps]
        per_stage = [_stage_positions(stage, prompt_pos, self.mrope_ids) for stage in self.stages]
        valid, visual = self.valid.tolist(), self.visual.tolist()
        positions, raters = prompt_pos.tolist(), self.raters.tolist()
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
                final_positions=per_stage[-1][b].tokens, flops=prefill_flops(length, entering, shape.dims, pruning),
                stages=tuple(stage[b] for stage in per_stage)))
        return Trace(samples=samples, pruning_layers=shape.pruning_layers, depth=shape.depth)


@dataclass
class DenseRecord:
    """A prefill that pruned nothing. valid, visual: [B, L] bool; mrope_ids: [3, B, L] or None."""

    valid: torch.Tensor
    visual: torch.Tensor
    mrope_ids: torch.Tensor | None = None

    def build(self, shape: TraceShape) -> Trace:
        pos = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        slots = torch.arange(self.valid.shape[1], device=self.valid.device).expand_as(pos)
        stage = StageRecord(first_layer=0, src=slots, valid=self.valid, pos=pos)
        positions = _stage_positions(stage, pos, self.mrope_ids)
        samples = []
        for b in range(self.valid.shape[0]):
            valid = self.valid[b]
            length = int(valid.sum())
            visual_positions = tuple(p for p, v, ok in zip(pos[b].tolist(), self.visual[b].tolist(), valid.tolist())
                                     if v and ok)
            entering = (len(visual_positions),) * shape.depth
            samples.append(SampleTrace(
                length=length, visual_positions=visual_positions, rater_positions=(), pruning=(),
                visual_entering=entering, final_positions=tuple(range(length)),
                flops=prefill_flops(length, entering, shape.dims, 0.0), stages=(positions[b],)))
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
