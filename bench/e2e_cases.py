"""Running end-to-end cases: warm-up, the prefill and generate measurements of one provider on
one batch, and a batch's whole series of cases (dense, then each preset and budget: the engine,
then the authors-style baseline), each written to the JSON when done."""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch

import sparsevlm_engine as sve
from authors_style import authors_style
from e2e_common import (Clock, DecoderProbe, PruneProbe, Repeats, dense_samples, expected_kv_tokens, flops_of,
                        kept_records, kv_bytes_per_token, kv_cache_info, peak_memory, stats, time_calls)
from e2e_figures import AUTHORS, DENSE, PRESETS, SPARSE, case_id
from e2e_inputs import decode_steps, generate, prefill, split_samples
from e2e_models import config_for


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
    decode step (new_tokens - 1 greedy steps over a fresh prefill's cache, the prefill untimed),
    and the peak memory of generate(new_tokens)."""
    full, _ = time_calls(lambda: generate(model, inputs, new_tokens), clock, repeats)
    first, _ = time_calls(lambda: generate(model, inputs, 1), clock, repeats)
    n_steps = max(1, new_tokens - 1)
    steps, _ = time_calls(lambda prefilled: decode_steps(model, inputs, prefilled, n_steps), clock, repeats,
                          setup=lambda: prefill(model, inputs))
    step = steps["median_ms"] / n_steps
    batch = inputs["input_ids"].shape[0]
    peak, _ = peak_memory(lambda: generate(model, inputs, new_tokens), clock) if clock.cuda else (None, None)
    return {"generate_ms": full, "generate_first_token_ms": first, "decode_ms_per_step": step,
            "decode_tokens_per_s": batch / (step / 1e3), "peak_mem_generate_bytes": peak}


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


def write_results(path: Path, results: dict) -> None:
    """The results as JSON at path, replaced whole (a run cut short leaves the last complete file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


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
        write_results(path, results)
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
