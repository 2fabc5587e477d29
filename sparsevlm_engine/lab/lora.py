"""Low-rank adapters on a frozen decoder: trained through torch parametrizations, merged for inference."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LowRankDelta(nn.Module):
    """weight [O, I] -> weight + scale * up [O, r] @ down [r, I]; up starts at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.scale * self.up @ self.down

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def target_linears(decoder: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The decoder's linear layers whose attribute name is in targets, by qualified name."""
    found = {name: module for name, module in decoder.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not found:
        raise ValueError(f"no linear layer named any of {targets}")
    return found


def attach(decoder: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> dict[str, LowRankDelta]:
    """Parametrize the target layers with fresh adapters (for training); returns them by layer name."""
    adapters = {}
    for name, linear in target_linears(decoder, targets).items():
        adapter = LowRankDelta(linear.out_features, linear.in_features, rank, alpha)
        parametrize.register_parametrization(linear, "weight", adapter)
        adapters[name] = adapter
    return adapters


def detach_merged(decoder: nn.Module) -> None:
    """Fold every attached adapter into its weight and drop the parametrization."""
    for module in decoder.modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(False)


def adapter_state(adapters: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(a, part).detach().clone()
            for name, a in adapters.items() for part in ("down", "up")}


@torch.no_grad()
def merge(decoder: nn.Module, state: dict[str, torch.Tensor], targets: tuple[str, ...], rank: int,
          alpha: float) -> None:
    """Add saved adapters into the decoder's weights in place; every target layer must have one."""
    linears = target_linears(decoder, targets)
    expected = {f"{name}.{part}" for name in linears for part in ("down", "up")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter weights do not match the decoder: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, linear in linears.items():
        up, down = state[f"{name}.up"].float(), state[f"{name}.down"].float()
        if up.shape != (linear.out_features, rank) or down.shape != (rank, linear.in_features):
            raise ValueError(f"adapter {name}: shapes {tuple(up.shape)} / {tuple(down.shape)} do not fit")
        linear.weight += (alpha / rank * up @ down).to(linear.weight.dtype)
