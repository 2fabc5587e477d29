"""Shared by the kernel tests: the device kernels run on, tolerances per dtype, poisoned outputs."""
import torch

from sparsevlm_engine.kernels._launch import interpreting

DEVICE = torch.device("cpu") if interpreting() or not torch.cuda.is_available() else torch.device("cuda")

# (atol, rtol) of a kernel output against the reference, by the OUTPUT dtype. Kernels and
# reference both compute in fp32 from the same inputs (fp16/bf16 products are exact in fp32),
# so fp32 outputs differ only by summation order; fp16/bf16 outputs by about one unit in the
# last place of the final cast.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh output with NaN (floats), a negative sentinel (ints) or True (bools) so
    unwritten slots show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-7777 if t.element_size() > 1 else -77)
