"""Shared by the kernel tests: the device kernels run on, tolerances per dtype, poisoned outputs."""
import torch

from sparsevlm_engine.kernels._launch import interpreting

DEVICE = torch.device("cpu") if interpreting() or not torch.cuda.is_available() else torch.device("cuda")

# (atol, rtol) of a kernel that accumulates in fp32 against the fp32 reference, by input dtype.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 1e-3),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh output with NaN (floats) or a sentinel (ints) so unwritten slots show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-7777)
