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


def _finish(model_cls, cfg, impl: str, dtype, qk_scale: float = 1.0):
    """qk_scale multiplies the decoder's query and key weights: at random init (std 0.02) attention is
    near uniform and visual scores tie within float rounding; scale 6 separates them."""
    cfg._attn_implementation = impl
    cfg.text_config._attn_implementation = impl
    cfg.vision_config._attn_implementation = impl
    model = model_cls(cfg).eval().to(dtype)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def tiny_llava(impl: str = "eager", seed: int = 0, layers: int = 8, dtype=torch.float32, qk_scale: float = 1.0):
    """LLaVA-1.5 geometry in miniature: 112 px / patch 14 -> 64 visual tokens, 8 decoder layers."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(layers), image_token_id=IMAGE_TOKEN,
                      pad_token_id=PAD)
    return _finish(LlavaForConditionalGeneration, cfg, impl, dtype, qk_scale)


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


def llava_case(family: str, impl: str):
    """(model, inputs): a tiny LLaVA ("llava") or LLaVA-NeXT ("llava_next") and a left-padded batch
    of three prompts, each with its own text lengths (and image size, on LLaVA-NeXT)."""
    if family == "llava":
        return tiny_llava(impl), llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    model = tiny_llava_next(impl)
    inputs, _ = llava_next_prompts(model, [[28, 56], [56, 56], [56, 28]], before=(3, 6, 1), after=(5, 9, 7))
    return model, inputs


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_VOCAB = 160
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 150, 151, 152, 153
QWEN_PATCH, QWEN_TEMPORAL, QWEN_MERGE = 2, 2, 2
QWEN_PATCH_DIM = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH


def tiny_qwen(family: str = "qwen2_vl", impl: str = "eager", seed: int = 0, layers: int = 8, dtype=torch.float32,
              qk_scale: float = 1.0):
    """Qwen2-VL / Qwen2.5-VL in miniature: patch 2, temporal patch 2, 2x2 merge, mRoPE sections
    (2, 1, 1) over the 4 frequency pairs of 8-wide heads, 8 decoder layers."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    text = dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)
    common = dict(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE,
                  in_channels=3, num_heads=2, depth=1)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
               vision_end_token_id=QWEN_VISION_END, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if family == "qwen2_vl":
        vision = dict(embed_dim=16, hidden_size=32, mlp_ratio=2, **common)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    else:
        vision = dict(hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=8,
                      fullatt_block_indexes=[0], tokens_per_second=2, **common)
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), Qwen2_5_VLForConditionalGeneration
    return _finish(cls, cfg, impl, dtype, qk_scale)


def _qwen_ids(generator, n):
    return torch.randint(3, 140, (n,), generator=generator).tolist()


def qwen_prompts(media, before=(3,), after=(5,), seed=1):
    """Qwen prompts [text, <vision_start> pads <vision_end> ..., text], left padded, as the processor
    lays them out. media: per prompt a list of ("image", (h, w)) or ("video", (t, h, w)) in patches
    of the vision tower (h, w even); each gives t*h*w/4 visual tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs, types, grids = [], [], {"image": [], "video": []}
    for items, a, b in zip(media, before, after):
        seq = [1] + _qwen_ids(g, a)
        for k, (kind, shape) in enumerate(items):
            thw = (1, *shape) if kind == "image" else tuple(shape)
            grids[kind].append(thw)
            n = thw[0] * thw[1] * thw[2] // QWEN_MERGE ** 2
            token = QWEN_IMAGE if kind == "image" else QWEN_VIDEO
            seq += (_qwen_ids(g, 2) if k else []) + [QWEN_VISION_START] + [token] * n + [QWEN_VISION_END]
        seqs.append(seq + _qwen_ids(g, b))
    ids, mask = left_pad(seqs)
    kind_of = torch.zeros_like(ids)
    kind_of[ids == QWEN_IMAGE] = 1
    kind_of[ids == QWEN_VIDEO] = 2
    inputs = {"input_ids": ids, "attention_mask": mask}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            thw = torch.tensor(grids[kind])
            inputs[key] = torch.randn(int(thw.prod(1).sum()), QWEN_PATCH_DIM, generator=g)
            inputs[f"{kind}_grid_thw"] = thw
    return inputs, kind_of


def with_token_types(inputs: dict, kind_of: torch.Tensor) -> dict:
    """Add mm_token_type_ids where the installed transformers takes them (5.x)."""
    import inspect

    from transformers import Qwen2VLModel

    if "mm_token_type_ids" in inspect.signature(Qwen2VLModel.get_rope_index).parameters:
        return {**inputs, "mm_token_type_ids": kind_of}
    return inputs


def qwen_single(inputs: dict, b: int) -> dict:
    """Row b of a qwen_prompts batch on its own: padding removed, its own images and videos."""
    real = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, real] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    for kind, token, key in (("image", QWEN_IMAGE, "pixel_values"), ("video", QWEN_VIDEO, "pixel_values_videos")):
        if f"{kind}_grid_thw" not in inputs:
            continue
        ids = inputs["input_ids"]
        starts = (ids == token) & ~torch.nn.functional.pad(ids == token, (1, 0))[:, :-1]
        spans = starts.sum(1).tolist()
        first, count = sum(spans[:b]), spans[b]
        if not count:
            continue
        thw = inputs[f"{kind}_grid_thw"]
        rows = thw.prod(1).tolist()
        begin = sum(rows[:first])
        out[key] = inputs[key][begin:begin + sum(rows[first:first + count])]
        out[f"{kind}_grid_thw"] = thw[first:first + count]
    return out
