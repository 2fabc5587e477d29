"""Counting the device operations a piece of code issues: every Triton launch, and every torch op
that does work on a tensor (a TorchDispatchMode sees each aten op after autograd).

Not counted: allocations (torch.empty and friends: the caching allocator does no device work)
and metadata-only ops (views, dtype reinterpretation, shape queries), which launch nothing.
The Triton interpreter's own tensor handling inside a launch is not counted either: a launch
is one operation.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
METADATA_ONLY = {
    "view", "_unsafe_view", "reshape", "as_strided", "alias", "detach", "t", "transpose", "permute",
    "expand", "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "split_with_sizes", "chunk",
    "narrow", "diagonal", "view_as_real", "view_as_complex", "lift_fresh", "_reshape_alias", "unfold",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "dim", "size", "stride",
    "_local_scalar_dense_meta", "is_same_size", "_has_compatible_shallow_copy_type",
}


@dataclass
class DeviceOps:
    """What ran inside count_device_ops(): launches per kernel name, torch ops per aten name,
    and host reads (a device tensor's value brought to the host: .item(), .tolist(), .cpu())."""

    launches: Counter = field(default_factory=Counter)
    torch_ops: Counter = field(default_factory=Counter)
    host_reads: int = 0

    @property
    def total(self) -> int:
        return sum(self.launches.values()) + sum(self.torch_ops.values())

    def __str__(self) -> str:
        return (f"{self.total} device ops: launches {dict(self.launches)}, torch ops {dict(self.torch_ops)}, "
                f"host reads {self.host_reads}")


def _base_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class _TorchOpCounter(TorchDispatchMode):
    def __init__(self, record: DeviceOps):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _base_name(func)
        if name == "_local_scalar_dense" or (name == "_to_copy" and _to_host(args, kwargs)):
            self.record.host_reads += 1
        elif name not in ALLOCATIONS and name not in METADATA_ONLY:
            self.record.torch_ops[name] += 1
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    device = (kwargs or {}).get("device")
    return device is not None and torch.device(device).type == "cpu" and args and args[0].device.type != "cpu"


def _launch_classes():
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def count_device_ops():
    """Yields a DeviceOps filled in as the block runs."""
    record = DeviceOps()
    patched = []
    for cls in _launch_classes():
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            fn = getattr(self, "fn", None)
            record.launches[getattr(fn, "__name__", repr(self))] += 1
            with _disable_current_modes():
                return _original(self, *args, **kwargs)
        cls.run = run
        patched.append((cls, original))
    try:
        with _TorchOpCounter(record):
            yield record
    finally:
        for cls, original in patched:
            cls.run = original
