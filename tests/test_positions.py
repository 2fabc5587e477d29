"""Position modes (SPARSEVLM.md section 5): "renumber" gives the tokens left after each pruning
layer ids 0 .. L'-1 and each generated token, at every layer, the length of that layer's own
cache; "original" keeps every id and decodes at the unpruned length. Which tokens each mode keeps
is tests/test_semantics.py's (the transcription)."""
import pytest
import torch

import sparsevlm_engine as sve
from tiny import llava_prompts, tiny_llava
from transcription import PEAKED_QK

NEW_TOKENS = 3


def _decode_positions(model, inputs, config):
    """Per decode step, the position ids [B] and cos rows [B, Dr] each decoder layer was given."""
    lm = model.model.language_model
    steps = []

    def grab(index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            return
        if index == 0:
            steps.append({})
        pid = kwargs["position_ids"].expand(hidden.shape[0], -1)[:, 0]
        cos = kwargs["position_embeddings"][0].expand(hidden.shape[0], -1, -1)[:, 0]
        steps[-1][index] = (pid.clone(), cos.clone())

    sve.sparsify(model, config)  # first, so that the hooks below see what the engine hands each layer
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: grab(i, m, a, k), with_kwargs=True)
               for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS + 1, do_sample=False)
        trace = sve.last_trace(model)
    finally:
        sve.unsparsify(model)
        for h in handles:
            h.remove()
    return steps, trace, generated


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_decode_positions_follow_the_mode_at_every_stage(positions, impl):
    model = tiny_llava(impl, seed=2)
    inputs = llava_prompts(before=(3, 6), after=(5, 9))
    steps, trace, _ = _decode_positions(model, inputs, sve.SparseVLMConfig.v1_5(128, positions=positions))
    rotary = model.model.language_model.rotary_emb
    assert len(steps) == NEW_TOKENS and trace.pruning_layers
    for t, layers in enumerate(steps):
        assert len(layers) == len(model.model.language_model.layers)
        for index, (pid, cos) in layers.items():
            expected = []
            for sample in trace.samples:
                stage = [s for s in sample.stages if s.first_layer <= index][-1]
                # the real tokens this layer's cache held before the step: its stage's, then t generated
                expected.append((len(stage.tokens) if positions == "renumber" else sample.length) + t)
            expected = torch.tensor(expected)
            assert torch.equal(pid, expected), (index, t)
            assert torch.equal(cos, rotary(cos[:, None], expected[:, None])[0][:, 0])
    deepest = [len(s.stages[-1].tokens) for s in trace.samples]
    assert all(n < s.length for n, s in zip(deepest, trace.samples))


def test_renumbered_ids_are_the_sequence_order_and_original_ids_the_prompts():
    model = tiny_llava("sdpa", seed=3)
    inputs = llava_prompts(before=(3, 6), after=(5, 9))
    for positions in ("renumber", "original"):
        sve.sparsify(model, sve.SparseVLMConfig.v1_5(192, positions=positions))
        with torch.no_grad():
            model(**inputs)
        trace = sve.last_trace(model)
        sve.unsparsify(model)
        for sample in trace.samples:
            assert sample.stages[0].position_ids == sample.stages[0].tokens == tuple(range(sample.length))
            for stage in sample.stages[1:]:
                want = tuple(range(len(stage.tokens))) if positions == "renumber" else stage.tokens
                assert stage.position_ids == want
            if positions == "renumber":  # the recycled tokens follow the kept visual ones, out of prompt order
                assert any(list(s.tokens) != sorted(s.tokens) for s in sample.stages[1:])


def test_the_position_mode_changes_what_later_layers_keep():
    """Guards the transcription tests: renumbering changes the scores of the layers after the
    first pruning, so the kept sets differ from the original-position run."""
    model = tiny_llava("eager", seed=3, qk_scale=PEAKED_QK)
    inputs = llava_prompts(before=(4,), after=(9,), seed=5)
    kept = {}
    for positions in ("renumber", "original"):
        sve.sparsify(model, sve.SparseVLMConfig.v1_5(128, recycling=False, positions=positions))
        with torch.no_grad():
            model(**inputs)
        kept[positions] = [r.kept for r in sve.last_trace(model).samples[0].pruning]
        sve.unsparsify(model)
    assert kept["renumber"][0] == kept["original"][0]  # the first pruning layer sees the prompt's ids
    assert kept["renumber"][1:] != kept["original"][1:]
