"""Pruned runs equal masked dense runs, and a padded batch gives each sample what it gets alone."""
import pytest
import torch

import sparsevlm_engine as sve
from masked_reference import gather_final_logits, masked_dense
from tiny import llava_case, llava_next_prompts, llava_prompts, tiny_llava, tiny_llava_next

ATOL = 2e-5
NEW_TOKENS = 6


def _sparse_run(model, inputs, config):
    sve.sparsify(model, config)
    with torch.no_grad():
        logits = model(**inputs).logits
        trace = sve.last_trace(model)
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    sve.unsparsify(model)
    return logits, trace, generated


def _real_rows(logits, trace):
    """Zero the padding columns so that only real tokens are compared."""
    out = logits.clone()
    width = logits.shape[1]
    for b, s in enumerate(trace.samples):
        out[b, : width - len(s.final_positions)] = 0
    return out


@pytest.mark.parametrize("preset", ["v1_5", "v2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_pruned_equals_masked_dense(family, impl, preset):
    model, inputs = llava_case(family, impl)
    config = getattr(sve.SparseVLMConfig, preset)(128, recycling=False, positions="original")
    logits, trace, generated = _sparse_run(model, inputs, config)
    assert all(s.pruning and s.pruning[-1].visual_after < s.n_visual for s in trace.samples)
    dense_logits, dense_generated = masked_dense(model, inputs, trace, impl, NEW_TOKENS)
    expected = gather_final_logits(dense_logits, trace, inputs["attention_mask"])
    torch.testing.assert_close(_real_rows(logits, trace), expected, atol=ATOL, rtol=1e-5)
    assert torch.equal(generated, dense_generated)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_masking_is_what_changes_the_output(family):
    """Guards the test above: the pruned logits differ from the plain dense ones."""
    model, inputs = llava_case(family, "eager")
    logits, trace, _ = _sparse_run(model, inputs, sve.SparseVLMConfig.v1_5(64, recycling=False))
    with torch.no_grad():
        plain = model(**inputs).logits
    expected = gather_final_logits(plain, trace, inputs["attention_mask"])
    assert (_real_rows(logits, trace) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("recycling", [False, True])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batch_rows_match_single_runs(family, recycling, positions):
    model, inputs = llava_case(family, "sdpa")
    config = sve.SparseVLMConfig.v1_5(128, recycling=recycling, positions=positions)
    logits, trace, generated = _sparse_run(model, inputs, config)
    for b in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][b].bool()
        single = {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real]}
        if family == "llava":
            single["pixel_values"] = inputs["pixel_values"][b:b + 1]
        else:
            single["pixel_values"] = inputs["pixel_values"][b:b + 1]
            single["image_sizes"] = inputs["image_sizes"][b:b + 1]
        one_logits, one_trace, one_generated = _sparse_run(model, single, config)
        assert one_trace.samples[0].pruning == trace.samples[b].pruning
        assert one_trace.samples[0].rater_positions == trace.samples[b].rater_positions
        assert one_trace.samples[0].stages == trace.samples[b].stages
        n = len(trace.samples[b].final_positions)
        torch.testing.assert_close(one_logits[0, -n:], logits[b, -n:], atol=ATOL, rtol=1e-5)
        assert torch.equal(one_generated[0, -NEW_TOKENS:], generated[b, -NEW_TOKENS:])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_two_images_per_prompt_equal_masked_dense(family):
    if family == "llava":
        model = tiny_llava("sdpa", seed=2)
        inputs = llava_prompts(before=(3, 6), after=(5, 2), images_per_prompt=2)
        counts = [64] * 4
    else:
        model = tiny_llava_next("sdpa", seed=2)
        sizes = [[28, 56], [56, 56], [56, 28], [28, 28]]
        inputs, counts = llava_next_prompts(model, sizes, before=(3, 6), after=(5, 2), images_per_prompt=2)
    logits, trace, generated = _sparse_run(model, inputs, sve.SparseVLMConfig.v2(128, positions="original"))
    assert [s.n_visual for s in trace.samples] == [counts[0] + counts[1], counts[2] + counts[3]]
    dense_logits, dense_generated = masked_dense(model, inputs, trace, "sdpa", NEW_TOKENS)
    expected = gather_final_logits(dense_logits, trace, inputs["attention_mask"])
    torch.testing.assert_close(_real_rows(logits, trace), expected, atol=ATOL, rtol=1e-5)
    assert torch.equal(generated, dense_generated)
