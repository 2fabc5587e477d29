"""An offline, random-weight Qwen2-VL / Qwen2.5-VL lookalike for the demo and the tests.

The decoder has the LLaVA demo's tiny widths and 32 layers (so the default pruning layers
2 / 6 / 15 apply); the vision tower has Qwen2-VL's real geometry: 14 px patches, temporal
patch 2, 2x2 merge, so a 336 x 336 image is 24 x 24 patches and 12 x 12 = 144 visual tokens.
Inputs come from a real `Qwen2VLImageProcessor` and `Qwen2VLProcessor` built in code (a subclass
that only drops the video processor, which would need torchvision); the tokenizer is the demo's
word-level one with Qwen's special tokens and Qwen2-VL-Instruct's chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLProcessor

from .demo_model import CLIP_MEAN, CLIP_STD, word_tokenizer

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  IMAGE_TOKEN, "<|video_pad|>")
EXTRA_WORDS = ("helpful",)
DEFAULT_QUESTION = "What is the colour of the square?"
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
PLAIN_PROMPT = "<|im_start|>user\n" + IMAGE_BLOCK + "{prompt}<|im_end|>\n<|im_start|>assistant\n"
CHAT_TEMPLATE = (  # Qwen2-VL-Instruct's
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def build_qwen_tokenizer():
    """A `PreTrainedTokenizerFast` over the demo words with Qwen's special tokens and chat template.

    No BOS; pad "<|endoftext|>", EOS "<|im_end|>", as in Qwen2-VL-Instruct.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(SPECIAL_TOKENS, EXTRA_WORDS),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_qwen_image_processor():
    """Qwen2-VL's image processor with its real settings (no torchvision needed)."""
    import transformers

    # transformers 5 names the torchvision-free one Qwen2VLImageProcessorPil.
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def build_qwen_processor(tokenizer, image_processor=None, chat_template=CHAT_TEMPLATE):
    """An `ImageQwen2VLProcessor` over the tokenizer and (by default) Qwen2-VL's image processor."""
    return ImageQwen2VLProcessor(image_processor=image_processor or build_qwen_image_processor(),
                                 tokenizer=tokenizer, video_processor=None, chat_template=chat_template)


def _saved_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def load_qwen_processor(path):
    """The checkpoint's image processor, tokenizer and chat template as an `ImageQwen2VLProcessor`.

    For a Qwen checkpoint whose `AutoProcessor` cannot be built (no torchvision for its video
    processor). The chat template is the processor's saved one, else the tokenizer's.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(path)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = _saved_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return build_qwen_processor(tokenizer, image_processor, chat_template=template)


def qwen_config(tokenizer, family: str = "qwen2_vl", depth: int = 32):
    """A `Qwen2VLConfig` / `Qwen2_5_VLConfig`: real vision geometry, the LLaVA demo's decoder sizes.

    Heads of width 16 have 8 rotary frequency pairs, split (2, 3, 3) over the mRoPE axes t, h, w
    (Qwen2-VL's 16 / 24 / 24 of 64, scaled).
    """
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_TOKEN), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=depth,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False, **special)
    geometry = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
                    in_channels=3, num_heads=2, depth=3)
    if family == "qwen2_vl":
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **geometry)
        cls = transformers.Qwen2VLConfig
    elif family == "qwen2_5_vl":
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=112,
                      fullatt_block_indexes=[2], tokens_per_second=2, **geometry)
        cls = transformers.Qwen2_5_VLConfig
    else:
        raise ValueError(f"unknown Qwen family {family!r}; choose from {', '.join(FAMILY_NAMES)}")
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids, **special)


def build_demo_qwen(family: str = "qwen2_vl", seed: int = 0, dtype: torch.dtype = torch.float32, depth: int = 32,
                    attn_implementation: str = "sdpa"):
    """(model, processor): a random-weight Qwen2-VL / Qwen2.5-VL in eval mode and its processor.

    The global RNG is left as it was; `seed` alone fixes the weights.
    """
    import transformers

    from .families import FAMILIES

    tokenizer = build_qwen_tokenizer()
    config = qwen_config(tokenizer, family, depth)
    model_cls = getattr(transformers, FAMILIES[family].model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    gen.eos_token_id = tokenizer.eos_token_id
    gen.do_sample = False
    return model, build_qwen_processor(tokenizer)


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


def save_qwen_demo_checkpoint(path, family: str = "qwen2_vl", seed: int = 0, depth: int = 32) -> None:
    """Save a demo Qwen model, its image processor and tokenizer (with chat template) to a folder."""
    model, processor = build_demo_qwen(family, seed=seed, depth=depth)
    model.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
