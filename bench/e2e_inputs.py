"""Prompts and model calls for the end-to-end benchmarks: left-padded batches with random pixels,
a batch split into its rows, and the prefill and generate calls that are timed."""
from __future__ import annotations

import torch

from e2e_models import BOS, IMAGE_TOKEN, PAD, SHAPES, Shape


def visual_token_count(model, shape: Shape) -> int:
    """Visual tokens one image gives on this model."""
    if shape.family == "llava":
        return (shape.image_size // shape.patch_size) ** 2
    pixels, sizes = _next_pixels(shape, 1, torch.Generator().manual_seed(0), model.device, model.dtype)
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes)
    feats = getattr(feats, "pooler_output", feats)
    return int(feats[0].shape[0])


def _next_pixels(shape: Shape, batch: int, gen, device, dtype):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = image_size_to_num_patches(list(shape.image_hw), [list(p) for p in shape.pinpoints], shape.image_size)
    pixels = torch.randn(batch, tiles, 3, shape.image_size, shape.image_size, generator=gen)
    sizes = torch.tensor([list(shape.image_hw)] * batch)
    return pixels.to(device, dtype), sizes.to(device)


def text_lengths(shape: Shape, batch: int, seed: int = 0) -> list[int]:
    """Tokens after the image per sample: the shape's question length for the first, then
    lengths spread over [text_after / 4, 3 * text_after] so the batch is left padded."""
    gen = torch.Generator().manual_seed(1000 + seed)
    low, high = max(1, shape.text_after // 4), 3 * shape.text_after
    return [shape.text_after] + torch.randint(low, high + 1, (batch - 1,), generator=gen).tolist()


def make_inputs(model, shape: Shape | str, batch: int, seed: int = 0, n_visual: int | None = None) -> dict:
    """A left-padded batch [BOS, text, <image> x n_visual, text of its own length] with random
    pixels, on the model's device."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    n_visual = n_visual or visual_token_count(model, shape)
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for after in text_lengths(shape, batch, seed):
        words = torch.randint(3, IMAGE_TOKEN, (shape.text_before - 1 + after,), generator=gen).tolist()
        seqs.append([BOS] + words[:shape.text_before - 1] + [IMAGE_TOKEN] * n_visual + words[shape.text_before - 1:])
    length = max(map(len, seqs))
    ids = torch.full((batch, length), PAD)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    device, dtype = model.device, model.dtype
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if shape.family == "llava":
        pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=gen)
        inputs["pixel_values"] = pixels.to(device, dtype)
    else:
        inputs["pixel_values"], inputs["image_sizes"] = _next_pixels(shape, batch, gen, device, dtype)
    return inputs


def split_samples(inputs: dict) -> list[dict]:
    """Each row of a left-padded batch on its own, padding removed (one image per row)."""
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][b].bool()
        one = {"input_ids": inputs["input_ids"][b:b + 1, real],
               "attention_mask": inputs["attention_mask"][b:b + 1, real]}
        for key in ("pixel_values", "image_sizes"):
            if key in inputs:
                one[key] = inputs[key][b:b + 1]
        out.append(one)
    return out


def prefill(model, inputs: dict):
    """One prefill as generate runs it: a fresh cache, logits of the last position only."""
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def decode_steps(model, inputs: dict, prefilled, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps continuing a prefill (its output, with past_key_values), as
    generate runs them; returns the tokens [B, steps]."""
    cache, mask = prefilled.past_key_values, inputs["attention_mask"]
    token = prefilled.logits[:, -1].argmax(-1, keepdim=True)
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, 1)


def generate(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly new_tokens tokens per row."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    expected = inputs["input_ids"].shape[1] + new_tokens
    if out.shape[1] != expected:
        raise RuntimeError(f"generate returned {out.shape[1]} positions, expected {expected}")
    return out
