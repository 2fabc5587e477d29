"""Random-weight models for the end-to-end benchmarks (bench/e2e_bench.py, bench/test_e2e_bench.py):
the LLaVA-1.5 / LLaVA-NeXT shapes, models built on their device without random init, and the
SparseVLM config of a preset.

Timings need real shapes, not real weights: a model is constructed directly on its device with
transformers' weight init switched off, then every weight is set once to small normal noise
(norm weights 1, biases 0), so attention softmaxes are neither flat nor one-hot.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import sparsevlm_engine as sve

IMAGE_TOKEN = 32000
PAD = 32001
BOS = 1
VOCAB = 32064


@dataclass(frozen=True)
class Shape:
    """A LLaVA-1.5 (family "llava") or LLaVA-NeXT ("llava_next") model shape and its prompt."""

    name: str
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int           # the vision tower's tile size (px)
    patch_size: int
    projection_dim: int = 768
    image_hw: tuple[int, int] | None = None   # LLaVA-NeXT: the image size the prompt claims (any-resolution)
    pinpoints: tuple[tuple[int, int], ...] = ()
    text_before: int = 35     # tokens before the image, BOS included (system prompt + "USER:")
    text_after: int = 39      # tokens after the image in the first sample (the question)
    dtype: str = "bfloat16"
    real: bool = False        # the published model's sizes (timings worth reporting)


NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

SHAPES: dict[str, Shape] = {s.name: s for s in (
    # Vicuna-7B decoder + CLIP ViT-L/14-336 (24 layers, 1024 wide, 16 heads), 576 visual tokens.
    Shape("llava-1.5-7b", "llava", 4096, 11008, 32, 32, 32, 1024, 4096, 24, 16, 336, 14, real=True),
    # The same towers; a 672x672 image is 2x2 tiles + the base tile: 576 + 48 x (48 + 1) = 2928.
    Shape("llava-next-7b", "llava_next", 4096, 11008, 32, 32, 32, 1024, 4096, 24, 16, 336, 14,
          image_hw=(672, 672), pinpoints=NEXT_PINPOINTS, real=True),
    # CPU: LLaVA-1.5's token geometry (576 visual tokens, 32 layers, pruning after 2 / 6 / 15) on
    # a narrow decoder and a one-layer vision tower.
    Shape("llava-1.5-small", "llava", 128, 344, 32, 4, 4, 32, 64, 1, 2, 336, 14, dtype="float32"),
    # CPU: LLaVA-NeXT geometry on 112 px tiles: 64 + 16 x (16 + 1) = 336 visual tokens.
    Shape("llava-next-small", "llava_next", 128, 344, 32, 4, 4, 32, 64, 1, 2, 112, 14, image_hw=(224, 224),
          pinpoints=((112, 224), (224, 112), (224, 224)), text_before=11, text_after=13, dtype="float32"),
    # CI: 64 visual tokens, grouped-query attention (4 heads, 2 key heads), 32 layers.
    Shape("llava-1.5-tiny", "llava", 32, 64, 32, 4, 2, 16, 32, 1, 2, 112, 14, text_before=6, text_after=9,
          dtype="float32"),
    # CI: LLaVA-NeXT in miniature, 56 px tiles of patch 14: 16 + 8 x (8 + 1) = 88 visual tokens.
    Shape("llava-next-tiny", "llava_next", 32, 64, 32, 4, 2, 16, 32, 1, 2, 56, 14, image_hw=(112, 112),
          pinpoints=((56, 112), (112, 56), (112, 112)), text_before=6, text_after=9, dtype="float32"),
)}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _configs(shape: Shape):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size,
                              projection_dim=shape.projection_dim)
    text = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, vocab_size=VOCAB, max_position_embeddings=4096,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, pad_token_id=PAD,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if shape.family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        return LlavaForConditionalGeneration, LlavaConfig(**common)
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration, LlavaNextConfig(
        image_grid_pinpoints=[list(p) for p in shape.pinpoints], **common)


def _no_init():
    """transformers' context that skips weight init (the weights are set once afterwards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def fill_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Every weight set once, on its own device: matrices and embeddings N(0, std), 1-D weights
    (norms) 1, biases 0, other vectors (CLIP's class embedding, NeXT's newline) N(0, std)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1 and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def build_model(shape: Shape | str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                attn: str = "sdpa", seed: int = 0):
    """A random-weight model of `shape`, built on `device` in `dtype` (default: the shape's)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    dtype = dtype or torch_dtype(shape.dtype)
    cls, config = _configs(shape)
    with torch.device(device), _no_init():
        try:
            model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
        except TypeError:  # transformers 4.57 names it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype, attn_implementation=attn)
    fill_weights(model, seed)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always generate the full count
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(model.generation_config, key):
            setattr(model.generation_config, key, None)
    return model


def set_attention(model, impl: str) -> None:
    """Switch the attention implementation in place (decoder and vision tower)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(impl)
    for cfg in (model.config, getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if cfg is not None and getattr(cfg, "_attn_implementation", None) != impl:
            cfg._attn_implementation = impl


def flash_attn_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def config_for(preset: str, budget: int, backend: str = "auto") -> sve.SparseVLMConfig:
    return sve.SparseVLMConfig.preset(preset, budget, backend=backend)

