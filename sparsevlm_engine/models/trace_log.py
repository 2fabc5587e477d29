"""What the plugin logs beside the scores, taken from `sve.last_trace(model)`.

Per sample: lmms-eval writes each request's `TokenCounts.to_dict()` into the sample's
`token_counts` entry of the --log_samples JSONL; SparseTokenCounts adds a "sparsevlm" dict there.
Per run: lmms-eval's `log_metrics` puts `avg_sparsevlm_*` into the results' "throughput" dict.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from lmms_eval.api.instance import TokenCounts
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from ..trace import SampleTrace, Trace

RUN_MEANS = ("equivalent_visual_tokens", "flops_reduction_paper", "flops_reduction_exact")


def sample_record(sample: SampleTrace, batch_rows: int) -> dict:
    """One prefill row's token counts and decoder FLOPs (plain numbers, JSON-ready); batch_rows:
    the rows of the batched prefill it was part of."""
    flops = sample.flops
    return {
        "batch_rows": batch_rows,
        "visual_tokens": sample.n_visual,
        "visual_tokens_after_pruning": [p.visual_after for p in sample.pruning],
        "equivalent_visual_tokens": sample.equivalent_tokens_entering,
        "equivalent_visual_tokens_after": sample.equivalent_tokens_after,
        "flops_dense_paper": flops.dense_paper,
        "flops_sparse_paper": flops.sparse_paper,
        "flops_dense_exact": flops.dense_exact,
        "flops_sparse_exact": flops.sparse_exact,
        "flops_pruning": flops.pruning,
        "flops_reduction_paper": flops.reduction_paper,
        "flops_reduction_exact": flops.reduction_exact,
    }


@dataclass
class SparseTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the SparseVLM record of the request's prefill."""

    sparsevlm: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "sparsevlm": self.sparsevlm}


def generated_lengths(new_tokens: torch.Tensor, eos_token_id) -> list[int]:
    """Tokens generated per row before the first eos; new_tokens: [B, T] the ids after the prompt."""
    if eos_token_id is None:
        return [new_tokens.shape[1]] * new_tokens.shape[0]
    ends = torch.as_tensor(eos_token_id, device=new_tokens.device).reshape(-1)
    is_end = torch.isin(new_tokens, ends)
    first = torch.where(is_end.any(1), is_end.int().argmax(1), new_tokens.shape[1])
    return first.tolist()


class RunLog:
    """Collects one generate_until call's rows, then reports the run means to lmms-eval."""

    def __init__(self):
        self.records: list[dict] = []
        self.generated = 0
        self.seconds = 0.0

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def counts(self, trace: Trace, row: int, output_tokens: int | None) -> SparseTokenCounts:
        """Row `row` of a prefill trace as SparseTokenCounts (input_tokens: the prompt's real
        tokens), recorded for the run."""
        sample = trace[row]
        record = sample_record(sample, len(trace))
        self.records.append(record)
        self.generated += output_tokens or 0
        return SparseTokenCounts(input_tokens=sample.length, output_tokens=output_tokens, sparsevlm=record)

    def report(self) -> None:
        """lmms-eval's log_metrics with the run's mean equivalent tokens and FLOPs reductions."""
        if not self.records:
            return
        means = {f"sparsevlm_{k}": sum(r[k] for r in self.records) / len(self.records) for k in RUN_MEANS}
        speed = self.generated / self.seconds if self.seconds > 0 else 0.0
        log_metrics(self.seconds, self.generated, speed, additional_metrics=means)
