"""`sparsevlm generate`: a local LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL checkpoint, sparsified,
answers a prompt about an image."""
from __future__ import annotations

from .cli_checks import MAX_NEW_TOKENS, check_output_folder, check_range, make_config, sparsify_or_fail
from .cli_load import (check_model_path, device_and_dtype, heatmap_view, load_image, load_model, load_processor,
                       model_inputs, quiet_transformers, read_checkpoint_config)
from .cli_report import decode_new, report, save_kept_patches


def run_generate(args) -> int:
    """Check every argument, load the checkpoint, generate sparsified, print the answer and the
    report, write the PNG; returns the exit code."""
    config = make_config(args.preset, args.budget, args.rank_scale, args.rank_bias, args.positions)
    check_range("--max-new-tokens", args.max_new_tokens, 1, MAX_NEW_TOKENS)
    path = check_model_path(args.model)
    image = load_image(args.image)
    out = check_output_folder(args.out)
    device, dtype = device_and_dtype(args.device, args.dtype)
    quiet_transformers()
    import torch

    import sparsevlm_engine as sve

    hf_config = read_checkpoint_config(path)
    processor = load_processor(path, hf_config.model_type)
    inputs = model_inputs(processor, image, args.prompt, hf_config.model_type, device, dtype)
    model = load_model(path, hf_config.model_type, device, dtype)
    sparsify_or_fail(model, config)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    trace = sve.last_trace(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    print(decode_new(tokenizer, output, inputs["input_ids"].shape[1]))
    print(f"preset {args.preset}, budget {args.budget}; pruning layers: "
          f"{', '.join(str(x) for x in trace.pruning_layers)}; positions {config.positions}")
    report(trace)
    shown, grid = heatmap_view(hf_config, image, inputs)
    save_kept_patches(shown, trace.samples[0], out, grid)
    return 0
