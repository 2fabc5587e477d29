"""End-to-end benchmark suite (pytest-benchmark) and the checks behind its figures.

On a CUDA GPU the timed cases run a random-weight LLaVA-1.5-7B-shaped model in bf16; on CPU a
tiny one (64 visual tokens, 32 decoder layers) in fp32, so CI runs them with
`--benchmark-disable` (each case once, its assertions still checked):

    python -m pytest -q bench/test_e2e_bench.py --benchmark-disable     # CI, CPU
    python -m pytest -q bench/test_e2e_bench.py                          # timings (GPU)

Timed: prefill (dense, v1.5 and v2 at budgets 192 / 128 / 96 / 64, batch 1 / 8 / 32, left
padded; sdpa, and flash_attention_2 when flash-attn is installed), generate (every budget on a
GPU, budget 128 on CPU), and the authors-style baseline (one row at a time). Each asserts what the
figures rest on: KV cache tokens per layer equal to the trace's, FLOPs ratios, kept tokens.
The plain tests run the tiny models on CPU whatever the machine.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, decoder_flops
from authors_style import AuthorsStyleOps, authors_style
from e2e_common import (Clock, DecoderProbe, PruneProbe, dense_samples, expected_kv_tokens, flops_of, kept_records,
                        kv_bytes_per_token, kv_cache_info)
from e2e_inputs import generate, make_inputs, prefill, split_samples
from e2e_models import build_model, config_for, flash_attn_available, set_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = "llava-1.5-7b" if CUDA else "llava-1.5-tiny"
BATCHES = (1, 8, 32)
BUDGETS = (192, 128, 96, 64)
PRESETS = ("v1.5", "v2")
SPARSE = [(p, b) for p in PRESETS for b in BUDGETS]
PROVIDERS = [("dense", None)] + SPARSE
GENERATE_PROVIDERS = PROVIDERS if CUDA else [("dense", None), ("v1.5", 128), ("v2", 128)]
ATTNS = ["sdpa"] + (["flash_attention_2"] if flash_attn_available() else [])
NEW_TOKENS = 64
ROUNDS = dict(rounds=10, warmup_rounds=2) if CUDA else dict(rounds=2, warmup_rounds=0)
LOOP_ROUNDS = dict(rounds=3, warmup_rounds=1) if CUDA else ROUNDS  # generate, and the row-by-row loop


def provider_id(provider):
    preset, budget = provider
    return "dense" if budget is None else f"{preset}-{budget}"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def model():
    m = build_model(SHAPE, DEVICE)
    yield m
    sve.unsparsify(m)
    del m
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def inputs(model):
    return {b: make_inputs(model, SHAPE, b) for b in BATCHES}


@pytest.fixture
def configured(model):
    """Sparsify the module's model for one test (or leave it dense), and always undo it."""
    def apply(provider, attn="sdpa"):
        preset, budget = provider
        sve.unsparsify(model)
        set_attention(model, attn)
        if budget is not None:
            sve.sparsify(model, config_for(preset, budget))
        return model
    yield apply
    sve.unsparsify(model)
    set_attention(model, "sdpa")


def _check_cache(model, batch_inputs, out):
    """The cache holds, per layer, exactly the tokens the trace says that layer ran on."""
    depth = model.config.text_config.num_hidden_layers
    samples = sve.last_trace(model).samples if sve.is_sparsified(model) else dense_samples(model, batch_inputs)
    info = kv_cache_info(out.past_key_values)
    expected = expected_kv_tokens(samples, depth)
    assert info["kv_tokens_per_layer"] == expected
    rows = batch_inputs["input_ids"].shape[0]
    assert info["kv_cache_bytes"] == rows * kv_bytes_per_token(model) * sum(expected)
    return samples, info


# ----------------------------------------------------------------------------- timed
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("provider", PROVIDERS, ids=provider_id)
@pytest.mark.parametrize("attn", ATTNS)
def test_prefill(benchmark, model, inputs, configured, attn, provider, batch):
    configured(provider, attn)
    batch_inputs = inputs[batch]

    def run():
        out = prefill(model, batch_inputs)
        _sync()
        return out

    out = benchmark.pedantic(run, **ROUNDS)
    assert torch.isfinite(out.logits).all()
    samples, info = _check_cache(model, batch_inputs, out)
    flops = flops_of(model, samples)
    if provider[1] is None:
        assert flops["ratio_exact"] == 1.0 and flops["ratio_paper"] == 1.0
        assert info["kv_tokens_per_layer"] == [batch_inputs["input_ids"].shape[1]] * len(info["kv_tokens_per_layer"])
    else:
        assert flops["ratio_exact"] > 1.5 and flops["ratio_paper"] > flops["ratio_exact"] * 0.9
        assert max(info["kv_tokens_per_layer"][-1:]) < batch_inputs["input_ids"].shape[1]
    benchmark.extra_info.update(flops_ratio_exact=flops["ratio_exact"], kv_cache_bytes=info["kv_cache_bytes"])


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("provider", GENERATE_PROVIDERS, ids=provider_id)
@pytest.mark.parametrize("attn", ATTNS)
def test_generate(benchmark, model, inputs, configured, attn, provider, batch):
    configured(provider, attn)
    batch_inputs = inputs[batch]

    def run():
        with torch.no_grad():
            out = model.generate(**batch_inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, return_dict_in_generate=True)
        _sync()
        return out

    out = benchmark.pedantic(run, **LOOP_ROUNDS)
    length = batch_inputs["input_ids"].shape[1]
    assert out.sequences.shape == (batch, length + NEW_TOKENS)
    depth = model.config.text_config.num_hidden_layers
    samples = sve.last_trace(model).samples if sve.is_sparsified(model) else dense_samples(model, batch_inputs)
    prefill_tokens = expected_kv_tokens(samples, depth)
    # each layer's cache: its own prefill tokens, then one per decode step (the last token is not fed back)
    assert kv_cache_info(out.past_key_values)["kv_tokens_per_layer"] == [t + NEW_TOKENS - 1 for t in prefill_tokens]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("provider", SPARSE, ids=provider_id)
def test_authors_style_prefill(benchmark, model, inputs, configured, provider, batch):
    configured(provider)
    rows = split_samples(inputs[batch])
    engine = []
    for row in rows:
        prefill(model, row)
        engine += sve.last_trace(model).samples

    def loop():
        for row in rows:
            prefill(model, row)
        _sync()

    with authors_style(model):
        benchmark.pedantic(loop, **LOOP_ROUNDS)
        theirs = []
        for row in rows:
            out = prefill(model, row)
            samples, _ = _check_cache(model, row, out)
            theirs += samples
    counts = [[[r.visual_after for r in s.pruning] for s in rows] for rows in (theirs, engine)]
    assert counts[0] == counts[1]
    same = sum(a == b for x, y in zip(kept_records(theirs), kept_records(engine)) for a, b in zip(x, y))
    total = sum(len(s.pruning) for s in engine)
    benchmark.extra_info.update(records_identical=same / total)
    if not CUDA:  # fp32: the same method keeps exactly the same tokens (bf16 logits may flip near-ties)
        assert same == total


# ----------------------------------------------------------------------------- plain checks (CPU, tiny)
@pytest.fixture(scope="module")
def tiny():
    return build_model("llava-1.5-tiny", "cpu")


@pytest.fixture(scope="module")
def tiny_next():
    return build_model("llava-next-tiny", "cpu")


@pytest.mark.parametrize("preset,budget", [("v1.5", 192), ("v1.5", 96), ("v2", 128), ("v2", 64)])
@pytest.mark.parametrize("shape", ["llava-1.5-tiny", "llava-next-tiny"])
def test_authors_style_keeps_the_engines_tokens(request, shape, preset, budget, monkeypatch):
    """The baseline is the same method: rows scored from full [H, L, L] softmax matrices keep the
    tokens the engine keeps from its rater rows, in a padded batch, one row at a time."""
    model = request.getfixturevalue("tiny" if shape == "llava-1.5-tiny" else "tiny_next")
    batch = make_inputs(model, shape, 3, seed=7)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # left padded, rows of different lengths
    sve.sparsify(model, config_for(preset, budget))
    calls = []
    real = AuthorsStyleOps._rater_probs
    monkeypatch.setattr(AuthorsStyleOps, "_rater_probs", lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    try:
        prefill(model, batch)
        engine = kept_records(sve.last_trace(model).samples)
        engine_state = sve.engine_of(model)
        theirs = []
        with authors_style(model):
            for row in split_samples(batch):
                prefill(model, row)
                theirs += kept_records(sve.last_trace(model).samples)
        assert engine_state.observers == ()
    finally:
        sve.unsparsify(model)
    assert len(calls) == 3 * len(engine)  # the full matrices were built at every pruning layer of every row
    assert any(r[2] for row in engine for r in row) == (preset == "v1.5")  # recycled tokens compared too
    assert theirs == engine


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", ["llava-1.5-tiny", "llava-next-tiny"])
def test_kv_cache_shrinks_by_the_removed_tokens(request, shape, batch):
    """Per layer, the sparse cache holds the dense one minus the visual tokens removed before that
    layer (the widest row's, when padded), times the bytes of one token."""
    model = request.getfixturevalue("tiny" if shape == "llava-1.5-tiny" else "tiny_next")
    batch_inputs = make_inputs(model, shape, batch, seed=3)
    dense = kv_cache_info(prefill(model, batch_inputs).past_key_values)
    sve.sparsify(model, config_for("v1.5", 128))
    try:
        sparse = kv_cache_info(prefill(model, batch_inputs).past_key_values)
        samples = sve.last_trace(model).samples
    finally:
        sve.unsparsify(model)
    per_token = kv_bytes_per_token(model) * batch
    width = batch_inputs["input_ids"].shape[1]
    assert dense["kv_tokens_per_layer"] == [width] * len(dense["kv_tokens_per_layer"])
    for layer, (d, s) in enumerate(zip(dense["kv_tokens_per_layer"], sparse["kv_tokens_per_layer"])):
        removed = min(x.n_visual - x.visual_entering[layer] + width - x.length for x in samples)
        assert d - s == removed
    removed_total = sum(d - s for d, s in zip(dense["kv_tokens_per_layer"], sparse["kv_tokens_per_layer"]))
    assert removed_total > 0
    assert dense["kv_cache_bytes"] - sparse["kv_cache_bytes"] == removed_total * per_token
    if batch == 1:
        sample = samples[0]
        assert removed_total == sum(sample.n_visual - v for v in sample.visual_entering)


def test_flops_ratio_matches_the_cache(tiny):
    """The trace's decoder FLOPs equal those of the token counts the cache actually holds."""
    batch_inputs = make_inputs(tiny, "llava-1.5-tiny", 1, seed=4)
    sve.sparsify(tiny, config_for("v2", 96))
    try:
        out = prefill(tiny, batch_inputs)
        sample = sve.last_trace(tiny).samples[0]
    finally:
        sve.unsparsify(tiny)
    dims = DecoderDims.from_text_config(tiny.config.text_config)
    tokens = kv_cache_info(out.past_key_values)["kv_tokens_per_layer"]
    paper, exact = decoder_flops(tokens, dims)
    assert sample.flops.sparse_exact == exact and sample.flops.sparse_paper == paper
    dense_paper, dense_exact = decoder_flops([sample.length] * len(tokens), dims)
    flops = flops_of(tiny, [sample])
    assert flops["ratio_exact"] == pytest.approx(dense_exact / (exact + sample.flops.pruning), rel=1e-12)
    assert flops["ratio_paper"] == pytest.approx(dense_paper / paper, rel=1e-12)
    assert 1.5 < flops["ratio_exact"] < flops["ratio_paper"]


def test_probes_time_every_pruning_step_and_clean_up(tiny):
    batch_inputs = make_inputs(tiny, "llava-1.5-tiny", 2, seed=5)
    sve.sparsify(tiny, config_for("v1.5", 64))
    try:
        clock = Clock("cpu")
        probes = [DecoderProbe(tiny, clock), PruneProbe(tiny, clock)]
        for p in probes:
            p.reset()
        prefill(tiny, batch_inputs)
        prefill(tiny, batch_inputs)
        reading = {k: v for p in probes for k, v in p.read().items()}
        for p in probes:
            p.close()
        assert sve.engine_of(tiny).observers == ()
        layers = sve.last_trace(tiny).pruning_layers
    finally:
        sve.unsparsify(tiny)
    assert reading["prune_calls"] == 2 * (1 + len(layers))
    assert len(reading["prune_steps_ms"]) == len(layers) and all(t > 0 for t in reading["prune_steps_ms"])
    assert 0 < reading["prune_ms"] < reading["decoder_ms"]


def test_generate_makes_exactly_the_new_tokens(tiny):
    batch_inputs = make_inputs(tiny, "llava-1.5-tiny", 2, seed=6)
    out = generate(tiny, batch_inputs, 5)
    assert out.shape[1] == batch_inputs["input_ids"].shape[1] + 5


# ----------------------------------------------------------------------------- the script
def _png(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_script_writes_every_figure_for_every_case(tmp_path):
    import e2e_bench
    import e2e_figures

    argv = ["--device", "cpu", "--shapes", "llava-1.5-tiny", "--batches", "1", "3", "--budgets", "128", "64",
            "--new-tokens", "3", "--repeats-scale", "0.34", "--out", str(tmp_path)]
    results = e2e_bench.main(argv)
    assert results["failures"] == 0
    data = json.loads((tmp_path / "e2e_cpu.json").read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "transformers", "date", "python"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    expected = {e2e_figures.case_id("llava-1.5-tiny", "sdpa", b, "dense") for b in (1, 3)}
    expected |= {e2e_figures.case_id("llava-1.5-tiny", "sdpa", b, p, preset, budget) for b in (1, 3)
                 for p in ("sparsevlm", "authors-style") for preset in ("v1.5", "v2") for budget in (128, 64)}
    assert set(data["cases"]) == expected
    for cid, case in data["cases"].items():
        fig = case["figures"]
        assert set(fig) >= set(e2e_figures.FIGURES[case["provider"]]), cid
        missing = {k for k in e2e_figures.FIGURES[case["provider"]] if fig[k] is None}
        assert missing == set(case["not_measured"]), cid
        assert missing <= set(e2e_figures.MEMORY_FIGURES), (cid, missing)  # CPU: only GPU memory is not measured
        assert fig["kv_cache_bytes"] == fig["kv_expected_bytes"] and fig["kv_cache_bytes"] > 0
        p = fig["prefill_ms"]
        assert p["p20_ms"] <= p["median_ms"] <= p["p80_ms"]
        if case["provider"] != "dense":
            dense = data["cases"][e2e_figures.case_id("llava-1.5-tiny", "sdpa", case["batch"], "dense")]["figures"]
            assert fig["speedup_vs_dense"] == pytest.approx(dense["prefill_ms"]["median_ms"] / p["median_ms"])
            ratio = fig["speedup_vs_dense"] / fig["flops"]["ratio_exact"]
            assert fig["speedup_over_flops_ratio"] == pytest.approx(ratio)
            assert fig["kv_ratio_vs_dense"] == pytest.approx(fig["kv_ratio_expected"]) and fig["kv_ratio_vs_dense"] < 1
            assert 0 < fig["prune_share"] < 1
        if case["provider"] == "authors-style":
            assert fig["kept_identical"] == 1.0 and fig["kept_overlap"] == 1.0
    assert [t["status"] for t in data["targets"]] == ["not-measured"] * len(data["targets"])
    kv = [t for t in data["targets_informational"] if t["target"].startswith("KV cache")]
    assert kv and all(t["status"] == "PASS" for t in kv)
    assert len(data["end_to_end_ratios"]) == 8
    for name in data["plots"]:
        width, height = _png(tmp_path / name)
        assert width > 300 and height > 200

    # --resume keeps what is there and adds the new cases
    e2e_bench.main(argv[:6] + ["--batches", "1", "--budgets", "96", "--presets", "v2", "--no-authors",
                               "--new-tokens", "3", "--repeats-scale", "0.34", "--out", str(tmp_path), "--resume"])
    again = json.loads((tmp_path / "e2e_cpu.json").read_text())
    assert set(again["cases"]) == expected | {e2e_figures.case_id("llava-1.5-tiny", "sdpa", 1, "sparsevlm", "v2", 96)}
    assert again["cases"][e2e_figures.case_id("llava-1.5-tiny", "sdpa", 1, "dense")] == data["cases"][
        e2e_figures.case_id("llava-1.5-tiny", "sdpa", 1, "dense")]


def _fake_results(device_type="cuda", good=True, kv_off=False):
    """Measured-looking cases of LLaVA-1.5-7B: every target met (good) or every one missed."""
    import e2e_figures

    cases = {}

    def add(attn, batch, provider, preset=None, budget=None, **fig):
        base = {"kv_cache_bytes": 10, "kv_expected_bytes": 11 if kv_off and provider != "dense" else 10,
                "kv_tokens_per_layer": [5], "kv_expected_tokens_per_layer": [5], "flops": {"ratio_exact": 2.5},
                "kv_ratio_vs_dense": 0.4, "kv_ratio_expected": 0.4, "speedup_vs_dense": 2.0,
                "decoder_speedup_over_flops_ratio": 0.9}
        cid = e2e_figures.case_id("llava-1.5-7b", attn, batch, provider, preset, budget)
        cases[cid] = {"shape": "llava-1.5-7b", "attn": attn, "batch": batch, "provider": provider, "preset": preset,
                      "budget": budget, "figures": base | fig}

    def pick(met, missed):
        return met if good else missed

    for batch in (1, 8, 32):
        add("sdpa", batch, "dense")
    add("sdpa+compiled", 1, "dense")
    memory = {"peak_mem_prefill_ratio_vs_dense": pick(0.97, 1.01), "peak_mem_generate_ratio_vs_dense": pick(1.0, 1.2)}
    add("sdpa", 1, "sparsevlm", "v1.5", 128, speedup_vs_dense=pick(1.25, 1.1), speedup_vs_authors=pick(5.0, 0.9),
        prune_step_share_of_dense=pick(0.015, 0.021), **memory)
    add("sdpa", 8, "sparsevlm", "v1.5", 128, speedup_over_flops_ratio=pick(0.91, 0.89),
        speedup_vs_authors=pick(3.2, 2.9), **memory)
    add("sdpa", 32, "sparsevlm", "v1.5", 128, throughput_ratio_vs_dense=pick(2.1, 1.9),
        decode_step_ratio_vs_dense=pick(0.7, 0.81))
    add("sdpa+compiled", 1, "sparsevlm", "v1.5", 128, speedup_over_flops_ratio=pick(0.86, 0.84))
    return {"environment": {"device_type": device_type, "device": "fake"}, "cases": cases}


def test_targets_are_computed_from_the_figures():
    import e2e_targets

    lines = e2e_targets.evaluate_targets(_fake_results())
    status = {(t["attn"], t["target"]): t["status"] for t in lines}
    assert len(status) == len(lines) == 13
    assert set(status.values()) == {"PASS"}, status
    compiled = [t for t in lines if t["attn"] == "sdpa+compiled"]
    assert len(compiled) == 1 and "0.860" in compiled[0]["detail"]
    missed = e2e_targets.evaluate_targets(_fake_results(good=False, kv_off=True))
    assert [t["status"] for t in missed] == ["FAIL"] * 13, [(t["target"], t["status"]) for t in missed]
    slow = next(t for t in missed if t["target"].startswith("faster than the authors"))
    assert "B1 sparsevlm v1.5 128" in slow["detail"]
    cpu = e2e_targets.evaluate_targets(_fake_results(device_type="cpu"))
    assert [t["status"] for t in cpu] == ["not-measured"] * 13
    without = _fake_results()
    del without["cases"]["llava-1.5-7b/sdpa/B32/sparsevlm/v1.5/128"]
    gone = {t["target"]: t for t in e2e_targets.evaluate_targets(without)}
    assert gone["batch 32: decode time per token <= 0.8 x dense (budget 128)"]["status"] == "not-measured"
