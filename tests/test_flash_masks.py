"""The flash_attention_2 path on CPU: flash-attn cannot be built here, so a stand-in with
flash-attn's padding semantics (un-pad by the 2-D mask, causal aligned bottom-right) takes its
place in transformers' attention registry; the engine's 2-D masks must give the masked-dense
result through it."""
import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import sparsevlm_engine as sve
from masked_reference import gather_final_logits, masked_dense
from tiny import llava_prompts, tiny_llava


def flash_like_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query [B, H, Q, D], key/value [B, H_kv, K, D], attention_mask [B, K] (1 = real) or None."""
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    valid = torch.ones(batch, k_len, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rank = valid.long().cumsum(1) - 1  # index among real keys
    q_valid = valid[:, -q_len:]
    q_rank = rank[:, -q_len:]
    causal = rank[:, None, :] <= q_rank[:, :, None] if getattr(module, "is_causal", True) else True
    allowed = valid[:, None, :] & causal & q_valid[:, :, None]
    allowed |= ~q_valid[:, :, None] & (torch.arange(k_len)[None, None, :] == (k_len - q_len + torch.arange(q_len))[None, :, None])
    scores = (query @ key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    out = (probs @ value) * q_valid[:, None, :, None]
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def flash_like(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", flash_like_attention)


def _use(model, impl):
    for cfg in (model.config, model.config.text_config):
        cfg._attn_implementation = impl


def test_flash_path_equals_masked_dense(flash_like):
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    _use(model, "flash_attention_2")
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128, recycling=False, positions="original"))
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    trace = sve.last_trace(model)
    sve.unsparsify(model)
    _use(model, "sdpa")
    dense, dense_generated = masked_dense(model, inputs, trace, "sdpa", 5)
    expected = gather_final_logits(dense, trace, inputs["attention_mask"])
    assert all(s.pruning for s in trace.samples)
    torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=2e-5, rtol=1e-5)
    assert torch.equal(generated, dense_generated)


def test_stand_in_matches_sdpa_on_the_dense_model(flash_like):
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    with torch.no_grad():
        reference = model(**inputs).logits
        _use(model, "flash_attention_2")
        flash = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(flash[real], reference[real], atol=2e-5, rtol=1e-5)


def test_renumbered_positions_run_the_same_on_every_attention(flash_like):
    """positions="renumber" (the v1.5 default) on eager, sdpa and the flash path: the same kept
    tokens, logits and generated tokens on a left-padded batch."""
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    runs = {}
    for impl in ("eager", "sdpa", "flash_attention_2"):
        _use(model, impl)
        sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        runs[impl] = logits, generated, sve.last_trace(model)
        sve.unsparsify(model)
    _use(model, "sdpa")
    logits, generated, trace = runs["sdpa"]
    assert all(any(r.recycled for r in s.pruning) for s in trace.samples)
    for impl in ("eager", "flash_attention_2"):
        other_logits, other_generated, other_trace = runs[impl]
        assert [s.stages for s in other_trace.samples] == [s.stages for s in trace.samples]
        torch.testing.assert_close(other_logits[:, -1], logits[:, -1], atol=2e-5, rtol=1e-5)
        assert torch.equal(other_generated, generated)


def test_a_later_chat_turn_runs_the_same_on_every_attention(flash_like):
    """A chat's next turn (several tokens on the pruned cache) on eager, sdpa and the flash path:
    the same logits and generated tokens, in both position modes."""
    model = tiny_llava("sdpa")
    inputs = llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    for positions in ("renumber", "original"):
        runs = {}
        for impl in ("eager", "sdpa", "flash_attention_2"):
            _use(model, impl)
            sve.sparsify(model, sve.SparseVLMConfig.v1_5(128, positions=positions))
            with torch.no_grad():
                first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
                ids = torch.cat([first.sequences, torch.tensor([[7, 8, 9]]).expand(3, -1)], 1)
                mask = torch.cat([inputs["attention_mask"], torch.ones(3, ids.shape[1] - inputs["input_ids"].shape[1],
                                                                         dtype=torch.long)], 1)
                out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values,
                                     max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
            runs[impl] = out.logits[0], out.sequences
            sve.unsparsify(model)
        _use(model, "sdpa")
        logits, sequences = runs["sdpa"]
        for impl in ("eager", "flash_attention_2"):
            torch.testing.assert_close(runs[impl][0], logits, atol=2e-5, rtol=1e-5)
            assert torch.equal(runs[impl][1], sequences), (positions, impl)
