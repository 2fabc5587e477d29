"""Qwen2-VL and Qwen2.5-VL: the engine-core set (masked-reference equivalence, batch consistency,
semantics, reversibility) on images, videos, two images and image + video, and the positions
mRoPE gives kept, recycled and generated tokens."""
import pytest
import torch

import sparsevlm_engine as sve
from masked_reference import gather_final_logits, masked_dense
from sparsevlm_engine.families import rope_rows
from tiny import qwen_prompts, qwen_single, tiny_qwen, with_token_types
from transcription import PEAKED_QK, transcribe

ATOL = 2e-5
NEW_TOKENS = 6
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Two left-padded prompts per case, each with media of its own sizes (in vision patches).
MEDIA = {
    "image": [[("image", (16, 16))], [("image", (8, 12))]],
    "video": [[("video", (2, 8, 8))], [("video", (4, 8, 6))]],
    "two-images": [[("image", (8, 8)), ("image", (12, 8))], [("image", (16, 8)), ("image", (8, 8))]],
    "image-video": [[("image", (12, 12)), ("video", (2, 8, 8))], [("video", (2, 6, 8)), ("image", (8, 8))]],
}


def _case(family, media, impl="sdpa", seed=0, qk_scale=1.0):
    model = tiny_qwen(family, impl, seed=seed, qk_scale=qk_scale)
    inputs, kinds = qwen_prompts(MEDIA[media], before=(3, 6), after=(5, 9), seed=seed + 1)
    return model, with_token_types(inputs, kinds)


def _n_visual(inputs, b):
    ids = inputs["input_ids"][b]
    return int(((ids == 150) | (ids == 151)).sum())


def _sparse_run(model, inputs, config, new_tokens=NEW_TOKENS):
    sve.sparsify(model, config)
    with torch.no_grad():
        logits = model(**inputs).logits
        trace = sve.last_trace(model)
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False) if new_tokens else None
    sve.unsparsify(model)
    return logits, trace, generated


def _real_rows(logits, trace):
    out = logits.clone()
    for b, s in enumerate(trace.samples):
        out[b, : logits.shape[1] - len(s.final_positions)] = 0
    return out


@pytest.mark.parametrize("preset", ["v1_5", "v2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("media", list(MEDIA))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_dense(family, media, impl, preset):
    model, inputs = _case(family, media, impl)
    config = getattr(sve.SparseVLMConfig, preset)(128, recycling=False, positions="original")
    logits, trace, generated = _sparse_run(model, inputs, config)
    assert [s.n_visual for s in trace.samples] == [_n_visual(inputs, b) for b in range(2)]
    assert all(s.pruning and s.pruning[-1].visual_after < s.n_visual for s in trace.samples)
    dense_logits, dense_generated = masked_dense(model, inputs, trace, impl, NEW_TOKENS)
    expected = gather_final_logits(dense_logits, trace, inputs["attention_mask"])
    torch.testing.assert_close(_real_rows(logits, trace), expected, atol=ATOL, rtol=1e-5)
    assert torch.equal(generated, dense_generated)


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_is_what_changes_the_output(family):
    """Guards the test above: the pruned logits differ from the plain dense ones."""
    model, inputs = _case(family, "image-video", "eager")
    logits, trace, _ = _sparse_run(model, inputs, sve.SparseVLMConfig.v1_5(64, recycling=False), 0)
    with torch.no_grad():
        plain = model(**inputs).logits
    expected = gather_final_logits(plain, trace, inputs["attention_mask"])
    assert (_real_rows(logits, trace) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("recycling", [False, True])
@pytest.mark.parametrize("media", list(MEDIA))
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_match_single_runs(family, media, recycling, positions):
    model, inputs = _case(family, media)
    config = sve.SparseVLMConfig.v1_5(128, recycling=recycling, positions=positions)
    logits, trace, generated = _sparse_run(model, inputs, config)
    assert any(r.recycled for s in trace.samples for r in s.pruning) == recycling
    for b in range(2):
        one_logits, one_trace, one_generated = _sparse_run(model, qwen_single(inputs, b), config)
        assert one_trace.samples[0].pruning == trace.samples[b].pruning
        assert one_trace.samples[0].rater_positions == trace.samples[b].rater_positions
        assert one_trace.samples[0].stages == trace.samples[b].stages
        n = len(trace.samples[b].final_positions)
        torch.testing.assert_close(one_logits[0, -n:], logits[b, -n:], atol=ATOL, rtol=1e-5)
        assert torch.equal(one_generated[0, -NEW_TOKENS:], generated[b, -NEW_TOKENS:])


SEMANTICS = {
    "v1.5-recycling": sve.SparseVLMConfig.v1_5(192),
    "v1.5-recycling-original": sve.SparseVLMConfig.v1_5(192, positions="original"),
    "rank-v1": sve.SparseVLMConfig.v1_rank(64),
    "v2-priority-gravity": sve.SparseVLMConfig.v2(128),
    "v2-recycling": sve.SparseVLMConfig.v2(64, recycling=True),
}


@pytest.mark.parametrize("media", ["image", "image-video"])
@pytest.mark.parametrize("name", list(SEMANTICS))
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_positions_match_transcription(family, name, media):
    config = SEMANTICS[name]
    model, batch = _case(family, media, "eager", seed=3, qk_scale=PEAKED_QK)
    inputs = qwen_single(batch, 0)
    _, trace, _ = _sparse_run(model, inputs, config, 0)
    expected = transcribe(model, inputs, config, trace.pruning_layers)
    sample = trace.samples[0]
    assert any(r.recycled for r in sample.pruning) == config.recycling
    assert list(sample.rater_positions) == expected[0]["raters"]
    assert len(sample.pruning) == len(expected)
    for record, want in zip(sample.pruning, expected):
        assert record.layer == want["layer"]
        assert record.kept == want["kept"]
        assert sorted((t.centre, t.members) for t in record.recycled) == want["recycled"]
    for stage, want in zip(sample.stages[1:], expected):
        assert (stage.first_layer, stage.tokens) == (want["layer"] + 1, want["tokens"])
        assert stage.position_ids == want["position_ids"]


def test_gravity_follows_the_three_mrope_axes():
    """Guards the transcription test: with gravity taken over 1-D token distances instead of the
    3-D mRoPE ids, some kept set changes."""
    from sparsevlm_engine import pruning

    model, batch = _case("qwen2_vl", "image-video", "eager", seed=3)
    inputs = qwen_single(batch, 0)
    config = sve.SparseVLMConfig.v2(128)
    _, trace, _ = _sparse_run(model, inputs, config, 0)
    real = pruning.Pruner._gravity
    try:
        pruning.Pruner._gravity = lambda self, prefill, layout: (prefill.gravity_table[:1], layout.pos, None)
        _, flat, _ = _sparse_run(model, inputs, config, 0)
    finally:
        pruning.Pruner._gravity = real
    assert [r.kept for r in flat.samples[0].pruning] != [r.kept for r in trace.samples[0].pruning]


@pytest.mark.parametrize("family", FAMILIES)
def test_unsparsify_restores_bit_identical_outputs(family):
    model, inputs = _case(family, "image-video")
    with torch.no_grad():
        before = model(**inputs).logits
        before_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    logits, _, _ = _sparse_run(model, inputs, sve.SparseVLMConfig.v2(64), 3)
    assert logits.shape[1] < before.shape[1]
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), before_ids)


def _rope_seen(model, inputs, config=None):
    """cos rows [B, L, D] each decoder layer used in generate's prefill, and those of every decode step."""
    lm = model.model.language_model
    sections = lm.config.rope_parameters["mrope_section"] if hasattr(lm.config, "rope_parameters") \
        else lm.config.rope_scaling["mrope_section"]
    prefill, decode = {}, []

    def grab(index, module, args, kwargs):
        cos = rope_rows(kwargs["position_embeddings"][0], sections).expand(inputs["input_ids"].shape[0], -1, -1)
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            prefill[index] = cos.clone()
        elif index == len(lm.layers) - 1:
            decode.append(cos.clone())

    if config is not None:
        sve.sparsify(model, config)  # first, so that the hooks below see what the engine hands each layer
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: grab(i, m, a, k), with_kwargs=True)
               for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
        trace = sve.last_trace(model) if config is not None else None
    finally:
        sve.unsparsify(model)
        for h in handles:
            h.remove()
    return prefill, decode, trace


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_recycled_and_generated_tokens_keep_their_dense_positions(family, positions):
    """mRoPE keeps every token's 3-D ids in both position modes ("renumber" moves only the
    recycled tokens, after the kept visual ones): each layer's RoPE rows are the dense ones of the
    tokens its stage holds, in the stage's order, and decode steps use the dense ones."""
    model, inputs = _case(family, "image-video")
    dense_prefill, dense_decode, _ = _rope_seen(model, inputs)
    prefill, decode, trace = _rope_seen(model, inputs, sve.SparseVLMConfig.v1_5(128, positions=positions))
    assert len(decode) == len(dense_decode) == 3
    for a, b in zip(dense_decode, decode):
        assert torch.equal(a, b)
    width = inputs["input_ids"].shape[1]
    moved = 0
    for layer, cos in prefill.items():
        for b, sample in enumerate(trace.samples):
            stage = [s for s in sample.stages if s.first_layer <= layer][-1]
            offset = width - sample.length
            expected = dense_prefill[0][b, [offset + p for p in stage.tokens]]
            assert torch.equal(cos[b, cos.shape[1] - len(stage.tokens):], expected)
            moved += list(stage.tokens) != sorted(stage.tokens)
    assert any(r.recycled for s in trace.samples for r in s.pruning)
    assert (moved > 0) == (positions == "renumber")


@pytest.mark.tf5_only
@pytest.mark.parametrize("family", FAMILIES)
def test_missing_token_types_raise_instead_of_wrong_positions(family):
    model, inputs = _case(family, "image")
    inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_without_positions_raise(family):
    model, inputs = _case(family, "image")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    with pytest.raises(ValueError, match="3-D mRoPE position ids"):
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_scale_with_each_samples_visual_tokens(family):
    model, inputs = _case(family, "image")
    _, trace, _ = _sparse_run(model, inputs, sve.SparseVLMConfig.v1_5(128, recycling=False), 0)
    # 303 / 110 / 36 of 576, scaled to 64 and to 24 visual tokens
    assert [[r.visual_after for r in s.pruning] for s in trace.samples] == [[34, 12, 4], [13, 5, 2]]
    by_fraction = _sparse_run(model, inputs, sve.SparseVLMConfig.v1_5(keep_fraction=0.25, recycling=False), 0)[1]
    by_budget = _sparse_run(model, inputs, sve.SparseVLMConfig.v1_5(144, recycling=False), 0)[1]
    counts = [[r.visual_after for r in s.pruning] for s in by_fraction.samples]
    assert counts == [[r.visual_after for r in s.pruning] for s in by_budget.samples]
    assert counts[0] != [34, 12, 4] and counts[0][0] > counts[0][1] > counts[0][2]


@pytest.mark.parametrize("call", ["forward", "generate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_without_their_grid_raise_a_value_error_naming_it(family, call):
    """pixel_values without image_grid_thw never reach the vision tower (generate runs it before
    any forward; a forward with explicit 3-D position_ids [3, 1, L] would too): a ValueError
    names image_grid_thw first."""
    model = tiny_qwen(family)
    inputs, kinds = qwen_prompts([[("image", (4, 4))]])
    inputs = with_token_types(inputs, kinds)
    del inputs["image_grid_thw"]
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    with pytest.raises(ValueError, match="image_grid_thw"), torch.no_grad():
        if call == "generate":
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            length = inputs["input_ids"].shape[1]
            model(**inputs, position_ids=torch.arange(length).view(1, 1, length).expand(3, 1, length))
