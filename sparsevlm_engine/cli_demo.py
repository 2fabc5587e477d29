"""`sparsevlm demo`: the trained lab VLM, or a random-weight LLaVA-1.5- or Qwen2-VL-shaped model,
answering a question about an image dense and sparse, with token counts, FLOPs and timings."""
from __future__ import annotations

import statistics
import time

from .cli_checks import (MAX_NEW_TOKENS, MAX_REPEATS, MAX_SEED, CliError, check_one_image, check_output_folder,
                         check_range, first_line, make_config, sparsify_or_fail)
from .cli_load import LLAVA_PLAIN_PROMPT, build_prompt, quiet_transformers
from .cli_report import decode_new, report, save_kept_patches

DEMO_FAMILIES = ("lab", "llava", "qwen2_vl", "qwen2_5_vl")


def _timed_prefill(model, inputs) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True)
    return time.perf_counter() - t0


def compare_prefill(model, inputs, config, repeats: int) -> tuple[float, float]:
    """(dense, sparse) median prefill seconds, timed alternately after one warm-up round.

    Leaves the model sparsified.
    """
    import sparsevlm_engine as sve

    dense, sparse = [], []
    for i in range(repeats + 1):
        d = _timed_prefill(model, inputs)
        sve.sparsify(model, config)
        s = _timed_prefill(model, inputs)
        if i < repeats:
            sve.unsparsify(model)
        if i > 0:
            dense.append(d)
            sparse.append(s)
    return statistics.median(dense), statistics.median(sparse)


def _llava_demo(args, config):
    """(model, tokenizer, image, inputs, header, heatmap grid) of the LLaVA-1.5-shaped demo."""
    import sparsevlm_engine as sve
    from .demo_model import DEFAULT_PROMPT, build_demo_llava, demo_inputs, load_demo_image

    check_one_image(args.prompt, "<image>")
    prompt = DEFAULT_PROMPT
    if args.prompt is not None:
        prompt = args.prompt if "<image>" in args.prompt else LLAVA_PLAIN_PROMPT.format(prompt=args.prompt)
    model, tokenizer = build_demo_llava(seed=args.seed)
    sve.unsparsify(sparsify_or_fail(model, config))  # fail early on a config this model cannot take
    image = load_demo_image()
    try:
        inputs = demo_inputs(tokenizer, image, prompt)
    except ValueError as e:
        raise CliError(str(e)) from None
    text = model.config.text_config
    header = (f"SparseVLM demo: random-weight LLaVA-1.5-shaped model ({inputs['input_ids'].shape[1]} prompt "
              f"tokens, 576 visual; {text.num_hidden_layers} decoder layers of width {text.hidden_size})")
    return model, tokenizer, image, inputs, header, None


def _qwen_demo(args, config):
    """(model, tokenizer, image, inputs, header, heatmap grid) of the Qwen2-VL / Qwen2.5-VL demo."""
    import sparsevlm_engine as sve
    from .demo_model import load_demo_image
    from .demo_qwen import DEFAULT_QUESTION, FAMILY_NAMES, PATCH_SIZE, build_demo_qwen
    from .qwen_processor import IMAGE_TOKEN, MERGE_SIZE, PLAIN_PROMPT, merged_grid, qwen_inputs

    check_one_image(args.prompt, IMAGE_TOKEN)
    model, processor = build_demo_qwen(args.family, seed=args.seed)
    sve.unsparsify(sparsify_or_fail(model, config))
    image = load_demo_image()
    prompt = build_prompt(processor, DEFAULT_QUESTION if args.prompt is None else args.prompt, PLAIN_PROMPT)
    try:
        inputs = qwen_inputs(processor, image, prompt)
    except ValueError as e:
        raise CliError(str(e)) from None
    _, h, w = (int(x) for x in inputs["image_grid_thw"][0])
    rows, cols = merged_grid(inputs["image_grid_thw"])
    text = model.config.text_config
    header = (f"SparseVLM demo: random-weight {FAMILY_NAMES[args.family]}-shaped model "
              f"({inputs['input_ids'].shape[1]} prompt tokens, {rows * cols} visual: the {image.width}x{image.height} "
              f"image as {h}x{w} patches of {PATCH_SIZE} px merged {MERGE_SIZE}x{MERGE_SIZE}; "
              f"{text.num_hidden_layers} decoder layers of width {text.hidden_size})")
    return model, processor.tokenizer, image, inputs, header, (rows, cols)


def _lab_demo(args, config):
    """(model, tokenizer, image, inputs, header, heatmap grid, expected answer) of the lab VLM demo."""
    import sparsevlm_engine as sve

    try:
        from .lab.demo import lab_demo_setup  # needs the lab extra

        model, tokenizer, image, inputs, header, expected = lab_demo_setup(args.index, args.prompt)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise CliError(first_line(e)) from None
    sve.unsparsify(sparsify_or_fail(model, config))
    return model, tokenizer, image, inputs, header, model.config.grid, expected


def _random_weight_demo(args, config):
    setup = _llava_demo if args.family == "llava" else _qwen_demo
    return (*setup(args, config), None)


def _check_demo_args(args):
    """The config of a demo's arguments, every one checked; fills in the default --max-new-tokens."""
    config = make_config(args.preset, args.budget, args.rank_scale, args.rank_bias, args.positions)
    check_range("--repeats", args.repeats, 1, MAX_REPEATS)
    check_range("--seed", args.seed, 0, MAX_SEED)
    if args.max_new_tokens is None:
        args.max_new_tokens = 1 if args.family == "lab" else 8
    check_range("--max-new-tokens", args.max_new_tokens, 1, MAX_NEW_TOKENS)
    if args.index is not None and args.family != "lab":
        raise CliError("--index selects a scene-VQA example of the lab VLM (--family lab)")
    return config


def run_demo(args) -> int:
    """Set up the chosen demo model, time dense and sparse prefills, generate both ways, print the
    report and write the PNG; returns the exit code."""
    config = _check_demo_args(args)
    out = check_output_folder(args.out)
    quiet_transformers()
    import torch

    import sparsevlm_engine as sve
    from .accounting import DecoderDims, prefill_flops

    trained = args.family == "lab"
    setup = _lab_demo if trained else _random_weight_demo
    model, tokenizer, image, inputs, header, grid, expected = setup(args, config)
    print(header)
    if not trained:
        print("NOTE: the weights are random, so the generated text is meaningless; the token counts, "
              "FLOPs and timings are real.")
    print(f"preset {args.preset}, budget {args.budget}, positions {config.positions}")

    dense_s, sparse_s = compare_prefill(model, inputs, config, args.repeats)  # leaves it sparsified
    n_prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        sparse_out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        trace = sve.last_trace(model)
        sve.unsparsify(model)
        dense_out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)

    print(f"pruning layers: {', '.join(str(x) for x in trace.pruning_layers)}")
    report(trace)
    sample = trace.samples[0]
    at_7b = prefill_flops(sample.length, sample.visual_entering, DecoderDims.llava_1_5_7b(), 0.0)
    print(f"the same token counts at LLaVA-1.5-7B decoder sizes: {at_7b.dense_paper / 1e12:.2f} -> "
          f"{at_7b.sparse_paper / 1e12:.2f} TFLOPs by the paper's formula ({100 * at_7b.reduction_paper:.1f}% fewer)")
    print(f"CPU prefill time (median of {args.repeats}, after a warm-up, timed alternately): "
          f"dense {1e3 * dense_s:.1f} ms, sparse {1e3 * sparse_s:.1f} ms, "
          f"ratio sparse/dense {sparse_s / dense_s:.2f}")
    print("  (whole forward pass, vision tower included; measured on a CPU, not a GPU figure)")
    label = "" if trained else " (meaningless, random weights)"
    print(f"dense output{label}:  {decode_new(tokenizer, dense_out, n_prompt)!r}")
    print(f"sparse output{label}: {decode_new(tokenizer, sparse_out, n_prompt)!r}")
    if expected is not None:
        print(f"expected answer: {expected!r}")
    save_kept_patches(image, sample, out, grid)
    return 0
