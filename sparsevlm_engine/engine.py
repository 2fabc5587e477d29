"""Hooks that run SparseVLM inside a Hugging Face VLM, and the public sparsify / unsparsify.

Nothing is patched on any class: forward hooks on the model's own modules do the work and
are removed by unsparsify, which leaves the model exactly as it was.

- a pre-hook on the multimodal model reads input_ids (visual positions), the 2-D attention
  mask and the cache, and decides the phase: prefill (prune), decode, or dense;
- for mRoPE models (Qwen2-VL), a pre-hook on the language model keeps the 3-D position ids
  the multimodal model computed (RoPE gravity measures distances along each axis);
- a pre-hook on layer 0 picks the raters;
- a pre-hook on every later layer swaps in the mask, RoPE rows and position ids of the
  compacted layout it runs on (prefill) or its own decode mask (decode);
- a pre-hook on the attention of each pruning layer keeps its input, and a hook on the
  layer's output scores, selects, recycles and compacts.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .accounting import DecoderDims, prefill_flops, rater_selection_flops
from .config import SparseVLMConfig
from .families import Family, UnsupportedModelError, family_of, rope_rows, rotary_functions
from .masks import decode_mask, prefill_mask
from .pruning import HostCounts, Layout, Pruner, Rope, ScoringInputs, StepRecord
from .schedule import default_pruning_layers
from .trace import SampleTrace, Trace

_ENGINE_ATTR = "_sparsevlm_engine"
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2")
UNSUPPORTED_CACHES = ("StaticCache", "SlidingWindowCache", "HybridCache", "OffloadedStaticCache",
                      "QuantizedCache", "EncoderDecoderCache")


class UnsupportedModeError(RuntimeError):
    """A generation or cache mode the engine cannot run exactly."""


@dataclass
class Stage:
    """A run of layers sharing one layout: masks and RoPE rows for their prefill, validity for decode."""

    first_layer: int
    layout: Layout
    mask: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


class _Prefill:
    """Everything one sparse prefill builds and later decode steps read."""

    def __init__(self, visual: torch.Tensor, valid: torch.Tensor, length: int):
        self.visual = visual
        self.valid = valid
        self.length = length
        self.stages: list[Stage] = []
        self.steps: list[StepRecord] = []
        self.counts: HostCounts | None = None
        self.rope: Rope | None = None
        self.scoring: ScoringInputs | None = None
        self.scoring_cache = None
        self.cache_ref = None


def _attn_implementation(config) -> str:
    text = getattr(config, "text_config", config)
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
    return impl


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def _batched(rope: torch.Tensor, batch: int) -> torch.Tensor:
    """cos / sin [B or 1, L, D] or [P, B or 1, L, D] with the batch dimension expanded to batch."""
    return rope.expand(*rope.shape[:-3], batch, *rope.shape[-2:])


def _layer_keys(cache, layer: int, length: int):
    """Post-RoPE keys [B, H_kv, L, D] a cache holds for a layer, when it holds exactly this prefill."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers):
        keys = getattr(layers[layer], "keys", None)
    else:
        key_cache = getattr(cache, "key_cache", None)
        keys = key_cache[layer] if key_cache is not None and layer < len(key_cache) else None
    if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[-2] == length:
        return keys
    return None


class SparseEngine:
    """The hooks and state of one sparsified model."""

    def __init__(self, model: nn.Module, config: SparseVLMConfig, family: Family):
        self.model = model
        self.config = config
        self.family = family
        self.outer = family.multimodal_model(model)
        self.decoder = family.decoder(model)
        self.layers = list(self.decoder.layers)
        text_config = getattr(model.config, "text_config", model.config)
        self.dims = DecoderDims.from_text_config(text_config)
        self.depth = len(self.layers)
        self.pruning_layers = config.pruning_layers or default_pruning_layers(self.depth)
        if self.pruning_layers[-1] >= self.depth - 1:
            raise ValueError(f"pruning layers {self.pruning_layers} must be below the last layer ({self.depth - 1})")
        self.impl = _attn_implementation(model.config)
        if self.impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModeError(
                f"attn_implementation {self.impl!r} is not supported; use one of {SUPPORTED_ATTENTION}")
        attn = self.layers[self.pruning_layers[0]].self_attn
        inv_freq = getattr(getattr(self.decoder, "rotary_emb", None), "inv_freq", None)
        self.rotary = rotary_functions(attn)
        self.sections = family.mrope_sections(text_config)
        self.pruner = Pruner(config, self.pruning_layers, self.dims, float(attn.scaling), inv_freq, self.sections)
        self.layer_stage = [sum(p < layer for p in self.pruning_layers) for layer in range(self.depth)]
        self.handles: list = []
        self.phase = "idle"
        self.pending: dict = {}
        self.prefill: _Prefill | None = None
        self._trace: Trace | None = None
        self._trace_source = None

    @property
    def trace(self) -> Trace | None:
        """The last prefill's trace, read back from the device on first access."""
        if self._trace is None and self._trace_source is not None:
            self._trace = self._trace_source()
            self._trace_source = None
        return self._trace

    def _set_trace(self, build) -> None:
        self._trace, self._trace_source = None, build

    # ----------------------------------------------------------------- installation
    def install(self) -> None:
        self.handles.append(self.outer.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        if self.sections is not None:
            self.handles.append(self.decoder.register_forward_pre_hook(self._keep_mrope_ids, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(
                functools.partial(self._before_layer, index), with_kwargs=True))
        for index in self.pruning_layers:
            layer = self.layers[index]
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._keep_attention_input, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                functools.partial(self._after_pruning_layer, index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.prefill = None

    # ----------------------------------------------------------------- phase
    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        if cache is not None and type(cache).__name__ in UNSUPPORTED_CACHES:
            raise UnsupportedModeError(
                f"{type(cache).__name__} is not supported by a sparsified model: each layer keeps a different "
                "number of tokens, which needs a DynamicCache (the default)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedModeError("a sparsified model needs a 2-D attention mask (or none), "
                                       f"got shape {tuple(attention_mask.shape)}")
        tokens = input_ids if input_ids is not None else embeds
        batch, q_len = tokens.shape[0], tokens.shape[1]
        past = _cache_length(cache)
        if past == 0:
            self.pending = {"mask": attention_mask, "length": q_len}
            visual = self.family.visual_mask(self.model, input_ids, embeds)
            self.pending["visual"] = visual
            has_visual = bool(visual.any())
            if has_visual:
                self.family.check_positions(self.model, {**kwargs, "input_ids": input_ids})
            self.phase = "prefill" if (q_len > 1 and self.config.prunes and has_visual) else "dense"
            self.prefill = None
            if self.phase == "dense":
                valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
                self._set_trace(functools.partial(self.dense_trace, valid, visual & valid))
            return None
        if self.prefill is not None and self.prefill.cache_ref is not None and self.prefill.cache_ref() is cache:
            if q_len != 1:
                raise UnsupportedModeError(
                    "a sparsified model cannot extend a pruned cache with several tokens at once "
                    "(chunked prefill, assisted decoding, cache continuation)")
            if attention_mask is None:
                generated = torch.ones(batch, past + q_len - self.prefill.length, dtype=torch.bool,
                                       device=tokens.device)
            else:
                generated = attention_mask[:, self.prefill.length:].to(torch.bool)
            self.pending = {"generated": generated, "q_len": q_len, "masks": {}}
            self.phase = "decode"
        else:
            self.phase = "dense"
        return None

    def _keep_mrope_ids(self, module, args, kwargs):
        """The 3-D position ids [3, B, L] the multimodal model computed (RoPE gravity needs them)."""
        if self.phase == "prefill":
            pid = kwargs.get("position_ids")
            self.pending["mrope_ids"] = pid[-3:] if pid is not None and pid.dim() == 3 else None
        return None

    # ----------------------------------------------------------------- layers
    def _before_layer(self, index, module, args, kwargs):
        if self.phase == "prefill":
            if index == 0:
                self._start_prefill(args, kwargs)
                return None
            stage = self.prefill.stages[self.layer_stage[index]]
            if stage.first_layer == 0:
                return None
            kwargs["attention_mask"] = stage.mask
            kwargs["position_embeddings"] = (stage.cos, stage.sin)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = stage.position_ids
            return args, kwargs
        if self.phase == "decode":
            stage_index = self.layer_stage[index]
            stage = self.prefill.stages[stage_index]
            if stage.first_layer == 0:
                return None
            masks = self.pending["masks"]  # one per stage and step, shared by the stage's layers
            if stage_index not in masks:
                hidden = args[0] if args else kwargs["hidden_states"]
                masks[stage_index] = decode_mask(stage.layout.valid, self.pending["generated"],
                                                 self.pending["q_len"], self.impl, hidden.dtype)
            kwargs["attention_mask"] = masks[stage_index]
            return args, kwargs
        return None

    def _start_prefill(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        mask2d = self.pending.get("mask")
        valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if mask2d is None \
            else mask2d.to(device=hidden.device, dtype=torch.bool)
        visual = self.pending["visual"].to(hidden.device)
        state = _Prefill(visual & valid, valid, length)
        layout, state.counts = self.pruner.start(hidden, valid, visual, self.pending.get("mrope_ids"))
        cos, sin = kwargs["position_embeddings"]
        pid = kwargs.get("position_ids")
        state.rope = Rope(_batched(cos, batch), _batched(sin, batch),
                          None if pid is None else pid.expand(batch, pid.shape[-1]))
        cache = kwargs.get("past_key_values")
        state.cache_ref = weakref.ref(cache) if cache is not None else None
        state.stages.append(Stage(first_layer=0, layout=layout))
        self.prefill = state

    def _keep_attention_input(self, module, args, kwargs):
        if self.phase != "prefill":
            return None
        x = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = (_batched(rope_rows(t, self.sections), x.shape[0]) for t in kwargs["position_embeddings"])
        self.prefill.scoring = ScoringInputs(x=x, cos=cos, sin=sin, keys=None)
        self.prefill.scoring_cache = kwargs.get("past_key_values")
        return None

    def _after_pruning_layer(self, index, module, args, kwargs, output):
        if self.phase != "prefill":
            return None
        state = self.prefill
        hidden = output[0] if isinstance(output, tuple) else output
        stage_index = self.layer_stage[index]
        scoring = state.scoring
        scoring.keys = _layer_keys(state.scoring_cache, index, hidden.shape[1])
        result = self.pruner.prune(stage_index, index, hidden, state.stages[stage_index].layout, scoring,
                                   state.counts, state.rope, module.self_attn, self.rotary)
        state.scoring = None
        state.steps.append(result.record)
        state.counts = result.counts
        state.stages.append(Stage(first_layer=index + 1, layout=result.layout,
                                  mask=prefill_mask(result.layout.valid, self.impl, hidden.dtype),
                                  cos=result.rope.cos, sin=result.rope.sin, position_ids=result.rope.position_ids))
        if index == self.pruning_layers[-1]:
            self._set_trace(functools.partial(self._build_trace, state))
        if isinstance(output, tuple):
            return (result.hidden,) + tuple(output[1:])
        return result.hidden

    # ----------------------------------------------------------------- trace
    def _build_trace(self, state: _Prefill) -> Trace:
        first, final = state.stages[0].layout, state.stages[-1].layout
        per_step = [step.records() for step in state.steps]
        step_flops = [step.flops(self.dims, self.config.mode == "rank") for step in state.steps]
        valid, visual = state.valid.tolist(), state.visual.tolist()
        positions, raters = first.pos.tolist(), (first.rater & first.valid).tolist()
        final_pos, final_valid = final.pos.tolist(), final.valid.tolist()
        samples = []
        for b in range(len(valid)):
            length = sum(valid[b])
            visual_positions = tuple(p for p, v in zip(positions[b], visual[b]) if v)
            records = [step[b] for step in per_step]
            after = {r.layer: r.visual_after for r in records}
            entering, current = [], len(visual_positions)
            for layer in range(self.depth):
                entering.append(current)
                current = after.get(layer, current)
            pruning = rater_selection_flops(len(visual_positions), length - len(visual_positions), self.dims.hidden)
            pruning += sum(flops[b] for flops in step_flops)
            samples.append(SampleTrace(
                length=length, visual_positions=visual_positions,
                rater_positions=tuple(p for p, r in zip(positions[b], raters[b]) if r),
                pruning=tuple(records), visual_entering=tuple(entering),
                final_positions=tuple(p for p, ok in zip(final_pos[b], final_valid[b]) if ok),
                flops=prefill_flops(length, entering, self.dims, pruning)))
        return Trace(samples=samples, pruning_layers=self.pruning_layers, depth=self.depth)

    def dense_trace(self, valid: torch.Tensor, visual: torch.Tensor) -> Trace:
        """Trace of a prefill that pruned nothing."""
        samples = []
        for b in range(valid.shape[0]):
            length = int(valid[b].sum())
            pos = (valid[b].long().cumsum(0) - 1).tolist()
            visual_positions = tuple(p for p, v, ok in zip(pos, visual[b].tolist(), valid[b].tolist()) if v and ok)
            samples.append(SampleTrace(
                length=length, visual_positions=visual_positions, rater_positions=(), pruning=(),
                visual_entering=(len(visual_positions),) * self.depth, final_positions=tuple(range(length)),
                flops=prefill_flops(length, (len(visual_positions),) * self.depth, self.dims, 0.0)))
        return Trace(samples=samples, pruning_layers=self.pruning_layers, depth=self.depth)


def _guarded_generate(model, original, *args, **kwargs):
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
    return original(*args, **kwargs)


def sparsify(model: nn.Module, config: SparseVLMConfig | None = None) -> nn.Module:
    """Make a Hugging Face VLM prune visual tokens with SparseVLM, in place; returns the model.

    Calling it again with the same config changes nothing; with another config it replaces the
    first. Raises UnsupportedModelError for models outside the supported families.
    """
    config = config or SparseVLMConfig()
    if not isinstance(config, SparseVLMConfig):
        raise TypeError(f"config must be a SparseVLMConfig, got {type(config).__name__}")
    family = family_of(model)
    existing = getattr(model, _ENGINE_ATTR, None)
    if existing is not None:
        if existing.config == config:
            return model
        unsparsify(model)
    engine = SparseEngine(model, config, family)
    engine.install()
    object.__setattr__(model, _ENGINE_ATTR, engine)
    saved = model.__dict__.get("generate")
    object.__setattr__(model, "_sparsevlm_saved_generate", saved)
    original = saved or model.generate
    object.__setattr__(model, "generate", functools.partial(_guarded_generate, model, original))
    name = type(model).__name__
    object.__setattr__(model, "_get_name", lambda: f"SparseVLM[{name}]")
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute sparsify added; the model computes exactly as before."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None:
        return model
    engine.remove()
    saved = model.__dict__.pop("_sparsevlm_saved_generate", None)
    del model.__dict__["generate"]
    if saved is not None:
        object.__setattr__(model, "generate", saved)
    del model.__dict__["_get_name"]
    del model.__dict__[_ENGINE_ATTR]
    return model


def is_sparsified(model: nn.Module) -> bool:
    return _ENGINE_ATTR in model.__dict__


def last_trace(model: nn.Module) -> Trace:
    """The trace of the model's last prefill (see sparsevlm_engine.trace)."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None:
        raise RuntimeError("the model is not sparsified: call sparsify(model, config) first")
    if engine.trace is None:
        raise RuntimeError("no prefill has run since sparsify")
    return engine.trace


__all__ = ["sparsify", "unsparsify", "last_trace", "is_sparsified", "UnsupportedModeError", "UnsupportedModelError"]
