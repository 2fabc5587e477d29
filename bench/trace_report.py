"""What the trace reports for a 576-visual-token LLaVA-1.5-shaped prefill, per preset and budget.

Runs the embedded demo model (LLaVA-1.5's visual geometry, 32 decoder layers, random weights)
so the token counts are the engine's own, and prices the decoder FLOPs at LLaVA-1.5-7B's sizes
(the counts do not depend on the widths). The prompt carries TEXT_TOKENS text tokens, the
number at which the paper's formula gives its dense 4.62 TFLOPs with 576 visual tokens, so the
sparse figures are comparable with the paper's Table 1. Every preset runs in its own position
mode (v1 and v1.5 renumber, v2 keeps the original ids) and v1.5 also in the other one. Writes
bench/results/trace_flops.json; --readme also rewrites the README's table from it.

    python bench/trace_report.py [--readme] [--from-json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, prefill_flops
from sparsevlm_engine.demo_model import build_demo_llava, demo_inputs, draw_demo_image

ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = ROOT / "bench/results/trace_flops.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- trace-report:begin -->", "<!-- trace-report:end -->"
PAPER = {  # LLaVA-1.5-7B, SPARSEVLM.md: decoder TFLOPs (dense 4.62) by visual-token budget
    192: 2.1, 128: 1.72, 64: 1.30,
}
PAPER_DENSE = 4.62
# (preset, position mode, budgets): v1's rank coefficients are published for 192 / 128 / 64
RUNS = (("v1", "renumber", (192, 128, 64)), ("v1.5", "renumber", (192, 128, 96, 64)),
        ("v1.5", "original", (192, 128, 96, 64)), ("v2", "original", (192, 128, 96, 64)))
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


def measure() -> dict:
    """One row per (preset, positions, budget) of RUNS."""
    model, tokenizer = build_demo_llava(seed=0)
    inputs = demo_inputs(tokenizer, draw_demo_image(), report_prompt(tokenizer))
    dims = DecoderDims.llava_1_5_7b()
    rows = []
    for preset, positions, budgets in RUNS:
        for budget in budgets:
            sve.sparsify(model, sve.SparseVLMConfig.preset(preset, budget, positions=positions))
            with torch.no_grad():
                model(**inputs)
            sample = sve.last_trace(model).samples[0]
            sve.unsparsify(model)
            flops = prefill_flops(sample.length, sample.visual_entering, dims, 0.0)
            rows.append({
                "preset": preset, "positions": positions, "budget": budget, "tokens": sample.length,
                "visual": sample.n_visual, "pruning_layers": [r.layer for r in sample.pruning],
                "after_each_pruning_layer": [r.visual_after for r in sample.pruning],
                "recycled_each_pruning_layer": [len(r.recycled) for r in sample.pruning],
                "equivalent_tokens_entering": round(sample.equivalent_tokens_entering, 1),
                "equivalent_tokens_after": round(sample.equivalent_tokens_after, 1),
                "dense_tflops_paper": round(flops.dense_paper / 1e12, 3),
                "sparse_tflops_paper": round(flops.sparse_paper / 1e12, 3),
                "reduction_paper": round(flops.reduction_paper, 4),
                "reduction_exact": round(1 - flops.sparse_exact / flops.dense_exact, 4),
                "paper_sparse_tflops": PAPER.get(budget),
                "paper_reduction": round(1 - PAPER[budget] / PAPER_DENSE, 4) if budget in PAPER else None,
            })
    return {"model": "LLaVA-1.5-7B sizes, 576 visual tokens, demo model with random weights", "rows": rows}


def table(result: dict) -> str:
    """The README's markdown table of the rows."""
    lines = ["| preset | positions | budget | pruning layers | visual tokens after each (recycled) | "
             "equivalent tokens (entering / after) | decoder TFLOPs, dense → sparse | "
             "reduction (paper formula / exact) | paper, Table 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        after = " / ".join(f"{n} ({c})" if c else str(n)
                           for n, c in zip(r["after_each_pruning_layer"], r["recycled_each_pruning_layer"]))
        paper = (f"{PAPER_DENSE} → {r['paper_sparse_tflops']} ({100 * r['paper_reduction']:.1f}%)"
                 if r["paper_sparse_tflops"] is not None else "—")
        lines.append(
            f"| {r['preset']} | {r['positions']} | {r['budget']} | {' / '.join(map(str, r['pruning_layers']))} | "
            f"{after} | {r['equivalent_tokens_entering']} / {r['equivalent_tokens_after']} | "
            f"{r['dense_tflops_paper']:.2f} → {r['sparse_tflops_paper']:.2f} | "
            f"{100 * r['reduction_paper']:.1f}% / {100 * r['reduction_exact']:.1f}% | {paper} |")
    return "\n".join(lines)


def update_readme(result: dict, readme: Path = README) -> None:
    """Replace the README's trace-report block with the table of `result`."""
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{BEGIN}\n{table(result)}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(JSON_PATH), help="the JSON to write (or read with --from-json)")
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's table")
    parser.add_argument("--from-json", action="store_true", help="with --readme: take the rows from --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        result = json.loads(out.read_text())
    else:
        result = measure()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(table(result))
    if args.readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
