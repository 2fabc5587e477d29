"""Kernel microbenchmarks: each Triton kernel against its torch reference, and the scoring
against the authors' way (materialise the full softmax attention at the pruning layer, average
the heads, slice rater rows x visual columns), at LLaVA-1.5-7B and LLaVA-NeXT-7B shapes, batch
1 and 8. Then the whole prune step at one pruning layer of a LLaVA-1.5-7B-shaped model against
that model's dense prefill.

Times are triton.testing.do_bench medians with p20 / p80 (ms); memory is the peak allocated
above what was allocated before the call (MiB). Writes bench/results/kernels_<gpu>.json and a
plot. Needs a CUDA GPU.

    python bench/kernel_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.backends import TorchOps, TritonOps
from sparsevlm_engine.kernels.compact import compaction_order
from sparsevlm_engine.kernels.relevance import head_relevance

RESULTS = Path(__file__).parent / "results"
TRITON, TORCH = TritonOps(), TorchOps()
QUANTILES = [0.5, 0.2, 0.8]
HEADS, HEAD_DIM, HIDDEN = 32, 128, 4096
SHAPES = {  # name: (sequence length, visual tokens, raters)
    "llava-1.5-7b": (650, 576, 40),
    "llava-next-7b": (3000, 2880, 60),
}


def timed(fn, warmup=25, rep=100):
    """(median, p20, p80) ms and peak extra MiB of fn()."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_extra_mib": peak}


def scoring_inputs(batch, length, n_visual, n_raters, dtype=torch.bfloat16, seed=0):
    """Full Q / K of a pruning layer (the authors need all queries), and the rater subset."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_all = torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    first_visual = 35
    visual = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    visual[:, first_visual:first_visual + n_visual] = True
    text_slots = torch.arange(first_visual + n_visual, length, device="cuda")
    rater_slot = text_slots[torch.linspace(0, len(text_slots) - 1, n_raters, device="cuda").long()]
    rater_slot = rater_slot.expand(batch, -1).contiguous()
    q = q_all.gather(2, rater_slot[:, None, :, None].expand(-1, HEADS, -1, HEAD_DIM))
    key_valid = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    rater_valid = torch.ones(batch, n_raters, dtype=torch.bool, device="cuda")
    return q_all, q, k, rater_slot, rater_valid, key_valid, visual


def authors_scoring(q_all, k, rater_slot, visual):
    """Full [B, H, L, L] softmax attention (as eager attention with output_attentions builds it),
    head mean, rater rows x visual columns (one sample at a time, as their code runs)."""
    out = []
    length = k.shape[2]
    causal = torch.full((length, length), float("-inf"), device=k.device).triu(1)
    for b in range(q_all.shape[0]):
        logits = (q_all[b:b + 1] @ k[b:b + 1].transpose(-1, -2)) * HEAD_DIM ** -0.5 + causal
        attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q_all.dtype)
        mean = attn.mean(1)[0]
        out.append(mean[rater_slot[b]][:, visual[b]].float().mean(0))
    return out


def both(op: str, *args, reference_timing=None, **kwargs) -> dict:
    """The Triton launcher and its reference (backends' two tables), timed on the same arguments."""
    return {"triton": timed(lambda: getattr(TRITON, op)(*args, **kwargs)),
            "torch-reference": timed(lambda: getattr(TORCH, op)(*args, **kwargs), **(reference_timing or {}))}


def bench_scoring(batch, length, n_visual, n_raters):
    q_all, q, k, slot, r_ok, k_ok, visual = scoring_inputs(batch, length, n_visual, n_raters)
    scaling = HEAD_DIM ** -0.5
    rows = both("head_relevance", q, k, slot, r_ok, k_ok, visual, scaling)
    try:
        rows["authors"] = timed(lambda: authors_scoring(q_all, k, slot, visual), warmup=5, rep=20)
    except torch.OutOfMemoryError:
        rows["authors"] = None
    # agreement: the same relevance (head mean) up to bf16 rounding of the authors' probabilities
    ours = head_relevance(q, k, slot, r_ok, k_ok, visual, scaling).mean(1)[:, visual[0]]
    theirs = torch.stack(authors_scoring(q_all, k, slot, visual))
    rows["max_rel_diff_vs_authors"] = float(((ours - theirs).abs().max() / theirs.abs().max()).item())
    return rows


def layout_inputs(batch, length, n_visual, start=35):
    """valid, visual, rater [B, L] of a prompt: text, n_visual image tokens from start, then the
    question (its tokens are the raters)."""
    valid = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    visual = torch.zeros_like(valid)
    visual[:, start:start + n_visual] = True
    rater = torch.zeros_like(valid)
    rater[:, start + n_visual:] = True
    return valid, visual, rater


def bench_select(batch, length, n_visual, keep):
    head_rel = torch.rand(batch, 32, length, device="cuda")
    valid, visual, rater = layout_inputs(batch, length, n_visual)
    counts = torch.tensor([[keep], [(n_visual - keep) * 3 // 10 + 1]], device="cuda").expand(2, batch)
    width = length - n_visual + keep
    return {"no-recycling": both("select_step", head_rel, valid, visual, rater, counts[0], counts[1], None, 0, width),
            "recycling": both("select_step", head_rel, valid, visual, rater, counts[0], counts[1], None,
                              int(counts[1, 0]), None)}


def bench_recycle(batch, length, n_cand):
    hidden = torch.randn(batch, length, HIDDEN, device="cuda", dtype=torch.bfloat16)
    cand_idx = torch.stack([torch.randperm(length, device="cuda")[:n_cand].sort().values for _ in range(batch)])
    n = torch.full((batch,), n_cand, device="cuda")
    clusters = n_cand // 10 + 1
    c = torch.full((batch,), clusters, device="cuda")
    alive = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    alive[:, :length // 2] = False
    return both("recycle", hidden, cand_idx, n, c, clusters, alive, length, reference_timing=dict(warmup=5, rep=20))


def bench_compact(batch, length, width):
    hidden = torch.randn(batch, length, HIDDEN, device="cuda", dtype=torch.bfloat16)
    alive = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    alive[:, length - width:] = True
    valid, visual, rater = layout_inputs(batch, length, length - width)
    slots = torch.arange(length, device="cuda").expand(batch, -1).contiguous()
    cos = torch.randn(1, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16).expand(batch, -1, -1)
    sin = cos.clone()
    order = compaction_order(alive, width)
    return both("compact", order, hidden, slots, slots, alive, visual, rater, cos, sin, slots, mask="bool")


def bench_queries(batch, length, n_raters):
    """The rater queries: gather, RMSNorm, q_proj and RoPE of the raters (LLaVA-1.5-7B widths)."""
    hidden = torch.randn(batch, length, HIDDEN, device="cuda", dtype=torch.bfloat16)
    valid, _, rater = layout_inputs(batch, length, length - 35 - n_raters)
    weight = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5
    norm = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(1, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16).expand(batch, -1, -1)
    return both("rater_queries", hidden, rater, valid, n_raters, norm, 1e-5, weight, None, cos, cos)


def bench_raters(batch, n_visual, n_text):
    visual = torch.randn(batch, n_visual, HIDDEN, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(batch, n_text, HIDDEN, device="cuda", dtype=torch.bfloat16)
    v_ok = torch.ones(batch, n_visual, dtype=torch.bool, device="cuda")
    t_ok = torch.ones(batch, n_text, dtype=torch.bool, device="cuda")
    return both("select_raters", visual, text, v_ok, t_ok)


# ----------------------------------------------------------------------------- whole prune step
def llava_7b_shaped():
    """A random-weight LlavaForConditionalGeneration with LLaVA-1.5-7B's shapes (bf16, sdpa)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def llava_inputs(batch, n_text_before=35, n_text_after=39, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 32000, (batch, n_text_before), generator=gen),
                     torch.full((batch, 576), 32000),
                     torch.randint(3, 32000, (batch, n_text_after), generator=gen)], 1)
    pixels = torch.randn(batch, 3, 336, 336, generator=gen)
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
            "pixel_values": pixels.to("cuda", torch.bfloat16)}


def bench_prune_step(model, config, repeats=20):
    """Per pruning layer: the prune step's GPU time (events around Pruner.prune, medians over
    repeats), beside the dense prefill of the same model and inputs."""
    from sparsevlm_engine.pruning import Pruner

    inputs = llava_inputs(1)
    with torch.no_grad():
        dense = timed(lambda: model(**inputs), warmup=100, rep=500)
    original = Pruner.prune
    events = []

    def timed_prune(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = original(self, *args, **kwargs)
        end.record()
        events.append((start, end))
        return result

    Pruner.prune = timed_prune
    sve.sparsify(model, config)
    try:
        with torch.no_grad():
            sparse = timed(lambda: model(**inputs), warmup=100, rep=500)
            per_layer = []
            for _ in range(repeats):
                events.clear()
                model(**inputs)
                torch.cuda.synchronize()
                per_layer.append([s.elapsed_time(e) for s, e in events])
            layers = list(sve.last_trace(model).pruning_layers)
    finally:
        Pruner.prune = original
        sve.unsparsify(model)
    steps = [statistics.median(col) for col in zip(*per_layer)]
    return {"dense_prefill": dense, "sparse_prefill": sparse, "prune_step_ms": steps,
            "prune_step_share_of_dense": [s / dense["median_ms"] for s in steps],
            "pruning_layers": layers}


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(name, batch) for name in SHAPES for batch in results["batches"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    providers = ["triton", "torch-reference", "authors"]
    width = 0.25
    for i, provider in enumerate(providers):
        values = []
        for name, batch in cases:
            row = results["scoring"][f"{name}/B{batch}"].get(provider)
            values.append(row["median_ms"] if row else float("nan"))
        ax.bar([c + (i - 1) * width for c in range(len(cases))], values, width, label=provider)
    ax.set_xticks(range(len(cases)), [f"{n}\nbatch {b}" for n, b in cases])
    ax.set_yscale("log")
    ax.set_ylabel("scoring at one pruning layer (ms, median)")
    ax.set_title(f"Rater-to-visual scoring, bf16, {results['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, fewer shapes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    batches = (1,) if args.quick else (1, 8)
    import transformers
    import triton

    results = {"gpu": gpu, "date": date.today().isoformat(), "torch": torch.__version__,
               "triton": triton.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "batches": list(batches),
               "queries": {}, "scoring": {}, "select": {}, "recycle": {}, "compact": {}, "raters": {}}
    for name, (length, n_visual, n_raters) in SHAPES.items():
        for batch in batches:
            key = f"{name}/B{batch}"
            print(f"== {key}", flush=True)
            results["queries"][key] = bench_queries(batch, length, n_raters)
            results["scoring"][key] = bench_scoring(batch, length, n_visual, n_raters)
            for kind, rows in bench_select(batch, length, n_visual, n_visual // 2).items():
                results["select"][f"{key}/{kind}"] = rows
            results["recycle"][key] = bench_recycle(batch, length, (n_visual // 2) * 3 // 10 + 1)
            results["compact"][key] = bench_compact(batch, length, length - n_visual // 2)
            results["raters"][key] = bench_raters(batch, n_visual, length - n_visual)
            torch.cuda.empty_cache()
    model = llava_7b_shaped()
    results["prune_step"] = {
        preset: bench_prune_step(model, sve.SparseVLMConfig.preset(preset, 128))
        for preset in ("v1.5", "v2", "v1")}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{gpu_slug(gpu)}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    print_table(results)


def print_table(results):
    print(f"\n{results['gpu']}  torch {results['torch']}  triton {results['triton']}")
    print(f"{'op':8} {'case':22} {'triton ms':>10} {'torch ms':>10} {'authors ms':>11} {'speedup vs authors':>19}"
          f" {'peak MiB triton/authors':>24}")
    for op in ("queries", "scoring", "select", "recycle", "compact", "raters"):
        for key, rows in results.get(op, {}).items():
            t, r, a = rows["triton"], rows["torch-reference"], rows.get("authors")
            line = f"{op:8} {key:22} {t['median_ms']:10.4f} {r['median_ms']:10.4f}"
            if a:
                line += (f" {a['median_ms']:11.3f} {a['median_ms'] / t['median_ms']:18.1f}x"
                         f" {t['peak_extra_mib']:11.2f}/{a['peak_extra_mib']:.1f}")
            print(line)
    for preset, row in results["prune_step"].items():
        shares = ", ".join(f"{100 * s:.2f}%" for s in row["prune_step_share_of_dense"])
        steps = ", ".join(f"{s:.3f}" for s in row["prune_step_ms"])
        print(f"prune step {preset:5}: {steps} ms per pruning layer = {shares} of dense prefill "
              f"{row['dense_prefill']['median_ms']:.2f} ms (sparse prefill {row['sparse_prefill']['median_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
