"""Config validation, presets, schedules and FLOPs accounting, and the inputs a sparsified
Qwen model checks before its vision tower runs."""
import math
import re

import numpy as np
import pytest
import torch

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, layer_flops_exact, layer_macs_paper, prefill_flops
from sparsevlm_engine.schedule import (SCHEDULE_TABLES, V1_LAYERS, default_pruning_layers, derive_schedule,
                                       layer_averaged_tokens, scale_count, schedule_counts)
from tiny import llava_prompts, tiny_llava


def test_presets():
    v15, v2, v1 = sve.SparseVLMConfig.v1_5(192), sve.SparseVLMConfig.v2(96), sve.SparseVLMConfig.v1_rank(64)
    assert (v15.schedule, v15.recycling, v15.priority_heads, v15.rope_gravity) == ("v1.5", True, False, False)
    assert (v2.schedule, v2.recycling, v2.priority_heads, v2.rope_gravity) == ("v2.0", False, True, True)
    assert (v1.mode, v1.recycling, v1.rank_coefficients) == ("rank", True, (0.8, 0.0))
    assert sve.SparseVLMConfig.v1_rank(100, scale=2.0, bias=1.0).rank_coefficients == (2.0, 1.0)
    assert sve.SparseVLMConfig.preset("v2", 64) == sve.SparseVLMConfig.v2(64)


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0}, "budget must be > 0"),
    ({"budget": -5}, "budget must be > 0"),
    ({"mode": "topk"}, "mode must be one of"),
    ({"schedule": "v3"}, "schedule must be one of"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"mode": "rank", "budget": 100}, "rank_scale and rank_bias"),
    ({"pruning_layers": (6, 2)}, "ascending"),
    ({"keep_counts": (10, 5), "pruning_layers": (1, 2, 3)}, "keep_counts has 2"),
    ({"budget": 30}, "below 54.9"),
    ({"keep_fraction": 0.0}, "keep_fraction must be in"),
    ({"keep_fraction": 1.5}, "keep_fraction must be in"),
    ({"keep_fraction": 0.5, "mode": "rank"}, "keep_fraction needs schedule mode"),
    ({"keep_fraction": 0.05}, "keep_fraction 0.05 is too small: budget 28.8 is below 54.9"),
    ({"cluster_divisor": 1}, "cluster_divisor must be >= 2"),
    ({"cluster_divisor": 0}, "cluster_divisor must be >= 2"),
    ({"reference_visual_tokens": 1}, "reference_visual_tokens must be >= 2"),
    ({"reference_visual_tokens": 200}, "gives the v1.5 counts (303, 110, 36), not all below"),
    ({"keep_counts": (600, 700, 800)}, "keep_counts must be in 1..575"),
    ({"keep_counts": (576,)}, "keep_counts must be in 1..575"),
    ({"keep_counts": (0,)}, "keep_counts must be in 1..575"),
    ({"keep_counts": (100,), "reference_visual_tokens": 100}, "keep_counts must be in 1..99"),
    ({"keep_counts": (100, 200)}, "keep_counts must not increase"),
    ({"keep_counts": (40, 30, 20, 10)}, "default pruning layers are at most 3"),
    ({"keep_counts": (100,), "keep_fraction": 0.5}, "keep_counts and keep_fraction both set the counts"),
    ({"keep_counts": ()}, "keep_counts must not be empty"),
    ({"keep_counts": 100}, "keep_counts must be a sequence of ints"),
    ({"keep_counts": (100,), "mode": "rank", "budget": 64}, "keep_counts needs schedule mode"),
    ({"pruning_layers": (2, 2)}, "distinct"),
    ({"pruning_layers": (-1, 2)}, ">= 0"),
    ({"pruning_layers": "26"}, "pruning_layers must be a sequence of ints"),
    ({"mode": "rank", "rank_scale": 0.0, "rank_bias": 1.0}, "rank_scale must be > 0"),
    ({"mode": "rank", "rank_scale": -1.0, "rank_bias": 1.0}, "rank_scale must be > 0"),
    ({"mode": "rank", "rank_scale": 2.0}, "both rank_scale and rank_bias"),
    ({"rank_scale": 2.0, "rank_bias": 1.0}, "rank_scale and rank_bias need rank mode"),
    ({"recycle_ratio": 0.0}, "recycle_ratio must be in (0, 1]"),
    ({"recycle_ratio": 1.01}, "recycle_ratio must be in (0, 1]"),
    ({"recycle_ratio": None}, "recycle_ratio must be a finite number"),
    ({"priority_head_fraction": 0.0}, "priority_head_fraction must be in (0, 1]"),
    ({"mode": ["rank"]}, "mode must be one of"),
    ({"schedule": ["v1.5"]}, "schedule must be one of"),
    ({"backend": None}, "backend must be one of"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        sve.SparseVLMConfig(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        sve.SparseVLMConfig.preset("v9")


def test_config_is_frozen():
    with pytest.raises(Exception):
        sve.SparseVLMConfig().budget = 3


def test_default_pruning_layers():
    assert default_pruning_layers(32) == (2, 6, 15)
    assert default_pruning_layers(8) == (1, 2, 4)
    assert default_pruning_layers(40) == (2, 8, 19)
    assert default_pruning_layers(32, V1_LAYERS) == (2, 6, 15, 19)
    assert default_pruning_layers(8, V1_LAYERS) == (1, 2, 4, 5)


def test_v1_prunes_at_four_layers_by_default():
    assert sve.SparseVLMConfig.v1_rank(128).reference_layers == (2, 6, 15, 19)
    assert sve.SparseVLMConfig.v1_5(128).reference_layers == sve.SparseVLMConfig.v2(128).reference_layers == (2, 6, 15)
    model = tiny_llava("sdpa", layers=32)
    sve.sparsify(model, sve.SparseVLMConfig.v1_rank(128))
    with torch.no_grad():
        model(**llava_prompts(before=(3,), after=(5,)))
    assert [r.layer for r in sve.last_trace(model).samples[0].pruning] == [2, 6, 15, 19]
    sve.unsparsify(model)


def test_position_modes_follow_the_presets():
    assert sve.SparseVLMConfig.v1_rank(128).positions == "renumber"
    assert sve.SparseVLMConfig.v1_5(128).positions == "renumber"
    assert sve.SparseVLMConfig.v2(128).positions == "original"
    assert sve.SparseVLMConfig().positions == "renumber"  # the v1.5 schedule
    assert sve.SparseVLMConfig(schedule="v2.0").positions == "original"
    assert sve.SparseVLMConfig.v2(128, positions="renumber").positions == "renumber"
    assert sve.SparseVLMConfig.v1_5(128, positions="original").positions == "original"
    for bad in ("renumbered", 1, True):
        with pytest.raises(ValueError, match="positions must be one of"):
            sve.SparseVLMConfig(positions=bad)


def test_v1_5_has_the_budget_96_counts_of_the_v2_0_codes_v1_5_mode():
    assert SCHEDULE_TABLES["v1.5"][96] == (238, 48, 26)
    assert derive_schedule(96, "v1.5") == (238, 48, 26)
    with pytest.raises(ValueError):
        default_pruning_layers(2)


def test_published_tables_are_returned_as_is():
    for table, entries in SCHEDULE_TABLES.items():
        for budget, counts in entries.items():
            assert derive_schedule(budget, table) == counts


@pytest.mark.parametrize("table", ["v1.5", "v2.0"])
@pytest.mark.parametrize("budget", [80, 100, 150, 256])
def test_derived_schedules_average_to_the_budget(table, budget):
    counts = derive_schedule(budget, table)
    assert list(counts) == sorted(counts, reverse=True)
    assert layer_averaged_tokens(counts) == pytest.approx(budget, abs=1.0)


def test_too_small_budget_raises():
    with pytest.raises(ValueError, match="below"):
        derive_schedule(40, "v1.5")


def test_scaling_and_depth_adaptation():
    assert scale_count(303, 2880) == 1515
    assert scale_count(17, 20) == 1
    assert schedule_counts(128, "v1.5", 2) == (110, 36)
    assert schedule_counts(128, "v1.5", 4) == (303, 110, 36, 36)


def test_flops_formulas():
    dims = DecoderDims(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, depth=2)
    assert layer_macs_paper(3, dims) == 4 * 3 * 64 + 2 * 9 * 8 + 3 * 3 * 8 * 16
    # q, o: 3*8*8 each; k, v: 3*8*4 each; attention 2*4*3*4; mlp 3*3*8*16 -- all MACs, times 2
    assert layer_flops_exact(3, dims) == 2 * (2 * 192 + 2 * 96 + 2 * 4 * 12 + 1152)
    report = prefill_flops(10, (4, 2), dims, pruning=5.0)
    assert report.dense_paper == 2 * layer_macs_paper(10, dims)
    assert report.sparse_paper == layer_macs_paper(10, dims) + layer_macs_paper(8, dims)
    assert report.reduction_exact == pytest.approx(1 - (report.sparse_exact + 5.0) / report.dense_exact)


def test_llava_dense_flops_near_the_papers():
    """4.62 TFLOPs dense in the paper's Table 1 for LLaVA-1.5-7B (576 visual + ~60 text tokens)."""
    report = prefill_flops(576 + 100, (576,) * 32, DecoderDims.llava_1_5_7b(), 0.0)
    assert 4.0e12 < report.dense_paper < 5.0e12


def test_keep_fraction_is_a_budget_of_576():
    quarter = sve.SparseVLMConfig.v1_5(keep_fraction=0.25)
    assert quarter.schedule_budget == 144 and quarter.prunes
    assert sve.SparseVLMConfig.v2(keep_fraction=128 / 576).schedule_budget == 128
    assert not sve.SparseVLMConfig.v1_5(keep_fraction=1.0).prunes
    assert sve.SparseVLMConfig.v1_5(64).schedule_budget == 64


# ---------------------------------------------------------------- field types, one rule per kind

INT_FIELDS = ("budget", "cluster_divisor", "reference_visual_tokens", "keep_counts", "pruning_layers")
NUMBER_FIELDS = ("keep_fraction", "rank_scale", "rank_bias", "recycle_ratio", "priority_head_fraction")


def _with_field(name, value):
    """Config kwargs setting `name` to value (the last element of the tuple fields), valid otherwise."""
    if name in ("keep_counts", "pruning_layers"):
        return {"keep_counts": (300, 100), "pruning_layers": (2, 6), name: (300 if name == "keep_counts" else 2, value)}
    if name in ("rank_scale", "rank_bias"):
        return {"mode": "rank", "rank_scale": 1.0, "rank_bias": 1.0, name: value}
    return {name: value}


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [2.7, 128.0, True, False, "3", None])
def test_integer_fields_take_ints_only(name, value):
    with pytest.raises(ValueError, match=r"^" + name + r"(\[1\])? must be an int, got "):
        sve.SparseVLMConfig(**_with_field(name, value))


@pytest.mark.parametrize("name", INT_FIELDS)
def test_integer_fields_take_numpy_ints_as_ints(name):
    config = sve.SparseVLMConfig(**_with_field(name, np.int64(64)))
    value = getattr(config, name)
    last = value[-1] if isinstance(value, tuple) else value
    assert last == 64 and type(last) is int


@pytest.mark.parametrize("name", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, "0.5"])
def test_number_fields_take_finite_numbers_only(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got "):
        sve.SparseVLMConfig(**_with_field(name, value))


@pytest.mark.parametrize("name", ["recycling", "priority_heads", "rope_gravity"])
@pytest.mark.parametrize("value", [1, 0, "no", None])
def test_flags_take_bools_only(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be True or False, got "):
        sve.SparseVLMConfig(**{name: value})


def test_rank_scale_infinite_or_nan_from_the_preset_is_rejected():
    for scale in (math.inf, math.nan):
        with pytest.raises(ValueError, match="rank_scale must be a finite number"):
            sve.SparseVLMConfig.v1_rank(100, scale=scale, bias=0.0)


def test_every_message_is_one_line_naming_the_field():
    cases = [({"cluster_divisor": 1}, "cluster_divisor"), ({"pruning_layers": (2.7,)}, "pruning_layers"),
             ({"keep_counts": (600, 700, 800)}, "keep_counts"), ({"keep_fraction": 0.05}, "keep_fraction"),
             ({"budget": 128.0}, "budget"), ({"recycle_ratio": math.nan}, "recycle_ratio")]
    for kwargs, field in cases:
        with pytest.raises(ValueError) as info:
            sve.SparseVLMConfig(**kwargs)
        message = str(info.value)
        assert message.startswith(field) and "\n" not in message


def test_explicit_counts_prune_whatever_the_budget():
    assert sve.SparseVLMConfig(budget=576, keep_counts=(100,), pruning_layers=(2,)).prunes
    assert sve.SparseVLMConfig.v1_rank(600, scale=1.0, bias=1.0).prunes
    assert not sve.SparseVLMConfig.v1_rank(600).prunes and not sve.SparseVLMConfig.v1_5(576).prunes


# ---------------------------------------------------------------- boundaries that are accepted run

def _pruned_generate(config):
    """Visual tokens left after each pruning layer [[n, ...]] of a sparse 2-token generate on a tiny
    LLaVA (64 visual tokens, 8 layers, pruning layers 1 / 2 / 4 unless the config names others)."""
    model = tiny_llava(seed=3)
    inputs = llava_prompts()
    sve.sparsify(model, config)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)
    trace = sve.last_trace(model)
    return [[r.visual_after for r in s.pruning] for s in trace.samples]


@pytest.mark.parametrize("config", [
    sve.SparseVLMConfig.v1_5(55),
    sve.SparseVLMConfig.v2(55),
    sve.SparseVLMConfig.v1_5(575),
    sve.SparseVLMConfig.v1_5(keep_fraction=0.0954),
    sve.SparseVLMConfig.v1_5(128, cluster_divisor=2, recycle_ratio=1.0),
    sve.SparseVLMConfig.v1_5(128, recycle_ratio=1e-9),
    sve.SparseVLMConfig.v2(128, priority_head_fraction=1e-9),
    sve.SparseVLMConfig.v1_rank(100, scale=1e-9, bias=0.0),
    sve.SparseVLMConfig.v1_rank(100, scale=1e9, bias=-5.0),
    sve.SparseVLMConfig(keep_counts=(575,), pruning_layers=(0,), recycling=False),
    sve.SparseVLMConfig(keep_counts=(1, 1), pruning_layers=(1, 6)),
    sve.SparseVLMConfig(keep_counts=(36, 36, 36)),
], ids=["v1.5-55", "v2-55", "v1.5-575", "fraction-0.0954", "divisor-2-ratio-1", "ratio-1e-9", "heads-1e-9",
        "rank-scale-1e-9", "rank-scale-1e9", "counts-575", "counts-1-layer-6", "counts-equal"])
def test_accepted_boundary_configs_run_a_pruned_generate(config):
    after = _pruned_generate(config)
    assert len(after) == 1 and after[0] and all(1 <= n <= 64 for n in after[0])


def test_cluster_divisor_two_recycles_at_most_one_cluster_per_candidate():
    after = _pruned_generate(sve.SparseVLMConfig.v1_5(128, cluster_divisor=2, recycle_ratio=1.0))
    assert after[0] == sorted(after[0], reverse=True) and after[0][-1] < 64


@pytest.mark.parametrize("accepted, rejected", [
    ({"budget": 55}, {"budget": 54}),
    ({"keep_fraction": 0.0954}, {"keep_fraction": 0.0953}),
    ({"keep_counts": (575,), "pruning_layers": (2,)}, {"keep_counts": (576,), "pruning_layers": (2,)}),
    ({"keep_counts": (100, 100), "pruning_layers": (2, 6)}, {"keep_counts": (100, 101), "pruning_layers": (2, 6)}),
    ({"keep_counts": (30, 20, 10)}, {"keep_counts": (40, 30, 20, 10)}),
    ({"cluster_divisor": 2}, {"cluster_divisor": 1}),
    ({"recycle_ratio": 1.0}, {"recycle_ratio": 1.0000001}),
    ({"priority_head_fraction": 1.0}, {"priority_head_fraction": 1.0000001}),
    ({"mode": "rank", "rank_scale": 1e-300, "rank_bias": 0.0}, {"mode": "rank", "rank_scale": 0.0, "rank_bias": 0.0}),
    ({"reference_visual_tokens": 2, "budget": 1, "keep_counts": (1,)}, {"reference_visual_tokens": 1}),
])
def test_first_value_past_each_boundary_raises(accepted, rejected):
    sve.SparseVLMConfig(**accepted)
    with pytest.raises(ValueError):
        sve.SparseVLMConfig(**rejected)
