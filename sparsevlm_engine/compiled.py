"""Compiled decoder layers: compile_decoder, uncompile_decoder, warm_up, is_compiled.

    sve.compile_decoder(model)              # plain or sparsified, either order
    sve.warm_up(model, [one_prompt, batch]) # compiles every kind of call once
    model.generate(**inputs)                # no recompilation from here on
    sve.uncompile_decoder(model)

compile_decoder runs every decoder layer's forward through torch.compile. The engine's hooks
are module hooks, which run around layer.forward, not inside it, so the compiled region holds
the layer's own computation only: norms, projections, RoPE, the KV-cache update, attention
and MLP, as one graph (fullgraph=True by default; no graph breaks).

Each layer gets an entry function with a code object of its own. torch.compile keeps compiled
graphs, guards and the recompile limit per code object, so every layer has its own, and a
layer's constants (its layer_idx in the cache update) never make another layer recompile.

Before the compiled entry runs, the layer's inputs are put in one form, whoever produced them
(the model, or the engine's hooks for pruned stages and decode steps):

- hidden_states [B, Q, d];
- attention_mask [B, 1, Q, K], never None: boolean for sdpa, additive float for eager. Where
  the model passes None (no padding), the causal mask over the layer's K = cached + Q keys is
  built here, once per shape, and shared by the layers;
- position_embeddings (cos, sin) [B, Q, Dr] (or [3, B, Q, Dr] with transformers 4.57 mRoPE)
  and position_ids [B, Q] (or [3, B, Q]), batch dimension expanded to B;
- the layer's cached keys and values [B, H_kv, T, D] contiguous (a compiled prefill may leave
  another layout);
- no input a view of another tensor (torch.compile guards on a view's base).

B, Q, K and T are marked dynamic. torch specialises sizes of 1, and a prefill (the layer's
cache empty) traces differently from a decode step (its cache filled), so each layer holds
four graphs once warm: prefill and decode, each for one prompt and for a batch. Prompt
lengths, batch sizes from 2 up, budgets, presets and dense or sparse calls all reuse them
(the engine hands its stage masks in the same form). A forward without a cache
(use_cache=False) adds two more per layer.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from .engine import UnsupportedModeError, attn_implementation
from .families import family_of
from .masks import decode_mask

_COMPILED_ATTR = "_sparsevlm_compiled"
COMPILED_ATTENTION = ("eager", "sdpa")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _run_layer(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


def _layer_entry(index: int):
    """_run_layer under a code object of its own, named after the layer."""
    code = _run_layer.__code__.replace(co_name=f"decoder_layer_{index}")
    return types.FunctionType(code, _run_layer.__globals__, code.co_name)


def _causal_mask(batch: int, queries: int, keys: int, impl: str, dtype, device) -> torch.Tensor:
    """[B, 1, Q, K]: query q, at position K - Q + q, sees keys 0 .. K - Q + q (no padding)."""
    every = torch.ones(batch, keys, dtype=torch.bool, device=device)
    return decode_mask(every[:, :keys - queries], every[:, keys - queries:], queries, impl, dtype).contiguous()


def _unaliased(t: torch.Tensor) -> torch.Tensor:
    """t, not as a view of another tensor (same storage; kept as is where it needs gradients)."""
    return t.detach() if t._base is not None and not t.requires_grad else t


def _at_batch(t: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
    """t with dimension dim (1 or batch) at batch."""
    if t.shape[dim] == batch:
        return _unaliased(t)
    shape = list(t.shape)
    shape[dim] = batch
    return t.expand(shape).contiguous()


def _settle_cache(cache, layer_idx: int) -> None:
    """The layer's cached keys and values [B, H_kv, T, D]: contiguous, not views, B and T dynamic."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            continue
        if not t.is_contiguous():
            t = t.contiguous()
            setattr(layer, name, t)
        elif t._base is not None:
            t = t.detach()
            setattr(layer, name, t)
        _dynamic(t, 0, 2)


def _dynamic(t: torch.Tensor, *dims: int) -> None:
    for dim in dims:  # one call per dimension: maybe_mark_dynamic with a list is far slower
        torch._dynamo.maybe_mark_dynamic(t, dim)


def _mark_dynamic(hidden: torch.Tensor, kwargs: dict) -> None:
    """Batch and sequence dimensions dynamic from the first compile: B, Q of hidden, cos, sin and
    position_ids, B, Q, K of the mask, Q of cache_position (transformers 4.57)."""
    _dynamic(hidden, 0, 1)
    _dynamic(kwargs["attention_mask"], 0, 2, 3)
    for t in kwargs.get("position_embeddings") or ():
        _dynamic(t, t.dim() - 3, t.dim() - 2)
    if kwargs.get("position_ids") is not None:
        t = kwargs["position_ids"]
        _dynamic(t, t.dim() - 2, t.dim() - 1)
    if kwargs.get("cache_position") is not None:
        _dynamic(kwargs["cache_position"], 0)


class CompiledDecoder:
    """What compile_decoder installed on one model: its layers, the torch.compile options, and
    the last causal mask built for a call without one, as (key, mask)."""

    def __init__(self, layers: list, options: dict, impl: str):
        self.layers = layers
        self.options = options
        self.impl = impl
        self.causal: tuple | None = None

    def causal_mask(self, hidden: torch.Tensor, keys: int) -> torch.Tensor:
        batch, queries = hidden.shape[:2]
        key = (batch, queries, keys, hidden.dtype, hidden.device)
        causal = self.causal
        if causal is None or causal[0] != key:
            causal = (key, _causal_mask(batch, queries, keys, self.impl, hidden.dtype, hidden.device))
            self.causal = causal
        return causal[1]


class CompiledLayerForward:
    """layer.forward of a compiled layer: its inputs in one form (module docstring), then its
    compiled entry."""

    def __init__(self, layer: nn.Module, index: int, layer_idx: int, decoder: CompiledDecoder, options: dict):
        self.layer = layer
        self.index = index
        self.layer_idx = layer_idx
        self.decoder = decoder
        self.entry = torch.compile(_layer_entry(index), **options)

    def __call__(self, *args, **kwargs):
        if self.layer.training:
            raise UnsupportedModeError("compiled decoder layers run in inference only: call model.eval(), "
                                       "or uncompile_decoder(model) to train")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batch = hidden.shape[0]
        cache = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        if mask is None:
            cached = 0 if cache is None else int(cache.get_seq_length(self.layer_idx))
            mask = self.decoder.causal_mask(hidden, cached + hidden.shape[1])
        kwargs["attention_mask"] = _unaliased(mask)
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (_at_batch(cos, batch, -3), _at_batch(sin, batch, -3))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _at_batch(kwargs["position_ids"], batch, -2)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = _unaliased(kwargs["cache_position"])
        if cache is not None:
            _settle_cache(cache, self.layer_idx)
        hidden = _unaliased(hidden)
        _mark_dynamic(hidden, kwargs)
        return self.entry(self.layer, hidden, *args[1:], **kwargs)

    def __deepcopy__(self, memo):
        """A copy with an entry of its own, compiled on its first call (the layer copy is still
        being filled in here, so nothing of it is read)."""
        return CompiledLayerForward(copy.deepcopy(self.layer, memo), self.index, self.layer_idx,
                                    copy.deepcopy(self.decoder, memo), self.decoder.options)

    def __reduce__(self):
        raise TypeError("a compiled decoder does not pickle: call sve.uncompile_decoder(model) before saving, "
                        "and compile_decoder again after loading")


def _check_options(options: dict) -> None:
    if "dynamic" in options:
        raise ValueError("compile_decoder marks the batch and sequence dimensions dynamic itself; "
                         "do not pass dynamic=")
    mode = options.get("mode")
    if mode in CUDA_GRAPH_MODES or (options.get("options") or {}).get("triton.cudagraphs"):
        raise UnsupportedModeError(
            f"compile_decoder does not support CUDA graphs (mode={mode!r}): they record one graph per shape "
            "and the KV cache grows every step; use mode='default' or 'max-autotune-no-cudagraphs'")


def compile_decoder(model: nn.Module, **options) -> nn.Module:
    """Compile every decoder layer's forward with torch.compile, in place; returns the model.

    options go to torch.compile (backend, mode, fullgraph, options, ...); fullgraph defaults to
    True, so that a layer that cannot compile as one graph raises rather than running in pieces.
    Works on a plain or a sparsified model (sparsify may come before or after). Calling it again
    with the same options changes nothing; with others it compiles afresh. Raises
    UnsupportedModeError for an attention implementation other than eager or sdpa, or CUDA
    graphs; UnsupportedModelError outside the supported families.
    """
    options = {"fullgraph": True, **options}
    _check_options(options)
    existing = model.__dict__.get(_COMPILED_ATTR)
    if existing is not None:
        if existing.options == options:
            return model
        uncompile_decoder(model)
    family = family_of(model)
    impl = attn_implementation(model.config)
    if impl not in COMPILED_ATTENTION:
        raise UnsupportedModeError(f"compile_decoder supports attn_implementation {COMPILED_ATTENTION}, got {impl!r}")
    layers = list(family.decoder(model).layers)
    for index, layer in enumerate(layers):
        if "forward" in layer.__dict__:
            raise UnsupportedModeError(f"decoder layer {index} already has a forward of its own "
                                       f"({type(layer.__dict__['forward']).__name__}); compile_decoder needs "
                                       "the class's")
    decoder = CompiledDecoder(layers, options, impl)
    for index, layer in enumerate(layers):
        layer_idx = getattr(layer.self_attn, "layer_idx", index)
        layer.forward = CompiledLayerForward(layer, index, layer_idx, decoder, options)
    object.__setattr__(model, _COMPILED_ATTR, decoder)
    return model


def uncompile_decoder(model: nn.Module) -> nn.Module:
    """Give every decoder layer back its class's forward; nothing compile_decoder added remains."""
    decoder = model.__dict__.pop(_COMPILED_ATTR, None)
    if decoder is None:
        return model
    for layer in decoder.layers:
        layer.__dict__.pop("forward", None)
    return model


def is_compiled(model: nn.Module) -> bool:
    return _COMPILED_ATTR in model.__dict__


def warm_up(model: nn.Module, batches, max_new_tokens: int = 2) -> None:
    """Compile every kind of call a compiled model serves: greedy generate on each batch (the
    processor's inputs), under no_grad. Give one batch of a single prompt and one of several
    (compiled graphs specialise a batch of one); prompt lengths, other batch sizes, budgets and
    presets then reuse the same graphs."""
    if not is_compiled(model):
        raise RuntimeError("the model's decoder is not compiled: call compile_decoder(model) first")
    with torch.no_grad():
        for batch in batches:
            model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)


__all__ = ["compile_decoder", "uncompile_decoder", "is_compiled", "warm_up", "CompiledDecoder"]
