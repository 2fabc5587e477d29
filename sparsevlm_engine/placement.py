"""Models whose layers sit on several devices (`device_map`, accelerate's dispatch and offload hooks).

A prefill's bookkeeping (layouts, RoPE rows, plans, the masks of its stages) lives on one device,
that of the hidden states layer 0 receives; a pruning layer's scoring brings its layer output and
keys there and computes the rater queries where the layer's weights are. Every tensor the engine
hands a layer is on that layer's device: its accelerate hook's execution device, else the device
of the hidden states it receives. In one process on one device every check here is a host-side
comparison and nothing is copied.

accelerate's offload hooks (device_map entries "cpu" / "disk" next to an accelerator, or
`cpu_offload`) keep a layer's weights on the meta device outside its forward; the scoring reads
a pruning layer's input_layernorm and q_proj (k_proj without a cache) after that forward, so it
loads them for its duration (accelerate.utils.align_module_device) and offloads them again.
"""
from __future__ import annotations

import contextlib

import torch


def execution_device(module, hidden: torch.Tensor) -> torch.device:
    """Where module computes: its accelerate hook's execution device, else hidden's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return hidden.device


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """t on device (itself when it is there already, or None)."""
    return t if t is None or t.device == device else t.to(device)


def scoring_modules(layer) -> list:
    """The modules of a decoder layer whose weights the scoring reads."""
    attn = layer.self_attn
    names = ("q_proj", "k_proj", "q_norm", "k_norm")
    parts = [getattr(attn, n, None) for n in names]
    return [layer, layer.input_layernorm, attn] + [m for m in parts if m is not None]


def materialised(layer):
    """A context in which the weights the scoring reads of layer are loaded, where accelerate
    offloads them (a no-op context otherwise)."""
    hooked = [m for m in scoring_modules(layer) if getattr(m, "_hf_hook", None) is not None]
    if not hooked:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    stack = contextlib.ExitStack()
    for module in hooked:  # outermost first, as the forward loads them
        stack.enter_context(align_module_device(module))
    return stack


def stage_tensors(stage, device: torch.device) -> tuple:
    """(mask, cos, sin, position_ids) of a pruned stage on device, copied once per device and kept
    on the stage."""
    own = (stage.mask, stage.cos, stage.sin, stage.position_ids)
    if stage.cos.device == device:
        return own
    if device not in stage.copies:
        stage.copies[device] = tuple(to_device(t, device) for t in own)
    return stage.copies[device]


def moved(changes: dict, device: torch.device) -> dict:
    """A decode step's layer kwargs (tensors, or tuples of them) on device."""
    return {k: tuple(to_device(t, device) for t in v) if isinstance(v, tuple) else to_device(v, device)
            for k, v in changes.items()}
