"""Qwen2-VL / Qwen2.5-VL inputs from an image and a prompt, without torchvision.

`sparsevlm generate` uses this for a Qwen checkpoint whose `AutoProcessor` cannot be built:
`load_qwen_processor` puts the checkpoint's image processor, tokenizer and chat template in an
`ImageQwen2VLProcessor`, and `qwen_inputs` turns a prompt with one image block into the
model's inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLProcessor

MERGE_SIZE = 2  # Qwen2-VL's spatial merge: 2 x 2 patches make one visual token
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
PLAIN_PROMPT = "<|im_start|>user\n" + IMAGE_BLOCK + "{prompt}<|im_end|>\n<|im_start|>assistant\n"


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images and text, with no video processor and any tokenizer.

    The stock class insists on a `Qwen2VLVideoProcessor` (which needs torchvision) and, in
    transformers 4, on a Qwen2 tokenizer; everything else, its __call__ included, is unchanged.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        if argument_name == "tokenizer" and isinstance(argument, PreTrainedTokenizerBase):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def saved_chat_template(path: Path) -> str | None:
    """The processor's chat template saved in a checkpoint folder (.jinja or .json), or None."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def load_qwen_processor(path) -> ImageQwen2VLProcessor:
    """The checkpoint's image processor, tokenizer and chat template as an `ImageQwen2VLProcessor`.

    The chat template is the processor's saved one, else the tokenizer's.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(path)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = saved_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return ImageQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                 chat_template=template)


def qwen_inputs(processor, image, prompt: str) -> dict:
    """Model inputs for one prompt with one image block, as the processor makes them.

    input_ids, attention_mask [1, L] (and mm_token_type_ids [1, L] in transformers 5), with the
    image pad expanded to t*h*w/4 tokens; pixel_values [t*h*w, 3*2*14*14]; image_grid_thw [1, 3].
    """
    if prompt.count(IMAGE_BLOCK) != 1 or prompt.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"the prompt must contain {IMAGE_BLOCK!r} once and no other {IMAGE_TOKEN!r}: {prompt!r}")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return {k: v for k, v in inputs.items() if k != "token_type_ids"}


def merged_grid(image_grid_thw: torch.Tensor, merge_size: int = MERGE_SIZE) -> tuple[int, int]:
    """(rows, cols) of the first image's visual tokens: its patch grid h x w merged merge_size^2."""
    _, h, w = (int(x) for x in image_grid_thw[0])
    return h // merge_size, w // merge_size
