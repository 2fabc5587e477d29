"""Compiled decoder layers (compiled.py): exact against eager, dense and sparse; no recompilation
once warm; uncompile and unsparsify leave what they should; refusals are one clear line.

One test runs inductor with sdpa attention: exactness, and no recompilation after warm_up
across batch sizes, prompt lengths, budgets and presets. Inductor's C++ compile is slow on a
CPU (about 10 s a graph), so eager attention is checked with backend="aot_eager" (the traced
graphs run as they are, without code generation), and the other tests with backend="eager".
"""
import copy
import io
import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import sparsevlm_engine as sve
from tiny import llava_prompts, tiny_llava

LAYERS = 3
ATOL = 1e-5
NEW_TOKENS = 4
CONFIGS = {
    "dense": None,
    "v1.5": sve.SparseVLMConfig.v1_5(64, pruning_layers=(0, 1)),
    "v2": sve.SparseVLMConfig.v2(64, pruning_layers=(1,)),
}


def _batch(before, after, seed=1):
    return llava_prompts(before=before, after=after, seed=seed)


BATCHES = {"one": _batch((3,), (5,)), "padded-3": _batch((3, 6, 1), (5, 9, 7))}


def _configure(model, config):
    if config is None:
        sve.unsparsify(model)
    else:
        sve.sparsify(model, config)


def _run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        positions = [s.final_positions for s in sve.last_trace(model).samples] if sve.is_sparsified(model) else None
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, positions, generated


def _assert_same(compiled, reference, inputs):
    logits, positions, generated = _run(compiled, inputs)
    ref_logits, ref_positions, ref_generated = _run(reference, inputs)
    assert positions == ref_positions
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-5)
    assert torch.equal(generated, ref_generated)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def pair():
    """(compiled model, eager model) with the same weights and eager attention, sparsified first
    and compiled afterwards (the inductor test below compiles first and sparsifies afterwards)."""
    model, reference = tiny_llava("eager", layers=LAYERS), tiny_llava("eager", layers=LAYERS)
    sve.sparsify(model, CONFIGS["v1.5"])
    sve.sparsify(reference, CONFIGS["v1.5"])
    sve.compile_decoder(model, backend="aot_eager")
    return model, reference


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_eager_with_eager_attention(pair, name, batch):
    model, reference = pair
    for m in pair:
        _configure(m, CONFIGS[name])
    breaks = _graph_breaks()
    _assert_same(model, reference, BATCHES[batch])
    assert _graph_breaks() == breaks
    assert sve.is_compiled(model)


def test_unsparsify_leaves_it_compiled_and_dense_exact(pair):
    model, reference = pair
    for m in pair:
        _configure(m, CONFIGS["v1.5"])
        _run(m, BATCHES["padded-3"])
        sve.unsparsify(m)
    forwards = [layer.__dict__["forward"] for layer in model.get_decoder().layers]
    assert sve.is_compiled(model) and not sve.is_sparsified(model)
    _assert_same(model, reference, BATCHES["padded-3"])
    assert [layer.__dict__["forward"] for layer in model.get_decoder().layers] == forwards


def test_inductor_sdpa_is_exact_and_never_recompiles_after_warm_up():
    """Compiled first, sparsified afterwards. Four graphs per layer once warm (prefill and decode,
    for one prompt and for a batch); then batch sizes 1, 3 and 8, other prompt lengths, budgets
    and presets, dense or sparse, compile nothing and match eager."""
    model, reference = tiny_llava("sdpa", layers=LAYERS), tiny_llava("sdpa", layers=LAYERS)
    sve.compile_decoder(model)
    before, breaks = _graphs(), _graph_breaks()
    for m in (model, reference):
        _configure(m, CONFIGS["v1.5"])
    sve.warm_up(model, [_batch((2,), (4,), seed=3), _batch((4, 1), (2, 6), seed=4)])
    assert _graphs() - before == 4 * LAYERS
    cases = [
        (None, _batch((3,), (9,))),
        (sve.SparseVLMConfig.v1_5(160, pruning_layers=(0, 1)), _batch((3, 6, 1), (5, 9, 7))),
        (sve.SparseVLMConfig.v1_rank(64, pruning_layers=(1,)), _batch((5,) * 8, tuple(range(8)))),
        (sve.SparseVLMConfig.v2(96, pruning_layers=(0, 1)), _batch((1,), (2,))),
        (CONFIGS["v2"], _batch((2, 7, 4), (1, 3, 3))),
        (None, _batch((2, 7, 4, 1, 3, 3, 9, 2), (1,) * 8)),
    ]
    with torch.compiler.set_stance("fail_on_recompile"):
        for config, inputs in cases:
            for m in (model, reference):
                _configure(m, config)
            _assert_same(model, reference, inputs)
    assert _graphs() - before == 4 * LAYERS
    assert _graph_breaks() == breaks


def _tiny_compiled(impl="sdpa", **options):
    model = tiny_llava(impl, layers=2)
    return model, sve.compile_decoder(copy.deepcopy(model), backend="eager", **options)


def test_uncompile_restores_every_layer():
    plain, model = _tiny_compiled()
    dicts = [dict(layer.__dict__) for layer in plain.get_decoder().layers]
    inputs = BATCHES["padded-3"]
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(64, pruning_layers=(0,)))
    _run(model, inputs)
    sve.uncompile_decoder(model)
    sve.unsparsify(model)
    assert not sve.is_compiled(model)
    assert set(model.__dict__) == set(plain.__dict__)
    for layer, expected in zip(model.get_decoder().layers, dicts):
        assert layer.__dict__.keys() == expected.keys()
    for got, expected in zip(_run(model, inputs), _run(plain, inputs)):
        assert torch.equal(got, expected) if got is not None else expected is None
    assert sve.uncompile_decoder(model) is model


def test_deepcopy_compiles_the_copy_of_its_own():
    plain, model = _tiny_compiled()
    copied = copy.deepcopy(model)
    assert sve.is_compiled(copied)
    layers = copied.get_decoder().layers
    assert all(layer.__dict__["forward"].layer is layer for layer in layers)
    inputs = BATCHES["padded-3"]
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs).logits, plain(**inputs).logits, atol=ATOL, rtol=1e-5)


def test_compile_again_with_the_same_options_changes_nothing():
    _, model = _tiny_compiled()
    forwards = [layer.forward for layer in model.get_decoder().layers]
    sve.compile_decoder(model, backend="eager")
    assert [layer.forward for layer in model.get_decoder().layers] == forwards
    sve.compile_decoder(model, backend="aot_eager")
    assert all(a is not b for a, b in zip(forwards, (layer.forward for layer in model.get_decoder().layers)))


@pytest.mark.parametrize("options, error, match", [
    ({"dynamic": True}, ValueError, "dynamic"),
    ({"mode": "reduce-overhead"}, sve.UnsupportedModeError, "CUDA graphs"),
    ({"options": {"triton.cudagraphs": True}}, sve.UnsupportedModeError, "CUDA graphs"),
])
def test_refused_options(options, error, match):
    with pytest.raises(error, match=match):
        sve.compile_decoder(tiny_llava("sdpa", layers=2), **options)


def test_refused_models_and_modes():
    model = tiny_llava("sdpa", layers=2)
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(sve.UnsupportedModeError, match="attn_implementation"):
        sve.compile_decoder(model)
    with pytest.raises(sve.UnsupportedModelError):
        sve.compile_decoder(torch.nn.Linear(2, 2))
    model = tiny_llava("sdpa", layers=2)
    model.get_decoder().layers[1].forward = lambda *a, **k: None
    with pytest.raises(sve.UnsupportedModeError, match="layer 1 already has a forward"):
        sve.compile_decoder(model)
    with pytest.raises(RuntimeError, match="not compiled"):
        sve.warm_up(tiny_llava("sdpa", layers=2), [])
    _, model = _tiny_compiled()
    with pytest.raises(TypeError, match="uncompile_decoder"):
        torch.save(model, io.BytesIO())
    with pytest.raises(TypeError, match="uncompile_decoder"):
        pickle.dumps(model)
    model.train()
    with pytest.raises(sve.UnsupportedModeError, match="inference only"):
        model(**BATCHES["one"])
