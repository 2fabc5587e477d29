"""A dense run in which each layer is denied the keys of the visual tokens pruned before it.

With recycling off, this is what a pruned run must equal: pruning removes tokens, masking
hides them, and nothing else differs.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def allowed_keys(trace, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, L0] bool: real tokens layer `layer` may attend to in the padded prompt."""
    valid = attention_mask.bool()
    allowed = valid.clone()
    for b, sample in enumerate(trace.samples):
        offset = valid.shape[1] - sample.length
        earlier = [r for r in sample.pruning if r.layer < layer]
        if not earlier:
            continue
        kept = set(earlier[-1].kept)
        for p in sample.visual_positions:
            if p not in kept:
                allowed[b, offset + p] = False
    return allowed


def _mask(allowed: torch.Tensor, q_len: int, kv_len: int, impl: str, dtype) -> torch.Tensor:
    batch, prompt = allowed.shape
    keys = torch.cat([allowed, torch.ones(batch, kv_len - prompt, dtype=torch.bool)], 1)
    q_pos = torch.arange(kv_len - q_len, kv_len)
    causal = torch.arange(kv_len)[None, :] <= q_pos[:, None]
    full = (keys[:, None, None, :] & causal) | (torch.arange(kv_len)[None, :] == q_pos[:, None])
    if impl == "sdpa":
        return full
    return torch.where(full, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


@contextlib.contextmanager
def masking(model, trace, impl: str, prompt_mask: torch.Tensor):
    """Inside, each decoder layer of the (unsparsified) model is denied the prompt keys pruned
    before it; prompt_mask [B, L0] is the pruned prompt's mask, and every key after the prompt
    (generated tokens, later chat turns) stays visible."""
    layers = model.model.language_model.layers
    handles = []

    def hook(index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(index) if cache is not None else 0
        q_len = hidden.shape[1]
        allowed = allowed_keys(trace, prompt_mask, index)
        kwargs["attention_mask"] = _mask(allowed, q_len, past + q_len, impl, hidden.dtype)
        return args, kwargs

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(functools.partial(hook, index), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_dense(model, inputs: dict, trace, impl: str, max_new_tokens: int = 0):
    """Run the (unsparsified) model with the masks; returns (prefill logits, generated ids or None)."""
    with masking(model, trace, impl, inputs["attention_mask"]), torch.no_grad():
        logits = model(**inputs).logits
        generated = None
        if max_new_tokens:
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, generated


def gather_final_logits(dense_logits: torch.Tensor, trace, attention_mask: torch.Tensor):
    """Dense logits at each sample's final (kept) positions, right-aligned like the pruned run."""
    width = max(len(s.final_positions) for s in trace.samples)
    out = torch.zeros(dense_logits.shape[0], width, dense_logits.shape[-1], dtype=dense_logits.dtype)
    for b, sample in enumerate(trace.samples):
        offset = attention_mask.shape[1] - sample.length
        idx = torch.tensor([offset + p for p in sample.final_positions])
        out[b, width - len(idx):] = dense_logits[b, idx]
    return out
