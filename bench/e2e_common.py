"""Measurements shared by the end-to-end benchmarks (bench/e2e_bench.py, bench/test_e2e_bench.py):
timers, decoder and pruning-step probes, KV cache bytes, FLOPs from the trace, kept tokens.

Times are medians with p20 / p80 over repeats: CUDA events around each call (with a synchronize
after each, so a call is timed from its first launch to its last kernel) on a GPU, perf_counter
on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, prefill_flops
from sparsevlm_engine.families import family_of

from e2e_models import IMAGE_TOKEN

QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------- timing
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (after sync)."""
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3


def stats(times_ms: list[float]) -> dict:
    """median, p20, p80 (torch.quantile, as triton.testing.do_bench) and the count."""
    t = torch.tensor(times_ms, dtype=torch.float64)
    median, p20, p80 = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "n": len(times_ms)}


@dataclass
class Repeats:
    """How often to call: warm-up calls, then at least min_iters and up to max_iters calls, going
    on while less than min_time_s has passed."""

    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 50
    min_time_s: float = 1.0

    def scaled(self, factor: float) -> "Repeats":
        return Repeats(self.warmup, max(1, math.ceil(self.min_iters * factor)),
                       max(1, math.ceil(self.max_iters * factor)), self.min_time_s * factor)


def time_calls(fn, clock: Clock, repeats: Repeats, probes=(), setup=None) -> tuple[dict, list[dict]]:
    """Time fn() (ms stats) and collect each probe's per-call readings. With setup, each call is
    fn(setup()), setup() untimed."""
    if setup is not None:
        call = fn

        def fn():
            call(prepared.pop())
    prepared = []
    for _ in range(repeats.warmup):
        if setup is not None:
            prepared.append(setup())
        fn()
    clock.sync()
    times, readings = [], []
    began = time.perf_counter()
    while len(times) < repeats.min_iters or (
            len(times) < repeats.max_iters and time.perf_counter() - began < repeats.min_time_s):
        for probe in probes:
            probe.reset()
        if setup is not None:
            prepared.append(setup())
            clock.sync()
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.ms(start, end))
        readings.append({k: v for probe in probes for k, v in probe.read().items()})
    return stats(times), readings


def peak_memory(fn, clock: Clock) -> tuple[int | None, int | None]:
    """(peak bytes allocated during fn(), peak above what was allocated before) on a GPU; None on CPU."""
    if not clock.cuda:
        fn()
        return None, None
    clock.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    clock.sync()
    peak = torch.cuda.max_memory_allocated()
    return int(peak), int(peak - base)


class DecoderProbe:
    """Time spent in the decoder (the language model's forward) per call: hooks on its module."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.marks: list = []
        decoder = family_of(model).decoder(model)
        self.handles = [decoder.register_forward_pre_hook(lambda *a: self.marks.append(self.clock.mark())),
                        decoder.register_forward_hook(lambda *a: self.marks.append(self.clock.mark()))]

    def reset(self) -> None:
        self.marks = []

    def read(self) -> dict:
        pairs = zip(self.marks[0::2], self.marks[1::2])
        return {"decoder_ms": sum(self.clock.ms(a, b) for a, b in pairs)}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class PruneProbe(sve.PruningObserver):
    """Time spent in the pruning pass per call: rater selection and each pruning layer's
    scoring, selection, recycling and compaction, observed through the sparsified model's
    engine (until close). prune_steps_ms: per pruning layer, summed over the prefills of the
    call (several when a call loops over rows)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        engine = sve.engine_of(model)
        self.n_layers = len(engine.pruning_layers)
        self.starts: list = []
        self.steps: list = []
        self._open: dict = {}
        self._observing = engine.observe(self)
        self._observing.__enter__()

    def before_raters(self) -> None:
        self._open["raters"] = self.clock.mark()

    def after_raters(self) -> None:
        self.starts.append((self._open.pop("raters"), self.clock.mark()))

    def before_prune(self, layer, ops, all_queries) -> None:
        self._open[layer] = self.clock.mark()

    def after_prune(self, layer) -> None:
        self.steps.append((self._open.pop(layer), self.clock.mark()))

    def reset(self) -> None:
        self.starts.clear()
        self.steps.clear()

    def read(self) -> dict:
        start = [self.clock.ms(a, b) for a, b in self.starts]
        steps = [self.clock.ms(a, b) for a, b in self.steps]
        per_layer = [sum(steps[i::self.n_layers]) for i in range(self.n_layers)]  # summed over prefills
        return {"prune_start_ms": sum(start), "prune_steps_ms": per_layer, "prune_ms": sum(start) + sum(steps),
                "prune_calls": len(self.starts) + len(self.steps)}

    def close(self) -> None:
        self._observing.__exit__(None, None, None)


# ----------------------------------------------------------------------------- cache and FLOPs
def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache (transformers 5 layers, or 4.x key/value lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_cache_info(cache) -> dict:
    """Bytes of the cache tensors (sum over layers; each layer holds its own token count) and
    the tokens per layer."""
    layers = cache_layers(cache)
    return {"kv_cache_bytes": sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers),
            "kv_tokens_per_layer": [int(k.shape[-2]) for k, _ in layers]}


def kv_bytes_per_token(model) -> int:
    """Keys + values of one token in one layer, for the whole batch row."""
    text = getattr(model.config, "text_config", model.config)
    dims = DecoderDims.from_text_config(text)
    return 2 * dims.kv_heads * dims.head_dim * torch.tensor([], dtype=model.dtype).element_size()


def expected_kv_tokens(samples, depth: int) -> list[int]:
    """Tokens each layer's cache holds for a batch whose rows the trace describes: the widest
    row of the left-padded layout that layer ran on (real tokens: text + visual entering it)."""
    return [max(s.length - s.n_visual + s.visual_entering[layer] for s in samples) for layer in range(depth)]


def dense_samples(model, inputs: dict) -> list:
    """Per-row (length, n_visual, visual_entering) of a dense prefill, as a trace would give them."""
    text = getattr(model.config, "text_config", model.config)
    depth = text.num_hidden_layers
    rows = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        length = sum(mask)
        n_visual = sum(1 for t, m in zip(ids, mask) if m and t == IMAGE_TOKEN)
        rows.append(_Row(length, n_visual, (n_visual,) * depth))
    return rows


@dataclass
class _Row:
    length: int
    n_visual: int
    visual_entering: tuple[int, ...]


def flops_of(model, samples) -> dict:
    """Decoder prefill FLOPs summed over rows: paper formula (MACs) and exact, dense and sparse,
    the pruning's own, and the ratios dense / sparse (exact: pruning included)."""
    text = getattr(model.config, "text_config", model.config)
    dims = DecoderDims.from_text_config(text)
    total = {"dense_paper": 0.0, "sparse_paper": 0.0, "dense_exact": 0.0, "sparse_exact": 0.0, "pruning": 0.0}
    for s in samples:
        report = getattr(s, "flops", None) or prefill_flops(s.length, s.visual_entering, dims, 0.0)
        for key in total:
            total[key] += getattr(report, key)
    total["ratio_paper"] = total["dense_paper"] / total["sparse_paper"]
    total["ratio_exact"] = total["dense_exact"] / (total["sparse_exact"] + total["pruning"])
    return total


def kept_records(samples) -> list:
    """Per row, per pruning layer: (layer, kept positions, recycled (centre, members))."""
    return [[(r.layer, r.kept, sorted((t.centre, t.members) for t in r.recycled)) for r in s.pruning]
            for s in samples]

