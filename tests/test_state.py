"""Engine state by lifetime: nothing of one call, cache or thread reaches another (state.py)."""
import copy
import gc
import io
import threading
import types
import weakref

import pytest
import torch

import sparsevlm_engine as sve
from tiny import llava_prompts, tiny_llava

CONFIG = sve.SparseVLMConfig.v1_5(64)


def _batch():
    """Two left-padded prompts (lengths 75 and 82) with 64 visual tokens each."""
    return llava_prompts(before=(3, 5), after=(4, 9))


def _text_batch(inputs):
    """Text-only ids of the batch's shape (no visual token)."""
    return torch.randint(3, 90, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(5))


def _decoder_out(model, ids):
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids).last_hidden_state


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kw)


@pytest.mark.parametrize("before", ["forward", "generate", "generate-no-cache", "raised"])
def test_a_direct_decoder_call_runs_as_the_unsparsified_decoder(before):
    model = tiny_llava("sdpa")
    inputs = _batch()
    text = _text_batch(inputs)
    expected = _decoder_out(model, text)
    sve.sparsify(model, CONFIG)
    with torch.no_grad():
        if before == "forward":
            model(**inputs)
        elif before == "generate":
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        elif before == "generate-no-cache":
            model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        else:
            handle = model.get_decoder().layers[4].register_forward_hook(lambda *a: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(**inputs)
            handle.remove()
    assert torch.equal(_decoder_out(model, text), expected)


def test_a_direct_decoder_call_on_a_pruned_cache_is_refused():
    model = tiny_llava()
    inputs = llava_prompts()
    sve.sparsify(model, CONFIG)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(sve.UnsupportedModeError, match="pruned prefill"):
            model.get_decoder()(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values)


def _step(model, inputs, out):
    """One greedy decode step continuing `out` (a forward with use_cache=True)."""
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
    with torch.no_grad():
        return model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_several_caches_decode_in_any_interleaving(impl):
    model = tiny_llava(impl)
    sve.sparsify(model, CONFIG)
    a, b = _batch(), llava_prompts(before=(2, 7), after=(6, 3), seed=4)
    with torch.no_grad():
        alone = _step(model, a, model(**a, use_cache=True)).logits
        out_a = model(**a, use_cache=True)
        out_b = model(**b, use_cache=True)
        interleaved = _step(model, a, out_a).logits
        b_after = _step(model, b, out_b).logits
        b_alone = _step(model, b, model(**b, use_cache=True)).logits
    assert torch.equal(interleaved, alone)
    assert torch.equal(b_after, b_alone)


def test_two_threads_generate_exactly_as_one():
    model = tiny_llava("sdpa")
    sve.sparsify(model, CONFIG)
    prompts = [_batch(), llava_prompts(before=(2, 7), after=(6, 3), seed=4)]
    expected = [_generate(model, p) for p in prompts]
    results, errors = {}, []

    def work(k):
        try:
            results[k] = [_generate(model, prompts[k]) for _ in range(20)]
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k in range(2):
        assert len(results[k]) == 20
        assert all(torch.equal(out, expected[k]) for out in results[k])


_OPAQUE = (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def _engine_tensors(engine) -> list[torch.Tensor]:
    """Tensors reachable from the engine without going through a module (parameters, buffers),
    a class or a function (their globals)."""
    seen, found, todo = set(), [], [engine]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def test_nothing_but_the_trace_outlives_a_generate():
    model = tiny_llava()
    sve.sparsify(model, CONFIG)
    out = _generate(model, _batch(), return_dict_in_generate=True)
    cache = weakref.ref(out.past_key_values)
    del out
    gc.collect()
    assert cache() is None
    engine = sve.engine_of(model)
    assert [t.shape for t in _engine_tensors(engine) if t.dim() > 2] == []  # no mask, RoPE row or KV
    assert len(sve.last_trace(model).samples) == 2
    assert [t.shape for t in _engine_tensors(engine) if t.dim() > 1] == []  # the trace, read, holds lists


def test_a_prefill_that_raised_leaves_no_stale_trace():
    model = tiny_llava()
    sve.sparsify(model, CONFIG)
    with torch.no_grad():
        model(**_batch())
        assert len(sve.last_trace(model)) == 2
        handle = model.get_decoder().layers[3].register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            model(**llava_prompts())
        handle.remove()
    with pytest.raises(RuntimeError, match="last prefill raised .*ZeroDivisionError"):
        sve.last_trace(model)
    with torch.no_grad():
        model(**llava_prompts())
    assert len(sve.last_trace(model)) == 1


def test_a_refused_prefill_leaves_no_stale_trace():
    model = tiny_llava()
    sve.sparsify(model, CONFIG)
    inputs = llava_prompts()
    with torch.no_grad():
        model(**inputs)
        mask4d = torch.ones(1, 1, 70, 70)
        with pytest.raises(sve.UnsupportedModeError):
            model(**{**inputs, "attention_mask": mask4d})
    with pytest.raises(RuntimeError, match="last prefill raised .*UnsupportedModeError"):
        sve.last_trace(model)


def test_training_mode_forwards_that_would_prune_are_refused():
    model = tiny_llava()
    sve.sparsify(model, CONFIG)
    inputs = llava_prompts()
    model.train()
    with pytest.raises(sve.UnsupportedModeError, match=r"inference only.*model\.eval\(\)"):
        model(**inputs, labels=inputs["input_ids"])


def test_gradient_checkpointing_trains_as_unsparsified_on_text():
    def loss_and_grads(sparse):
        model = tiny_llava()
        if sparse:
            sve.sparsify(model, CONFIG)
        model.gradient_checkpointing_enable()
        model.train()
        ids = _text_batch(llava_prompts())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.get_decoder().parameters() if p.grad is not None]

    dense_loss, dense_grads = loss_and_grads(False)
    sparse_loss, sparse_grads = loss_and_grads(True)
    assert torch.equal(sparse_loss, dense_loss)
    assert len(sparse_grads) == len(dense_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(sparse_grads, dense_grads))


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _check_sparsified_copy(copied, inputs, expected, dense):
    assert sve.is_sparsified(copied)
    assert repr(copied).startswith("SparseVLM[")
    assert sve.engine_of(copied).model is copied
    assert torch.equal(_generate(copied, inputs), expected)
    assert len(sve.last_trace(copied)) == 2
    sve.unsparsify(copied)
    with torch.no_grad():
        assert torch.equal(copied(**inputs).logits, dense)


def test_a_sparsified_model_saves_loads_and_deep_copies_sparsified():
    """torch.save before any forward: transformers 5 itself installs an unpicklable hook on a
    model's first forward, sparsified or not; deepcopy works at any time."""
    inputs = _batch()
    reference = tiny_llava()
    with torch.no_grad():
        dense = reference(**inputs).logits
    expected = _generate(sve.sparsify(reference, CONFIG), inputs)

    model = sve.sparsify(tiny_llava(), CONFIG)
    _check_sparsified_copy(_saved_and_loaded(model), inputs, expected, dense)
    assert torch.equal(_generate(model, inputs), expected)
    _check_sparsified_copy(copy.deepcopy(model), inputs, expected, dense)
    assert torch.equal(_generate(model, inputs), expected)  # the original is untouched
    assert sve.is_sparsified(model)


class _Counter(sve.PruningObserver):
    def __init__(self):
        self.events = []

    def before_raters(self):
        self.events.append("raters")

    def before_prune(self, layer, ops, all_queries):
        self.events.append(("prune", layer, tuple(all_queries().shape)))


def test_observers_see_every_pruning_step_and_leave_when_done():
    model = tiny_llava()
    sve.sparsify(model, CONFIG)
    engine = sve.engine_of(model)
    counter = _Counter()
    with torch.no_grad(), engine.observe(counter):
        model(**llava_prompts())
    assert engine.observers == ()
    length = llava_prompts()["input_ids"].shape[1]
    assert counter.events[0] == "raters"
    assert [e[1] for e in counter.events[1:]] == list(engine.pruning_layers)
    assert counter.events[1][2] == (1, 4, length, 8)
