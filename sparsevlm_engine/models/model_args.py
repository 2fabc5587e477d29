"""SparseVLM's --model_args: told apart from the wrapped lmms-eval model's own, and turned into a
SparseVLMConfig. Every bad argument raises a one-line ValueError that names it."""
from __future__ import annotations

import inspect

from ..config import BACKENDS, POSITIONS, PRESETS, SparseVLMConfig

SPARSE_ARGS = ("preset", "budget", "keep_fraction", "positions", "backend")
DEFAULT_PRESET = "v1.5"


def wrapped_args(base_cls: type) -> tuple[str, ...]:
    """The keyword arguments the wrapped lmms-eval class names in its __init__."""
    params = inspect.signature(base_cls.__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.name != "self" and p.kind in kinds)


def split_model_args(model_name: str, base_cls: type, kwargs: dict) -> tuple[SparseVLMConfig, dict]:
    """(config, the wrapped class's own arguments) from the parsed --model_args (plus the batch
    size and device lmms-eval adds)."""
    own = wrapped_args(base_cls)
    unknown = [k for k in kwargs if k not in SPARSE_ARGS and k not in own]
    if unknown:
        raise ValueError(f"{model_name}: unknown model_arg {unknown[0]!r}; SparseVLM takes {', '.join(SPARSE_ARGS)}, "
                         f"{base_cls.__name__} takes {', '.join(own)}")
    sparse = {k: kwargs[k] for k in SPARSE_ARGS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in SPARSE_ARGS}
    return sparse_config(model_name, **sparse), rest


def sparse_config(model_name: str, preset=DEFAULT_PRESET, **fields) -> SparseVLMConfig:
    """SparseVLMConfig.preset(preset, ...) from model_args values (ints and floats as lmms-eval
    parsed them); ValueError "<model>: model_arg <name>=<value>: <why>" otherwise."""
    if preset not in PRESETS:
        raise ValueError(f"{model_name}: model_arg preset={preset!r}: choose from {', '.join(PRESETS)}")
    for name, choices in (("positions", POSITIONS), ("backend", BACKENDS)):
        if name in fields and fields[name] not in choices:
            raise ValueError(f"{model_name}: model_arg {name}={fields[name]!r}: choose from {', '.join(choices)}")
    given = {"budget": fields.pop("budget", 128), **fields}
    try:
        return SparseVLMConfig.preset(preset, given["budget"], **fields)
    except ValueError as e:
        mentioned = sorted((str(e).find(k), k) for k in given if k in str(e))
        named = mentioned[0][1] if mentioned else "budget"
        raise ValueError(f"{model_name}: model_arg {named}={given[named]!r} (preset {preset}): {e}") from None
