"""What an end-to-end case is: its providers, presets and budgets, its id, every figure it
carries (None only where not_measured says why), and the figures derived from the others
(ratios against the dense and the authors-style case of the same shape, attention and batch)."""
from __future__ import annotations

from authors_style import PROVIDER as AUTHORS

PRESETS = ("v1.5", "v2")
BUDGETS = (192, 128, 96, 64)
DENSE, SPARSE = "dense", "sparsevlm"

# Every figure each provider's case carries (None only where not_measured says why).
PREFILL_FIGURES = ("prefill_ms", "decoder_prefill_ms", "prefill_seq_per_s", "peak_mem_prefill_bytes",
                   "peak_mem_prefill_extra_bytes", "kv_cache_bytes", "kv_tokens_per_layer", "kv_expected_bytes",
                   "flops", "equivalent_visual_tokens")
GENERATE_FIGURES = ("generate_ms", "generate_first_token_ms", "decode_ms_per_step", "decode_tokens_per_s",
                    "peak_mem_generate_bytes")
PRUNING_FIGURES = ("prune_ms", "prune_steps_ms", "prune_share", "visual_after_pruning_layers")
VS_DENSE = ("speedup_vs_dense", "decoder_speedup_vs_dense", "throughput_ratio_vs_dense", "speedup_over_flops_ratio",
            "speedup_over_flops_ratio_paper", "decoder_speedup_over_flops_ratio", "kv_ratio_vs_dense",
            "kv_ratio_expected")
VS_DENSE_GENERATE = ("generate_speedup_vs_dense", "decode_speedup_vs_dense", "decode_step_ratio_vs_dense")
VS_DENSE_PRUNING = ("prune_step_share_of_dense",)
VS_DENSE_MEMORY = ("peak_mem_prefill_ratio_vs_dense", "peak_mem_generate_ratio_vs_dense")
FIGURES = {
    DENSE: PREFILL_FIGURES + GENERATE_FIGURES,
    SPARSE: PREFILL_FIGURES + GENERATE_FIGURES + PRUNING_FIGURES + VS_DENSE + VS_DENSE_GENERATE + VS_DENSE_PRUNING
    + VS_DENSE_MEMORY + ("speedup_vs_authors",),
    AUTHORS: PREFILL_FIGURES + PRUNING_FIGURES + VS_DENSE + ("kept_identical", "kept_overlap"),
}
MEMORY_FIGURES = ("peak_mem_prefill_bytes", "peak_mem_prefill_extra_bytes", "peak_mem_generate_bytes") + VS_DENSE_MEMORY
COMPILED = "+compiled"  # attention label suffix of the cases run with sve.compile_decoder


def _ratio(a, b):
    return a / b if a is not None and b else None


def case_id(shape: str, attn: str, batch: int, provider: str, preset: str | None = None, budget: int | None = None):
    tail = "" if provider == DENSE else f"/{preset}/{budget}"
    return f"{shape}/{attn}/B{batch}/{provider}{tail}"


def derive(results: dict) -> None:
    """Ratios against the dense case and the authors-style case of the same shape, attention
    and batch; recomputed from the stored figures (so --resume runs get them too)."""
    cases = results["cases"]
    for case in cases.values():
        if case.get("error") or case["provider"] == DENSE:
            continue
        fig = case["figures"]
        dense = cases.get(case_id(case["shape"], case["attn"], case["batch"], DENSE))
        dense_fig = dense["figures"] if dense and not dense.get("error") else None
        if dense_fig:
            speedup = dense_fig["prefill_ms"]["median_ms"] / fig["prefill_ms"]["median_ms"]
            dec = dense_fig["decoder_prefill_ms"]["median_ms"] / fig["decoder_prefill_ms"]["median_ms"]
            fig |= {"speedup_vs_dense": speedup, "decoder_speedup_vs_dense": dec,
                    "throughput_ratio_vs_dense": fig["prefill_seq_per_s"] / dense_fig["prefill_seq_per_s"],
                    "speedup_over_flops_ratio": speedup / fig["flops"]["ratio_exact"],
                    "speedup_over_flops_ratio_paper": speedup / fig["flops"]["ratio_paper"],
                    "decoder_speedup_over_flops_ratio": dec / fig["flops"]["ratio_exact"],
                    "kv_ratio_vs_dense": fig["kv_cache_bytes"] / dense_fig["kv_cache_bytes"],
                    "kv_ratio_expected": fig["kv_expected_bytes"] / dense_fig["kv_expected_bytes"]}
            if case["provider"] == SPARSE and dense_fig.get("generate_ms") and fig.get("generate_ms"):
                fig["generate_speedup_vs_dense"] = (dense_fig["generate_ms"]["median_ms"]
                                                    / fig["generate_ms"]["median_ms"])
                if dense_fig["decode_ms_per_step"] and fig["decode_ms_per_step"]:
                    fig["decode_speedup_vs_dense"] = dense_fig["decode_ms_per_step"] / fig["decode_ms_per_step"]
                    fig["decode_step_ratio_vs_dense"] = 1 / fig["decode_speedup_vs_dense"]
            if case["provider"] == SPARSE:
                steps = fig.get("prune_steps_ms") or []
                fig["prune_step_share_of_dense"] = (max(steps) / dense_fig["prefill_ms"]["median_ms"]
                                                    if steps else None)
                fig["peak_mem_prefill_ratio_vs_dense"] = _ratio(fig.get("peak_mem_prefill_bytes"),
                                                                dense_fig.get("peak_mem_prefill_bytes"))
                fig["peak_mem_generate_ratio_vs_dense"] = _ratio(fig.get("peak_mem_generate_bytes"),
                                                                 dense_fig.get("peak_mem_generate_bytes"))
        if case["provider"] == SPARSE:
            authors = cases.get(case_id(case["shape"], case["attn"], case["batch"], AUTHORS, case["preset"],
                                        case["budget"]))
            if authors and not authors.get("error"):
                fig["speedup_vs_authors"] = (authors["figures"]["prefill_ms"]["median_ms"]
                                             / fig["prefill_ms"]["median_ms"])
    for case in cases.values():
        if not case.get("error"):
            _complete(case, results["environment"]["device_type"])


def _complete(case: dict, device_type: str) -> None:
    """Every figure of the provider present; None only with a reason in not_measured."""
    fig, missing = case["figures"], {}
    for key in FIGURES[case["provider"]]:
        if fig.get(key) is not None:
            continue
        fig[key] = None
        if key in MEMORY_FIGURES and device_type != "cuda":
            missing[key] = "GPU memory: measured on CUDA only"
        elif key in GENERATE_FIGURES + VS_DENSE_GENERATE and not case.get("new_tokens"):
            missing[key] = "generation not run (--new-tokens 0)"
        elif key in VS_DENSE + VS_DENSE_GENERATE + VS_DENSE_PRUNING:
            missing[key] = "no dense case of the same shape, attention and batch"
        elif key == "speedup_vs_authors":
            missing[key] = "no authors-style case (--no-authors)"
        else:
            missing[key] = "not measured"
    case["not_measured"] = missing


def end_to_end_ratios(results: dict) -> list[dict]:
    rows = []
    for case in results["cases"].values():
        f = case.get("figures", {})
        if case["provider"] != SPARSE or case.get("error") or f.get("speedup_vs_dense") is None:
            continue
        gen = f.get("generate_speedup_vs_dense")
        rows.append({"shape": case["shape"], "attn": case["attn"], "batch": case["batch"], "preset": case["preset"],
                     "budget": case["budget"], "prefill_ratio": 1 / f["speedup_vs_dense"],
                     "generate_ratio": None if gen is None else 1 / gen})
    return rows
