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

This script parses the options and runs the shapes; beside it: e2e_models (shapes, random-weight
models), e2e_inputs (prompts, the timed calls), e2e_common (timers, probes, KV cache, FLOPs),
e2e_cases (running the cases), e2e_figures (case ids, figures, derived ratios), e2e_targets,
e2e_report (the printed table) and e2e_plot.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import traceback
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparsevlm_engine as sve  # noqa: E402
from e2e_cases import run_batch, warm_up, write_results  # noqa: E402
from e2e_common import Repeats  # noqa: E402
from e2e_figures import BUDGETS, COMPILED, PRESETS, derive, end_to_end_ratios  # noqa: E402
from e2e_inputs import make_inputs, visual_token_count  # noqa: E402
from e2e_models import SHAPES, build_model, flash_attn_available, set_attention  # noqa: E402
from e2e_plot import plot  # noqa: E402
from e2e_report import print_table  # noqa: E402
from e2e_targets import TARGET_SHAPE, evaluate_targets  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMPILED_ATTN = ("sdpa" + COMPILED, "eager" + COMPILED)
DEFAULT_SHAPES = {"cuda": ("llava-1.5-7b", "llava-next-7b"), "cpu": ("llava-1.5-small",)}
DEFAULT_BATCHES = {"llava-1.5-7b": (1, 8, 32), "llava-next-7b": (1, 8), "llava-1.5-small": (1, 8),
                   "llava-next-small": (1, 4), "llava-1.5-tiny": (1, 8, 32), "llava-next-tiny": (1, 4)}
REPEATS = {  # prefill, generate, authors-style loop
    "cuda": (Repeats(3, 10, 100, 1.5), Repeats(1, 3, 10, 2.0), Repeats(1, 3, 20, 1.5)),
    "cpu": (Repeats(2, 5, 20, 1.0), Repeats(0, 1, 3, 0.0), Repeats(1, 2, 5, 0.3)),
}


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: the real shapes on CUDA, "
                        "llava-1.5-small on CPU")
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 8 32 (LLaVA-1.5-7B), 1 8 (NeXT, CPU)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--attn", nargs="+", choices=("sdpa", "flash_attention_2", "eager") + COMPILED_ATTN,
                        help="default: sdpa, and flash_attention_2 when flash-attn is installed (CUDA); "
                        f"'<attn>{COMPILED}' runs the decoder layers compiled (sve.compile_decoder), dense and "
                        "sparse alike")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (0: no decode figures)")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors-style baseline")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: the shape's")
    parser.add_argument("--repeats-scale", type=float, default=1.0, help="scale the repeat counts and times")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in the JSON")
    parser.add_argument("--report-only", action="store_true",
                        help="run no case: derive the figures, targets and plots of the JSON as it is")
    parser.add_argument("--name", help="JSON / plot stem (default e2e_<device>)")
    return parser.parse_args(argv)


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
    if args.report_only and not path.exists():
        raise SystemExit(f"--report-only: no results at {path}")
    if (args.resume or args.report_only) and path.exists():
        previous = json.loads(path.read_text())
        if args.report_only:
            env = results["environment"] = previous["environment"]
            kind, shapes = env["device_type"], []
        results["cases"] = {k: v for k, v in previous.get("cases", {}).items()
                            if args.report_only or not v.get("error")}
        results["shapes"] = previous.get("shapes", {})
        results["runs"] = previous.get("runs", [])
    if not args.report_only:
        results["runs"].append({"date": env["date"], "argv": sys.argv[1:] if argv is None else list(argv)})
    results["settings"] = previous["settings"] if args.report_only else {
        "repeats": dict(zip(("prefill", "generate", "authors_style_loop"), map(vars, repeats))),
        "new_tokens": args.new_tokens,
        "timer": "CUDA events, synchronised per call" if kind == "cuda" else "perf_counter",
        "prefill_call": "model(**inputs, use_cache=True, logits_to_keep=1) under no_grad",
        "flops_ratio": "dense_exact / (sparse_exact + pruning), summed over rows",
        "decode_ms_per_step": "median of N - 1 greedy decode steps over a fresh prefill's cache, / (N - 1)"}
    failures = sum(c.get("error", "out of memory") != "out of memory" for c in results["cases"].values()) \
        if args.report_only else 0
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        dtype = getattr(torch, args.dtype or shape.dtype)
        print(f"== building {shape_name} ({dtype}, {kind})", flush=True)
        model = build_model(shape, device, dtype)
        n_visual = visual_token_count(model, shape)
        results["shapes"][shape_name] = describe(model, shape, n_visual, dtype)
        for attn in attns:
            compiled = attn.endswith(COMPILED)
            try:
                set_attention(model, attn.removesuffix(COMPILED))
                if compiled:
                    sve.compile_decoder(model)
            except Exception as error:  # e.g. flash-attn present but unusable
                print(f"   skipping {attn}: {type(error).__name__}: {error}", flush=True)
                results.setdefault("skipped", []).append({"shape": shape_name, "attn": attn, "error": str(error)})
                failures += 1
                continue
            try:
                warm_up(model, make_inputs(model, shape, 1, n_visual=n_visual))
            except Exception:  # the cases record their own errors
                traceback.print_exc()
            several_warm = not compiled  # compiled graphs specialise a batch of one: compile the other once
            try:
                for batch in args.batches or DEFAULT_BATCHES[shape_name]:
                    where = {"shape": shape_name, "attn": attn, "batch": batch, "n_visual": n_visual,
                             "dtype": str(dtype).replace("torch.", "")}
                    inputs = make_inputs(model, shape, batch, n_visual=n_visual)
                    if batch > 1 and not several_warm:
                        warm_up(model, inputs)
                        several_warm = True
                    failures += run_batch(model, inputs, where, args, settings, results, path)
            finally:
                if compiled:
                    sve.uncompile_decoder(model)
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
    write_results(path, results)
    print_table(results, targets, informational)
    print(f"\nwrote {path} and {', '.join(results['plots'])}")
    if failures:
        print(f"{failures} case(s) failed; see 'error' in the JSON", file=sys.stderr)
    results["failures"] = failures
    return results


if __name__ == "__main__":
    sys.exit(1 if main().get("failures") else 0)
