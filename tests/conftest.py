"""Test set-up. Without a CUDA GPU, Triton kernels run through the interpreter on CPU (set here,
before any kernel is defined); with one, they are compiled and the kernel tests run on CUDA.
Tests marked `cuda` need a GPU and are skipped cleanly without one."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "tf5_only: needs transformers 5")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like made during the test comes pre-filled with NaN (floats),
    a negative sentinel (ints) or True (bools), so a kernel output slot that is never written fails."""
    from kernel_checks import poison

    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
