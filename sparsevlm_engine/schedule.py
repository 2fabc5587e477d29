"""Where to prune and how many visual tokens to keep (SPARSEVLM.md section 3)."""
from __future__ import annotations

import torch

REFERENCE_DEPTH = 32
REFERENCE_LAYERS = (2, 6, 15)
V1_LAYERS = (2, 6, 15, 19)  # the authors' v1 code prunes a fourth time
REFERENCE_VISUAL = 576

# Visual tokens kept after layers 2 / 6 / 15 for 576 visual tokens, by budget.
SCHEDULE_TABLES: dict[str, dict[int, tuple[int, int, int]]] = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}

# Rank mode (v1): keep = int(rank * scale + bias), by budget.
RANK_COEFFICIENTS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}


def default_pruning_layers(depth: int, reference: tuple[int, ...] = REFERENCE_LAYERS) -> tuple[int, ...]:
    """round(l * depth / 32) for l in reference ((2, 6, 15), or V1_LAYERS for v1), deduplicated,
    each >= 1 and < depth - 1."""
    if depth < 3:
        raise ValueError(f"a decoder needs at least 3 layers to be pruned, got {depth}")
    layers = sorted({min(max(1, round(l * depth / REFERENCE_DEPTH)), depth - 2) for l in reference})
    return tuple(layers)


def layer_averaged_tokens(counts: tuple[int, ...], layers=REFERENCE_LAYERS, depth=REFERENCE_DEPTH,
                          n_visual: int = REFERENCE_VISUAL) -> float:
    """Mean over all decoder layers of the visual tokens entering each layer (no recycling)."""
    entering = []
    current = n_visual
    boundaries = dict(zip(layers, counts))
    for layer in range(depth):
        entering.append(current)
        if layer in boundaries:
            current = min(current, boundaries[layer])
    return sum(entering) / depth


def derive_schedule(budget: int, table: str) -> tuple[int, int, int]:
    """Counts after layers 2 / 6 / 15 (576 tokens, 32 layers) for a budget missing from the table.

    The shape (ratios between the three counts) is taken from the table entry with the nearest
    budget; it is scaled by alpha so that the layer-averaged visual count entering the 32 layers,
    (3 * 576 + 4 * c1 + 9 * c2 + 16 * c3) / 32, equals the budget. Counts are rounded and kept in
    [1, 575]; a budget too small for the first three dense layers raises.
    """
    entries = SCHEDULE_TABLES[table]
    if budget in entries:
        return entries[budget]
    floor = layer_averaged_tokens((1, 1, 1))
    if budget < floor:
        raise ValueError(
            f"budget {budget} is below {floor:.1f}, the least a schedule pruning after layers 2/6/15 "
            f"of a 32-layer decoder can average"
        )
    nearest = min(entries, key=lambda b: (abs(b - budget), b))
    shape = entries[nearest]
    spans = (6 - 2, 15 - 6, REFERENCE_DEPTH - 1 - 15)
    dense_part = (REFERENCE_LAYERS[0] + 1) * REFERENCE_VISUAL
    alpha = (REFERENCE_DEPTH * budget - dense_part) / sum(s * c for s, c in zip(spans, shape))
    counts = [min(REFERENCE_VISUAL - 1, max(1, round(alpha * c))) for c in shape]
    for i in range(1, 3):
        counts[i] = min(counts[i], counts[i - 1])
    return tuple(counts)


def schedule_counts(budget: int, table: str, n_layers: int) -> tuple[int, ...]:
    """Counts for 576 visual tokens after each of n_layers pruning layers.

    The published tables have three stages; a decoder whose derived pruning layers collapse to
    fewer keeps the last counts (the deepest, smallest budgets).
    """
    counts = derive_schedule(budget, table)
    if n_layers >= len(counts):
        return counts + (counts[-1],) * (n_layers - len(counts))
    return counts[len(counts) - n_layers:]


def scale_count(count: int, n_visual, reference: int = REFERENCE_VISUAL):
    """A count given for `reference` visual tokens, scaled to n_visual (rounded half to even,
    at least 1). n_visual: an int, or a [B] tensor for per-sample counts."""
    if isinstance(n_visual, int):
        return max(1, round(count * n_visual / reference))
    return torch.round(n_visual.double() * count / reference).long().clamp(min=1)
