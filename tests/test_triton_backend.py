"""The engine on the Triton kernels (compiled on a GPU, interpreted on CPU) against the torch
reference backend: same kept and recycled tokens, same logits, same generated tokens; and on a
GPU, the host synchronisations of one pruning step."""
import warnings

import pytest
import torch

import sparsevlm_engine as sve
from kernel_checks import DEVICE
from sparsevlm_engine.pruning import Pruner
from tiny import llava_next_prompts, llava_prompts, qwen_prompts, tiny_llava, tiny_llava_next, tiny_qwen, with_token_types

NEW_TOKENS = 4
PRESETS = {
    "v1": sve.SparseVLMConfig.v1_rank(128),
    "v1.5": sve.SparseVLMConfig.v1_5(128),
    "v1.5-no-recycling": sve.SparseVLMConfig.v1_5(96, recycling=False),
    "v1.5-original": sve.SparseVLMConfig.v1_5(128, positions="original"),
    "v2": sve.SparseVLMConfig.v2(64),
    "v2-renumber": sve.SparseVLMConfig.v2(64, recycling=True, positions="renumber"),
}


def _setup(family, dtype=torch.float32):
    if family == "llava":
        model = tiny_llava("sdpa", dtype=dtype)
        inputs = llava_prompts(before=(3, 6, 1), after=(5, 9, 7))
    elif family.startswith("qwen"):
        model = tiny_qwen(family, "sdpa", dtype=dtype)
        media = [[("image", (12, 12)), ("video", (2, 8, 8))], [("video", (2, 6, 8)), ("image", (8, 8))]]
        inputs = with_token_types(*qwen_prompts(media, before=(3, 6), after=(5, 9)))
        for key in ("pixel_values", "pixel_values_videos"):
            inputs[key] = inputs[key].to(dtype)
        return model.to(DEVICE), {k: v.to(DEVICE) for k, v in inputs.items()}
    else:
        model = tiny_llava_next("sdpa", dtype=dtype)
        inputs, _ = llava_next_prompts(model, [[28, 56], [56, 56], [56, 28]], before=(3, 6, 1), after=(5, 9, 7))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model.to(DEVICE), {k: v.to(DEVICE) for k, v in inputs.items()}


def _run(model, inputs, config, generate):
    sve.sparsify(model, config)
    with torch.no_grad():
        logits = model(**inputs).logits
        trace = sve.last_trace(model)
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) if generate else None
    sve.unsparsify(model)
    return logits, trace, generated


CASES = [("llava", preset) for preset in PRESETS] + [("llava_next", "v1.5"), ("llava_next", "v2")] + [
    (family, preset) for family in ("qwen2_vl", "qwen2_5_vl") for preset in ("v1", "v1.5", "v2")]


@pytest.mark.parametrize("family,preset", CASES)
def test_triton_backend_equals_torch_backend(family, preset):
    model, inputs = _setup(family)
    config = PRESETS[preset]
    generate = DEVICE.type == "cuda"  # interpreted kernels are slow: CPU runs compare the prefill only
    logits, trace, generated = _run(model, inputs, config.with_(backend="torch"), generate)
    t_logits, t_trace, t_generated = _run(model, inputs, config.with_(backend="triton"), generate)
    assert any(r.recycled for s in trace.samples for r in s.pruning) == config.recycling
    for sample, t_sample in zip(trace.samples, t_trace.samples):
        assert sample.rater_positions == t_sample.rater_positions
        assert sample.pruning == t_sample.pruning  # kept positions, keep counts and recycled tokens
        assert sample.final_positions == t_sample.final_positions
        assert sample.stages == t_sample.stages  # every stage's tokens, in order, and position ids
        assert sample.flops == t_sample.flops
    for b, sample in enumerate(trace.samples):
        real = slice(logits.shape[1] - len(sample.final_positions), None)
        torch.testing.assert_close(t_logits[b, real], logits[b, real], atol=1e-5, rtol=1e-5)
    if generate:
        assert torch.equal(t_generated, generated)


def test_auto_backend_follows_the_device():
    from sparsevlm_engine.backends import TorchOps, TritonOps, ops_for

    assert isinstance(ops_for("auto", torch.device("cpu")), TorchOps)
    assert isinstance(ops_for("torch", torch.device("cpu")), TorchOps)
    if torch.cuda.is_available():
        assert isinstance(ops_for("auto", torch.device("cuda")), TritonOps)


def test_triton_backend_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    from sparsevlm_engine.backends import ops_for

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs the model on a CUDA GPU"):
        ops_for("triton", torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("preset,expected_syncs", [("v1.5", 0), ("v2", 0), ("v1", 1)])
def test_a_pruning_step_synchronises_with_the_host_at_most_once(monkeypatch, preset, expected_syncs):
    model, inputs = _setup("llava", torch.bfloat16)
    counted = []
    original = Pruner.prune

    def counting_prune(self, *args, **kwargs):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # only torch's per-operation warning; setting the mode itself warns once per process
        counted.append(sum("called a synchronizing CUDA operation" in str(w.message) for w in caught))
        return result

    sve.sparsify(model, PRESETS[preset].with_(backend="auto"))
    with torch.no_grad():
        model(**inputs)  # warm-up: kernel compilation
        monkeypatch.setattr(Pruner, "prune", counting_prune)
        model(**inputs)
    assert counted == [expected_syncs] * len(sve.last_trace(model).pruning_layers)
