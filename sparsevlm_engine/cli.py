"""The `sparsevlm` command: an offline demo, and generation with a local checkpoint.

    sparsevlm demo [--family lab|llava|qwen2_vl|qwen2_5_vl] [--budget 128] [--preset v1.5] [--out DIR]
                   [--index N] [--seed N] [--prompt TEXT] [--repeats N]
    sparsevlm generate --model PATH --image IMG --prompt TEXT [--budget 128] [--preset v1.5] ...

Bad arguments (missing files, unreadable image, budget <= 0, unknown preset) end with exit
code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

PNG_NAME = "kept_patches.png"
DEMO_FAMILIES = ("lab", "llava", "qwen2_vl", "qwen2_5_vl")
LLAVA_PLAIN_PROMPT = "USER: <image>\n{prompt} ASSISTANT:"
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsevlm", description="SparseVLM visual-token pruning for Hugging Face VLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p):
        p.add_argument("--budget", type=int, default=128,
                       help="target visual tokens, for LLaVA-1.5's 576 (default 128)")
        p.add_argument("--preset", default="v1.5", help="v1 (rank), v1.5 (default) or v2 (SparseVLM+)")
        p.add_argument("--out", default="sparsevlm_out", help="folder for the PNG (default ./sparsevlm_out)")

    demo = sub.add_parser("demo", help="answer a scene question with the trained lab VLM, dense and sparse, offline "
                                       "(or run a random-weight LLaVA-1.5- or Qwen2-VL-shaped model)")
    common(demo)
    demo.add_argument("--family", default="lab", choices=DEMO_FAMILIES,
                      help="lab (default: the trained lab VLM, 576 visual tokens, on a scene-VQA test image); "
                           "llava (random weights, LLaVA-1.5 geometry, 576 visual tokens), qwen2_vl or qwen2_5_vl "
                           "(random weights, 14 px patches merged 2x2: 144 visual tokens)")
    demo.add_argument("--index", type=int, default=None, help="lab: which scene-VQA test example to show")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (llava, qwen2_vl, qwen2_5_vl)")
    demo.add_argument("--prompt", default=None, help="question about the image")
    demo.add_argument("--repeats", type=int, default=5, help="timed prefills per variant (default 5)")
    demo.add_argument("--max-new-tokens", type=int, default=None,
                      help="default 1 for the lab VLM (trained to answer in one token), else 8")

    gen = sub.add_parser("generate", help="generate with a local LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL "
                                          "checkpoint, sparsified")
    gen.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    gen.add_argument("--image", required=True, help="image file")
    gen.add_argument("--prompt", required=True, help="question about the image")
    common(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                     help="auto: float16 on CUDA, float32 on CPU")
    return parser


def make_config(preset: str, budget: int):
    """The SparseVLMConfig for a preset name and budget; CliError when either is invalid."""
    from .config import SparseVLMConfig

    try:
        return SparseVLMConfig.preset(preset, budget)
    except ValueError as e:
        raise CliError(str(e)) from None


def load_image(path: str):
    """The image at `path` as RGB; CliError when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CliError(f"image file not found: {path}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CliError(f"cannot read image {path}: {e}") from None


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # keep the report readable
    transformers.utils.logging.disable_progress_bar()


def _timed_prefill(model, inputs) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True)
    return time.perf_counter() - t0


def sparsify_or_fail(model, config):
    """sve.sparsify, with a config the model cannot take (e.g. a budget too small) as a CliError."""
    import sparsevlm_engine as sve

    try:
        return sve.sparsify(model, config)
    except (ValueError, NotImplementedError) as e:
        raise CliError(_first_line(e)) from None


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


def report(trace, out=None) -> None:
    """Per-layer visual token counts, equivalent tokens and FLOPs of every sample."""
    out = out or sys.stdout
    print(trace.summary(), file=out)
    for b, s in enumerate(trace.samples):
        print(f"sample {b}: visual tokens entering each decoder layer: "
              f"{' '.join(str(n) for n in s.visual_entering)}", file=out)
        f = s.flops
        print(f"sample {b}: decoder prefill FLOPs dense {f.dense_exact / 1e9:.3f} G, sparse "
              f"{f.sparse_exact / 1e9:.3f} G + pruning {f.pruning / 1e9:.4f} G", file=out)


def _decode_new(tokenizer, output_ids, prompt_len: int) -> str:
    return tokenizer.decode(output_ids[0, prompt_len:], skip_special_tokens=True).strip()


def _llava_demo(args, config):
    """(model, tokenizer, image, inputs, header, heatmap grid) of the LLaVA-1.5-shaped demo."""
    import sparsevlm_engine as sve
    from .demo_model import DEFAULT_PROMPT, build_demo_llava, demo_inputs, load_demo_image

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
    from .demo_qwen import (DEFAULT_QUESTION, FAMILY_NAMES, MERGE_SIZE, PATCH_SIZE, PLAIN_PROMPT, build_demo_qwen,
                            merged_grid, qwen_inputs)

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
    from .lab.demo import lab_demo_setup

    try:
        model, tokenizer, image, inputs, header, expected = lab_demo_setup(args.index, args.prompt)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise CliError(_first_line(e)) from None
    sve.unsparsify(sparsify_or_fail(model, config))
    return model, tokenizer, image, inputs, header, model.config.grid, expected


def _random_weight_demo(args, config):
    setup = _llava_demo if args.family == "llava" else _qwen_demo
    return (*setup(args, config), None)


def run_demo(args) -> int:
    config = make_config(args.preset, args.budget)
    if args.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 1 if args.family == "lab" else 8
    _check_max_new_tokens(args.max_new_tokens)
    _quiet_transformers()
    import torch

    import sparsevlm_engine as sve
    from .accounting import DecoderDims, prefill_flops
    from .heatmap import draw_kept_patches

    if args.index is not None and args.family != "lab":
        raise CliError("--index selects a scene-VQA example of the lab VLM (--family lab)")
    trained = args.family == "lab"
    setup = _lab_demo if trained else _random_weight_demo
    model, tokenizer, image, inputs, header, grid, expected = setup(args, config)
    print(header)
    if not trained:
        print("NOTE: the weights are random, so the generated text is meaningless; the token counts, "
              "FLOPs and timings are real.")
    print(f"preset {args.preset}, budget {args.budget}")

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
    print(f"dense output{label}:  {_decode_new(tokenizer, dense_out, n_prompt)!r}")
    print(f"sparse output{label}: {_decode_new(tokenizer, sparse_out, n_prompt)!r}")
    if expected is not None:
        print(f"expected answer: {expected!r}")
    png = draw_kept_patches(image, trace.samples[0], Path(args.out) / PNG_NAME, grid=grid)
    print(f"kept patches: {png}")
    return 0


def _check_max_new_tokens(n: int) -> None:
    if n < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {n}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_model_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"model path not found: {path}")
    if not (p / "config.json").is_file():
        raise CliError(f"no config.json in model path {path} (expected a local Hugging Face checkpoint folder)")
    return p


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but no CUDA device is available")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def build_prompt(processor, prompt: str, plain: str = LLAVA_PLAIN_PROMPT) -> str:
    """The processor's chat template with one image, else `plain` with {prompt} filled in
    (LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" by default).

    A prompt that already contains the processor's image token ("<image>" unless it names
    another, e.g. Qwen's "<|image_pad|>") is used as it is.
    """
    if (getattr(processor, "image_token", None) or "<image>") in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return plain.format(prompt=prompt)


def load_processor(path: Path, model_type: str):
    """The checkpoint's `AutoProcessor`; for Qwen, where that cannot be built (its video processor
    needs torchvision), its image processor, tokenizer and chat template in an `ImageQwen2VLProcessor`."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError, TypeError) as e:
        if model_type not in QWEN_TYPES:
            raise CliError(f"cannot load the checkpoint in {path}: {_first_line(e)}") from None
    from .demo_qwen import load_qwen_processor

    try:
        return load_qwen_processor(path)
    except (OSError, ValueError, ImportError, TypeError) as e:
        raise CliError(f"cannot load the checkpoint in {path}: {_first_line(e)}") from None


def model_inputs(processor, image, prompt: str, model_type: str, device, dtype) -> dict:
    """The processor's tensors on `device`, pixel_values in `dtype`; CliError when it rejects the prompt.

    LLaVA: input_ids, attention_mask [1, L], pixel_values. Qwen: also image_grid_thw [1, 3] and
    (transformers 5) mm_token_type_ids [1, L]; pixel_values [t*h*w, 3*2*14*14].
    """
    if model_type in QWEN_TYPES:
        from .demo_qwen import PLAIN_PROMPT, qwen_inputs

        try:
            inputs = qwen_inputs(processor, image, build_prompt(processor, prompt, PLAIN_PROMPT))
        except ValueError as e:
            raise CliError(_first_line(e)) from None
    else:
        inputs = processor(images=image, text=build_prompt(processor, prompt), return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items() if k != "token_type_ids"}  # neither family takes them
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def heatmap_view(hf_config, image, inputs):
    """(image shown, grid) for the kept-patch PNG of the first image.

    LLaVA: the CLIP square, grid = image_size / patch_size; LLaVA-NeXT: its base tile, the whole
    image resized square. Qwen: the whole image over its merged-patch grid (h/2, w/2) of
    image_grid_thw.
    """
    vision = hf_config.vision_config
    if hf_config.model_type in QWEN_TYPES:
        from .demo_qwen import merged_grid

        return image, merged_grid(inputs["image_grid_thw"].cpu(), vision.spatial_merge_size)
    grid = vision.image_size // vision.patch_size
    if hf_config.model_type == "llava_next":
        return image.resize((vision.image_size, vision.image_size)), grid
    return image, grid


def run_generate(args) -> int:
    config = make_config(args.preset, args.budget)
    _check_max_new_tokens(args.max_new_tokens)
    path = _check_model_path(args.model)
    image = load_image(args.image)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    _quiet_transformers()

    import torch
    import transformers

    import sparsevlm_engine as sve
    from .families import FAMILIES
    from .heatmap import draw_kept_patches

    try:
        hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the model config in {path}: {_first_line(e)}") from None
    model_type = hf_config.model_type
    checkpoint_types = [name for name, family in FAMILIES.items() if family.hf_checkpoint]
    if model_type not in checkpoint_types:
        raise CliError(f"unsupported model type {model_type!r}; supported: {', '.join(checkpoint_types)}")
    model_cls = getattr(transformers, FAMILIES[model_type].model_class)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    processor = load_processor(path, model_type)
    try:
        model = model_cls.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the checkpoint in {path}: {_first_line(e)}") from None
    model = model.to(device).eval()

    inputs = model_inputs(processor, image, args.prompt, model_type, device, dtype)
    sparsify_or_fail(model, config)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    trace = sve.last_trace(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    print(_decode_new(tokenizer, out, inputs["input_ids"].shape[1]))
    print(f"preset {args.preset}, budget {args.budget}; pruning layers: "
          f"{', '.join(str(x) for x in trace.pruning_layers)}")
    report(trace)
    shown, grid = heatmap_view(hf_config, image, inputs)
    png = draw_kept_patches(shown, trace.samples[0], Path(args.out) / PNG_NAME, grid=grid)
    print(f"kept patches: {png}")
    return 0


def main(argv=None) -> int:
    """Entry point of the `sparsevlm` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args)
        return run_generate(args)
    except CliError as e:
        print(f"sparsevlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
