"""What the engine's hooks cost where host time dominates: a tiny model on CPU (32 decoder layers).

Two cases, each timed side by side in one run against an unsparsified copy of the same model
(identical weights), rounds interleaved so that both see the same machine state:

- decode: greedy decode steps over a cache the sparsified model pruned (v1.5, budget 128) vs
  the dense model's steps over its full cache;
- no-prune prefill: a sparsified model whose budget covers every visual token (576), which
  runs dense, vs the unsparsified model.

The target is a ratio (sparsified / unsparsified median) of at most 1.05; it is reported in the
benchmark's extra_info (`--benchmark-json`), never asserted: timings vary by machine. With
`--benchmark-disable` (CI) each case runs once and only its exactness is checked.

    python -m pytest -q bench/test_hook_overhead.py --benchmark-json hook_overhead.json
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

import sparsevlm_engine as sve
from e2e_inputs import decode_steps, make_inputs
from e2e_models import build_model

SHAPE = "llava-1.5-tiny"
ROUNDS = 15
STEPS = 8
TARGET = 1.05


@pytest.fixture(scope="module")
def dense():
    return build_model(SHAPE, "cpu")


def _sparsified(model, config):
    return sve.sparsify(copy.deepcopy(model), config)


def _interleaved(calls: dict, rounds: int) -> dict:
    """Median seconds of each zero-argument callable, timed in alternation."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _report(benchmark, medians: dict) -> float:
    ratio = medians["sparsified"] / medians["unsparsified"]
    benchmark.extra_info.update({f"{name}_median_s": t for name, t in medians.items()})
    benchmark.extra_info.update(ratio=ratio, target=TARGET, meets_target=ratio <= TARGET)
    return ratio


def _prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_overhead(benchmark, dense, batch):
    inputs = make_inputs(dense, SHAPE, batch, seed=3)
    sparse = _sparsified(dense, sve.SparseVLMConfig.v1_5(128))
    models = {"unsparsified": dense, "sparsified": sparse}
    prefills = {name: [] for name in models}

    def decode(name, steps=STEPS):
        return decode_steps(models[name], inputs, prefills[name].pop(), steps)

    rounds = 1 if benchmark.disabled else ROUNDS
    for name, model in models.items():  # each timed round decodes over a prefill of its own
        prefills[name] = [_prefill(model, inputs) for _ in range(rounds + 2)]
    assert all(len(r.pruning) == 3 for r in sve.last_trace(sparse).samples)  # its cache is pruned
    benchmark.pedantic(decode, args=("sparsified", 1), rounds=1, iterations=1)
    if not benchmark.disabled:
        medians = _interleaved({name: (lambda n=name: decode(n)) for name in models}, rounds)
        _report(benchmark, {name: t / STEPS for name, t in medians.items()})
    assert decode("sparsified").shape == decode("unsparsified").shape == (batch, STEPS)


@pytest.mark.parametrize("batch", [1, 4])
def test_no_prune_prefill_overhead(benchmark, dense, batch):
    inputs = make_inputs(dense, SHAPE, batch, seed=4)
    sparse = _sparsified(dense, sve.SparseVLMConfig.v1_5(576))
    calls = {"unsparsified": lambda: _prefill(dense, inputs), "sparsified": lambda: _prefill(sparse, inputs)}
    out = benchmark.pedantic(calls["sparsified"], rounds=1, iterations=1)
    assert torch.equal(out.logits, calls["unsparsified"]().logits)  # no pruning: exactly the dense model
    assert all(not s.pruning for s in sve.last_trace(sparse).samples)
    if not benchmark.disabled:
        _report(benchmark, _interleaved(calls, ROUNDS))
