"""The end-to-end targets, each PASS / FAIL / not-measured from the measured figures."""
from __future__ import annotations

from e2e_figures import AUTHORS, DENSE, PRESETS, SPARSE

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
