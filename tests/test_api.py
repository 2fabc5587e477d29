"""Public API behaviour: reversibility, no-op cases, edge prompts, dtypes, refusals."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsevlm_engine as sve
from masked_reference import gather_final_logits, masked_dense
from tiny import IMAGE_TOKEN, llava_prompts, tiny_llava


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, **kw)


def test_unsparsify_restores_bit_identical_outputs():
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    before_logits, before_ids = _logits(model, inputs), _generate(model, inputs)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(64))
    assert _logits(model, inputs).shape[1] < before_logits.shape[1]
    sve.unsparsify(model)
    assert not sve.is_sparsified(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert "generate" not in model.__dict__
    assert torch.equal(_logits(model, inputs), before_logits)
    assert torch.equal(_generate(model, inputs), before_ids)


def test_sparsify_is_idempotent_and_shows_in_repr():
    model = tiny_llava()
    config = sve.SparseVLMConfig.v1_5(128)
    sve.sparsify(model, config)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert sve.sparsify(model, config) is model
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert repr(model).startswith("SparseVLM[LlavaForConditionalGeneration]")
    sve.sparsify(model, sve.SparseVLMConfig.v2(64))
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    sve.unsparsify(model)
    assert repr(model).startswith("LlavaForConditionalGeneration")


def test_budget_covering_every_visual_token_changes_nothing():
    model = tiny_llava()
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    dense, dense_ids = _logits(model, inputs), _generate(model, inputs)
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(576))
    assert torch.equal(_logits(model, inputs), dense)
    trace = sve.last_trace(model)
    assert all(not s.pruning and s.visual_entering == (64,) * 8 for s in trace.samples)
    assert all(s.flops.reduction_paper == 0.0 for s in trace.samples)
    assert torch.equal(_generate(model, inputs), dense_ids)


def test_prompt_without_image_runs_dense():
    model = tiny_llava()
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    dense, dense_ids = _logits(model, inputs), _generate(model, inputs)
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(64))
    assert torch.equal(_logits(model, inputs), dense)
    assert sve.last_trace(model).samples[0].n_visual == 0
    assert torch.equal(_generate(model, inputs), dense_ids)


def test_single_instruction_token_becomes_the_rater():
    model = tiny_llava()
    inputs = llava_prompts(before=(3,), after=(1,))
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    _logits(model, inputs)
    sample = sve.last_trace(model).samples[0]
    assert sample.rater_positions == (sample.length - 1,)
    assert sample.pruning[-1].visual_after < 64


def test_trace_counts_follow_the_scaled_schedule():
    model = tiny_llava()
    inputs = llava_prompts(before=(3,), after=(6,))
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128, recycling=False))
    _logits(model, inputs)
    sample = sve.last_trace(model).samples[0]
    # 303 / 110 / 36 of 576, scaled to 64 visual tokens
    assert [r.visual_after for r in sample.pruning] == [34, 12, 4]
    assert [r.layer for r in sample.pruning] == [1, 2, 4]
    assert sample.visual_entering == (64, 64, 34, 12, 12, 4, 4, 4)
    assert sample.equivalent_tokens_entering == pytest.approx(sum(sample.visual_entering) / 8)
    assert 0 < sample.flops.reduction_paper < 1 and 0 < sample.flops.reduction_exact < 1
    assert sample.flops.pruning > 0


def test_decode_positions_are_the_logical_ones():
    model = tiny_llava()
    inputs = llava_prompts(before=(3, 6), after=(6, 2))
    seen = {}

    def grab(module, args, kwargs):
        if (args[0] if args else kwargs["hidden_states"]).shape[1] == 1:
            seen.setdefault("pos", []).append(kwargs["position_ids"].clone())
            seen.setdefault("cos", []).append(kwargs["position_embeddings"][0].clone())

    handle = model.model.language_model.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
    _generate(model, inputs)
    dense = dict(seen)
    seen.clear()
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(64))
    _generate(model, inputs)
    handle.remove()
    for a, b in zip(dense["pos"], seen["pos"]):
        assert torch.equal(a, b)
    for a, b in zip(dense["cos"], seen["cos"]):
        assert torch.equal(a, b)
    assert len(seen["pos"]) == 4


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_matches_masked_dense(dtype, atol):
    model = tiny_llava("sdpa", dtype=dtype)
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128, recycling=False))
    logits = _logits(model, inputs)
    trace = sve.last_trace(model)
    sve.unsparsify(model)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert [r.visual_after for r in trace.samples[0].pruning] == [34, 12, 4]
    dense, _ = masked_dense(model, inputs, trace, "sdpa")
    expected = gather_final_logits(dense, trace, inputs["attention_mask"])
    torch.testing.assert_close(logits[:, -1].float(), expected[:, -1].float(), atol=atol, rtol=0)


def test_sampling_generates():
    model = tiny_llava()
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    sve.sparsify(model, sve.SparseVLMConfig.v2(128))
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=10)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_unsupported_model_names_the_supported_families():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2))
    with pytest.raises(sve.UnsupportedModelError, match="LLaVA-1.5.*LLaVA-NeXT"):
        sve.sparsify(model, sve.SparseVLMConfig())


@pytest.mark.parametrize("kwargs,match", [
    ({"num_beams": 2}, "beam search"),
    ({"cache_implementation": "static"}, "cache_implementation"),
    ({"prompt_lookup_num_tokens": 3}, "assisted decoding"),
    ({"prefill_chunk_size": 8}, "chunked prefill"),
])
def test_unsupported_generation_modes_raise(kwargs, match):
    model = tiny_llava()
    sve.sparsify(model, sve.SparseVLMConfig())
    with pytest.raises(sve.UnsupportedModeError, match=match):
        model.generate(**llava_prompts(), max_new_tokens=2, **kwargs)


def test_last_trace_errors_are_clear():
    model = tiny_llava()
    with pytest.raises(RuntimeError, match="not sparsified"):
        sve.last_trace(model)
    sve.sparsify(model, sve.SparseVLMConfig())
    with pytest.raises(RuntimeError, match="no prefill"):
        sve.last_trace(model)


def test_visual_tokens_found_from_inputs_embeds():
    model = tiny_llava()
    inputs = llava_prompts()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    mask = sve.FAMILIES["llava"].visual_mask(model, None, embeds)
    assert torch.equal(mask, inputs["input_ids"] == IMAGE_TOKEN)


def test_scoring_without_a_cache_recomputes_the_same_keys():
    model = tiny_llava()
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits
        trace_cached = sve.last_trace(model)
        uncached = model(**inputs, use_cache=False).logits
    trace_uncached = sve.last_trace(model)
    assert [s.pruning for s in trace_cached.samples] == [s.pruning for s in trace_uncached.samples]
    torch.testing.assert_close(uncached, cached, atol=1e-6, rtol=1e-6)


def test_a_static_cache_object_is_refused():
    from transformers import StaticCache

    model = tiny_llava()
    inputs = llava_prompts()
    sve.sparsify(model, sve.SparseVLMConfig())
    cache = StaticCache(config=model.config.text_config, max_cache_len=256)
    with pytest.raises(sve.UnsupportedModeError, match="StaticCache"):
        model.generate(**inputs, max_new_tokens=2, past_key_values=cache)
    with pytest.raises(sve.UnsupportedModeError, match="StaticCache"), torch.no_grad():
        model(**inputs, past_key_values=StaticCache(config=model.config.text_config, max_cache_len=256))


def test_an_all_padding_row_does_not_disturb_the_others():
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 5), after=(6, 4))
    alone = {k: v[:1] for k, v in inputs.items()}
    inputs["attention_mask"][1] = 0
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    with torch.no_grad():
        batch_logits = model(**inputs).logits
        trace = sve.last_trace(model)
        single_logits = model(**alone).logits
    assert trace.samples[1].length == 0 and trace.samples[1].pruning[0].visual_before == 0
    n = len(trace.samples[0].final_positions)
    torch.testing.assert_close(batch_logits[0, -n:], single_logits[0, -n:], atol=2e-5, rtol=1e-5)
