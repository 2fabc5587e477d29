"""The end-to-end targets, each PASS / FAIL / not-measured from the measured figures."""
from __future__ import annotations

from e2e_figures import AUTHORS, COMPILED, DENSE, PRESETS, SPARSE

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
    attns = {c["attn"] for c in cases} or {"sdpa"}
    attns = sorted(attns | {a + COMPILED for a in attns if not a.endswith(COMPILED) and a != "flash_attention_2"})
    presets = sorted({c["preset"] for c in cases if c["preset"]}) or list(PRESETS)
    lines = []

    def find(attn, batch, provider, preset=None, budget=None):
        return next((c for c in cases if c["attn"] == attn and c["batch"] == batch and c["provider"] == provider
                     and c.get("preset") == preset and c.get("budget") == budget), None)

    def line(name, status, detail, attn, preset=None):
        lines.append({"target": name, "attn": attn, "preset": preset, "status": status, "detail": detail})

    def measured(name, attn, preset, batch, key, passes, detail, budget=128):
        """A target on figure `key` of the sparse case (attn, batch, preset, budget)."""
        case = find(attn, batch, SPARSE, preset, budget)
        value = None if why_not or not case else case["figures"].get(key)
        if value is None:
            line(name, "not-measured", why_not or ("case missing" if not case else f"{key} not measured"), attn, preset)
        else:
            line(name, "PASS" if passes(value) else "FAIL", detail(value, case["figures"]), attn, preset)

    def flops_detail(value, f):
        return (f"speedup {f['speedup_vs_dense']:.3f} / FLOPs ratio {f['flops']['ratio_exact']:.3f} = {value:.3f} "
                f"(decoder only: {f['decoder_speedup_over_flops_ratio']:.3f})")

    for attn in attns:
        compiled = attn.endswith(COMPILED)
        for preset in presets:
            if compiled:
                measured("batch 1 compiled: prefill speedup >= 0.85 x decoder FLOPs ratio (budget 128)", attn, preset,
                         1, "speedup_over_flops_ratio", lambda v: v >= 0.85, flops_detail)
                continue
            measured("batch 1: sparse prefill >= 1.2 x dense (budget 128)", attn, preset, 1, "speedup_vs_dense",
                     lambda v: v >= 1.2, lambda v, f: f"{v:.3f} x")
            measured("batch 8: prefill speedup >= 0.9 x decoder FLOPs ratio (budget 128)", attn, preset, 8,
                     "speedup_over_flops_ratio", lambda v: v >= 0.9, flops_detail)
            measured("batch 32: sparse prefill throughput >= 2 x dense (budget 128)", attn, preset, 32,
                     "throughput_ratio_vs_dense", lambda v: v >= 2.0, lambda v, f: f"{v:.3f} x")
            measured("batch 1: the pruning step <= 2% of the dense prefill (budget 128, largest layer)", attn, preset,
                     1, "prune_step_share_of_dense", lambda v: v <= 0.02, lambda v, f: f"{100 * v:.2f}%")
            for batch in (1, 8):
                for kind in ("prefill", "generate"):
                    measured(f"batch {batch}: peak GPU memory of a sparse {kind} <= dense's (budget 128)", attn,
                             preset, batch, f"peak_mem_{kind}_ratio_vs_dense", lambda v: v <= 1.0,
                             lambda v, f: f"{v:.4f} of dense")
            measured("batch 32: decode time per token <= 0.8 x dense (budget 128)", attn, preset, 32,
                     "decode_step_ratio_vs_dense", lambda v: v <= 0.8, lambda v, f: f"{v:.3f} of dense")
            measured("batch 8: >= 3 x faster than the authors-style pipeline (budget 128)", attn, preset, 8,
                     "speedup_vs_authors", lambda v: v >= 3.0, lambda v, f: f"{v:.2f} x")
        if compiled:
            continue
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
