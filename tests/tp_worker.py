"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py), run under torchrun with gloo.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT_DIR {tp_plan,manual}

tp_plan: the model loads with transformers' tensor parallelism (DTensor shards of q/k/v/o and the
MLP). manual: the model loads whole and each rank keeps its share of every layer's attention heads
as plain tensors (q/k/v by rows, o_proj by columns with an all-reduce of its output), as a colwise /
rowwise plan splits them. Each rank writes what every config generated and kept to OUT_DIR/rank{r}.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from transformers import LlavaForConditionalGeneration  # noqa: E402

import sparsevlm_engine as sve  # noqa: E402
from tiny import llava_prompts  # noqa: E402

CONFIGS = {
    "v1.5": lambda: sve.SparseVLMConfig.v1_5(128),
    "v2": lambda: sve.SparseVLMConfig.v2(128),
    "v1-rank": lambda: sve.SparseVLMConfig.v1_rank(64),
}


def prompts():
    """Two left-padded prompts of different lengths."""
    return llava_prompts(before=(3, 6), after=(5, 9))


def outcome(model, inputs) -> dict:
    """Greedy tokens and, per sample and pruning layer, the kept and recycled tokens."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    trace = sve.last_trace(model)
    kept = [[[p.layer, list(p.kept), [[r.centre, list(r.members)] for r in p.recycled]] for p in s.pruning]
            for s in trace.samples]
    return {"tokens": out[:, inputs["input_ids"].shape[1]:].tolist(), "kept": kept}


def run_configs(model) -> dict:
    inputs = prompts()
    results = {}
    for name, make in CONFIGS.items():
        sve.sparsify(model, make())
        results[name] = outcome(model, inputs)
        sve.unsparsify(model)
    return results


def _all_reduce_output(module, args, output):
    dist.all_reduce(output)
    return output


def shard_heads(model, rank: int, world: int) -> None:
    """Keep this rank's heads of every decoder layer: q/k/v rows, o_proj columns (plain tensors)."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    for layer in model.model.language_model.layers:
        attn = layer.self_attn
        for proj, heads in ((attn.q_proj, text.num_attention_heads), (attn.k_proj, text.num_key_value_heads),
                            (attn.v_proj, text.num_key_value_heads)):
            rows = heads // world * head_dim
            proj.weight = torch.nn.Parameter(proj.weight[rank * rows:(rank + 1) * rows].clone())
            proj.out_features = rows
        cols = text.num_attention_heads // world * head_dim
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, rank * cols:(rank + 1) * cols].clone())
        attn.o_proj.in_features = cols
        attn.o_proj.register_forward_hook(_all_reduce_output)


def main(model_dir: str, out_dir: str, mode: str) -> None:
    if mode == "tp_plan":
        try:
            from transformers import DistributedConfig
            model = LlavaForConditionalGeneration.from_pretrained(
                model_dir, distributed_config=DistributedConfig(tp_plan="auto"))
        except ImportError:  # transformers 4
            model = LlavaForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto")
    else:
        dist.init_process_group("gloo")
        model = LlavaForConditionalGeneration.from_pretrained(model_dir)
        shard_heads(model, dist.get_rank(), dist.get_world_size())
    model.eval()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    local_rows = getattr(q_proj.weight, "to_local", lambda: q_proj.weight)().shape[0]
    results = {"rank": dist.get_rank(), "q_rows": local_rows, "configs": run_configs(model)}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
