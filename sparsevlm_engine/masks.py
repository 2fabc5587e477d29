"""Attention masks for the compacted, left-padded layouts of later layers.

eager takes an additive float mask [B, 1, Q, K], sdpa a boolean one (True = attend), and
flash_attention_2 the 2-D key validity [B, K] (it un-pads and applies causality itself).
"""
from __future__ import annotations

import torch

FOUR_D = ("eager", "sdpa")


def _finish(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    if impl == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prefill_mask(valid: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """Causal mask over a compacted layout. valid: [B, L] bool.

    Slots are in position order, so causality is slot order. A padding row may see itself, so
    that no row is empty (an empty row gives NaN, and NaN values leak through zero weights).
    """
    if impl not in FOUR_D:
        return valid
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = (valid[:, None, None, :] & causal) | eye
    return _finish(allowed, impl, dtype)


def decode_mask(valid: torch.Tensor, generated: torch.Tensor, query_length: int, impl: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Mask of a decode step for a layer whose prefill layout had validity valid: [B, Ls].

    generated: [B, T] validity of the tokens appended since the prefill, the query_length new
    ones included (the tail of the 2-D attention mask generate keeps).
    """
    keys = torch.cat([valid, generated.to(device=valid.device, dtype=torch.bool)], dim=1)
    if impl not in FOUR_D:
        return keys
    if query_length == 1:  # the one query is the last slot: causality allows every key
        return _finish(keys[:, None, None, :], impl, dtype)
    total = keys.shape[1]
    q_pos = torch.arange(total - query_length, total, device=keys.device)
    causal = torch.arange(total, device=keys.device)[None, :] <= q_pos[:, None]
    allowed = keys[:, None, None, :] & causal
    return _finish(allowed, impl, dtype)
