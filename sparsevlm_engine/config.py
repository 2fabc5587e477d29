"""SparseVLMConfig: what to prune, where and how much (frozen, validated on creation)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

from .schedule import RANK_COEFFICIENTS, REFERENCE_LAYERS, SCHEDULE_TABLES, V1_LAYERS, derive_schedule

MODES = ("schedule", "rank")
PRESETS = ("v1", "v1.5", "v2")
BACKENDS = ("auto", "torch", "triton")
POSITIONS = ("renumber", "original")
SCHEDULES = tuple(SCHEDULE_TABLES)
MAX_DEFAULT_LAYERS = len(REFERENCE_LAYERS)  # default_pruning_layers gives at most one layer per stage
MIN_CLUSTER_DIVISOR = 2  # c = n_cand // divisor + 1 clusters must not exceed the n_cand candidates


def _integer(name: str, value) -> int:
    """value as an int; ValueError for bools, floats and anything else that is not an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def _integers(name: str, values) -> tuple[int, ...]:
    """values (a non-empty sequence of ints) as a tuple of ints."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    out = tuple(_integer(f"{name}[{i}]", v) for i, v in enumerate(values))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _finite(name: str, value) -> float:
    """value as a float; ValueError unless it is a finite real number (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _fraction(name: str, value) -> float:
    """value as a float in (0, 1]."""
    value = _finite(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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
    keep_counts: explicit counts after each pruning layer for 576 visual tokens (schedule mode,
        without keep_fraction); overrides the table. Each is below 576 and none exceeds the one
        before it; without pruning_layers there are at most 3.
    rank_scale, rank_bias: rank mode's coefficients (both or neither; scale > 0); without them
        the published ones for budget 192, 128 or 64.
    pruning_layers: 0-indexed decoder layers whose output is pruned; None derives
        round(l * depth / 32) for l in (2, 6, 15), or in (2, 6, 15, 19) in rank mode (v1).
    positions: "renumber" (the authors' v1 / v1.5 code: after each pruning layer the tokens left
        take position ids 0 .. L'-1, recycled tokens follow the kept visual tokens in centre-score
        order, and a generated token's position at a layer is that layer's cache length) or
        "original" (v2.0: every token keeps its position id, recycled tokens take their centre's,
        decoding continues at the unpruned length; only this mode equals a dense run with the
        pruned keys masked). None: "original" for the v2.0 schedule, else "renumber". On mRoPE
        models (Qwen2-VL) "renumber" keeps every token's 3-D ids and takes only the recycled
        tokens' placement (see README).
    recycling: merge part of the pruned tokens back (DPC-kNN + mean) instead of dropping them.
    recycle_ratio: the share of the pruned tokens that are recycling candidates, in (0, 1].
    cluster_divisor: candidates // cluster_divisor + 1 clusters; >= 2, so that there are never
        more clusters than candidates.
    priority_heads: average relevance only over the top round(priority_head_fraction * H) heads.
    rope_gravity: divide attention probabilities by the RoPE gravity g(i - j).
    reference_visual_tokens: the visual token count that budget and keep_counts are stated
        for (576).
    backend: "auto" (Triton for CUDA tensors when available, else the torch reference),
        "torch" or "triton".

    Integer fields take ints only (not bools or floats), number fields finite numbers, flags
    True or False; anything else raises ValueError naming the field.
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
    positions: str | None = None

    def __post_init__(self) -> None:
        self._check_kinds()
        self._check_ranges()
        if self.mode == "rank":
            self._check_rank()
        else:
            self._check_schedule()

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _check_kinds(self) -> None:
        """Types and choices of every field, normalised: ints, floats, tuples of ints."""
        for name in ("budget", "cluster_divisor", "reference_visual_tokens"):
            self._set(name, _integer(name, getattr(self, name)))
        for name in ("recycle_ratio", "priority_head_fraction"):
            self._set(name, _fraction(name, getattr(self, name)))
        optional = (("keep_counts", _integers), ("pruning_layers", _integers), ("keep_fraction", _fraction),
                    ("rank_scale", _finite), ("rank_bias", _finite))
        for name, check in optional:
            if getattr(self, name) is not None:
                self._set(name, check(name, getattr(self, name)))
        for name in ("recycling", "priority_heads", "rope_gravity"):
            _flag(name, getattr(self, name))
        _choice("mode", self.mode, MODES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("backend", self.backend, BACKENDS)
        if self.positions is None:
            self._set("positions", "original" if self.mode == "schedule" and self.schedule == "v2.0" else "renumber")
        _choice("positions", self.positions, POSITIONS)

    def _check_ranges(self) -> None:
        """Bounds that do not depend on the mode."""
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.cluster_divisor < MIN_CLUSTER_DIVISOR:
            raise ValueError(f"cluster_divisor must be >= {MIN_CLUSTER_DIVISOR} (candidates // cluster_divisor + 1 "
                             f"clusters must not outnumber the candidates), got {self.cluster_divisor}")
        if self.reference_visual_tokens < 2:
            raise ValueError(f"reference_visual_tokens must be >= 2, got {self.reference_visual_tokens}")
        layers = self.pruning_layers
        if layers is not None and (layers[0] < 0 or list(layers) != sorted(set(layers))):
            raise ValueError(f"pruning_layers must be distinct, ascending and >= 0, got {layers}")

    def _check_rank(self) -> None:
        if self.keep_fraction is not None:
            raise ValueError("keep_fraction needs schedule mode: rank mode's coefficients are published per budget")
        if self.keep_counts is not None:
            raise ValueError("keep_counts needs schedule mode: rank mode derives its counts from the rank")
        if (self.rank_scale is None) != (self.rank_bias is None):
            raise ValueError("rank mode needs both rank_scale and rank_bias, or neither")
        if self.rank_scale is not None and self.rank_scale <= 0:
            raise ValueError(f"rank_scale must be > 0, got {self.rank_scale}")
        if self.rank_scale is None and self.prunes and self.budget not in RANK_COEFFICIENTS:
            raise ValueError(
                f"rank mode has published coefficients for budgets {sorted(RANK_COEFFICIENTS)}; "
                f"got budget {self.budget}: pass rank_scale and rank_bias"
            )

    def _check_schedule(self) -> None:
        if self.rank_scale is not None or self.rank_bias is not None:
            raise ValueError("rank_scale and rank_bias need rank mode (mode='rank', the v1 preset)")
        if self.keep_counts is not None:
            self._check_keep_counts()
        elif self.prunes:
            counts = self._derived_counts()
            if max(counts) >= self.reference_visual_tokens:
                raise ValueError(f"budget {self.schedule_budget} gives the {self.schedule} counts {counts}, not all "
                                 f"below reference_visual_tokens {self.reference_visual_tokens}: pass keep_counts")

    def _derived_counts(self) -> tuple[int, ...]:
        """The schedule's counts for the budget; ValueError naming the field for one too small."""
        try:
            return derive_schedule(self.schedule_budget, self.schedule)
        except ValueError as e:
            if self.keep_fraction is None:
                raise
            raise ValueError(f"keep_fraction {self.keep_fraction} is too small: {e}") from None

    def _check_keep_counts(self) -> None:
        counts, layers = self.keep_counts, self.pruning_layers
        if self.keep_fraction is not None:
            raise ValueError("keep_counts and keep_fraction both set the counts: pass one of them")
        if any(c < 1 or c >= self.reference_visual_tokens for c in counts):
            raise ValueError(f"keep_counts must be in 1..{self.reference_visual_tokens - 1} (below "
                             f"reference_visual_tokens, or nothing is pruned), got {counts}")
        if any(b > a for a, b in zip(counts, counts[1:])):
            raise ValueError(f"keep_counts must not increase from one pruning layer to the next, got {counts}")
        if layers is not None and len(counts) != len(layers):
            raise ValueError(f"keep_counts has {len(counts)} entries but pruning_layers has {len(layers)}")
        if layers is None and len(counts) > MAX_DEFAULT_LAYERS:
            raise ValueError(f"keep_counts has {len(counts)} entries but the default pruning layers are at most "
                             f"{MAX_DEFAULT_LAYERS}: pass pruning_layers too")

    @property
    def prunes(self) -> bool:
        """False when the budget covers every visual token (the model then runs dense).

        Explicit counts (keep_counts, or rank_scale and rank_bias) always prune.
        """
        if self.keep_counts is not None or self.rank_scale is not None:
            return True
        return self.schedule_budget < self.reference_visual_tokens

    @property
    def reference_layers(self) -> tuple[int, ...]:
        """The default pruning layers of a 32-layer decoder: (2, 6, 15, 19) for v1 (rank mode),
        else (2, 6, 15)."""
        return V1_LAYERS if self.mode == "rank" else REFERENCE_LAYERS

    @property
    def schedule_budget(self) -> float:
        """The budget in visual tokens of 576: budget, or keep_fraction * 576."""
        if self.keep_fraction is None:
            return self.budget
        return round(self.keep_fraction * self.reference_visual_tokens, 6)

    @property
    def rank_coefficients(self) -> tuple[float, float]:
        """(scale, bias) of rank mode."""
        if self.rank_scale is not None:
            return self.rank_scale, self.rank_bias
        return RANK_COEFFICIENTS[self.budget]

    def with_(self, **changes) -> "SparseVLMConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def v1_rank(cls, budget: int = 128, scale: float | None = None, bias: float | None = None, **kw):
        """SparseVLM v1: rank-adaptive counts at layers 2 / 6 / 15 / 19, recycling on, renumbered positions."""
        kw.setdefault("recycling", True)
        kw.setdefault("positions", "renumber")
        return cls(budget=budget, mode="rank", rank_scale=scale, rank_bias=bias, **kw)

    @classmethod
    def v1_5(cls, budget: int = 128, **kw):
        """SparseVLM v1.5: the v1.5 schedule table, recycling on, renumbered positions."""
        kw.setdefault("recycling", True)
        kw.setdefault("positions", "renumber")
        return cls(budget=budget, mode="schedule", schedule="v1.5", **kw)

    @classmethod
    def v2(cls, budget: int = 128, **kw):
        """SparseVLM+ (v2.0): the v2.0 table, priority heads and RoPE gravity on, recycling off,
        original positions."""
        kw.setdefault("priority_heads", True)
        kw.setdefault("positions", "original")
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
