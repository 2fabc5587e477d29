"""SparseVLM ops: the plain-PyTorch reference (`reference`) and, on CUDA, Triton kernels."""
from . import reference

__all__ = ["reference"]
