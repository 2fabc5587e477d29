"""What the trace reports for a 576-visual-token LLaVA-1.5-shaped prefill, per preset and budget.

Runs the embedded demo model (LLaVA-1.5's visual geometry, 32 decoder layers, random weights)
so the token counts are the engine's own, and prices the decoder FLOPs at LLaVA-1.5-7B's sizes
(the counts do not depend on the widths). The prompt carries TEXT_TOKENS text tokens, the
number at which the paper's formula gives its dense 4.62 TFLOPs with 576 visual tokens, so the
sparse figures are comparable with the paper's Table 1. Writes bench/results/trace_flops.json.

    python bench/trace_report.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, prefill_flops
from sparsevlm_engine.demo_model import build_demo_llava, demo_inputs, draw_demo_image

PAPER = {  # LLaVA-1.5-7B, SPARSEVLM.md: decoder TFLOPs (dense 4.62) by visual-token budget
    192: 2.1, 128: 1.72, 64: 1.30,
}
BUDGETS = (192, 128, 64)
TEXT_TOKENS = 119
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions. ")
QUESTION = "What is the colour of the square in the picture? Answer the question using a single word. "


def report_prompt(tokenizer) -> str:
    """The demo's question, lengthened to TEXT_TOKENS text tokens around one image."""
    words = (SYSTEM + "USER: <image>\n" + QUESTION).split()
    body = " ".join(words)
    while len(tokenizer(body + " ASSISTANT:")["input_ids"]) - 1 < TEXT_TOKENS:
        body += " " + QUESTION.split()[len(body) % 5]
    return body + " ASSISTANT:"
PRESETS = ("v1_5", "v2")


def main(out: Path = Path("bench/results/trace_flops.json")) -> list[dict]:
    model, tokenizer = build_demo_llava(seed=0)
    inputs = demo_inputs(tokenizer, draw_demo_image(), report_prompt(tokenizer))
    dims = DecoderDims.llava_1_5_7b()
    rows = []
    for preset in PRESETS:
        for budget in BUDGETS:
            sve.sparsify(model, getattr(sve.SparseVLMConfig, preset)(budget))
            with torch.no_grad():
                model(**inputs)
            sample = sve.last_trace(model).samples[0]
            flops = prefill_flops(sample.length, sample.visual_entering, dims, 0.0)
            rows.append({
                "preset": preset, "budget": budget, "tokens": sample.length, "visual": sample.n_visual,
                "after_each_pruning_layer": [r.visual_after for r in sample.pruning],
                "equivalent_tokens_entering": round(sample.equivalent_tokens_entering, 1),
                "equivalent_tokens_after": round(sample.equivalent_tokens_after, 1),
                "dense_tflops_paper": round(flops.dense_paper / 1e12, 3),
                "sparse_tflops_paper": round(flops.sparse_paper / 1e12, 3),
                "reduction_paper": round(flops.reduction_paper, 4),
                "reduction_exact": round(1 - flops.sparse_exact / flops.dense_exact, 4),
                "paper_sparse_tflops": PAPER.get(budget),
                "paper_reduction": round(1 - PAPER[budget] / 4.62, 4) if budget in PAPER else None,
            })
            sve.unsparsify(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "LLaVA-1.5-7B sizes, 576 visual tokens", "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    for row in main(*(Path(a) for a in sys.argv[1:])):
        print(row)
