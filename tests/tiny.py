"""Tiny random-weight LLaVA-1.5 / LLaVA-NeXT models and prompts for the tests (no downloads)."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration)

IMAGE_TOKEN = 100
PAD = 0
VOCAB = 128


def _text_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _finish(model_cls, cfg, impl: str, dtype):
    cfg._attn_implementation = impl
    cfg.text_config._attn_implementation = impl
    cfg.vision_config._attn_implementation = impl
    model = model_cls(cfg).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def tiny_llava(impl: str = "eager", seed: int = 0, layers: int = 8, dtype=torch.float32):
    """LLaVA-1.5 geometry in miniature: 112 px / patch 14 -> 64 visual tokens, 8 decoder layers."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(layers), image_token_id=IMAGE_TOKEN,
                      pad_token_id=PAD)
    return _finish(LlavaForConditionalGeneration, cfg, impl, dtype)


def tiny_llava_next(impl: str = "eager", seed: int = 0, layers: int = 8, dtype=torch.float32):
    """LLaVA-NeXT in miniature: 28 px base tiles of patch 14 (4 tokens), any-resolution grids."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text_config(layers), image_token_id=IMAGE_TOKEN,
                          pad_token_id=PAD, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    return _finish(LlavaNextForConditionalGeneration, cfg, impl, dtype)


def _ids(generator, n):
    return torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=generator).tolist()


def left_pad(seqs: list[list[int]]):
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    return ids, mask


def llava_prompts(before=(3,), after=(5,), seed=1, n_visual=64, images_per_prompt=1):
    """Prompts [text, <image> x n_visual, text] (several images: image blocks joined by text)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for a, b in zip(before, after):
        seq = [1] + _ids(g, a)
        for i in range(images_per_prompt):
            if i:
                seq += _ids(g, 2)
            seq += [IMAGE_TOKEN] * n_visual
        seqs.append(seq + _ids(g, b))
    ids, mask = left_pad(seqs)
    pixels = torch.randn(len(seqs) * images_per_prompt, 3, 112, 112, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_next_prompts(model, image_sizes, before=(3,), after=(5,), seed=1, images_per_prompt=1):
    """Prompts with images of their own sizes (so each its own visual token count); with several
    images per prompt, image_sizes lists them prompt after prompt."""
    g = torch.Generator().manual_seed(seed)
    n_tiles = 5
    pixels = torch.randn(len(image_sizes), n_tiles, 3, 28, 28, generator=g)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes)
    feats = getattr(feats, "pooler_output", feats)
    counts = [f.shape[0] for f in feats]
    seqs = []
    for i, (a, b) in enumerate(zip(before, after)):
        seq = [1] + _ids(g, a)
        for k, n in enumerate(counts[i * images_per_prompt:(i + 1) * images_per_prompt]):
            seq += (_ids(g, 2) if k else []) + [IMAGE_TOKEN] * n
        seqs.append(seq + _ids(g, b))
    ids, mask = left_pad(seqs)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}, counts
