"""Tensor parallelism: two gloo ranks on CPU, each holding half of every layer's attention heads,
keep the same tokens as each other and as one unsharded process, and generate the same tokens.

Each test launches tests/tp_worker.py under torchrun (2 processes) on a tiny LLaVA saved by the
test: once sharded by transformers' tp_plan (DTensor parameters), once sharded by hand with plain
tensors. Scoring each rank's own heads alone makes the ranks keep different tokens; the engine
gathers the per-head relevance of all heads at every pruning layer (sparsevlm_engine/distributed.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import tp_worker
from sparsevlm_engine.distributed import head_shards
from tiny import tiny_llava

WORKER = Path(__file__).with_name("tp_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model dir, what one unsharded process generates and keeps with each config)."""
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(path)
    single = tp_worker.run_configs(LlavaForConditionalGeneration.from_pretrained(path).eval())
    return path, single


def _launch(model_dir: Path, out_dir: Path, mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(WORKER), str(model_dir), str(out_dir), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _check(ranks: list[dict], single: dict) -> None:
    heads, head_dim = 4, 8  # tests/tiny.py
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    assert [r["q_rows"] for r in ranks] == [heads * head_dim // WORLD] * WORLD  # really sharded
    for name, expected in single.items():
        assert all(any(len(p[1]) < 64 for p in sample) for sample in expected["kept"]), name  # it pruned
        for r in ranks:
            assert r["configs"][name]["kept"] == expected["kept"], (name, r["rank"])
            assert r["configs"][name]["tokens"] == expected["tokens"], (name, r["rank"])


@pytest.mark.tf5_only
def test_tp_plan_ranks_keep_what_one_process_keeps(saved, tmp_path):
    """from_pretrained(distributed_config=DistributedConfig(tp_plan="auto")): q/k/v/o and the MLP
    are DTensor shards; v1.5 (recycling), v2 (priority heads, gravity) and v1 (rank mode)."""
    model_dir, single = saved
    _check(_launch(model_dir, tmp_path, "tp_plan"), single)


def test_hand_sharded_heads_keep_what_one_process_keeps(saved, tmp_path):
    """Heads split with plain tensors (no DTensor, the default process group)."""
    model_dir, single = saved
    _check(_launch(model_dir, tmp_path, "manual"), single)


def test_one_process_has_no_head_shards():
    """Without a process group the engine does no collective, whatever the model."""
    assert not torch.distributed.is_initialized()
    attn = tiny_llava().model.language_model.layers[0].self_attn
    assert head_shards(None, attn, heads=4, head_dim=8) is None
