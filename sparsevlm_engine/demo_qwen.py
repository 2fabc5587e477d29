"""An offline, random-weight Qwen2-VL / Qwen2.5-VL lookalike for the demo and the tests.

The decoder has the LLaVA demo's tiny widths and 32 layers (so the default pruning layers
2 / 6 / 15 apply); the vision tower has Qwen2-VL's real geometry: 14 px patches, temporal
patch 2, 2x2 merge, so a 336 x 336 image is 24 x 24 patches and 12 x 12 = 144 visual tokens.
Inputs come from a real `Qwen2VLImageProcessor` in an `ImageQwen2VLProcessor` built in code
(sparsevlm_engine.qwen_processor); the tokenizer is the demo's word-level one with Qwen's
special tokens and Qwen2-VL-Instruct's chat template.
"""
from __future__ import annotations

import torch

from .demo_model import CLIP_MEAN, CLIP_STD, word_tokenizer
from .qwen_processor import IMAGE_TOKEN, MERGE_SIZE, ImageQwen2VLProcessor

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  IMAGE_TOKEN, "<|video_pad|>")
EXTRA_WORDS = ("helpful",)
DEFAULT_QUESTION = "What is the colour of the square?"
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
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


def save_qwen_demo_checkpoint(path, family: str = "qwen2_vl", seed: int = 0, depth: int = 32) -> None:
    """Save a demo Qwen model, its image processor and tokenizer (with chat template) to a folder."""
    model, processor = build_demo_qwen(family, seed=seed, depth=depth)
    model.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
