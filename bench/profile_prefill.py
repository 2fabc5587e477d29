"""Profile one dense and one sparse prefill of the LLaVA-1.5-7B-shaped model (CUDA): the ops
that take the most GPU and CPU time, and every host synchronisation the sparse pass makes.

    python bench/profile_prefill.py [--preset v1.5] [--budget 128]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sparsevlm_engine as sve
from kernel_bench import llava_7b_shaped, llava_inputs

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def profile_forward(model, inputs, label):
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\n==== {label}: top ops by GPU time")
    print(events.table(sort_by="self_cuda_time_total", row_limit=15))
    print(f"==== {label}: top ops by CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    syncs = [(e.key, e.count) for e in events if any(s in e.key for s in SYNC_CALLS)]
    print(f"==== {label}: synchronising calls {syncs}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="v1.5")
    parser.add_argument("--budget", type=int, default=128)
    args = parser.parse_args()
    model = llava_7b_shaped()
    inputs = llava_inputs(1)
    profile_forward(model, inputs, "dense")
    sve.sparsify(model, sve.SparseVLMConfig.preset(args.preset, args.budget))
    profile_forward(model, inputs, f"sparse {args.preset} budget {args.budget}")


if __name__ == "__main__":
    main()
