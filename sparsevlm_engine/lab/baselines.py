"""Text-agnostic visual-token pruning baselines for the lab VLM: FastV-style and random.

Both drop visual tokens once, after decoder layer `layer` (dense before, like SparseVLM's first
pruning layer): FastV-style keeps the visual tokens that the last prompt token attends to most
at that layer (mean over heads); random keeps a seeded random subset. Dropped tokens are masked
out as keys in every later layer, which for the prompt's remaining tokens is the same as
removing them.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

METHODS = ("fastv", "random")


def keep_for_average(target: float, n_visual: int, layer: int, depth: int) -> int:
    """Visual tokens to keep after `layer` so the mean over all layers of the visual tokens entering them is target."""
    dense_layers = layer + 1
    keep = (depth * target - dense_layers * n_visual) / (depth - dense_layers)
    return int(min(n_visual, max(1, round(keep))))


def layer_average(keep: int, n_visual: int, layer: int, depth: int) -> float:
    dense_layers = layer + 1
    return (dense_layers * n_visual + (depth - dense_layers) * keep) / depth


def last_token_attention(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
    """Attention [B, L] of the last position to every key, mean over heads; hidden is the normed layer input."""
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    q = attention.q_proj(hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(head_dim)  # [B, H, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


def choose_kept(method: str, visual: torch.Tensor, keep: int, attention: torch.Tensor | None,
                generators: list[torch.Generator]) -> torch.Tensor:
    """[B, L] bool: the visual tokens kept, `keep` per sample.

    random: row b's visual tokens, in order, get scores drawn from generators[b], so a row keeps
    the same tokens whatever its padding and the rest of its batch.
    """
    if method == "fastv":
        scores = attention.masked_fill(~visual, float("-inf"))
    elif method == "random":
        scores = torch.full(visual.shape, float("-inf"))
        for row, generator in enumerate(generators):
            scores[row, visual[row].cpu()] = torch.rand(int(visual[row].sum()), generator=generator)
        scores = scores.to(visual.device)
    else:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    top = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(visual).scatter(-1, top, True) & visual


@contextlib.contextmanager
def text_agnostic_pruning(model, method: str, keep: int, layer: int = 2, seed: int | list[int] = 0):
    """Within the block, the lab VLM's prefills keep `keep` visual tokens per sample after `layer`.

    seed: random's seed, one for every row or a list with one per row (a row's own draws).
    Yields a list that receives, per prefill, the kept mask [B, L].
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    decoder = model.model.language_model
    layers = list(decoder.layers)
    if not 0 <= layer < len(layers) - 1:
        raise ValueError(f"layer {layer} must be below the last layer ({len(layers) - 1})")
    state: dict = {}
    kept_log: list[torch.Tensor] = []
    row_seeds = [seed] if isinstance(seed, int) else list(seed)
    generators = [torch.Generator().manual_seed(s) for s in row_seeds]

    def on_model_call(module, args, kwargs):
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        state.clear()
        if input_ids.shape[1] > 1:
            state["visual"] = input_ids == model.config.image_token_id
            state["valid"] = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()

    def on_attention(module, args, kwargs):
        if "visual" not in state:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        attention = last_token_attention(module, hidden, cos, sin, state["valid"]) if method == "fastv" else None
        rows = state["visual"].shape[0]
        if len(generators) not in (1, rows):
            raise ValueError(f"{len(generators)} row seeds for a batch of {rows} rows")
        kept = choose_kept(method, state["visual"], keep, attention,
                           generators * rows if len(generators) == 1 else generators)
        kept_log.append(kept)
        keys = state["valid"] & (kept | ~state["visual"])
        length = keys.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
        allowed = causal[None, None] & keys[:, None, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=keys.device)[None, None]  # no empty rows
        state["mask"] = torch.zeros(allowed.shape, dtype=hidden.dtype, device=keys.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)
        return None

    def before_layer(module, args, kwargs):
        if "mask" not in state:
            return None
        kwargs["attention_mask"] = state["mask"]
        return args, kwargs

    handles = [model.model.register_forward_pre_hook(on_model_call, with_kwargs=True),
               layers[layer].self_attn.register_forward_pre_hook(on_attention, with_kwargs=True)]
    handles += [lay.register_forward_pre_hook(before_layer, with_kwargs=True) for lay in layers[layer + 1:]]
    try:
        yield kept_log
    finally:
        for handle in handles:
            handle.remove()
