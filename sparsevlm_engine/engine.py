"""The hooks that run SparseVLM inside a Hugging Face VLM (one SparseEngine per sparsified model).

Nothing is patched on any class: hooks on the model's own modules do the work, and
unsparsify removes them. The engine itself holds only what is fixed per model (config,
pruner, hooks) and the last finished prefill's trace; a call's state lives in its CallState,
a prefill's decode state on its cache (see state.py).

- a pre-hook on the multimodal model (it receives input_ids) opens the call and decides its
  phase: prefill (prune), decode (extend a pruned cache) or dense; its forward hook closes the
  call, also when the call raises;
- a pre-hook on the language model keeps the 3-D position ids of mRoPE models, and refuses a
  direct call that would extend a pruned cache without its stage masks;
- one pre-hook on each layer that needs one (no forward hooks on layers): on layer 0 it picks
  the raters; on the layer after a pruning layer it prunes its input (the pruning layer's
  output: scoring, selection, recycling, compaction); on every layer of a pruned stage it swaps
  in the mask, RoPE rows and position ids of the compacted layout (prefill) or its stage's decode
  mask (decode, where a padded layout needs one) and, with renumbered positions, its stage's
  decode RoPE rows; on a pruning layer it keeps a reference to the layer input and RoPE rows the
  scoring reads (no device work).

No hook runs inside a layer's forward, so that a compiled forward (compiled.py) holds the
layer's own computation only.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn

from .accounting import DecoderDims
from .config import SparseVLMConfig
from .families import Family, UnsupportedModelError, rotary_functions
from .layout import Rope, ScoringInputs
from .decoding import stage_inputs, stage_shifts
from .distributed import head_shards
from .placement import execution_device, materialised, moved, stage_tensors, to_device
from .pruning import Pruner
from .schedule import default_pruning_layers
from .state import (DecodeStep, Phase, PrefillRequest, PrunedCache, begin_call, current_call, end_call,
                    pruned_record, set_pruned_record)
from .trace import DenseRecord, LastTrace, PrefillRecord, StageRecord, Trace, TraceShape

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2")
UNSUPPORTED_CACHES = ("StaticCache", "SlidingWindowCache", "HybridCache", "OffloadedStaticCache",
                      "QuantizedCache", "EncoderDecoderCache")


class UnsupportedModeError(RuntimeError):
    """A generation, cache or model mode the engine cannot run exactly."""


class PruningObserver:
    """Called around the pruning pass of every prefill (benchmarks time it or swap its scoring).
    Every method is a no-op here; subclass and override what you need, then `engine.observe(obs)`.
    Observers are per model: they see the prefills of every thread."""

    def wrap_ops(self, ops):
        """The backend ops a prefill will use (return them, or a wrapper of them)."""
        return ops

    def before_raters(self) -> None:
        """Before the raters are picked (the input of layer 0)."""

    def after_raters(self) -> None:
        """After the raters are picked."""

    def before_prune(self, layer: int, ops, all_queries) -> None:
        """Before pruning layer `layer` scores; all_queries() gives the post-RoPE queries
        [B, H, L, D] of every token of that layer."""

    def after_prune(self, layer: int) -> None:
        """After pruning layer `layer` has compacted its output."""


def attn_implementation(config) -> str:
    """The attention implementation the text decoder runs (eager when unset)."""
    text = getattr(config, "text_config", config)
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"


def _cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


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


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _batch_ids(mrope_ids: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """The prompt's 3-D position ids [3, B, L] (batch dimension expanded), or None."""
    return None if mrope_ids is None else mrope_ids.to(valid.device).expand(3, *valid.shape)


class SparseEngine:
    """The hooks of one sparsified model, its pruner and its last trace."""

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
        self.pruning_layers = config.pruning_layers or default_pruning_layers(self.depth, config.reference_layers)
        if self.pruning_layers[-1] >= self.depth - 1:
            raise ValueError(f"pruning layers {self.pruning_layers} must be below the last layer ({self.depth - 1})")
        self.impl = attn_implementation(model.config)
        if self.impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModeError(
                f"attn_implementation {self.impl!r} is not supported; use one of {SUPPORTED_ATTENTION}")
        for index in self.pruning_layers:
            if not isinstance(getattr(self.layers[index], "input_layernorm", None), nn.Module):
                raise UnsupportedModelError(f"decoder layer {index} has no input_layernorm, which the engine "
                                            "needs to recompute its attention input")
        attn = self.layers[self.pruning_layers[0]].self_attn
        inv_freq = getattr(getattr(self.decoder, "rotary_emb", None), "inv_freq", None)
        self.rotary = rotary_functions(attn)
        self.sections = family.mrope_sections(text_config)
        self.pruner = Pruner(config, self.pruning_layers, self.dims, float(attn.scaling), inv_freq, self.sections)
        if self.pruner.renumbers_ids and not isinstance(getattr(self.decoder, "rotary_emb", None), nn.Module):
            raise UnsupportedModelError("positions='renumber' needs the decoder's rotary_emb module to give "
                                        "generated tokens their per-stage positions; use positions='original'")
        self.layer_stage = tuple(sum(p < layer for p in self.pruning_layers) for layer in range(self.depth))
        self.pruner_layers = frozenset(self.pruning_layers)
        self.trace_shape = TraceShape(self.dims, self.depth, self.pruning_layers, config.mode == "rank")
        self.observers: tuple[PruningObserver, ...] = ()
        self.handles: list = []
        self.last = LastTrace(None, self.trace_shape)

    def __getstate__(self):
        """Pickled and deep-copied without observers or the last trace (per process, per model)."""
        state = dict(self.__dict__)
        state["observers"] = ()
        state["last"] = LastTrace(None, self.trace_shape)
        return state

    @property
    def trace(self) -> Trace | None:
        """The last finished prefill's trace, read back from the device on first access."""
        return self.last.get()

    @contextlib.contextmanager
    def observe(self, observer: PruningObserver):
        """Call observer around every pruning pass while inside."""
        self.observers = self.observers + (observer,)
        try:
            yield observer
        finally:
            self.observers = tuple(o for o in self.observers if o is not observer)

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    # ----------------------------------------------------------------- installation
    def install(self) -> None:
        self.handles.append(self.outer.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self.handles.append(self.outer.register_forward_hook(self._end_call, with_kwargs=True, always_call=True))
        self.handles.append(self.decoder.register_forward_pre_hook(self._on_decoder_call, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            # later layers of stage 0 run as given, unless they prune
            if index == 0 or self.layer_stage[index] > 0 or index in self.pruner_layers:
                self.handles.append(layer.register_forward_pre_hook(
                    functools.partial(self._before_layer, index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ----------------------------------------------------------------- the call
    def _begin_call(self, module, args, kwargs):
        state = begin_call(self)  # first, so that the teardown sees a call that raised here
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        tokens = input_ids if input_ids is not None else embeds
        q_len = tokens.shape[1]
        past = _cache_length(cache)
        state.starts_prompt = past == 0
        if cache is not None and type(cache).__name__ in UNSUPPORTED_CACHES:
            raise UnsupportedModeError(
                f"{type(cache).__name__} is not supported by a sparsified model: each layer keeps a different "
                "number of tokens, which needs a DynamicCache (the default)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedModeError("a sparsified model needs a 2-D attention mask (or none), "
                                       f"got shape {tuple(attention_mask.shape)}")
        if past == 0:
            if cache is not None:
                set_pruned_record(cache, None)
            visual = self.family.visual_mask(self.model, input_ids, embeds)
            state.request = PrefillRequest(mask=attention_mask, visual=visual)
            has_visual = bool(visual.any())
            if has_visual:
                self.family.check_positions(self.model, {**kwargs, "input_ids": input_ids})
            if q_len > 1 and self.config.prunes and has_visual:
                if module.training:
                    raise UnsupportedModeError(
                        "a sparsified model prunes in inference only (training-mode forwards would compute "
                        "logits and losses for the kept tokens only): call model.eval(), or unsparsify(model) "
                        "to train")
                state.phase = Phase.PREFILL
            return None
        pruned = pruned_record(cache)
        if pruned is not None:
            if q_len != 1 and past == pruned.length:
                raise UnsupportedModeError(
                    "a sparsified model cannot extend a pruned prompt with several tokens before it has decoded "
                    "one (a chunked prefill): pass the whole prompt in one call; a later chat turn may pass "
                    "several tokens once a token has been decoded")
            state.decode = DecodeStep(pruned, attention_mask, past, q_len)
            state.phase = Phase.DECODE
        return None

    def _end_call(self, module, args, kwargs, output):
        """Close the call: on success record its trace (and leave a pruned prefill's stages on its
        cache); when it raised (output is None), leave no trace and no half-built cache state."""
        state = current_call(self)
        if state is None:
            return None
        end_call(state)
        if not state.starts_prompt:
            return None
        if output is None:
            error = sys.exc_info()[1]
            reason = f"{type(error).__name__}: {error}" if error is not None else "it raised"
            self.last = LastTrace(None, self.trace_shape, error=reason)
            if state.cache is not None:
                set_pruned_record(state.cache, None)
            return None
        mrope_ids = state.request.mrope_ids
        if state.phase is Phase.PREFILL:
            prefill = state.prefill
            first = prefill.stages[0].layout
            stages = [StageRecord(s.first_layer, s.layout.src, s.layout.valid, s.layout.pos) for s in prefill.stages]
            record = PrefillRecord(valid=prefill.valid, visual=prefill.visual, raters=first.rater & first.valid,
                                   stages=stages, steps=prefill.steps, mrope_ids=_batch_ids(mrope_ids, first.valid))
            if state.cache is not None:
                set_pruned_record(state.cache, PrunedCache(
                    length=first.valid.shape[1], layer_stage=self.layer_stage,
                    stage_valid=tuple(None if s.first_layer == 0 else s.layout.valid for s in prefill.stages),
                    stage_padded=tuple(s.padded for s in prefill.stages),
                    stage_shift=stage_shifts(prefill) if self.pruner.renumbers_ids else None,
                    device=first.valid.device))
        else:
            visual = state.request.visual
            mask = state.request.mask
            valid = torch.ones_like(visual) if mask is None else mask.to(device=visual.device, dtype=torch.bool)
            record = DenseRecord(valid, visual & valid, _batch_ids(mrope_ids, valid))
        self.last = LastTrace(record, self.trace_shape)
        return None

    def _on_decoder_call(self, module, args, kwargs):
        state = current_call(self)
        if state is None:
            cache = kwargs.get("past_key_values")
            if pruned_record(cache) is not None and _cache_length(cache) > 0:
                raise UnsupportedModeError(
                    "this cache was filled by a pruned prefill; extend it through the multimodal model "
                    "(model(...) or model.generate), which knows each layer's kept tokens, not the decoder alone")
            return None
        if state.starts_prompt and state.request is not None and self.sections is not None:
            pid = kwargs.get("position_ids")
            state.request.mrope_ids = pid[-3:] if pid is not None and pid.dim() == 3 else None
        return None

    # ----------------------------------------------------------------- layers
    def _before_layer(self, index, module, args, kwargs):
        state = current_call(self)
        if state is None or state.phase is Phase.DENSE:
            return None
        if state.phase is Phase.DECODE:
            return self._decode_layer(state.decode, index, args, kwargs)
        prefill = state.prefill
        if index == 0:
            self._start_prefill(state, args, kwargs)
            prefill = state.prefill
        stage_index = self.layer_stage[index]
        if index and stage_index > self.layer_stage[index - 1]:
            args, kwargs = self._prune_input(state, index - 1, args, kwargs)
        stage = prefill.stages[stage_index]
        if stage.first_layer > 0:
            mask, cos, sin, position_ids = stage_tensors(stage, execution_device(module, _hidden(args, kwargs)))
            kwargs["attention_mask"] = mask
            kwargs["position_embeddings"] = (cos, sin)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = position_ids
        if index in self.pruner_layers:
            self._keep_attention_input(state, args, kwargs)
        return args, kwargs

    def _decode_layer(self, step, index, args, kwargs):
        """A decode step's inputs for a layer of a pruned stage (decoding.stage_inputs)."""
        stage_index = step.pruned.layer_stage[index]
        if stage_index == 0:
            return None
        hidden = _hidden(args, kwargs)
        changes = stage_inputs(step, stage_index, hidden, kwargs, self.impl, self.decoder)
        if not changes:
            return None
        layer = self.layers[index]
        if getattr(layer, "_hf_hook", None) is not None or hidden.device != step.pruned.device:
            changes = moved(changes, execution_device(layer, hidden))
        kwargs.update(changes)
        return args, kwargs

    def _start_prefill(self, state, args, kwargs) -> None:
        hidden = _hidden(args, kwargs)
        batch, length = hidden.shape[:2]
        request = state.request
        valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if request.mask is None \
            else request.mask.to(device=hidden.device, dtype=torch.bool)
        cos, sin = kwargs["position_embeddings"]
        pid = kwargs.get("position_ids")
        rope = Rope(_batched(cos, batch), _batched(sin, batch),
                    None if pid is None else pid.expand(batch, pid.shape[-1]))
        observers = self.observers

        def wrap(ops):
            for observer in observers:
                ops = observer.wrap_ops(ops)
            return ops
        self._notify("before_raters")
        shards = head_shards(self.model, self.layers[self.pruning_layers[0]].self_attn, self.dims.heads,
                             self.dims.head_dim)
        state.prefill = self.pruner.start(hidden, valid, request.visual.to(hidden.device), rope,
                                          request.mrope_ids, wrap, shards)
        self._notify("after_raters")
        state.cache = kwargs.get("past_key_values")

    def _keep_attention_input(self, state, args, kwargs) -> None:
        """What the pruning layer's attention will see: the layer input (its input_layernorm is
        applied to the rater rows only, in the scoring), and the RoPE rows and cache the layer
        runs with (as swapped in for its stage)."""
        hidden = _hidden(args, kwargs)
        cos, sin = (_batched(t, hidden.shape[0]) for t in kwargs["position_embeddings"])
        state.prefill.scoring = ScoringInputs(hidden=hidden, cos=cos, sin=sin)
        if kwargs.get("past_key_values") is not None:
            state.cache = kwargs["past_key_values"]

    def _prune_input(self, state, index, args, kwargs):
        """Prune the output of pruning layer `index` (the input of the next layer) and open the
        stage it starts; returns the next layer's args and kwargs with the compacted hidden states."""
        prefill = state.prefill
        hidden = _hidden(args, kwargs)
        scoring, prefill.scoring = prefill.scoring, None
        scoring.keys = _layer_keys(state.cache, index, hidden.shape[1])
        layer = self.layers[index]
        with materialised(layer):  # weights an offload hook keeps on meta between forwards
            if self.observers:
                queries = functools.partial(self.pruner.queries, scoring, layer, self.rotary)
                self._notify("before_prune", index, prefill.ops, queries)
            result = self.pruner.prune(prefill, self.layer_stage[index], index, hidden, scoring, layer,
                                       self.rotary, self.impl)
        self._notify("after_prune", index)
        result.hidden = to_device(result.hidden, execution_device(self.layers[index + 1], hidden))
        prefill.steps.append(result.record)
        prefill.counts = result.counts
        prefill.stages.append(result.stage)
        if args:
            return (result.hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = result.hidden
        return args, kwargs
