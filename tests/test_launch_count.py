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
    """DeviceOps of every pruning layer's hooks (the pre-hook that keeps its input, and the output
    hook that prunes), in call order."""
    steps = []
    keep, prune = SparseEngine._keep_attention_input, SparseEngine._after_pruning_layer

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
    monkeypatch.setattr(SparseEngine, "_after_pruning_layer", counted_prune)
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
    steps = _count_pruning_steps(monkeypatch)  # before sparsify: the hooks bind the engine's methods
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
    assert len(reads) == prompt_reads + len(steps) == prompt_reads + 3


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
