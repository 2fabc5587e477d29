"""The two implementations of the pruning ops, with one interface: the Triton kernels (CUDA, or
CPU under TRITON_INTERPRET=1) and the plain-PyTorch reference (any device).

Both are tables of the same ops (OPS), each taking and returning exactly what its kernel launcher
does; see kernels/queries.py, relevance.py, select.py, recycle.py and compact.py for the shapes
and meanings, kernels/reference*.py for the reference of each.
"""
from __future__ import annotations

import importlib

import torch

from .kernels import reference as ref
from .kernels import reference_compact as ref_compact
from .kernels import reference_queries as ref_queries
from .kernels import reference_recycle as ref_recycle


# every op, by the kernels module its launcher is in
KERNEL_MODULES = {"select_raters": "raters", "gravity_table": "gravity", "rater_queries": "queries",
                  "rater_lse": "relevance", "head_relevance": "relevance", "rater_rows": "relevance",
                  "select_step": "select", "recycle": "recycle", "compact": "compact"}
OPS = tuple(KERNEL_MODULES)


class TorchOps:
    """The reference ops (kernels/reference*.py): a table, each entry taking its kernel's arguments."""

    name = "torch"
    select_raters = staticmethod(ref.select_raters)
    gravity_table = staticmethod(ref.gravity_table)
    rater_queries = staticmethod(ref_queries.rater_queries)
    rater_lse = staticmethod(ref.rater_lse)
    head_relevance = staticmethod(ref.head_relevance)
    rater_rows = staticmethod(ref.rater_rows)
    select_step = staticmethod(ref.select_step)
    recycle = staticmethod(ref_recycle.recycle)
    compact = staticmethod(ref_compact.compact)


class TritonOps:
    """The Triton kernels' launchers, by the same names (imported on first use: Triton is optional)."""

    name = "triton"

    def __init__(self):
        for op, module in KERNEL_MODULES.items():
            setattr(self, op, getattr(importlib.import_module(f"{__package__}.kernels.{module}"), op))


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def ops_for(backend: str, device: torch.device):
    """The ops a config's backend means for tensors on `device`."""
    from .kernels._launch import interpreting

    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not triton_available())):
        return TorchOps()
    if not triton_available():
        raise ImportError("backend='triton' needs the triton package (Linux x86-64: pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend='triton' needs the model on a CUDA GPU (tensors are on {device}); "
                         "use backend='torch' or 'auto', or set TRITON_INTERPRET=1 to interpret the kernels on CPU")
    return TritonOps()
