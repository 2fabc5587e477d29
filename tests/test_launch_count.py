"""A pruning layer's whole step — rater queries, scoring, selection, recycling, compaction and the
next layers' mask — issues at most six device operations in schedule mode on the Triton backend
(Triton launches plus torch ops that do work; tests/op_counting.py says what counts). That its
kept tokens, recycled tokens, positions and logits equal the torch reference's is
tests/test_triton_backend.py's."""
import pytest
import torch

import sparsevlm_engine as sve
from kernel_checks import DEVICE
from op_counting import count_device_ops
from sparsevlm_engine.engine import SparseEngine
from tiny import llava_prompts, qwen_prompts, tiny_llava, tiny_qwen, with_token_types

# (config, launches per pruning layer): v1.5 recycles (rater queries, relevance, selection,
# distances, clustering + merge, compaction); v2 does not (four).
SCHEDULE = {
    "v1.5": (sve.SparseVLMConfig.v1_5(128), 6),
    "v2": (sve.SparseVLMConfig.v2(64), 4),
}


def _count_pruning_steps(monkeypatch):
    """DeviceOps of every pruning step: keeping the pruning layer's input (its pre-hook) and
    pruning its output (the next layer's pre-hook), in call order."""
    steps = []
    keep, prune = SparseEngine._keep_attention_input, SparseEngine._prune_input

    def counted_keep(self, *args, **kwargs):
        with count_device_ops() as ops:
            result = keep(self, *args, **kwargs)
        steps.append(ops)
        return result

    def counted_prune(self, *args, **kwargs):
        with count_device_ops() as ops:
            result = prune(self, *args, **kwargs)
        before = steps.pop()
        ops.launches.update(before.launches)
        ops.torch_ops.update(before.torch_ops)
        steps.append(ops)
        return result

    monkeypatch.setattr(SparseEngine, "_keep_attention_input", counted_keep)
    monkeypatch.setattr(SparseEngine, "_prune_input", counted_prune)
    return steps


def _llava(impl, batch):
    model = tiny_llava(impl).to(DEVICE)
    before, after = ((3, 6), (5, 9)) if batch == 2 else ((3,), (5,))
    inputs = llava_prompts(before=before, after=after)
    return model, {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.mark.parametrize("impl,batch", [("sdpa", 1), ("eager", 2)])
@pytest.mark.parametrize("preset", SCHEDULE)
def test_a_pruning_layer_issues_at_most_six_device_operations(monkeypatch, preset, impl, batch):
    """Batch 1, and a left-padded batch of 2 whose rows keep different counts (the mask pads)."""
    config, launches = SCHEDULE[preset]
    model, inputs = _llava(impl, batch)
    steps = _count_pruning_steps(monkeypatch)
    sve.sparsify(model, config.with_(backend="triton"))
    with torch.no_grad():
        model(**inputs)
    trace = sve.last_trace(model)
    assert len(steps) == len(trace.pruning_layers) == 3
    assert any(record.recycled for s in trace.samples for record in s.pruning) == (preset == "v1.5")
    for ops in steps:
        assert ops.total <= 6 and ops.host_reads == 0, str(ops)
        assert sum(ops.launches.values()) == launches and not ops.torch_ops, str(ops)


def test_rank_mode_reads_the_host_once_per_pruning_layer(monkeypatch):
    """Rank mode adds the one read of the rater rows P (and the upload of the counts it decides)."""
    model, inputs = _llava("sdpa", 1)
    steps = _count_pruning_steps(monkeypatch)
    sve.sparsify(model, sve.SparseVLMConfig.v1_rank(128).with_(backend="triton"))
    reads = []
    real_cpu = torch.Tensor.cpu

    def counted_cpu(self, *args, **kwargs):
        reads.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    with torch.no_grad():
        model(**inputs)
    prompt_reads = 1  # the raters' counts at layer 0, once per prefill
    assert len(reads) == prompt_reads + len(steps) == prompt_reads + 4  # v1 prunes at four layers


def test_qwen_mrope_pruning_layer_issues_at_most_six_device_operations(monkeypatch):
    model = tiny_qwen("qwen2_vl", "sdpa").to(DEVICE)
    inputs = with_token_types(*qwen_prompts([[("image", (12, 12))]], before=(3,), after=(5,)))
    steps = _count_pruning_steps(monkeypatch)
    sve.sparsify(model, sve.SparseVLMConfig.v2(64).with_(backend="triton"))
    with torch.no_grad():
        model(**{k: v.to(DEVICE) for k, v in inputs.items()})
    assert steps
    for ops in steps:
        assert sum(ops.launches.values()) == 4 and not ops.torch_ops, str(ops)


def _count_engine_hooks(monkeypatch) -> list:
    """DeviceOps of every engine hook call (model, decoder and layer hooks), in call order."""
    calls = []
    for name in ("_begin_call", "_end_call", "_on_decoder_call", "_before_layer"):
        real = getattr(SparseEngine, name)

        def counted(self, *args, _real=real, **kwargs):
            with count_device_ops() as ops:
                result = _real(self, *args, **kwargs)
            calls.append(ops)
            return result
        monkeypatch.setattr(SparseEngine, name, counted)
    return calls


def _rope_call_ops(model, hidden, position_ids) -> int:
    """Device operations of one call of the decoder's own RoPE module."""
    with count_device_ops() as ops:
        model.model.language_model.rotary_emb(hidden, position_ids)
    return sum(ops.torch_ops.values())


@pytest.mark.parametrize("positions", ["original", "renumber"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_what_a_decode_step_costs_in_the_engine(monkeypatch, impl, batch, positions):
    """A decode step over a pruned cache: with no padding anywhere and a model that passes no mask
    (sdpa, batch 1), the engine adds no mask; otherwise one decode mask per pruned stage (sdpa:
    the key validity; eager: its additive form), and the generated tokens' validity. Renumbered
    positions add one subtraction and one call of the model's RoPE module for all stages, and a
    copy of each stage's position ids and cos / sin rows but the first (a view of the stacked rows
    would make a compiled layer recompile)."""
    calls = _count_engine_hooks(monkeypatch)
    model, inputs = _llava(impl, batch)
    sve.sparsify(model, SCHEDULE["v1.5"][0].with_(positions=positions))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)
        calls.clear()
        model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=out.past_key_values)
    ops = sum((sum(c.torch_ops.values()) for c in calls), 0)
    assert not any(c.launches or c.host_reads for c in calls)
    stages = 3
    rope = 0
    if positions == "renumber":
        hidden = torch.zeros(batch, 1, model.config.text_config.hidden_size, device=DEVICE)
        rope = 1 + _rope_call_ops(model, hidden, torch.zeros(stages, batch, 1, dtype=torch.long,
                                                             device=DEVICE).flatten(0, 1)) + 3 * (stages - 1)
    if impl == "sdpa" and batch == 1:
        assert ops == rope
    else:
        per_mask = {"sdpa": 1, "eager": 4}[impl]  # cat; cat, zeros, scalar_tensor, where
        assert ops == 1 + stages * per_mask + rope, [dict(c.torch_ops) for c in calls if c.torch_ops]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layers_the_fused_rater_queries_do_not_cover_keep_the_same_tokens(monkeypatch, backend):
    """Another norm, a q_norm, a quantised or mixed-dtype projection: the rater queries go through
    the layer's own modules, and the kept tokens and logits are those of the fused path."""
    from sparsevlm_engine import pruning

    model, inputs = _llava("sdpa", 2)
    sve.sparsify(model, SCHEDULE["v1.5"][0].with_(backend=backend))
    with torch.no_grad():
        fused = model(**inputs).logits
        fused_trace = sve.last_trace(model)
        monkeypatch.setattr(pruning, "rms_norm_eps", lambda norm: None)
        generic = model(**inputs).logits
    generic_trace = sve.last_trace(model)
    for a, b in zip(fused_trace.samples, generic_trace.samples):
        assert [r.kept for r in a.pruning] == [r.kept for r in b.pruning]
    torch.testing.assert_close(generic, fused, atol=1e-5, rtol=1e-5)


class _WrappedProjection(torch.nn.Module):
    """A projection that is not an nn.Linear (as quantised or adapter-wrapped layers are)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_projection_that_is_not_a_linear_takes_the_layers_own_path():
    model, inputs = _llava("sdpa", 2)
    sve.sparsify(model, SCHEDULE["v1.5"][0].with_(backend="triton"))
    with torch.no_grad():
        fused = model(**inputs).logits
        fused_trace = sve.last_trace(model)
        for index in sve.engine_of(model).pruning_layers:
            attn = sve.engine_of(model).layers[index].self_attn
            attn.q_proj = _WrappedProjection(attn.q_proj)
        wrapped = model(**inputs).logits
    wrapped_trace = sve.last_trace(model)
    for a, b in zip(fused_trace.samples, wrapped_trace.samples):
        assert [r.kept for r in a.pruning] == [r.kept for r in b.pruning]
    torch.testing.assert_close(wrapped, fused, atol=1e-5, rtol=1e-5)
