"""The public calls: sparsify, unsparsify, last_trace, is_sparsified, engine_of.

A sparsified model can be used from several threads at once, and with several caches in any
interleaving: each call's state is its own (state.py). It pickles (torch.save / torch.load,
copy.deepcopy) and loads back sparsified.
"""
from __future__ import annotations

import functools

from torch import nn

from .config import SparseVLMConfig
from .engine import UNSUPPORTED_CACHES, SparseEngine, UnsupportedModeError
from .families import family_of
from .trace import Trace

_ENGINE_ATTR = "_sparsevlm_engine"
_SAVED_GENERATE = "_sparsevlm_saved_generate"


def _guarded_generate(model, *args, **kwargs):
    """model.generate, refusing modes a pruned cache cannot serve."""
    config = kwargs.get("generation_config") or model.generation_config

    def setting(name, default=None):
        return kwargs.get(name, getattr(config, name, default))

    problems = []
    if (setting("num_beams", 1) or 1) > 1:
        problems.append("beam search (num_beams > 1)")
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens") is not None:
        problems.append("assisted decoding")
    if setting("cache_implementation") not in (None, "dynamic"):
        problems.append(f"cache_implementation={setting('cache_implementation')!r}")
    if setting("prefill_chunk_size") is not None:
        problems.append("chunked prefill")
    cache = kwargs.get("past_key_values")
    if cache is not None and type(cache).__name__ in UNSUPPORTED_CACHES:
        problems.append(type(cache).__name__)
    if problems:
        raise UnsupportedModeError(
            "a sparsified model does not support " + ", ".join(problems)
            + "; use greedy or sampling with the default dynamic cache, or unsparsify the model")
    if cache is None:  # generate may run the vision tower before any forward reaches the engine's hooks
        _check_visual_inputs(model, args, kwargs)
    saved = model.__dict__.get(_SAVED_GENERATE)
    return (saved or type(model).generate.__get__(model))(*args, **kwargs)


def _check_visual_inputs(model, args, kwargs) -> None:
    """Raise the family's clear ValueError for a prompt with visual tokens whose inputs are incomplete."""
    family = model.__dict__[_ENGINE_ATTR].family
    if not family.mrope:  # only mRoPE families need inputs beyond the visual tokens themselves
        return
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    if (input_ids is not None or embeds is not None) and bool(family.visual_mask(model, input_ids, embeds).any()):
        family.check_positions(model, {**kwargs, "input_ids": input_ids})


def _display_name(name: str) -> str:
    return f"SparseVLM[{name}]"


def sparsify(model: nn.Module, config: SparseVLMConfig | None = None) -> nn.Module:
    """Make a Hugging Face VLM prune visual tokens with SparseVLM, in place; returns the model.

    Calling it again with the same config changes nothing; with another config it replaces the
    first. Raises UnsupportedModelError for models outside the supported families.
    """
    config = config or SparseVLMConfig()
    if not isinstance(config, SparseVLMConfig):
        raise TypeError(f"config must be a SparseVLMConfig, got {type(config).__name__}")
    family = family_of(model)
    existing = model.__dict__.get(_ENGINE_ATTR)
    if existing is not None:
        if existing.config == config:
            return model
        unsparsify(model)
    engine = SparseEngine(model, config, family)
    engine.install()
    object.__setattr__(model, _ENGINE_ATTR, engine)
    saved = model.__dict__.get("generate")
    if saved is not None:
        object.__setattr__(model, _SAVED_GENERATE, saved)
    object.__setattr__(model, "generate", functools.partial(_guarded_generate, model))
    object.__setattr__(model, "_get_name", functools.partial(_display_name, type(model).__name__))
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute sparsify added; the model computes exactly as before."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None:
        return model
    engine.remove()
    saved = model.__dict__.pop(_SAVED_GENERATE, None)
    del model.__dict__["generate"]
    if saved is not None:
        object.__setattr__(model, "generate", saved)
    del model.__dict__["_get_name"]
    del model.__dict__[_ENGINE_ATTR]
    return model


def is_sparsified(model: nn.Module) -> bool:
    return _ENGINE_ATTR in model.__dict__


def engine_of(model: nn.Module) -> SparseEngine:
    """The SparseEngine of a sparsified model (its config, pruning layers, observers)."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None:
        raise RuntimeError("the model is not sparsified: call sparsify(model, config) first")
    return engine


def last_trace(model: nn.Module) -> Trace:
    """The trace of the model's last finished prefill, from any thread (see sparsevlm_engine.trace).
    Raises RuntimeError when no prefill has finished since sparsify, or when the last one raised."""
    engine = engine_of(model)
    trace = engine.trace
    if trace is None:
        if engine.last.error is not None:
            raise RuntimeError(f"the last prefill raised ({engine.last.error}), so there is no trace for it")
        raise RuntimeError("no prefill has run since sparsify")
    return trace


__all__ = ["sparsify", "unsparsify", "last_trace", "is_sparsified", "engine_of"]
