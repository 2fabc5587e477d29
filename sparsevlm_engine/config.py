"""SparseVLMConfig: what to prune, where and how much (frozen, validated on creation)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .schedule import RANK_COEFFICIENTS, SCHEDULE_TABLES, derive_schedule

MODES = ("schedule", "rank")
PRESETS = ("v1", "v1.5", "v2")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SparseVLMConfig:
    """How SparseVLM prunes visual tokens inside the decoder.

    budget: target visual tokens, expressed for LLaVA-1.5's 576 visual tokens; a sample with
        n_v visual tokens gets every count scaled by n_v / 576. A budget >= 576 prunes nothing.
    keep_fraction: instead of budget, the share of each sample's visual tokens to keep on
        average over the layers (schedule mode): 0.25 keeps what budget 144 keeps of 576 tokens,
        whatever the sample's count (a Qwen2-VL image of any size). 1.0 prunes nothing.
    mode: "schedule" (fixed counts after each pruning layer, v1.5 / v2.0) or "rank" (v1:
        keep = int(rank(P) * rank_scale + rank_bias)).
    schedule: "v1.5" or "v2.0", the published table the counts come from (schedule mode).
    keep_counts: explicit counts after each pruning layer for 576 visual tokens; overrides the
        table.
    pruning_layers: 0-indexed decoder layers whose output is pruned; None derives
        round(l * depth / 32) for l in (2, 6, 15).
    recycling: merge part of the pruned tokens back (DPC-kNN + mean) instead of dropping them.
    priority_heads: average relevance only over the top round(priority_head_fraction * H) heads.
    rope_gravity: divide attention probabilities by the RoPE gravity g(i - j).
    backend: "auto" (Triton for CUDA tensors when available, else the torch reference),
        "torch" or "triton".
    """

    budget: int = 128
    keep_fraction: float | None = None
    mode: str = "schedule"
    schedule: str = "v1.5"
    keep_counts: tuple[int, ...] | None = None
    rank_scale: float | None = None
    rank_bias: float | None = None
    pruning_layers: tuple[int, ...] | None = None
    recycling: bool = True
    recycle_ratio: float = 0.3
    cluster_divisor: int = 10
    priority_heads: bool = False
    priority_head_fraction: float = 0.4375
    rope_gravity: bool = False
    reference_visual_tokens: int = 576
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ValueError(f"budget must be an int, got {self.budget!r}")
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.keep_fraction is not None:
            if isinstance(self.keep_fraction, bool) or not 0.0 < float(self.keep_fraction) <= 1.0:
                raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
            if self.mode != "schedule":
                raise ValueError("keep_fraction needs schedule mode: rank mode's coefficients are published per budget")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULE_TABLES:
            raise ValueError(f"schedule must be one of {tuple(SCHEDULE_TABLES)}, got {self.schedule!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.keep_counts is not None:
            object.__setattr__(self, "keep_counts", tuple(int(c) for c in self.keep_counts))
            if not self.keep_counts or any(c < 1 for c in self.keep_counts):
                raise ValueError(f"keep_counts must be positive, got {self.keep_counts}")
        if self.pruning_layers is not None:
            layers = tuple(int(x) for x in self.pruning_layers)
            object.__setattr__(self, "pruning_layers", layers)
            if not layers or any(x < 0 for x in layers) or list(layers) != sorted(set(layers)):
                raise ValueError(f"pruning_layers must be distinct, ascending and >= 0, got {layers}")
        if self.keep_counts is not None and self.pruning_layers is not None:
            if len(self.keep_counts) != len(self.pruning_layers):
                raise ValueError(
                    f"keep_counts has {len(self.keep_counts)} entries but pruning_layers has "
                    f"{len(self.pruning_layers)}"
                )
        if self.mode == "rank":
            if (self.rank_scale is None) != (self.rank_bias is None):
                raise ValueError("rank mode needs both rank_scale and rank_bias, or neither")
            if self.rank_scale is None and self.budget < self.reference_visual_tokens:
                if self.budget not in RANK_COEFFICIENTS:
                    raise ValueError(
                        f"rank mode has published coefficients for budgets {sorted(RANK_COEFFICIENTS)}; "
                        f"got budget {self.budget}: pass rank_scale and rank_bias"
                    )
        if self.mode == "schedule" and self.keep_counts is None and self.prunes:
            derive_schedule(self.schedule_budget, self.schedule)  # raises for a budget no schedule can reach
        if not 0.0 < self.recycle_ratio <= 1.0:
            raise ValueError(f"recycle_ratio must be in (0, 1], got {self.recycle_ratio}")
        if self.cluster_divisor < 1:
            raise ValueError(f"cluster_divisor must be >= 1, got {self.cluster_divisor}")
        if not 0.0 < self.priority_head_fraction <= 1.0:
            raise ValueError(f"priority_head_fraction must be in (0, 1], got {self.priority_head_fraction}")
        if self.reference_visual_tokens < 1:
            raise ValueError("reference_visual_tokens must be >= 1")

    @property
    def prunes(self) -> bool:
        """False when the budget covers every visual token (the model then runs dense)."""
        return self.schedule_budget < self.reference_visual_tokens

    @property
    def schedule_budget(self) -> float:
        """The budget in visual tokens of 576: budget, or keep_fraction * 576."""
        if self.keep_fraction is None:
            return self.budget
        return round(float(self.keep_fraction) * self.reference_visual_tokens, 6)

    @property
    def rank_coefficients(self) -> tuple[float, float]:
        """(scale, bias) of rank mode."""
        if self.rank_scale is not None:
            return float(self.rank_scale), float(self.rank_bias)
        return RANK_COEFFICIENTS[self.budget]

    def with_(self, **changes) -> "SparseVLMConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def v1_rank(cls, budget: int = 128, scale: float | None = None, bias: float | None = None, **kw):
        """SparseVLM v1: rank-adaptive counts, recycling on."""
        kw.setdefault("recycling", True)
        return cls(budget=budget, mode="rank", rank_scale=scale, rank_bias=bias, **kw)

    @classmethod
    def v1_5(cls, budget: int = 128, **kw):
        """SparseVLM v1.5: the v1.5 schedule table, recycling on."""
        kw.setdefault("recycling", True)
        return cls(budget=budget, mode="schedule", schedule="v1.5", **kw)

    @classmethod
    def v2(cls, budget: int = 128, **kw):
        """SparseVLM+ (v2.0): the v2.0 table, priority heads and RoPE gravity on, recycling off."""
        kw.setdefault("priority_heads", True)
        kw.setdefault("rope_gravity", True)
        kw.setdefault("recycling", False)
        return cls(budget=budget, mode="schedule", schedule="v2.0", **kw)

    @classmethod
    def preset(cls, name: str, budget: int = 128, **kw) -> "SparseVLMConfig":
        """Build a preset by name: "v1", "v1.5" or "v2"."""
        builders = dict(zip(PRESETS, (cls.v1_rank, cls.v1_5, cls.v2)))
        if name not in builders:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return builders[name](budget, **kw)
