"""lmms-eval plugin: SparseVLM-pruned versions of lmms-eval's own Hugging Face model wrappers.

With `LMMS_EVAL_PLUGINS=sparsevlm_engine`, lmms-eval 0.7.3 imports this package, reads
AVAILABLE_MODELS (model name -> class name) and loads `sparsevlm_engine.models.<name>.<class>`
when `--model <name>` is asked for; installed, the package also declares the models through
lmms-eval's entry-point group `lmms_eval.models` (model_manifests). The core package never
imports this one.

    sparsevlm_llava_hf   lmms-eval's `llava_hf`, sparsified after loading, batched
    sparsevlm_qwen2_vl   lmms-eval's `qwen2_vl`, sparsified after loading
"""
INSTALL_HINT = "pip install 'sparsevlm-engine[eval]'"

try:
    import lmms_eval  # noqa: F401  (an empty package: cheap to import)
except ImportError:
    raise ImportError(f"the sparsevlm_engine lmms-eval plugin needs lmms-eval: {INSTALL_HINT}") from None

AVAILABLE_MODELS = {
    "sparsevlm_llava_hf": "SparseVLMLlavaHf",
    "sparsevlm_qwen2_vl": "SparseVLMQwen2VL",
}


def model_manifests():
    """The models as lmms-eval ModelManifests (the `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"{__name__}.{name}.{cls}")
            for name, cls in AVAILABLE_MODELS.items()]
