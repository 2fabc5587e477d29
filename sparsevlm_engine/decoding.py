"""What the layers of a pruned stage need at a decode step: the stage's decode mask and, with
renumbered positions, its own position ids and RoPE rows (a generated token's position at a
layer is the length of that layer's cache, SPARSEVLM.md section 5)."""
from __future__ import annotations

import torch

from .layout import Prefill
from .masks import decode_mask
from .placement import to_device
from .state import DecodeStep


def stage_shifts(prefill: Prefill) -> torch.Tensor:
    """[S - 1, B, 1]: how many tokens each row has pruned by each stage after the first, by which
    a generated token's position id drops at that stage's layers (renumbered 1-D positions)."""
    counts = torch.stack([s.layout.valid.sum(1, keepdim=True) for s in prefill.stages[1:]])
    return prefill.stages[0].layout.valid.sum(1, keepdim=True) - counts


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, copied if it does not start its storage (a compiled layer guards on the offset)."""
    return t if t.storage_offset() == 0 else t.clone()


def stage_inputs(step: DecodeStep, stage_index: int, hidden: torch.Tensor, kwargs: dict, impl: str,
                 decoder) -> dict:
    """The layer kwargs to replace for a layer of pruned stage stage_index >= 1: its decode mask
    where the model passes one or the stage's layout is padded (none without padding anywhere),
    and, with renumbered positions, position_ids [B, Q] and position_embeddings (cos, sin
    [B, Q, Dr]). Each is built once per step and shared by the stage's layers; the RoPE rows of
    every stage come from one call of the decoder's rotary_emb."""
    changes = {}
    pruned = step.pruned
    if kwargs.get("attention_mask") is not None or pruned.stage_padded[stage_index]:
        if stage_index not in step.masks:
            valid = pruned.stage_valid[stage_index]
            step.masks[stage_index] = decode_mask(valid, step.generated(valid), step.query_length, impl, hidden.dtype)
        changes["attention_mask"] = step.masks[stage_index]
    if pruned.stage_shift is not None:
        if step.rope is None:
            position_ids = kwargs["position_ids"] - pruned.stage_shift  # [S - 1, B, Q]
            # hidden may sit on another device than the ids (layers spread over devices, placement.py)
            cos, sin = decoder.rotary_emb(hidden, to_device(position_ids.flatten(0, 1), hidden.device))
            shape = position_ids.shape[:2]
            step.rope = [tuple(_own_storage(t) for t in rows)
                         for rows in zip(position_ids, cos.unflatten(0, shape), sin.unflatten(0, shape))]
        position_ids, cos, sin = step.rope[stage_index - 1]
        changes["position_ids"], changes["position_embeddings"] = position_ids, (cos, sin)
    return changes
