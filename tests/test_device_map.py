"""Models spread by device_map / accelerate hooks: a sparsified model whose layers are offloaded
(weights on the meta device between forwards, loaded by accelerate's hooks) prunes and generates
exactly as the same model held in memory; and the per-stage tensors the engine hands a layer are
moved to that layer's device (sparsevlm_engine/placement.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import sparsevlm_engine as sve
from sparsevlm_engine.layout import Layout, Stage
from sparsevlm_engine.placement import execution_device, moved, stage_tensors
from tiny import llava_prompts, tiny_llava

CONFIGS = {"v1.5": lambda: sve.SparseVLMConfig.v1_5(128), "v2": lambda: sve.SparseVLMConfig.v2(128),
           "v1-rank": lambda: sve.SparseVLMConfig.v1_rank(64)}


def _run(model, config):
    """(prefill logits, greedy tokens, kept / recycled tokens per sample and pruning layer)."""
    sve.sparsify(model, config)
    inputs = llava_prompts(before=(3, 6), after=(5, 9))
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    kept = [[(p.kept, p.recycled) for p in s.pruning] for s in sve.last_trace(model).samples]
    sve.unsparsify(model)
    return logits, tokens, kept


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(path)
    in_memory = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return path, {name: _run(in_memory, make()) for name, make in CONFIGS.items()}


def _check(model, expected):
    for name, make in CONFIGS.items():
        logits, tokens, kept = _run(model, make())
        want_logits, want_tokens, want_kept = expected[name]
        assert kept == want_kept, name
        assert torch.equal(tokens, want_tokens), name
        assert torch.equal(logits, want_logits), name


def test_disk_offloaded_layers(saved, tmp_path):
    """device_map: pruning layer 1 and every odd layer offloaded to disk, the rest in memory
    (the scoring reads a pruning layer's weights after its forward, when the hook has put them
    back on meta)."""
    path, expected = saved
    device_map = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector", "lm_head",
                                           "model.language_model.embed_tokens", "model.language_model.norm",
                                           "model.language_model.rotary_emb")}
    device_map.update({f"model.language_model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(8)})
    model = LlavaForConditionalGeneration.from_pretrained(path, device_map=device_map,
                                                          offload_folder=str(tmp_path / "offload")).eval()
    layers = model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert layers[2].self_attn.q_proj.weight.device.type == "cpu"
    _check(model, expected)
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"  # offloaded again after the scoring


def test_cpu_offload_hooks_on_every_module(saved):
    """accelerate.cpu_offload: a hook on each module with weights (q_proj, input_layernorm, ...)."""
    from accelerate import cpu_offload

    path, expected = saved
    model = cpu_offload(LlavaForConditionalGeneration.from_pretrained(path).eval(), execution_device="cpu")
    attn = model.model.language_model.layers[1].self_attn
    assert attn.q_proj.weight.device.type == "meta" and hasattr(attn.q_proj, "_hf_hook")
    _check(model, expected)


def _stage(device="cpu"):
    t = torch.arange(6, device=device).view(1, 6)
    layout = Layout(src=t, pos=t, valid=t > 0, visual=t > 2, rater=t > 4)
    return Stage(first_layer=3, layout=layout, mask=torch.ones(1, 6, dtype=torch.bool, device=device),
                 cos=torch.rand(1, 6, 4, device=device), sin=torch.rand(1, 6, 4, device=device), position_ids=t)


def test_stage_tensors_follow_the_layer_device():
    """On its own device a stage hands out its own tensors (no copy); on another, copies made once."""
    stage = _stage()
    own = (stage.mask, stage.cos, stage.sin, stage.position_ids)
    assert all(a is b for a, b in zip(stage_tensors(stage, torch.device("cpu")), own))
    assert stage.copies == {}
    meta = stage_tensors(stage, torch.device("meta"))
    assert [t.device.type for t in meta] == ["meta"] * 4
    assert [t.shape for t in meta] == [t.shape for t in own]
    assert all(a is b for a, b in zip(stage_tensors(stage, torch.device("meta")), meta))  # kept, not re-copied


def test_execution_device_reads_accelerate_hooks():
    """A layer's device: its accelerate hook's execution device, else where its input is."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module

    hidden = torch.zeros(1, 2, 4)
    layer = torch.nn.Linear(4, 4)
    assert execution_device(layer, hidden) == torch.device("cpu")
    add_hook_to_module(layer, AlignDevicesHook(execution_device="meta"))
    assert execution_device(layer, hidden) == torch.device("meta")
    other = torch.nn.Linear(4, 4)
    other._hf_hook = SequentialHook(AlignDevicesHook(), AlignDevicesHook(execution_device="meta"))
    assert execution_device(other, hidden) == torch.device("meta")


def test_decode_kwargs_moved_to_the_layer_device():
    mask, cos, sin = torch.ones(1, 5, dtype=torch.bool), torch.rand(1, 1, 4), torch.rand(1, 1, 4)
    changes = {"attention_mask": mask, "position_embeddings": (cos, sin)}
    same = moved(changes, torch.device("cpu"))
    assert same["attention_mask"] is mask and all(a is b for a, b in zip(same["position_embeddings"], (cos, sin)))
    other = moved(changes, torch.device("meta"))
    assert other["attention_mask"].device.type == "meta"
    assert [t.device.type for t in other["position_embeddings"]] == ["meta", "meta"]
