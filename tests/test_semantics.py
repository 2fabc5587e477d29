"""At every pruning layer the engine keeps what a literal transcription of SPARSEVLM.md keeps."""
import pytest
import torch

import sparsevlm_engine as sve
from tiny import llava_prompts, tiny_llava
from transcription import PEAKED_QK, transcribe

CONFIGS = {
    "schedule-v1.5": sve.SparseVLMConfig.v1_5(128, recycling=False),
    "schedule-v1.5-recycling": sve.SparseVLMConfig.v1_5(192),
    "schedule-v1.5-96": sve.SparseVLMConfig.v1_5(96),
    "schedule-derived-100": sve.SparseVLMConfig.v1_5(100),
    "rank-v1": sve.SparseVLMConfig.v1_rank(64),
    "v1.5-recycling-original": sve.SparseVLMConfig.v1_5(192, positions="original"),
    "rank-v1-original": sve.SparseVLMConfig.v1_rank(64, positions="original"),
    "v2-priority-gravity": sve.SparseVLMConfig.v2(128),
    "v2-recycling": sve.SparseVLMConfig.v2(64, recycling=True),
    "v2-recycling-renumber": sve.SparseVLMConfig.v2(64, recycling=True, positions="renumber"),
}


def _engine_records(model, inputs, config):
    sve.sparsify(model, config)
    with torch.no_grad():
        model(**inputs)
    trace = sve.last_trace(model)
    sve.unsparsify(model)
    return trace


def _compare(trace, expected):
    sample = trace.samples[0]
    assert len(sample.pruning) == len(expected)
    assert list(sample.rater_positions) == expected[0]["raters"]
    for record, want in zip(sample.pruning, expected):
        assert record.layer == want["layer"]
        assert record.kept == want["kept"]
        got = sorted((t.centre, t.members) for t in record.recycled)
        assert got == want["recycled"]
    # the tokens after each pruning layer in sequence order (recycled ones placed by the mode's
    # rule) and the position ids the next layers gave them
    assert [s.first_layer for s in sample.stages] == [0] + [w["layer"] + 1 for w in expected]
    for stage, want in zip(sample.stages[1:], expected):
        assert stage.tokens == want["tokens"]
        assert stage.position_ids == want["position_ids"]
    assert sample.final_positions == expected[-1]["tokens"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kept_positions_match_transcription(name):
    config = CONFIGS[name]
    model = tiny_llava("eager", seed=3, qk_scale=PEAKED_QK)
    inputs = llava_prompts(before=(4,), after=(9,), seed=5)
    trace = _engine_records(model, inputs, config)
    assert any(r.recycled for r in trace.samples[0].pruning) == config.recycling
    _compare(trace, transcribe(model, inputs, config, trace.pruning_layers))


def test_two_images_match_transcription():
    model = tiny_llava("eager", seed=4, qk_scale=PEAKED_QK)
    inputs = llava_prompts(before=(2,), after=(6,), seed=6, images_per_prompt=2)
    config = sve.SparseVLMConfig.v1_5(128)
    trace = _engine_records(model, inputs, config)
    assert trace.samples[0].n_visual == 128
    _compare(trace, transcribe(model, inputs, config, trace.pruning_layers))


def test_image_at_end_uses_last_token_as_rater():
    model = tiny_llava("eager", seed=5, qk_scale=PEAKED_QK)
    inputs = llava_prompts(before=(4,), after=(0,), seed=7)
    config = sve.SparseVLMConfig.v1_5(128)
    trace = _engine_records(model, inputs, config)
    sample = trace.samples[0]
    assert sample.rater_positions == (sample.length - 1,)
    assert all(sample.length - 1 in r.kept for r in sample.pruning)
    _compare(trace, transcribe(model, inputs, config, trace.pruning_layers))
