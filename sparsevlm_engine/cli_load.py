"""Model loading for `sparsevlm generate`: a local checkpoint, its processor, and the model inputs
of an image and a prompt."""
from __future__ import annotations

from pathlib import Path

from .cli_checks import CliError, check_one_image, first_line

LLAVA_PLAIN_PROMPT = "USER: <image>\n{prompt} ASSISTANT:"
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
LOAD_ERRORS = (OSError, ValueError, ImportError, TypeError)


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


def check_model_path(path: str) -> Path:
    """The checkpoint folder; CliError when it is missing or has no config.json."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"model path not found: {path}")
    if not (p / "config.json").is_file():
        raise CliError(f"no config.json in model path {path} (expected a local Hugging Face checkpoint folder)")
    return p


def device_and_dtype(device: str, dtype: str):
    """(torch.device, torch.dtype) of --device and --dtype; auto: CUDA in float16 when there is one."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but no CUDA device is available")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars, so that the report stays readable."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_checkpoint_config(path: Path):
    """The checkpoint's transformers config; CliError unless a supported family loads it."""
    import transformers

    from .families import FAMILIES

    try:
        hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the model config in {path}: {first_line(e)}") from None
    checkpoint_types = [name for name, family in FAMILIES.items() if family.hf_checkpoint]
    if hf_config.model_type not in checkpoint_types:
        raise CliError(f"unsupported model type {hf_config.model_type!r}; supported: {', '.join(checkpoint_types)}")
    return hf_config


def load_model(path: Path, model_type: str, device, dtype):
    """The checkpoint's model class from_pretrained, on `device` in `dtype`, in eval mode."""
    import transformers

    from .families import FAMILIES

    model_cls = getattr(transformers, FAMILIES[model_type].model_class)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = model_cls.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the checkpoint in {path}: {first_line(e)}") from None
    return model.to(device).eval()


def build_prompt(processor, prompt: str, plain: str = LLAVA_PLAIN_PROMPT) -> str:
    """The processor's chat template with one image, else `plain` with {prompt} filled in
    (LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" by default).

    A prompt that already contains the processor's image token ("<image>" unless it names
    another, e.g. Qwen's "<|image_pad|>") is used as it is.
    """
    if image_token_of(processor) in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return plain.format(prompt=prompt)


def image_token_of(processor) -> str:
    """The image placeholder of the processor's prompts: "<image>" unless it names another."""
    return getattr(processor, "image_token", None) or "<image>"


def load_processor(path: Path, model_type: str):
    """The checkpoint's `AutoProcessor`; for Qwen, where that cannot be built (its video processor
    needs torchvision), its image processor, tokenizer and chat template in an `ImageQwen2VLProcessor`."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except LOAD_ERRORS as e:
        if model_type not in QWEN_TYPES:
            raise CliError(f"cannot load the checkpoint in {path}: {first_line(e)}") from None
    from .qwen_processor import load_qwen_processor

    try:
        return load_qwen_processor(path)
    except LOAD_ERRORS as e:
        raise CliError(f"cannot load the checkpoint in {path}: {first_line(e)}") from None


def model_inputs(processor, image, prompt: str, model_type: str, device, dtype) -> dict:
    """The processor's tensors on `device`, pixel_values in `dtype`; CliError when it rejects the prompt.

    LLaVA: input_ids, attention_mask [1, L], pixel_values. Qwen: also image_grid_thw [1, 3] and
    (transformers 5) mm_token_type_ids [1, L]; pixel_values [t*h*w, 3*2*14*14].
    """
    check_one_image(prompt, image_token_of(processor))
    try:
        if model_type in QWEN_TYPES:
            from .qwen_processor import PLAIN_PROMPT, qwen_inputs

            inputs = qwen_inputs(processor, image, build_prompt(processor, prompt, PLAIN_PROMPT))
        else:
            inputs = processor(images=image, text=build_prompt(processor, prompt), return_tensors="pt")
    except ValueError as e:
        raise CliError(first_line(e)) from None
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
        from .qwen_processor import merged_grid

        return image, merged_grid(inputs["image_grid_thw"].cpu(), vision.spatial_merge_size)
    grid = vision.image_size // vision.patch_size
    if hf_config.model_type == "llava_next":
        return image.resize((vision.image_size, vision.image_size)), grid
    return image, grid
