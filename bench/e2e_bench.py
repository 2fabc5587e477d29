"""End-to-end benchmarks: prefill, decode, generate, memory and KV cache, dense against SparseVLM
(v1.5 and v2 at budgets 192 / 128 / 96 / 64) and against the authors-style baseline, on
random-weight models with real shapes, at batch 1 / 8 / 32 with prompts of different lengths
(left padded).

    python bench/e2e_bench.py --out bench/results

On a CUDA GPU it runs LLaVA-1.5-7B and LLaVA-NeXT-7B shapes in bf16 with sdpa (and
flash_attention_2 when flash-attn is installed); on CPU it runs small shapes in fp32. It writes
e2e_<device>.json (every case's figures, versions, date), e2e_<device>_prefill.png and
e2e_<device>_speedup.png, and prints a table and a PASS / FAIL / not-measured line per target.
Chunks of a long GPU run: --shapes / --batches / --presets / --budgets / --attn select cases,
--resume keeps the cases already in the JSON (the JSON is rewritten after every case).

Providers: "dense" (the model as transformers builds it), "sparsevlm" (this engine, batched)
and "authors-style" (the engine with the authors' scoring, full [H, L, L] attention at each
pruning layer, one sample at a time; bench/authors_style.py). Figures per case: prefill latency
(median, p20, p80) and the decoder's share of it, prefill throughput, time per decode step over
the generated tokens ((generate N - generate 1) / (N - 1)), end-to-end generate time, peak GPU
memory, KV cache bytes after prefill, decoder FLOPs from the trace (paper formula and exact) and
their ratio, speedup / FLOPs ratio, and the pruning pass's share of the sparse prefill (Pruner
.start and .prune timed on the model's own Pruner).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import traceback
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparsevlm_engine as sve  # noqa: E402
from authors_style import PROVIDER as AUTHORS, authors_style  # noqa: E402
from e2e_common import (SHAPES, Clock, DecoderProbe, PruneProbe, Repeats, build_model, config_for,  # noqa: E402
                        dense_samples, expected_kv_tokens, flash_attn_available, flops_of, generate, kept_records,
                        kv_bytes_per_token, kv_cache_info, make_inputs, peak_memory, prefill, set_attention,
                        split_samples, stats, time_calls, visual_token_count)

RESULTS = Path(__file__).parent / "results"
PRESETS = ("v1.5", "v2")
BUDGETS = (192, 128, 96, 64)
DEFAULT_SHAPES = {"cuda": ("llava-1.5-7b", "llava-next-7b"), "cpu": ("llava-1.5-small",)}
DEFAULT_BATCHES = {"llava-1.5-7b": (1, 8, 32), "llava-next-7b": (1, 8), "llava-1.5-small": (1, 8),
                   "llava-next-small": (1, 4), "llava-1.5-tiny": (1, 8, 32), "llava-next-tiny": (1, 4)}
REPEATS = {  # prefill, generate, authors-style loop
    "cuda": (Repeats(3, 10, 100, 1.5), Repeats(1, 3, 10, 2.0), Repeats(1, 3, 20, 1.5)),
    "cpu": (Repeats(2, 5, 20, 1.0), Repeats(0, 1, 3, 0.0), Repeats(1, 2, 5, 0.3)),
}
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
VS_DENSE_GENERATE = ("generate_speedup_vs_dense", "decode_speedup_vs_dense")
FIGURES = {
    DENSE: PREFILL_FIGURES + GENERATE_FIGURES,
    SPARSE: PREFILL_FIGURES + GENERATE_FIGURES + PRUNING_FIGURES + VS_DENSE + VS_DENSE_GENERATE
    + ("speedup_vs_authors",),
    AUTHORS: PREFILL_FIGURES + PRUNING_FIGURES + VS_DENSE + ("kept_identical", "kept_overlap"),
}
MEMORY_FIGURES = ("peak_mem_prefill_bytes", "peak_mem_prefill_extra_bytes", "peak_mem_generate_bytes")


# ----------------------------------------------------------------------------- environment
def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import flash_attn
        flash_version = flash_attn.__version__
    except ImportError:
        flash_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "flash_attn": flash_version, "sparsevlm_engine": sve.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "date": date.today().isoformat()}


def case_id(shape: str, attn: str, batch: int, provider: str, preset: str | None = None, budget: int | None = None):
    tail = "" if provider == DENSE else f"/{preset}/{budget}"
    return f"{shape}/{attn}/B{batch}/{provider}{tail}"


# ----------------------------------------------------------------------------- measuring
def warm_up(model, inputs) -> None:
    """First calls of a fresh model and attention kernel (allocator, kernel choice, Triton
    compilation) before anything is timed."""
    for config in (None, config_for(PRESETS[0], 128)):
        if config is not None:
            sve.sparsify(model, config)
        try:
            for _ in range(2):
                prefill(model, inputs)
            generate(model, inputs, 2)
        finally:
            sve.unsparsify(model)


def measure_prefill(model, calls: list[dict], clock: Clock, repeats: Repeats, pruned: bool) -> tuple[dict, list]:
    """Prefill figures of one model call per entry of `calls` (one batch, or its rows one at a
    time): latency, decoder time and pruning time per call, peak memory, then the KV cache and
    the trace (summed over the calls). Returns (figures, per-row trace samples)."""
    def run():
        for inputs in calls:
            prefill(model, inputs)

    probes = [DecoderProbe(model, clock)] + ([PruneProbe(model, clock)] if pruned else [])
    try:
        latency, readings = time_calls(run, clock, repeats, probes)
    finally:
        for probe in probes:
            probe.close()
    peak, extra = peak_memory(run, clock) if clock.cuda else (None, None)
    depth = model.config.text_config.num_hidden_layers
    samples, kv_bytes, kv_tokens, expected_tokens, expected_bytes = [], 0, [0] * depth, [0] * depth, 0
    for inputs in calls:
        out = prefill(model, inputs)
        info = kv_cache_info(out.past_key_values)
        del out
        rows = sve.last_trace(model).samples if pruned else dense_samples(model, inputs)
        expected = expected_kv_tokens(rows, depth)
        samples += rows
        kv_bytes += info["kv_cache_bytes"]
        kv_tokens = [a + b for a, b in zip(kv_tokens, info["kv_tokens_per_layer"])]
        expected_tokens = [a + b for a, b in zip(expected_tokens, expected)]
        expected_bytes += len(rows) * kv_bytes_per_token(model) * sum(expected)
    fig = {"prefill_ms": latency, "decoder_prefill_ms": stats([r["decoder_ms"] for r in readings]),
           "prefill_seq_per_s": len(samples) / (latency["median_ms"] / 1e3),
           "peak_mem_prefill_bytes": peak, "peak_mem_prefill_extra_bytes": extra,
           "kv_cache_bytes": kv_bytes, "kv_tokens_per_layer": kv_tokens, "kv_expected_bytes": expected_bytes,
           "kv_expected_tokens_per_layer": expected_tokens, "flops": flops_of(model, samples),
           "equivalent_visual_tokens": sum(sum(s.visual_entering) / depth for s in samples) / len(samples)}
    if pruned:
        steps = [r["prune_steps_ms"] for r in readings]
        fig |= {"prune_ms": stats([r["prune_ms"] for r in readings]),
                "prune_steps_ms": [stats(list(layer))["median_ms"] for layer in zip(*steps)],
                "pruning_layers": [r.layer for r in samples[0].pruning],
                "visual_after_pruning_layers": [sum(s.pruning[i].visual_after for s in samples) / len(samples)
                                                for i in range(len(samples[0].pruning))]}
        fig["prune_share"] = fig["prune_ms"]["median_ms"] / latency["median_ms"]
    return fig, samples


def measure_generate(model, inputs, clock: Clock, repeats: Repeats, new_tokens: int) -> dict:
    """generate(new_tokens) end to end, generate(1) (prefill and first token), the time per
    decode step between them, and the peak memory of generate(new_tokens)."""
    full, _ = time_calls(lambda: generate(model, inputs, new_tokens), clock, repeats)
    first, _ = time_calls(lambda: generate(model, inputs, 1), clock, repeats)
    step = (full["median_ms"] - first["median_ms"]) / max(1, new_tokens - 1)
    batch = inputs["input_ids"].shape[0]
    peak, _ = peak_memory(lambda: generate(model, inputs, new_tokens), clock) if clock.cuda else (None, None)
    return {"generate_ms": full, "generate_first_token_ms": first, "decode_ms_per_step": step,
            "decode_tokens_per_s": batch / (step / 1e3) if step > 0 else None, "peak_mem_generate_bytes": peak}


def run_case(model, inputs, provider: str, clock: Clock, settings: dict, engine_records=None) -> tuple[dict, list]:
    """One case on the model as it is (dense, or sparsified by the caller). The authors-style
    provider runs the rows one at a time with the authors' scoring and is compared with the
    engine's kept tokens (engine_records, from the batched run). Returns (figures, kept records)."""
    repeats_prefill, repeats_generate, repeats_loop = settings["repeats"]
    if provider == AUTHORS:
        with authors_style(model):
            fig, samples = measure_prefill(model, split_samples(inputs), clock, repeats_loop, pruned=True)
        pairs = [(set(a[1]), set(b[1])) for row_a, row_b in zip(kept_records(samples), engine_records)
                 for a, b in zip(row_a, row_b)]
        if pairs:  # the same method: equal in fp32; bf16 rounding of the probabilities can swap near-ties
            fig["kept_identical"] = sum(a == b for a, b in pairs) / len(pairs)
            fig["kept_overlap"] = sum(len(a & b) / max(1, len(a | b)) for a, b in pairs) / len(pairs)
        return fig, kept_records(samples)
    fig, samples = measure_prefill(model, [inputs], clock, repeats_prefill, pruned=provider == SPARSE)
    if settings["new_tokens"]:
        fig |= measure_generate(model, inputs, clock, repeats_generate, settings["new_tokens"])
    return fig, kept_records(samples) if provider == SPARSE else []

# ----------------------------------------------------------------------------- derived figures
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
        elif key in VS_DENSE + VS_DENSE_GENERATE:
            missing[key] = "no dense case of the same shape, attention and batch"
        elif key == "speedup_vs_authors":
            missing[key] = "no authors-style case (--no-authors)"
        elif key == "decode_tokens_per_s":
            missing[key] = "decode step time not above zero"
        else:
            missing[key] = "not measured"
    case["not_measured"] = missing


# ----------------------------------------------------------------------------- targets
TARGET_SHAPE = "llava-1.5-7b"


def evaluate_targets(results: dict, shape: str = TARGET_SHAPE, require_cuda: bool = True) -> list[dict]:
    """One line per target and preset, PASS / FAIL / not-measured, from the measured figures."""
    env = results["environment"]
    cases = [c for c in results["cases"].values() if c["shape"] == shape and not c.get("error")]
    why_not = None
    if require_cuda and env["device_type"] != "cuda":
        why_not = f"needs a CUDA GPU (this run: {env['device']})"
    elif not cases:
        why_not = f"no {shape} case in this run"
    attns = sorted({c["attn"] for c in cases}) or ["sdpa"]
    presets = sorted({c["preset"] for c in cases if c["preset"]}) or list(PRESETS)
    lines = []

    def find(attn, batch, provider, preset=None, budget=None):
        return next((c for c in cases if c["attn"] == attn and c["batch"] == batch and c["provider"] == provider
                     and c.get("preset") == preset and c.get("budget") == budget), None)

    def line(name, status, detail, attn, preset=None):
        lines.append({"target": name, "attn": attn, "preset": preset, "status": status, "detail": detail})

    for attn in attns:
        for preset in presets:
            for batch, floor in ((1, 0.85), (8, 0.9)):
                name = f"prefill speedup >= {floor} x decoder FLOPs ratio (budget 128, batch {batch})"
                case = find(attn, batch, SPARSE, preset, 128)
                if why_not or not case or case["figures"].get("speedup_over_flops_ratio") is None:
                    line(name, "not-measured", why_not or "case missing", attn, preset)
                    continue
                f = case["figures"]
                value = f["speedup_over_flops_ratio"]
                line(name, "PASS" if value >= floor else "FAIL",
                     f"speedup {f['speedup_vs_dense']:.3f} / FLOPs ratio {f['flops']['ratio_exact']:.3f} = {value:.3f} "
                     f"(decoder only: {f['decoder_speedup_over_flops_ratio']:.3f})", attn, preset)
            name = "sparse prefill throughput >= 2 x dense (budget 128, batch 32)"
            case = find(attn, 32, SPARSE, preset, 128)
            if why_not or not case or case["figures"].get("throughput_ratio_vs_dense") is None:
                line(name, "not-measured", why_not or "case missing", attn, preset)
            else:
                value = case["figures"]["throughput_ratio_vs_dense"]
                line(name, "PASS" if value >= 2.0 else "FAIL", f"{value:.3f} x", attn, preset)
        sparse = [c for c in cases if c["attn"] == attn and c["provider"] in (SPARSE, AUTHORS)]
        name = "KV cache after prefill shrinks in proportion to the visual tokens removed"
        if why_not or not sparse:
            line(name, "not-measured", why_not or "no sparse case", attn)
        else:
            bad = [case_label(c) for c in sparse if c["figures"]["kv_cache_bytes"] != c["figures"]["kv_expected_bytes"]
                   or c["figures"]["kv_tokens_per_layer"] != c["figures"]["kv_expected_tokens_per_layer"]]
            ref_case = find(attn, 1, SPARSE, presets[0], 128)
            example = ""
            if ref_case and ref_case["figures"].get("kv_ratio_vs_dense") is not None:
                example = (f"; batch 1, {presets[0]} 128: {ref_case['figures']['kv_ratio_vs_dense']:.4f} of dense, "
                           f"token ratio {ref_case['figures']['kv_ratio_expected']:.4f}")
            line(name, "FAIL" if bad else "PASS",
                 (f"{len(sparse) - len(bad)}/{len(sparse)} cases hold exactly the trace's tokens per layer" + example
                  + (f"; off: {', '.join(bad[:4])}" if bad else "")), attn)
        name = "faster than the authors-style baseline at every budget and batch it ran"
        pairs = [(c, c["figures"].get("speedup_vs_authors")) for c in cases
                 if c["attn"] == attn and c["provider"] == SPARSE
                 and c["figures"].get("speedup_vs_authors") is not None]
        if why_not or not pairs:
            line(name, "not-measured", why_not or "no authors-style case", attn)
        else:
            slower = [case_label(c) for c, v in pairs if v <= 1.0]
            values = [v for _, v in pairs]
            line(name, "FAIL" if slower else "PASS",
                 f"{len(pairs) - len(slower)}/{len(pairs)} faster; gain {min(values):.2f}x to {max(values):.2f}x"
                 + (f"; not faster: {', '.join(slower[:4])}" if slower else ""), attn)
    return lines


def case_label(case: dict) -> str:
    tail = "" if case["provider"] == DENSE else f" {case['preset']} {case['budget']}"
    return f"B{case['batch']} {case['provider']}{tail}"


# ----------------------------------------------------------------------------- output
def _mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def _num(value, fmt=".2f", suffix=""):
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def print_table(results: dict, targets: list[dict], informational: list[dict]) -> None:
    env = results["environment"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}"
          f"  flash-attn {env['flash_attn']}  {env['date']}")
    head = (f"{'case':44} {'prefill ms [p20, p80]':>26} {'seq/s':>8} {'speedup':>7} {'FLOPs x':>7} {'spd/FL':>6}"
            f" {'ms/step':>8} {'gen ms':>9} {'KV MiB':>7} {'peak MiB':>8} {'prune %':>7} {'vs auth':>7}")
    print(head)
    for cid, case in results["cases"].items():
        label = cid
        if case.get("error"):
            print(f"{label:44} {case['error']}")
            continue
        f = case["figures"]
        p = f["prefill_ms"]
        gen = f.get("generate_ms")
        print(f"{label:44} {p['median_ms']:9.2f} [{p['p20_ms']:7.2f}, {p['p80_ms']:7.2f}]"
              f" {f['prefill_seq_per_s']:8.2f} {_num(f.get('speedup_vs_dense'), '.2f'):>7}"
              f" {_num(f['flops']['ratio_exact'], '.2f'):>7} {_num(f.get('speedup_over_flops_ratio'), '.2f'):>6}"
              f" {_num(f.get('decode_ms_per_step'), '.2f'):>8} {_num(gen and gen['median_ms'], '.1f'):>9}"
              f" {_mib(f['kv_cache_bytes']):>7} {_mib(f['peak_mem_prefill_bytes']):>8}"
              f" {_num(f.get('prune_share') and 100 * f['prune_share'], '.1f'):>7}"
              f" {_num(f.get('speedup_vs_authors'), '.2f'):>7}")
    ratios = results.get("end_to_end_ratios", [])
    if ratios:
        kind = "CPU" if env["device_type"] == "cpu" else "GPU"
        print(f"\n{kind} end-to-end ratio, sparse / dense time (lower is faster):")
        for r in ratios:
            print(f"  {r['shape']} {r['attn']} batch {r['batch']:>2} {r['preset']:4} budget {r['budget']:>3}:"
                  f" prefill {r['prefill_ratio']:.3f}  generate {_num(r['generate_ratio'], '.3f')}")
    print("\nTargets (LLaVA-1.5-7B shapes, bf16, GPU):")
    for t in targets:
        who = " ".join(x for x in (t["attn"], t["preset"]) if x)
        print(f"  [{t['status']:>12}] {t['target']} [{who}]: {t['detail']}")
    if informational:
        print("Same checks on this run's shapes (informational, not the targets):")
        for t in informational:
            who = " ".join(x for x in (t["shape"], t["attn"], t["preset"]) if x)
            print(f"  [{t['status']:>12}] {t['target']} [{who}]: {t['detail']}")


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


def plot(results: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results["cases"].values() if not c.get("error")]
    groups = sorted({(c["shape"], c["attn"]) for c in cases})
    batches = sorted({c["batch"] for c in cases})
    paths = []
    if not groups:
        return paths
    fig, axes = plt.subplots(len(groups), len(batches), figsize=(4.2 * len(batches), 3.4 * len(groups)),
                             squeeze=False)
    for gi, (shape, attn) in enumerate(groups):
        for bi, batch in enumerate(batches):
            ax = axes[gi][bi]
            here = [c for c in cases if c["shape"] == shape and c["attn"] == attn and c["batch"] == batch]
            for c in here:
                if c["provider"] == DENSE:
                    p = c["figures"]["prefill_ms"]
                    ax.axhline(p["median_ms"], color="black", lw=1, label="dense")
                    ax.axhspan(p["p20_ms"], p["p80_ms"], color="black", alpha=0.1)
            for provider, style in ((SPARSE, "-o"), (AUTHORS, "--x")):
                for preset in sorted({c["preset"] for c in here if c["provider"] == provider}):
                    rows = sorted((c["budget"], c["figures"]["prefill_ms"]) for c in here
                                  if c["provider"] == provider and c["preset"] == preset)
                    xs = [b for b, _ in rows]
                    ys = [p["median_ms"] for _, p in rows]
                    err = [[p["median_ms"] - p["p20_ms"] for _, p in rows],
                           [p["p80_ms"] - p["median_ms"] for _, p in rows]]
                    ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=2, label=f"{provider} {preset}")
            ax.set_title(f"{shape}, {attn}, batch {batch}", fontsize=9)
            ax.set_xlabel("visual-token budget")
            ax.set_ylabel("prefill ms (median, p20-p80)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.suptitle(f"Prefill latency vs budget, {results['environment']['device']}", fontsize=10)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_prefill.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sparse = [c for c in cases if c["provider"] == SPARSE and c["figures"].get("speedup_vs_dense") is not None]
    markers = dict(zip(batches, "os^Dv*"))
    for c in sparse:
        colour = "tab:blue" if c["preset"] == "v1.5" else "tab:orange"
        ax.scatter(c["figures"]["flops"]["ratio_exact"], c["figures"]["speedup_vs_dense"], color=colour,
                   marker=markers[c["batch"]], alpha=0.8)
    if sparse:
        top = max(max(c["figures"]["flops"]["ratio_exact"] for c in sparse),
                  max(c["figures"]["speedup_vs_dense"] for c in sparse)) * 1.1
        xs = [0, top]
        ax.plot(xs, xs, "k-", lw=1, label="speedup = FLOPs ratio")
        ax.plot(xs, [0.9 * x for x in xs], "k--", lw=0.8, label="0.9 x (batch 8 target)")
        ax.plot(xs, [0.85 * x for x in xs], "k:", lw=0.8, label="0.85 x (batch 1 target)")
        ax.axhline(1.0, color="grey", lw=0.5)
    for preset, colour in (("v1.5", "tab:blue"), ("v2", "tab:orange")):
        ax.scatter([], [], color=colour, label=preset)
    for batch, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"batch {batch}")
    ax.set_xlabel("decoder FLOPs ratio, dense / sparse (exact, pruning included)")
    ax.set_ylabel("measured prefill speedup")
    ax.set_title(f"Speedup vs FLOPs ratio, {results['environment']['device']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def _write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: the real shapes on CUDA, "
                        "llava-1.5-small on CPU")
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 8 32 (LLaVA-1.5-7B), 1 8 (NeXT, CPU)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--attn", nargs="+", choices=("sdpa", "flash_attention_2", "eager"),
                        help="default: sdpa, and flash_attention_2 when flash-attn is installed (CUDA)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (0: no decode figures)")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors-style baseline")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: the shape's")
    parser.add_argument("--repeats-scale", type=float, default=1.0, help="scale the repeat counts and times")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in the JSON")
    parser.add_argument("--name", help="JSON / plot stem (default e2e_<device>)")
    return parser.parse_args(argv)


def run_batch(model, inputs, where: dict, args, settings: dict, results: dict, path: Path) -> int:
    """Dense, then each preset and budget: the engine, then the authors-style baseline. Every
    case is written to the JSON when done; returns how many failed (out of memory excepted)."""
    device = inputs["input_ids"].device
    clock = Clock(device)
    common = where | {"seq_lengths": inputs["attention_mask"].sum(1).tolist(), "new_tokens": args.new_tokens}
    failures = 0

    def record(provider, preset, budget, measure):
        nonlocal failures
        cid = case_id(where["shape"], where["attn"], where["batch"], provider, preset, budget)
        if cid in results["cases"]:
            print(f"   {cid}: kept from {path.name}", flush=True)
            return None
        print(f"   {cid}", flush=True)
        case, kept = common | {"provider": provider, "preset": preset, "budget": budget}, None
        try:
            case["figures"], kept = measure()
        except torch.OutOfMemoryError:
            case["error"] = "out of memory"
        except Exception as error:  # keep the other cases of a long GPU run
            traceback.print_exc()
            case["error"] = f"{type(error).__name__}: {error}"
            failures += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["cases"][cid] = case
        _write(path, results)
        return kept

    def authors(engine):
        if engine is None:  # the engine's own batched choice, when its case was kept from an earlier run
            prefill(model, inputs)
            engine = kept_records(sve.last_trace(model).samples)
        return run_case(model, inputs, AUTHORS, clock, settings, engine)

    sve.unsparsify(model)
    record(DENSE, None, None, lambda: run_case(model, inputs, DENSE, clock, settings))
    for preset in args.presets:
        for budget in args.budgets:
            sve.sparsify(model, config_for(preset, budget))
            try:
                engine = record(SPARSE, preset, budget, lambda: run_case(model, inputs, SPARSE, clock, settings))
                if not args.no_authors:
                    record(AUTHORS, preset, budget, lambda: authors(engine))
            finally:
                sve.unsparsify(model)
    return failures


def describe(model, shape, n_visual: int, dtype: torch.dtype) -> dict:
    text = model.config.text_config
    return {"family": shape.family, "dtype": str(dtype).replace("torch.", ""), "visual_tokens": n_visual,
            "decoder": {"layers": text.num_hidden_layers, "hidden": text.hidden_size,
                        "intermediate": text.intermediate_size, "heads": text.num_attention_heads,
                        "kv_heads": text.num_key_value_heads},
            "vision": {"hidden": shape.vision_hidden, "layers": shape.vision_layers, "image": shape.image_size,
                       "patch": shape.patch_size, "image_hw": shape.image_hw},
            "real_shape": shape.real, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    env = environment(device)
    shapes = args.shapes or DEFAULT_SHAPES[kind]
    attns = args.attn or (["sdpa", "flash_attention_2"] if kind == "cuda" and flash_attn_available() else ["sdpa"])
    repeats = tuple(r.scaled(args.repeats_scale) for r in REPEATS[kind])
    settings = {"repeats": repeats, "new_tokens": args.new_tokens}
    stem = args.out / (args.name or f"e2e_{device_slug(env['device'])}")
    path = stem.with_suffix(".json")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"environment": env, "settings": {}, "shapes": {}, "cases": {}, "runs": []}
    if args.resume and path.exists():
        previous = json.loads(path.read_text())
        results["cases"] = {k: v for k, v in previous.get("cases", {}).items() if not v.get("error")}
        results["shapes"] = previous.get("shapes", {})
        results["runs"] = previous.get("runs", [])
    results["runs"].append({"date": env["date"], "argv": sys.argv[1:] if argv is None else list(argv)})
    results["settings"] = {
        "repeats": dict(zip(("prefill", "generate", "authors_style_loop"), map(vars, repeats))),
        "new_tokens": args.new_tokens,
        "timer": "CUDA events, synchronised per call" if kind == "cuda" else "perf_counter",
        "prefill_call": "model(**inputs, use_cache=True, logits_to_keep=1) under no_grad",
        "flops_ratio": "dense_exact / (sparse_exact + pruning), summed over rows",
        "decode_ms_per_step": "(median generate(N) - median generate(1)) / (N - 1)"}
    failures = 0
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        dtype = getattr(torch, args.dtype or shape.dtype)
        print(f"== building {shape_name} ({dtype}, {kind})", flush=True)
        model = build_model(shape, device, dtype)
        n_visual = visual_token_count(model, shape)
        results["shapes"][shape_name] = describe(model, shape, n_visual, dtype)
        for attn in attns:
            try:
                set_attention(model, attn)
            except Exception as error:  # e.g. flash-attn present but unusable
                print(f"   skipping {attn}: {type(error).__name__}: {error}", flush=True)
                results.setdefault("skipped", []).append({"shape": shape_name, "attn": attn, "error": str(error)})
                failures += 1
                continue
            try:
                warm_up(model, make_inputs(model, shape, 1, n_visual=n_visual))
            except Exception:  # the cases record their own errors
                traceback.print_exc()
            for batch in args.batches or DEFAULT_BATCHES[shape_name]:
                where = {"shape": shape_name, "attn": attn, "batch": batch, "n_visual": n_visual,
                         "dtype": str(dtype).replace("torch.", "")}
                inputs = make_inputs(model, shape, batch, n_visual=n_visual)
                failures += run_batch(model, inputs, where, args, settings, results, path)
        del model
        if kind == "cuda":
            torch.cuda.empty_cache()
    derive(results)
    results["end_to_end_ratios"] = end_to_end_ratios(results)
    targets = evaluate_targets(results)
    informational = []
    if kind != "cuda" or TARGET_SHAPE not in shapes:
        for name in sorted({c["shape"] for c in results["cases"].values()}):
            informational += [t | {"shape": name} for t in evaluate_targets(results, name, require_cuda=False)]
    results["targets"], results["targets_informational"] = targets, informational
    results["plots"] = [p.name for p in plot(results, stem)]
    _write(path, results)
    print_table(results, targets, informational)
    print(f"\nwrote {path} and {', '.join(results['plots'])}")
    if failures:
        print(f"{failures} case(s) failed; see 'error' in the JSON", file=sys.stderr)
    results["failures"] = failures
    return results


if __name__ == "__main__":
    sys.exit(1 if main().get("failures") else 0)
