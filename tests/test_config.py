"""Config validation, presets, schedules and FLOPs accounting."""
import pytest

import sparsevlm_engine as sve
from sparsevlm_engine.accounting import DecoderDims, layer_flops_exact, layer_macs_paper, prefill_flops
from sparsevlm_engine.schedule import (SCHEDULE_TABLES, default_pruning_layers, derive_schedule,
                                       layer_averaged_tokens, scale_count, schedule_counts)


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
    ({"keep_fraction": 0.05}, "below 54.9"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
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
