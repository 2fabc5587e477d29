"""What every kernel launcher shares: input checks, block sizes and the interpreter switch."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, which Triton can run on: CUDA, or CPU under the interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: tensors are on different devices: "
                         + ", ".join(f"{k}={v}" for k, v in devices.items()))
    if first.type != "cuda" and not (first.type == "cpu" and interpreting()):
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {first}")
    return first


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be fp32, fp16 or bf16, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """shape: expected sizes, None for any."""
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {want}")


def upcast_bf16() -> bool:
    """The interpreter computes bf16 arithmetic wrongly: kernels upcast bf16 after loading there."""
    return interpreting()
