"""SparseVLM visual-token pruning inside Hugging Face vision-language decoders.

    import sparsevlm_engine as sve
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(budget=128))
    out = model.generate(**inputs, max_new_tokens=64)
    trace = sve.last_trace(model)
    sve.unsparsify(model)

    sve.compile_decoder(model)   # torch.compile of every decoder layer, plain or sparsified
"""
from .config import SparseVLMConfig
from .api import engine_of, is_sparsified, last_trace, sparsify, unsparsify
from .compiled import compile_decoder, is_compiled, uncompile_decoder, warm_up
from .engine import PruningObserver, SparseEngine, UnsupportedModeError
from .families import FAMILIES, UnsupportedModelError
from .trace import FlopsReport, PruningRecord, RecycledToken, SampleTrace, Trace

__version__ = "0.1.0"

__all__ = [
    "SparseVLMConfig", "sparsify", "unsparsify", "last_trace", "is_sparsified", "engine_of", "FAMILIES",
    "SparseEngine", "PruningObserver", "compile_decoder", "uncompile_decoder", "is_compiled", "warm_up",
    "UnsupportedModeError", "UnsupportedModelError", "Trace", "SampleTrace", "PruningRecord",
    "RecycledToken", "FlopsReport",
]
