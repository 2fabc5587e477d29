"""Shared by the end-to-end benchmarks (bench/e2e_bench.py, bench/test_e2e_bench.py): model
shapes, random-weight models built without random init, left-padded prompts, and the
measurements (timers, pruning-step probes, KV cache bytes, FLOPs from the trace).

Timings need real shapes, not real weights: a model is constructed directly on its device with
transformers' weight init switched off, then every weight is set once to small normal noise
(norm weights 1, biases 0), so attention softmaxes are neither flat nor one-hot.

Times are medians with p20 / p80 over repeats: CUDA events around each call (with a synchronize
after each, so a call is timed from its first launch to its last kernel) on a GPU, perf_counter
on CPU.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, prefill_flops
from sparsevlm_engine.families import family_of

IMAGE_TOKEN = 32000
PAD = 32001
BOS = 1
VOCAB = 32064
QUANTILES = (0.5, 0.2, 0.8)


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


# ----------------------------------------------------------------------------- models
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


# ----------------------------------------------------------------------------- prompts
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


# ----------------------------------------------------------------------------- calls
def prefill(model, inputs: dict):
    """One prefill as generate runs it: a fresh cache, logits of the last position only."""
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def generate(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly new_tokens tokens per row."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    expected = inputs["input_ids"].shape[1] + new_tokens
    if out.shape[1] != expected:
        raise RuntimeError(f"generate returned {out.shape[1]} positions, expected {expected}")
    return out


# ----------------------------------------------------------------------------- timing
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (after sync)."""
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3


def stats(times_ms: list[float]) -> dict:
    """median, p20, p80 (torch.quantile, as triton.testing.do_bench) and the count."""
    t = torch.tensor(times_ms, dtype=torch.float64)
    median, p20, p80 = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "n": len(times_ms)}


@dataclass
class Repeats:
    """How often to call: warm-up calls, then at least min_iters and up to max_iters calls, going
    on while less than min_time_s has passed."""

    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 50
    min_time_s: float = 1.0

    def scaled(self, factor: float) -> "Repeats":
        return Repeats(self.warmup, max(1, math.ceil(self.min_iters * factor)),
                       max(1, math.ceil(self.max_iters * factor)), self.min_time_s * factor)


def time_calls(fn, clock: Clock, repeats: Repeats, probes=()) -> tuple[dict, list[dict]]:
    """Time fn() (ms stats) and collect each probe's per-call readings."""
    for _ in range(repeats.warmup):
        fn()
    clock.sync()
    times, readings = [], []
    began = time.perf_counter()
    while len(times) < repeats.min_iters or (
            len(times) < repeats.max_iters and time.perf_counter() - began < repeats.min_time_s):
        for probe in probes:
            probe.reset()
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.ms(start, end))
        readings.append({k: v for probe in probes for k, v in probe.read().items()})
    return stats(times), readings


def peak_memory(fn, clock: Clock) -> tuple[int | None, int | None]:
    """(peak bytes allocated during fn(), peak above what was allocated before) on a GPU; None on CPU."""
    if not clock.cuda:
        fn()
        return None, None
    clock.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    clock.sync()
    peak = torch.cuda.max_memory_allocated()
    return int(peak), int(peak - base)


class DecoderProbe:
    """Time spent in the decoder (the language model's forward) per call: hooks on its module."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.marks: list = []
        decoder = family_of(model).decoder(model)
        self.handles = [decoder.register_forward_pre_hook(lambda *a: self.marks.append(self.clock.mark())),
                        decoder.register_forward_hook(lambda *a: self.marks.append(self.clock.mark()))]

    def reset(self) -> None:
        self.marks = []

    def read(self) -> dict:
        pairs = zip(self.marks[0::2], self.marks[1::2])
        return {"decoder_ms": sum(self.clock.ms(a, b) for a, b in pairs)}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class PruneProbe:
    """Time spent in the pruning pass per call: Pruner.start (raters) and Pruner.prune (each
    pruning layer's scoring, selection, recycling and compaction), wrapped on the sparsified
    model's own Pruner instance (removed by close). prune_steps_ms: per pruning layer, summed
    over the prefills of the call (several when a call loops over rows)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        engine = model.__dict__["_sparsevlm_engine"]
        self.pruner = engine.pruner
        self.n_layers = len(engine.pruning_layers)
        self.saved = {name: self.pruner.__dict__.get(name) for name in ("start", "prune")}
        self.starts: list = []
        self.steps: list = []
        for name, store in (("start", self.starts), ("prune", self.steps)):
            setattr(self.pruner, name, self._timed(getattr(self.pruner, name), store))

    def _timed(self, fn, store):
        def wrapper(*args, **kwargs):
            start = self.clock.mark()
            result = fn(*args, **kwargs)
            store.append((start, self.clock.mark()))
            return result
        return wrapper

    def reset(self) -> None:
        self.starts.clear()
        self.steps.clear()

    def read(self) -> dict:
        start = [self.clock.ms(a, b) for a, b in self.starts]
        steps = [self.clock.ms(a, b) for a, b in self.steps]
        per_layer = [sum(steps[i::self.n_layers]) for i in range(self.n_layers)]  # summed over prefills
        return {"prune_start_ms": sum(start), "prune_steps_ms": per_layer, "prune_ms": sum(start) + sum(steps),
                "prune_calls": len(self.starts) + len(self.steps)}

    def close(self) -> None:
        for name, saved in self.saved.items():
            if saved is None:
                self.pruner.__dict__.pop(name, None)
            else:
                setattr(self.pruner, name, saved)


# ----------------------------------------------------------------------------- cache and FLOPs
def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache (transformers 5 layers, or 4.x key/value lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_cache_info(cache) -> dict:
    """Bytes of the cache tensors (sum over layers; each layer holds its own token count) and
    the tokens per layer."""
    layers = cache_layers(cache)
    return {"kv_cache_bytes": sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers),
            "kv_tokens_per_layer": [int(k.shape[-2]) for k, _ in layers]}


def kv_bytes_per_token(model) -> int:
    """Keys + values of one token in one layer, for the whole batch row."""
    text = getattr(model.config, "text_config", model.config)
    dims = DecoderDims.from_text_config(text)
    return 2 * dims.kv_heads * dims.head_dim * torch.tensor([], dtype=model.dtype).element_size()


def expected_kv_tokens(samples, depth: int) -> list[int]:
    """Tokens each layer's cache holds for a batch whose rows the trace describes: the widest
    row of the left-padded layout that layer ran on (real tokens: text + visual entering it)."""
    return [max(s.length - s.n_visual + s.visual_entering[layer] for s in samples) for layer in range(depth)]


def dense_samples(model, inputs: dict) -> list:
    """Per-row (length, n_visual, visual_entering) of a dense prefill, as a trace would give them."""
    text = getattr(model.config, "text_config", model.config)
    depth = text.num_hidden_layers
    rows = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        length = sum(mask)
        n_visual = sum(1 for t, m in zip(ids, mask) if m and t == IMAGE_TOKEN)
        rows.append(_Row(length, n_visual, (n_visual,) * depth))
    return rows


@dataclass
class _Row:
    length: int
    n_visual: int
    visual_entering: tuple[int, ...]


def flops_of(model, samples) -> dict:
    """Decoder prefill FLOPs summed over rows: paper formula (MACs) and exact, dense and sparse,
    the pruning's own, and the ratios dense / sparse (exact: pruning included)."""
    text = getattr(model.config, "text_config", model.config)
    dims = DecoderDims.from_text_config(text)
    total = {"dense_paper": 0.0, "sparse_paper": 0.0, "dense_exact": 0.0, "sparse_exact": 0.0, "pruning": 0.0}
    for s in samples:
        report = getattr(s, "flops", None) or prefill_flops(s.length, s.visual_entering, dims, 0.0)
        for key in total:
            total[key] += getattr(report, key)
    total["ratio_paper"] = total["dense_paper"] / total["sparse_paper"]
    total["ratio_exact"] = total["dense_exact"] / (total["sparse_exact"] + total["pruning"])
    return total


def kept_records(samples) -> list:
    """Per row, per pruning layer: (layer, kept positions, recycled (centre, members))."""
    return [[(r.layer, r.kept, sorted((t.centre, t.members) for t in r.recycled)) for r in s.pruning]
            for s in samples]


def config_for(preset: str, budget: int, backend: str = "auto") -> sve.SparseVLMConfig:
    return sve.SparseVLMConfig.preset(preset, budget, backend=backend)

