"""Where the engine's state lives, by lifetime.

- per call: CallState, set up by the multimodal model's pre-hook and torn down by its
  forward hook (also when the call raises), held in a context variable, so no other call,
  thread or direct decoder call ever sees it;
- per cache: PrunedCache, what a pruned prefill leaves on the cache it filled, read by that
  cache's decode steps and gone with the cache.
"""
from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass, field

import torch

from .layout import Prefill

_PRUNED_ATTR = "_sparsevlm_pruned"
_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("sparsevlm_call", default=None)


class Phase(enum.Enum):
    """What the layers of one call do."""

    DENSE = "dense"      # run as the unsparsified model would
    PREFILL = "prefill"  # prune the prompt
    DECODE = "decode"    # extend a pruned cache (a decode step or a later chat turn), each stage with its own mask


@dataclass(frozen=True)
class PrunedCache:
    """What a pruned prefill leaves on the cache it filled.

    length: prompt slots of the prefill (the cache length of layer 0 after it); stage_valid: per
    stage, the validity [B, Ls] of the layout its layers cached (None for stage 0, the prompt
    as given); stage_padded: per stage, whether some row of that layout is padded; layer_stage:
    the stage of every decoder layer; stage_shift: [S - 1, B, 1] what a generated token's position
    id drops by at the layers of each stage after the first (renumbered positions), or None;
    device: where these tensors live (the prefill's device; a layer elsewhere gets copies).
    """

    length: int
    stage_valid: tuple[torch.Tensor | None, ...]
    stage_padded: tuple[bool, ...]
    layer_stage: tuple[int, ...]
    stage_shift: torch.Tensor | None
    device: torch.device | None = None


def pruned_record(cache) -> PrunedCache | None:
    return getattr(cache, _PRUNED_ATTR, None) if cache is not None else None


def set_pruned_record(cache, record: PrunedCache | None) -> None:
    if record is None:
        if _PRUNED_ATTR in getattr(cache, "__dict__", {}):
            delattr(cache, _PRUNED_ATTR)
    else:
        setattr(cache, _PRUNED_ATTR, record)


@dataclass
class PrefillRequest:
    """A call that starts a prompt: its 2-D mask [B, L] (or None), visual-token mask [B, L] and,
    on mRoPE models, the 3-D position ids [3, B, L] the multimodal model computed."""

    mask: torch.Tensor | None
    visual: torch.Tensor
    mrope_ids: torch.Tensor | None = None


@dataclass
class DecodeStep:
    """One call that extends a pruned cache (Q = 1 at a decode step, Q >= 1 in a later chat turn):
    its 2-D attention mask [B, past + Q] (or None), the query length, the decode mask of each stage and, with renumbered positions, the (position_ids
    [B, Q], cos, sin [B, Q, Dr]) of each stage after the first, built once per call where needed."""

    pruned: PrunedCache
    attention_mask: torch.Tensor | None
    past: int
    query_length: int
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    rope: list | None = None
    _generated: torch.Tensor | None = None

    def generated(self, like: torch.Tensor) -> torch.Tensor:
        """Validity [B, T] of the tokens added since the prefill, the new ones included."""
        if self._generated is None:
            if self.attention_mask is None:
                tail = self.past + self.query_length - self.pruned.length
                self._generated = torch.ones(like.shape[0], tail, dtype=torch.bool, device=like.device)
            else:
                self._generated = self.attention_mask[:, self.pruned.length:].to(torch.bool)
        return self._generated


@dataclass
class CallState:
    """One call of a sparsified multimodal model. starts_prompt: its cache was empty (a prefill,
    pruned or dense, whose trace it leaves); cache: the cache its prefill fills (as the layers
    see it); token: restores the previous context on teardown."""

    engine: object
    phase: Phase = Phase.DENSE
    starts_prompt: bool = False
    request: PrefillRequest | None = None
    prefill: Prefill | None = None
    decode: DecodeStep | None = None
    cache: object = None
    token: contextvars.Token | None = None


def begin_call(engine) -> CallState:
    state = CallState(engine=engine)
    state.token = _CALL.set(state)
    return state


def current_call(engine) -> CallState | None:
    """The call of this engine now running in this thread / context, or None."""
    state = _CALL.get()
    return state if state is not None and state.engine is engine else None


def end_call(state: CallState) -> None:
    _CALL.reset(state.token)
    state.token = None
