"""Uncertainty of the accuracy lab's figures: Wilson intervals, McNemar's exact test, paired bootstrap."""
from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / total."""
    if total == 0:
        raise ValueError("a proportion of zero trials has no interval")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: binomial(n, 1/2) tail, doubled."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap_ratio(method: torch.Tensor, reference: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> tuple[list[float], list[float]]:
    """95% percentile interval of accuracy(method) / accuracy(reference) over questions resampled in pairs.

    method [M, N] and reference [N] are bool (M methods, N questions); returns the [M] lower and upper bounds.
    """
    generator = torch.Generator().manual_seed(seed)
    n = reference.shape[0]
    picks = torch.randint(0, n, (resamples, n), generator=generator)
    ref = reference.float()[picks].mean(-1)                       # [R]
    ratios = method.float()[:, picks].mean(-1) / ref.clamp(min=1 / n)  # [M, R]
    bounds = torch.quantile(ratios, torch.tensor([0.025, 0.975]), dim=-1)  # [2, M]
    return bounds[0].tolist(), bounds[1].tolist()
